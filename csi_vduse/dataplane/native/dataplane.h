/* The csi-vduse data plane: split virtqueues serving virtio-blk requests.
 *
 * The ring walk (virtqueue.c) and the request logic (blk.c) touch guest memory only
 * through an IOTLB (iotlb.c) and the backend only through dp_backend_ops, so both
 * run under unit tests with a memory arena and a temporary file. worker.c is the
 * thin shell that waits on the kick eventfd and injects interrupts. */
#ifndef CSI_VDUSE_DATAPLANE_H
#define CSI_VDUSE_DATAPLANE_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <linux/virtio_ring.h>

#define DP_MAX_MAPS 64
#define DP_MAX_SEGS 1024       /* data segments per request, header and status included */
#define DP_BATCH 16            /* requests popped and executed together */
#define DP_MAX_QUEUE_SIZE 1024
#define DP_SERIAL_LEN 20

enum dp_perm { DP_PERM_READ = 1, DP_PERM_WRITE = 2 };

struct dp_map {
    uint64_t start, last;  /* IOVA range, inclusive */
    uint8_t *va;           /* address of `start` in this process */
    void *mmap_base;       /* NULL when the memory is not ours to unmap */
    size_t mmap_len;
    uint8_t perm;
};

/* IOVA -> process address translation. Workers hold the read lock for a batch;
 * the control thread takes the write lock to drop mappings. A miss is resolved
 * with VDUSE_IOTLB_GET_FD when dev_fd >= 0, and is final otherwise. */
struct dp_iotlb {
    pthread_rwlock_t lock;
    int dev_fd;
    uint32_t gen;          /* bumped whenever a mapping goes away */
    unsigned nmaps;
    unsigned next_victim;
    struct dp_map maps[DP_MAX_MAPS];
};

struct dp_seg {
    uint8_t *addr;
    uint32_t len;
    bool write;
};

/* One descriptor chain, flattened into translated segments. */
struct dp_chain {
    uint16_t head;
    bool bad;              /* hostile or broken chain: fail with IOERR */
    uint32_t nsegs;
    uint64_t out_len, in_len;
    uint8_t *bad_status;   /* where IOERR can safely be written for a bad chain, or NULL */
    uint32_t max_segs;     /* capacity of segs: a longer chain is bad */
    struct dp_seg *segs;
};

enum dp_pop_result {
    DP_POP_EMPTY = 0,
    DP_POP_OK = 1,         /* chain filled; it may still be marked bad */
    DP_POP_FAULT = -1,     /* an IOVA was not mapped yet: fault it in, then retry */
    DP_POP_BROKEN = -2,    /* the ring itself is corrupt; the queue stops */
};

struct dp_vq {
    uint16_t num;
    uint16_t last_avail_idx;
    uint16_t used_idx;
    uint16_t signalled_used;
    bool signalled_used_valid;
    bool event_idx;
    bool broken;
    bool fault_final;      /* the kernel has no mapping for fault_iova: fail the chain */
    uint64_t desc_iova, avail_iova, used_iova;
    struct vring_desc *desc;
    struct vring_avail *avail;
    struct vring_used *used;
    uint32_t tlb_gen;
    uint64_t fault_iova;
    struct dp_iotlb *tlb;
};

struct dp_backend_ops {
    ssize_t (*preadv)(void *ctx, const struct iovec *iov, int iovcnt, uint64_t offset);
    ssize_t (*pwritev)(void *ctx, const struct iovec *iov, int iovcnt, uint64_t offset);
    int (*flush)(void *ctx);
    int (*discard)(void *ctx, uint64_t offset, uint64_t len);
    int (*write_zeroes)(void *ctx, uint64_t offset, uint64_t len, bool may_unmap);
};

struct dp_stats {
    uint64_t reads, writes, flushes, discards, write_zeroes, get_ids;
    uint64_t read_bytes, written_bytes;
    uint64_t errors, unsupported, bad_chains;
};

struct dp_blk {
    const struct dp_backend_ops *ops;
    void *ctx;
    uint64_t capacity;           /* in 512-byte sectors */
    bool readonly;
    uint32_t max_discard_sectors, max_discard_seg;
    uint32_t max_write_zeroes_sectors, max_write_zeroes_seg;
    char serial[DP_SERIAL_LEN];
};

/* One popped request and what executing it needs. */
struct dp_slot {
    struct dp_chain chain;
    struct iovec *iov;
    uint32_t used_len;
};

/* A second thread per queue, so that the large reads and writes of one batch copy in
 * parallel. Completions stay in ring order: the used ring remains the queue's durable
 * progress (see dp_queue_resume). */
struct dp_helper {
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t work, done;
    bool started, stop, pending;
    uint32_t first, end;         /* slots [first, end) with odd offsets are the helper's */
    struct dp_stats stats;
};

struct dp_queue {
    uint32_t index;
    int dev_fd;                  /* for VDUSE_VQ_INJECT_IRQ; -1 counts interrupts only */
    int kick_fd, stop_fd;
    uint64_t interrupts;
    uint64_t parallel_batches;
    uint64_t parallel_min_bytes;  /* runs of reads/writes this large use the helper; 0: never */
    uint32_t poll_us;             /* busy-poll the ring this long before sleeping; 0: never */
    struct dp_vq vq;
    struct dp_blk *blk;
    struct dp_stats stats;
    struct dp_helper helper;
    uint32_t max_segs;
    struct dp_slot slots[DP_BATCH];
};

/* iotlb.c */
int dp_iotlb_init(struct dp_iotlb *tlb, int dev_fd);
void dp_iotlb_destroy(struct dp_iotlb *tlb);
int dp_iotlb_add(struct dp_iotlb *tlb, uint64_t start, uint64_t last, uint8_t *va, uint8_t perm);
void dp_iotlb_invalidate(struct dp_iotlb *tlb, uint64_t start, uint64_t last);
uint8_t *dp_iotlb_lookup(struct dp_iotlb *tlb, uint64_t iova, uint64_t len, uint8_t perm,
                         bool *miss);
int dp_iotlb_fault(struct dp_iotlb *tlb, uint64_t iova);

/* virtqueue.c */
void dp_vq_init(struct dp_vq *vq, struct dp_iotlb *tlb, uint16_t num, uint64_t desc,
                uint64_t avail, uint64_t used, uint16_t last_avail_idx, bool event_idx);
int dp_vq_map_rings(struct dp_vq *vq);
int dp_vq_pop(struct dp_vq *vq, struct dp_chain *c);
void dp_vq_push(struct dp_vq *vq, uint16_t head, uint32_t len);
void dp_vq_publish_used(struct dp_vq *vq);
bool dp_vq_should_notify(struct dp_vq *vq);
bool dp_vq_enable_notify(struct dp_vq *vq);
void dp_vq_disable_notify(struct dp_vq *vq);

/* blk.c */
uint32_t dp_blk_handle(struct dp_blk *blk, struct dp_chain *c, struct iovec *iov,
                       struct dp_stats *stats);

/* worker.c */
struct dp_queue *dp_queue_new(uint32_t index, int dev_fd, int kick_fd, int stop_fd,
                              struct dp_blk *blk, struct dp_iotlb *tlb, uint32_t max_segs);
void dp_queue_free(struct dp_queue *q);
int dp_queue_process(struct dp_queue *q);
int dp_queue_resume(struct dp_queue *q);
int dp_queue_run(struct dp_queue *q);

/* file_backend.c */
extern const struct dp_backend_ops dp_file_ops;

#endif
