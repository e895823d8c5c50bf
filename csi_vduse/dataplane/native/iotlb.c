#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>
#include <linux/vduse.h>

#include "dataplane.h"

int dp_iotlb_init(struct dp_iotlb *tlb, int dev_fd, unsigned capacity)
{
    pthread_rwlockattr_t attr;
    memset(tlb, 0, sizeof(*tlb));
    tlb->dev_fd = dev_fd;
    tlb->cap = capacity < DP_MIN_MAPS ? DP_MIN_MAPS : capacity;
    tlb->maps = calloc(tlb->cap, sizeof(*tlb->maps));
    if (!tlb->maps)
        return -ENOMEM;
    /* Workers take the read lock once per batch, all the time under load: without
     * writer preference an IOTLB update or a stop could wait as long as the load lasts. */
    pthread_rwlockattr_init(&attr);
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    int ret = -pthread_rwlock_init(&tlb->lock, &attr);
    pthread_rwlockattr_destroy(&attr);
    if (ret) {
        free(tlb->maps);
        tlb->maps = NULL;
    }
    return ret;
}

static void drop_map(struct dp_iotlb *tlb, unsigned i)
{
    struct dp_map *m = &tlb->maps[i];
    if (m->mmap_base)
        munmap(m->mmap_base, m->mmap_len);
    tlb->maps[i] = tlb->maps[--tlb->nmaps];
    tlb->gen++;
}

void dp_iotlb_destroy(struct dp_iotlb *tlb)
{
    dp_iotlb_invalidate(tlb, 0, UINT64_MAX);
    pthread_rwlock_destroy(&tlb->lock);
    free(tlb->maps);
    tlb->maps = NULL;
}

/* A queue engine holding the read lock across requests in flight (engine.c) sees
 * `writers` and drains, so that a writer never waits for more than the I/O in flight. */
static void write_lock(struct dp_iotlb *tlb)
{
    __atomic_add_fetch(&tlb->writers, 1, __ATOMIC_SEQ_CST);
    pthread_rwlock_wrlock(&tlb->lock);
    __atomic_sub_fetch(&tlb->writers, 1, __ATOMIC_SEQ_CST);
}

/* Adds a mapping that the caller owns (tests, or memory registered by the caller). */
int dp_iotlb_add(struct dp_iotlb *tlb, uint64_t start, uint64_t last, uint8_t *va, uint8_t perm)
{
    int ret = 0;
    if (last < start)
        return -EINVAL;
    write_lock(tlb);
    if (tlb->nmaps == tlb->cap)
        ret = -ENOSPC;
    else
        tlb->maps[tlb->nmaps++] = (struct dp_map){start, last, va, NULL, 0, perm, false};
    pthread_rwlock_unlock(&tlb->lock);
    return ret;
}

void dp_iotlb_invalidate(struct dp_iotlb *tlb, uint64_t start, uint64_t last)
{
    write_lock(tlb);
    for (unsigned i = 0; i < tlb->nmaps;) {
        struct dp_map *m = &tlb->maps[i];
        if (m->start <= last && start <= m->last)
            drop_map(tlb, i);
        else
            i++;
    }
    pthread_rwlock_unlock(&tlb->lock);
}

static struct dp_map *find(struct dp_iotlb *tlb, uint64_t iova)
{
    for (unsigned i = 0; i < tlb->nmaps; i++) {
        struct dp_map *m = &tlb->maps[i];
        if (iova >= m->start && iova <= m->last)
            return m;
    }
    return NULL;
}

/* Caller holds the read lock. Translates the start of [iova, iova + len): the address
 * of `iova`, with *avail set to how many of the `len` bytes the same mapping holds (a
 * buffer may continue in the next mapping). NULL when `iova` is unmapped (*miss: the
 * kernel may still map it), lacks `perm`, or the range wraps around 2**64. */
uint8_t *dp_iotlb_lookup(struct dp_iotlb *tlb, uint64_t iova, uint64_t len, uint8_t perm,
                         uint64_t *avail, bool *miss)
{
    *miss = false;
    *avail = 0;
    if (len == 0 || iova + (len - 1) < iova)
        return NULL;
    const struct dp_map *m = find(tlb, iova);
    if (!m) {
        *miss = tlb->dev_fd >= 0;
        return NULL;
    }
    if ((m->perm & perm) != perm)
        return NULL;
    uint64_t room = m->last - iova;  /* bytes after `iova` in this mapping */
    *avail = len - 1 <= room ? len : room + 1;
    return m->va + (iova - m->start);
}

/* Caller holds the read lock. Marks the mapping holding a ring: eviction skips it. */
void dp_iotlb_pin(struct dp_iotlb *tlb, uint64_t iova)
{
    struct dp_map *m = find(tlb, iova);
    if (m)
        m->ring = true;
}

static int vduse_perm_to_dp(uint8_t vperm)
{
    int p = 0;
    if (vperm & VDUSE_ACCESS_RO)
        p |= DP_PERM_READ;
    if (vperm & VDUSE_ACCESS_WO)
        p |= DP_PERM_WRITE;
    return p;
}

/* Makes room for one mapping: the next one round-robin that holds no ring. */
static void evict(struct dp_iotlb *tlb)
{
    for (unsigned tries = 0; tries < tlb->nmaps; tries++) {
        unsigned i = tlb->next_victim++ % tlb->nmaps;
        if (!tlb->maps[i].ring) {
            drop_map(tlb, i);
            return;
        }
    }
    drop_map(tlb, tlb->next_victim++ % tlb->nmaps);
}

/* Maps the IOTLB region holding `iova`. Takes the write lock; the caller must not hold
 * the read lock. Returns 0, or -errno when the kernel has no mapping there. */
int dp_iotlb_fault(struct dp_iotlb *tlb, uint64_t iova)
{
    struct vduse_iotlb_entry entry = {.start = iova, .last = iova};
    int ret = 0;

    if (tlb->dev_fd < 0)
        return -EFAULT;
    write_lock(tlb);
    if (find(tlb, iova))
        goto out;  /* another worker mapped it meanwhile */
    int fd = ioctl(tlb->dev_fd, VDUSE_IOTLB_GET_FD, &entry);
    if (fd < 0) {
        ret = -errno;
        goto out;
    }
    if (entry.start > iova || entry.last < iova || entry.last - entry.start >= SIZE_MAX) {
        close(fd);
        ret = -EFAULT;
        goto out;
    }
    int perm = vduse_perm_to_dp(entry.perm);
    int prot = (perm & DP_PERM_READ ? PROT_READ : 0) | (perm & DP_PERM_WRITE ? PROT_WRITE : 0);
    size_t len = (size_t)(entry.last - entry.start + 1);
    void *base = mmap(NULL, len, prot, MAP_SHARED, fd, (off_t)entry.offset);
    int err = errno;
    close(fd);
    if (base == MAP_FAILED) {
        ret = -err;
        goto out;
    }
    if (tlb->nmaps == tlb->cap)
        evict(tlb);
    tlb->maps[tlb->nmaps++] =
        (struct dp_map){entry.start, entry.last, base, base, len, (uint8_t)perm, false};
out:
    pthread_rwlock_unlock(&tlb->lock);
    return ret;
}
