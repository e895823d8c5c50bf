/* Split virtqueue, device side. Everything read from guest memory is copied once
 * and validated on the copy: the driver may rewrite the ring under our feet. */
#include <errno.h>
#include <string.h>

#include "dataplane.h"

#define DESC_SIZE sizeof(struct vring_desc)

void dp_vq_init(struct dp_vq *vq, struct dp_iotlb *tlb, uint16_t num, uint64_t desc,
                uint64_t avail, uint64_t used, uint16_t last_avail_idx, bool event_idx)
{
    memset(vq, 0, sizeof(*vq));
    vq->tlb = tlb;
    vq->num = num;
    vq->desc_iova = desc;
    vq->avail_iova = avail;
    vq->used_iova = used;
    vq->last_avail_idx = last_avail_idx;
    vq->used_idx = last_avail_idx;
    vq->event_idx = event_idx;
    vq->tlb_gen = tlb->gen - 1;  /* forces a first dp_vq_map_rings */
}

static bool failed_before(const struct dp_vq *vq, uint64_t iova)
{
    for (unsigned i = 0; i < vq->nfailed; i++)
        if (vq->failed[i] == iova)
            return true;
    return false;
}

/* The start of [iova, iova + len) and, in *avail, how much of it one mapping holds.
 * A miss the kernel may still resolve sets *err to DP_POP_FAULT; a miss it already
 * refused (or too many of them for one chain) is final. */
static uint8_t *translate(struct dp_vq *vq, uint64_t iova, uint64_t len, uint8_t perm,
                          uint64_t *avail, int *err)
{
    bool miss;
    uint8_t *p = dp_iotlb_lookup(vq->tlb, iova, len, perm, avail, &miss);
    if (!p && miss && !failed_before(vq, iova) && vq->nfailed < DP_FAILED_IOVAS) {
        vq->fault_iova = iova;
        *err = DP_POP_FAULT;
    }
    return p;
}

/* Like translate, for what must be contiguous in this process (rings, descriptors). */
static uint8_t *translate_all(struct dp_vq *vq, uint64_t iova, uint64_t len, uint8_t perm,
                              int *err)
{
    uint64_t avail;
    uint8_t *p = translate(vq, iova, len, perm, &avail, err);
    return p && avail == len ? p : NULL;
}

static void set_broken(struct dp_vq *vq, enum dp_broken why, uint16_t head)
{
    if (!vq->broken) {
        vq->broken = (uint8_t)why;
        vq->broken_head = head;
    }
}

/* Caller holds the IOTLB read lock. 0, DP_POP_FAULT or DP_POP_BROKEN. */
int dp_vq_map_rings(struct dp_vq *vq)
{
    int err = DP_POP_BROKEN;
    uint64_t n = vq->num;
    if (vq->tlb_gen == vq->tlb->gen)
        return 0;
    if (n == 0 || n > DP_MAX_QUEUE_SIZE || (n & (n - 1))) {
        set_broken(vq, DP_BROKEN_RING, 0);
        return DP_POP_BROKEN;
    }
    /* The event index fields are always part of the ring's memory. */
    vq->desc = (void *)translate_all(vq, vq->desc_iova, n * DESC_SIZE, DP_PERM_READ, &err);
    if (!vq->desc)
        goto fail;
    vq->avail = (void *)translate_all(vq, vq->avail_iova, 6 + 2 * n, DP_PERM_READ, &err);
    if (!vq->avail)
        goto fail;
    vq->used = (void *)translate_all(vq, vq->used_iova, 6 + 8 * n,
                                     DP_PERM_READ | DP_PERM_WRITE, &err);
    if (!vq->used)
        goto fail;
    dp_iotlb_pin(vq->tlb, vq->desc_iova);
    dp_iotlb_pin(vq->tlb, vq->avail_iova);
    dp_iotlb_pin(vq->tlb, vq->used_iova);
    vq->tlb_gen = vq->tlb->gen;
    return 0;
fail:
    if (err == DP_POP_BROKEN)
        set_broken(vq, DP_BROKEN_RING, 0);
    return err;
}

static uint16_t avail_idx(const struct dp_vq *vq)
{
    return __atomic_load_n(&vq->avail->idx, __ATOMIC_ACQUIRE);
}

/* Where descriptors are read from: the ring's table, or one indirect table. An
 * indirect table that straddles mappings is read one descriptor at a time. */
struct desc_src {
    const struct vring_desc *table;  /* NULL: translate each entry at iova */
    uint64_t iova;
    uint32_t size;
    bool indirect;
};

static bool load_desc(struct dp_vq *vq, const struct desc_src *src, uint32_t i,
                      struct vring_desc *d, int *err)
{
    const volatile struct vring_desc *v = src->table ? &src->table[i] : NULL;
    if (!v) {
        v = (const void *)translate_all(vq, src->iova + (uint64_t)i * DESC_SIZE, DESC_SIZE,
                                        DP_PERM_READ, err);
        if (!v)
            return false;
    }
    d->addr = v->addr;
    d->len = v->len;
    d->flags = v->flags;
    d->next = v->next;
    return true;
}

static bool valid_indirect(const struct desc_src *src, const struct vring_desc *d,
                           uint32_t seen)
{
    return !src->indirect && seen == 1 && !(d->flags & VRING_DESC_F_NEXT) && d->len &&
           d->len % DESC_SIZE == 0 && d->len / DESC_SIZE <= DP_MAX_DESCS &&
           d->addr + (d->len - 1) >= d->addr;
}

static void open_indirect(struct dp_vq *vq, struct desc_src *src, const struct vring_desc *d,
                          int *err)
{
    src->indirect = true;
    src->iova = d->addr;
    src->size = d->len / DESC_SIZE;
    src->table = (void *)translate_all(vq, d->addr, d->len, DP_PERM_READ, err);
}

/* The status byte of a chain we refuse: the last byte of its last descriptor, when
 * that descriptor is device-writable and mapped. A bounded walk that checks nothing
 * else; NULL when the chain has no such byte (a loop, an index out of range). */
static uint8_t *find_status(struct dp_vq *vq, uint16_t head, int *err)
{
    struct desc_src src = {.table = vq->desc, .size = vq->num};
    uint32_t idx = head, seen = 0;
    struct vring_desc d;
    for (;;) {
        if (!load_desc(vq, &src, idx, &d, err) || ++seen > src.size)
            return NULL;
        if (d.flags & VRING_DESC_F_INDIRECT) {
            if (!valid_indirect(&src, &d, seen))
                return NULL;
            open_indirect(vq, &src, &d, err);
            if (*err == DP_POP_FAULT)
                return NULL;
            idx = seen = 0;
            continue;
        }
        if (!(d.flags & VRING_DESC_F_NEXT))
            break;
        idx = d.next;
        if (idx >= src.size)
            return NULL;
    }
    if (!(d.flags & VRING_DESC_F_WRITE) || d.len == 0 || d.addr + (d.len - 1) < d.addr)
        return NULL;
    return translate_all(vq, d.addr + (d.len - 1), 1, DP_PERM_WRITE, err);
}

/* A chain we refuse completes with IOERR in its real status byte; without one, the
 * request cannot be answered and the queue stops (the caller reports why). */
static int chain_fail(struct dp_vq *vq, struct dp_chain *c)
{
    int err = DP_POP_OK;
    c->bad = true;
    c->status = find_status(vq, c->head, &err);
    if (err == DP_POP_FAULT)
        return err;
    if (!c->status) {
        set_broken(vq, DP_BROKEN_NO_STATUS, c->head);
        return DP_POP_BROKEN;
    }
    return DP_POP_OK;
}

static int add_buffer(struct dp_vq *vq, struct dp_chain *c, const struct vring_desc *d,
                      bool write)
{
    uint8_t perm = write ? DP_PERM_WRITE : DP_PERM_READ;
    uint64_t addr = d->addr, left = d->len;
    int err = DP_POP_OK;
    if (addr + (left - 1) < addr)
        return chain_fail(vq, c);
    while (left) {
        uint64_t got;
        uint8_t *p = translate(vq, addr, left, perm, &got, &err);
        if (!p)
            return err == DP_POP_FAULT ? err : chain_fail(vq, c);
        if (c->nsegs == c->max_segs)
            return chain_fail(vq, c);
        c->segs[c->nsegs++] = (struct dp_seg){p, (uint32_t)got, write};
        addr += got;
        left -= got;
    }
    if (write)
        c->in_len += d->len;
    else
        c->out_len += d->len;
    return DP_POP_OK;
}

static int walk_chain(struct dp_vq *vq, uint16_t head, struct dp_chain *c)
{
    struct desc_src src = {.table = vq->desc, .size = vq->num};
    uint32_t idx = head, seen = 0;
    int err = DP_POP_OK, r;

    c->head = head;
    c->bad = c->poisoned = false;
    c->nsegs = c->ndescs = 0;
    c->out_len = c->in_len = 0;
    c->status = NULL;
    for (;;) {
        struct vring_desc d;
        if (!load_desc(vq, &src, idx, &d, &err))
            return err == DP_POP_FAULT ? err : chain_fail(vq, c);
        if (++seen > src.size)
            return chain_fail(vq, c);  /* a loop */
        if (d.flags & VRING_DESC_F_INDIRECT) {
            if (!valid_indirect(&src, &d, seen))
                return chain_fail(vq, c);
            open_indirect(vq, &src, &d, &err);
            if (err == DP_POP_FAULT)
                return err;
            idx = seen = 0;
            continue;
        }
        bool write = d.flags & VRING_DESC_F_WRITE;
        if (d.len == 0 || (!write && c->in_len) || c->ndescs == c->max_descs)
            return chain_fail(vq, c);
        c->ndescs++;
        if ((r = add_buffer(vq, c, &d, write)) != DP_POP_OK || c->bad)
            return r;
        if (!(d.flags & VRING_DESC_F_NEXT)) {
            if (!write)
                return chain_fail(vq, c);  /* no status byte */
            const struct dp_seg *last = &c->segs[c->nsegs - 1];
            c->status = last->addr + last->len - 1;
            return DP_POP_OK;
        }
        idx = d.next;
        if (idx >= src.size)
            return chain_fail(vq, c);
    }
}

int dp_vq_pop(struct dp_vq *vq, struct dp_chain *c)
{
    if (vq->broken)
        return DP_POP_BROKEN;
    uint16_t avail = avail_idx(vq);
    if (avail == vq->last_avail_idx)
        return DP_POP_EMPTY;
    if ((uint16_t)(avail - vq->last_avail_idx) > vq->num) {
        set_broken(vq, DP_BROKEN_RING, 0);
        return DP_POP_BROKEN;
    }
    uint16_t head = ((volatile uint16_t *)vq->avail->ring)[vq->last_avail_idx % vq->num];
    if (head >= vq->num) {
        set_broken(vq, DP_BROKEN_RING, head);
        return DP_POP_BROKEN;
    }
    c->avail_idx = vq->last_avail_idx;
    int ret = walk_chain(vq, head, c);
    if (ret != DP_POP_OK)
        return ret;
    vq->nfailed = 0;
    vq->last_avail_idx++;
    return DP_POP_OK;
}

/* Walks the chain of a head the in-flight log names (a request popped by an earlier
 * process and never completed), without touching last_avail_idx. */
int dp_vq_pop_head(struct dp_vq *vq, uint16_t head, struct dp_chain *c)
{
    if (vq->broken)
        return DP_POP_BROKEN;
    if (head >= vq->num) {
        set_broken(vq, DP_BROKEN_RING, head);
        return DP_POP_BROKEN;
    }
    c->avail_idx = 0;
    int ret = walk_chain(vq, head, c);
    if (ret == DP_POP_OK)
        vq->nfailed = 0;
    return ret;
}

/* Any order: for a worker whose in-flight log, not the used ring, records progress. */
void dp_vq_push_unordered(struct dp_vq *vq, const struct dp_chain *c, uint32_t len)
{
    struct vring_used_elem *e = &vq->used->ring[vq->used_idx % vq->num];
    e->id = c->head;
    e->len = len;
    vq->used_idx++;
    __atomic_store_n(&vq->used->idx, vq->used_idx, __ATOMIC_RELEASE);
}

/* Completions follow the avail ring's order, so that the used ring is the queue's
 * durable progress (dp_queue_resume relies on it). Anything else stops the queue. */
void dp_vq_push(struct dp_vq *vq, const struct dp_chain *c, uint32_t len)
{
    if (vq->broken == DP_BROKEN_ORDER)
        return;
    if (c->avail_idx != vq->used_idx) {
        vq->broken = DP_BROKEN_ORDER;
        vq->broken_head = c->head;
        return;
    }
    struct vring_used_elem *e = &vq->used->ring[vq->used_idx % vq->num];
    e->id = c->head;
    e->len = len;
    vq->used_idx++;
    __atomic_store_n(&vq->used->idx, vq->used_idx, __ATOMIC_RELEASE);
}

bool dp_vq_should_notify(struct dp_vq *vq)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (!vq->event_idx)
        return !(((volatile struct vring_avail *)vq->avail)->flags & VRING_AVAIL_F_NO_INTERRUPT);
    uint16_t old = vq->signalled_used, new = vq->used_idx;
    bool valid = vq->signalled_used_valid;
    vq->signalled_used = new;
    vq->signalled_used_valid = true;
    uint16_t used_event = ((volatile uint16_t *)vq->avail->ring)[vq->num];
    return !valid || vring_need_event(used_event, new, old);
}

void dp_vq_disable_notify(struct dp_vq *vq)
{
    /* With EVENT_IDX, an avail_event the driver has already passed means "no kick". */
    if (vq->event_idx)
        __atomic_store_n((uint16_t *)&vq->used->ring[vq->num], (uint16_t)(vq->last_avail_idx - 1),
                         __ATOMIC_RELAXED);
    else
        __atomic_store_n(&vq->used->flags, VRING_USED_F_NO_NOTIFY, __ATOMIC_RELAXED);
}

/* Re-arms kicks; true when the driver added work meanwhile, so the caller drains again. */
bool dp_vq_enable_notify(struct dp_vq *vq)
{
    if (vq->event_idx)
        __atomic_store_n((uint16_t *)&vq->used->ring[vq->num], vq->last_avail_idx,
                         __ATOMIC_RELAXED);
    else
        __atomic_store_n(&vq->used->flags, 0, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return !vq->broken && avail_idx(vq) != vq->last_avail_idx;
}
