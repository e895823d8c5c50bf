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

static uint8_t *translate(struct dp_vq *vq, uint64_t iova, uint64_t len, uint8_t perm, int *err)
{
    bool miss;
    uint8_t *p = dp_iotlb_lookup(vq->tlb, iova, len, perm, &miss);
    if (!p && miss && !vq->fault_final) {
        vq->fault_iova = iova;
        *err = DP_POP_FAULT;
    }
    return p;
}

/* Caller holds the IOTLB read lock. 0, DP_POP_FAULT or DP_POP_BROKEN. */
int dp_vq_map_rings(struct dp_vq *vq)
{
    int err = DP_POP_BROKEN;
    uint64_t n = vq->num;
    if (vq->tlb_gen == vq->tlb->gen)
        return 0;
    if (n == 0 || n > DP_MAX_QUEUE_SIZE || (n & (n - 1))) {
        vq->broken = true;
        return DP_POP_BROKEN;
    }
    /* The event index fields are always part of the ring's memory. */
    vq->desc = (void *)translate(vq, vq->desc_iova, n * DESC_SIZE, DP_PERM_READ, &err);
    if (!vq->desc)
        goto fail;
    vq->avail = (void *)translate(vq, vq->avail_iova, 6 + 2 * n, DP_PERM_READ, &err);
    if (!vq->avail)
        goto fail;
    vq->used = (void *)translate(vq, vq->used_iova, 6 + 8 * n, DP_PERM_READ | DP_PERM_WRITE, &err);
    if (!vq->used)
        goto fail;
    vq->tlb_gen = vq->tlb->gen;
    return 0;
fail:
    if (err == DP_POP_BROKEN)
        vq->broken = true;
    return err;
}

static uint16_t avail_idx(const struct dp_vq *vq)
{
    return __atomic_load_n(&vq->avail->idx, __ATOMIC_ACQUIRE);
}

static int chain_fail(struct dp_chain *c)
{
    c->bad = true;
    return DP_POP_OK;
}

static void read_desc(const struct vring_desc *table, uint32_t i, struct vring_desc *d)
{
    const volatile struct vring_desc *v = &table[i];
    d->addr = v->addr;
    d->len = v->len;
    d->flags = v->flags;
    d->next = v->next;
}

static int walk_chain(struct dp_vq *vq, uint16_t head, struct dp_chain *c)
{
    const struct vring_desc *table = vq->desc;
    uint32_t table_size = vq->num, idx = head, seen = 0;
    int err = DP_POP_OK;

    c->head = head;
    c->bad = false;
    c->nsegs = 0;
    c->out_len = c->in_len = 0;
    c->bad_status = NULL;
    for (;;) {
        struct vring_desc d;
        read_desc(table, idx, &d);
        if (++seen > table_size)
            return chain_fail(c);  /* a loop */
        if (d.flags & VRING_DESC_F_INDIRECT) {
            /* Only the head may point to an indirect table, which may not nest. */
            if (table != vq->desc || seen != 1 || (d.flags & VRING_DESC_F_NEXT) ||
                d.len == 0 || d.len % DESC_SIZE || d.len / DESC_SIZE > DP_MAX_SEGS)
                return chain_fail(c);
            table = (void *)translate(vq, d.addr, d.len, DP_PERM_READ, &err);
            if (!table)
                return err == DP_POP_FAULT ? err : chain_fail(c);
            table_size = d.len / DESC_SIZE;
            idx = 0;
            seen = 0;
            continue;
        }
        bool write = d.flags & VRING_DESC_F_WRITE;
        if (d.len == 0 || (!write && c->in_len) || c->nsegs == c->max_segs)
            return chain_fail(c);
        uint8_t *p = translate(vq, d.addr, d.len, write ? DP_PERM_WRITE : DP_PERM_READ, &err);
        if (!p)
            return err == DP_POP_FAULT ? err : chain_fail(c);
        c->segs[c->nsegs++] = (struct dp_seg){p, d.len, write};
        if (write) {
            c->in_len += d.len;
            c->bad_status = p + d.len - 1;
        } else {
            c->out_len += d.len;
        }
        if (!(d.flags & VRING_DESC_F_NEXT))
            return DP_POP_OK;
        idx = d.next;
        if (idx >= table_size)
            return chain_fail(c);
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
        vq->broken = true;
        return DP_POP_BROKEN;
    }
    uint16_t head = ((volatile uint16_t *)vq->avail->ring)[vq->last_avail_idx % vq->num];
    if (head >= vq->num) {
        vq->broken = true;
        return DP_POP_BROKEN;
    }
    int ret = walk_chain(vq, head, c);
    if (ret == DP_POP_FAULT)
        return ret;
    vq->last_avail_idx++;
    return DP_POP_OK;
}

void dp_vq_push(struct dp_vq *vq, uint16_t head, uint32_t len)
{
    struct vring_used_elem *e = &vq->used->ring[vq->used_idx % vq->num];
    e->id = head;
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
