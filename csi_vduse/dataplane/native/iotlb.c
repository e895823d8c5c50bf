#include <errno.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>
#include <linux/vduse.h>

#include "dataplane.h"

int dp_iotlb_init(struct dp_iotlb *tlb, int dev_fd)
{
    memset(tlb, 0, sizeof(*tlb));
    tlb->dev_fd = dev_fd;
    return -pthread_rwlock_init(&tlb->lock, NULL);
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
}

/* Adds a mapping that the caller owns (tests, or memory registered by the caller). */
int dp_iotlb_add(struct dp_iotlb *tlb, uint64_t start, uint64_t last, uint8_t *va, uint8_t perm)
{
    int ret = 0;
    if (last < start)
        return -EINVAL;
    pthread_rwlock_wrlock(&tlb->lock);
    if (tlb->nmaps == DP_MAX_MAPS)
        ret = -ENOSPC;
    else
        tlb->maps[tlb->nmaps++] = (struct dp_map){start, last, va, NULL, 0, perm};
    pthread_rwlock_unlock(&tlb->lock);
    return ret;
}

void dp_iotlb_invalidate(struct dp_iotlb *tlb, uint64_t start, uint64_t last)
{
    pthread_rwlock_wrlock(&tlb->lock);
    for (unsigned i = 0; i < tlb->nmaps;) {
        struct dp_map *m = &tlb->maps[i];
        if (m->start <= last && start <= m->last)
            drop_map(tlb, i);
        else
            i++;
    }
    pthread_rwlock_unlock(&tlb->lock);
}

/* Caller holds the read lock. The whole [iova, iova + len) must lie in one mapping
 * that grants `perm`; anything else is refused, so a descriptor can never reach
 * memory outside what the kernel mapped for us. */
uint8_t *dp_iotlb_lookup(struct dp_iotlb *tlb, uint64_t iova, uint64_t len, uint8_t perm,
                         bool *miss)
{
    *miss = false;
    if (len == 0 || iova + (len - 1) < iova)
        return NULL;
    uint64_t last = iova + (len - 1);
    for (unsigned i = 0; i < tlb->nmaps; i++) {
        const struct dp_map *m = &tlb->maps[i];
        if (iova < m->start || iova > m->last)
            continue;
        if (last > m->last || (m->perm & perm) != perm)
            return NULL;
        return m->va + (iova - m->start);
    }
    *miss = tlb->dev_fd >= 0;
    return NULL;
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

/* Maps the IOTLB region holding `iova`. Takes the write lock; the caller must not hold
 * the read lock. Returns 0, or -errno when the kernel has no mapping there. */
int dp_iotlb_fault(struct dp_iotlb *tlb, uint64_t iova)
{
    struct vduse_iotlb_entry entry = {.start = iova, .last = iova};
    bool miss;
    int ret = 0;

    if (tlb->dev_fd < 0)
        return -EFAULT;
    pthread_rwlock_wrlock(&tlb->lock);
    if (dp_iotlb_lookup(tlb, iova, 1, 0, &miss) || !miss)
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
    if (tlb->nmaps == DP_MAX_MAPS)
        drop_map(tlb, tlb->next_victim++ % DP_MAX_MAPS);
    tlb->maps[tlb->nmaps++] =
        (struct dp_map){entry.start, entry.last, base, base, len, (uint8_t)perm};
out:
    pthread_rwlock_unlock(&tlb->lock);
    return ret;
}
