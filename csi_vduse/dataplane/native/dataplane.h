/* The csi-vduse data plane: split virtqueues serving virtio-blk requests.
 *
 * The ring walk (virtqueue.c) and the request logic (blk.c) touch guest memory only
 * through an IOTLB (iotlb.c) and the backend only through dp_backend_ops, so both
 * run under unit tests with a memory arena and a temporary file. Backends live in
 * backends/native (backend.h). worker.c is the
 * thin shell that waits on the kick eventfd and injects interrupts; guard.c keeps a
 * fault in guest memory from killing the process and remembers a request that did. */
#ifndef CSI_VDUSE_DATAPLANE_H
#define CSI_VDUSE_DATAPLANE_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <linux/virtio_ring.h>

#include "backend.h"
#include "inflight.h"

#define DP_MIN_MAPS 64
#define DP_MAX_DESCS 1024      /* descriptors per request, header and status included */
#define DP_MAX_SEGS 2048       /* translated pieces per request (a buffer may straddle maps) */
#define DP_BATCH 16            /* requests popped and executed together */
#define DP_MIN_QUEUE_SIZE 4    /* header + data + status, and a power of two */
#define DP_MAX_QUEUE_SIZE 1024
#define DP_SERIAL_LEN 20
#define DP_LOG_MAGIC 0x71766475u  /* "udvq" */
#define DP_LOG_VERSION 1u
#define DP_LOG_SIZE 4096u
#define DP_LATENCY_BUCKETS 19     /* <= 16 us << i for i < 18, then the rest */
#define DP_LATENCY_FIRST_NS 16000u

static inline void dp_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__) || defined(__arm__)
    __asm__ __volatile__("yield" ::: "memory");
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

enum dp_perm { DP_PERM_READ = 1, DP_PERM_WRITE = 2 };

/* Why a queue stopped. The guest's requests on it hang until the device is reset,
 * so each reason is reported (condition, log, metric). */
enum dp_broken {
    DP_OK = 0,
    DP_BROKEN_RING = 1,        /* rings unmapped, or an avail index or head out of range */
    DP_BROKEN_NO_STATUS = 2,   /* a refused request has no status byte to report it in */
    DP_BROKEN_FAULT = 3,       /* guest memory faulted where no request can be failed */
    DP_BROKEN_ORDER = 4,       /* internal: a completion out of ring order */
    DP_BROKEN_LOG = 5,         /* at re-attach, the in-flight log cannot describe the rings */
};

struct dp_map {
    uint64_t start, last;  /* IOVA range, inclusive */
    uint8_t *va;           /* address of `start` in this process */
    void *mmap_base;       /* NULL when the memory is not ours to unmap */
    size_t mmap_len;
    uint8_t perm;
    bool ring;             /* holds a ring: never evicted to make room */
};

/* IOVA -> process address translation. Workers hold the read lock for one batch; the
 * control thread takes the write lock to drop mappings, and a waiting writer goes
 * before new readers. A miss is resolved with VDUSE_IOTLB_GET_FD when dev_fd >= 0. */
struct dp_iotlb {
    pthread_rwlock_t lock;
    uint32_t writers;      /* waiting for the write lock */
    int dev_fd;
    uint32_t gen;          /* bumped whenever a mapping goes away */
    unsigned nmaps, cap;
    unsigned next_victim;
    struct dp_map *maps;
};

struct dp_seg {
    uint8_t *addr;
    uint32_t len;
    bool write;
};

/* One descriptor chain, flattened into translated segments. */
struct dp_chain {
    uint16_t head;
    uint16_t avail_idx;    /* position in the avail ring: completions follow it */
    bool bad;              /* refused: completes with IOERR in `status`, never executed */
    bool poisoned;         /* its execution crashed an earlier process: fail, never re-run */
    uint32_t nsegs, ndescs;
    uint64_t out_len, in_len;
    uint8_t *status;       /* the last byte of the last descriptor */
    uint32_t max_descs;    /* what the device offered (seg_max + 2): a longer chain is bad */
    uint32_t max_segs;     /* capacity of segs */
    struct dp_seg *segs;
};

enum dp_pop_result {
    DP_POP_EMPTY = 0,
    DP_POP_OK = 1,         /* chain filled; it may still be marked bad */
    DP_POP_FAULT = -1,     /* an IOVA was not mapped yet: fault it in, then retry */
    DP_POP_BROKEN = -2,    /* the queue stops; vq->broken says why */
};

#define DP_FAILED_IOVAS 4

struct dp_vq {
    uint16_t num;
    uint16_t last_avail_idx;
    uint16_t used_idx;
    uint16_t signalled_used;
    bool signalled_used_valid;
    bool event_idx;
    uint8_t broken;        /* enum dp_broken */
    uint16_t broken_head;
    uint64_t desc_iova, avail_iova, used_iova;
    struct vring_desc *desc;
    struct vring_avail *avail;
    struct vring_used *used;
    uint32_t tlb_gen;
    uint64_t fault_iova;
    /* IOVAs the kernel refused to map while popping the current chain: final misses */
    unsigned nfailed;
    uint64_t failed[DP_FAILED_IOVAS];
    struct dp_iotlb *tlb;
};

struct dp_stats {
    uint64_t reads, writes, flushes, discards, write_zeroes, get_ids;
    uint64_t read_bytes, written_bytes;
    uint64_t errors, unsupported, bad_chains;
    uint64_t faults, poisoned, enospc;
    uint64_t throttled_us;       /* time the queue waited for its QoS budget */
    /* service time, popped to completed, of every request */
    uint64_t latency_ns_sum;
    uint64_t latency[DP_LATENCY_BUCKETS];
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

/* Per-queue record in a shared file mapping (the state dir), so that it outlives the
 * process: which request each thread is executing, and a request whose execution
 * crashed the process, which the next process fails instead of running again. */
struct dp_log {
    uint32_t magic, version;
    uint32_t executing[2];       /* DP_LOG_VALID | avail index while executing, else 0 */
    uint32_t crashed;            /* the same, of a request that crashed us */
};
#define DP_LOG_VALID (1u << 16)
#define DP_LOG_BY_HEAD (1u << 17) /* the low bits are a head (asynchronous worker) */

/* Per-volume limits as token buckets (qos.c). A batch is charged after it executed and the
 * queue waits, outside every lock, until the budget is back to zero: a token debt, so
 * that a request larger than a bucket still passes and the long-run rate holds. */
enum dp_qos_kind { DP_QOS_READ_OPS, DP_QOS_WRITE_OPS, DP_QOS_READ_BYTES, DP_QOS_WRITE_BYTES,
                   DP_QOS_KINDS };

struct dp_qos_bucket {
    double rate;                 /* per second; 0: unlimited */
    double burst;                /* what an idle bucket holds */
    double tokens;
};

struct dp_qos {
    pthread_mutex_t mu;
    bool limited;                /* any bucket has a rate: read without the mutex */
    uint64_t last_ns;
    struct dp_qos_bucket b[DP_QOS_KINDS];
};

/* What every queue of one device shares: the QoS buckets, and the gate each batch passes
 * (read side) that dp_device_quiesce closes (write side) to cut a consistent snapshot. */
struct dp_device {
    pthread_rwlock_t gate;
    uint32_t draining;           /* a quiesce waits for the gate */
    struct dp_qos qos;
};

/* One popped request and what executing it needs. */
struct dp_slot {
    struct dp_chain chain;
    struct iovec *iov;
    uint32_t used_len;
};

/* A queue served asynchronously (engine.c): up to `depth` requests in flight on the
 * backend's aio context, completed in whatever order they finish. */
struct dp_aslot {
    struct dp_slot s;
    struct dp_io io;
    uint64_t popped_ns;
};

struct dp_engine {
    void *aio;
    int notify_fd;               /* the backend's completions: an eventfd */
    uint32_t depth, in_flight, nfree;
    bool locked;                 /* holds the device gate and the IOTLB read lock */
    bool fault_pending;          /* an IOVA to fault in once nothing is in flight */
    bool ring_idle;              /* found empty with kicks armed, and no kick since */
    bool kick_pending;           /* the backend refused the last kick: try again */
    uint64_t throttle_ns;        /* QoS: no new request before this time */
    struct dp_aslot *slots;
    uint32_t *free;
    struct dp_io **reaped;
    uint16_t *resubmit;          /* at resume: the log's heads, in pop order */
    uint32_t nresubmit, next_resubmit;
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
    int event_fd;                /* written once when the queue stops broken; -1: none */
    int stop;                    /* set by dp_queue_request_stop; checked every batch */
    int write_enospc;            /* the latest failed write failed for lack of space */
    bool broken_reported;
    uint64_t interrupts;
    uint32_t in_flight;           /* requests popped and not yet completed */
    uint64_t parallel_batches;
    uint64_t parallel_min_bytes;  /* runs of reads/writes this large use the helper; 0: never */
    uint32_t poll_us;             /* busy-poll the ring this long before sleeping; 0: never */
    bool crashed_pending;         /* log->crashed names a request still in the ring */
    uint16_t crashed_idx;         /* its avail index (synchronous worker) */
    uint16_t crashed_head;        /* its head (asynchronous worker) */
    struct dp_vq vq;
    struct dp_blk *blk;
    struct dp_device *dev;        /* NULL: no gate, no limits (unit tests) */
    struct dp_log *log;
    struct dp_inflight *inflight; /* NULL: none (unit tests); set before the worker runs */
    struct dp_engine *engine;     /* NULL: the synchronous worker */
    uint32_t resumed;             /* requests the in-flight log ran again at re-attach */
    bool resumed_from_log;        /* re-attach went by the in-flight log (asynchronous) */
    bool inflight_disagreed;      /* at resume, the log and the rings told different stories */
    struct dp_stats stats;
    struct dp_helper helper;
    struct dp_slot slots[DP_BATCH];
};

/* iotlb.c */
int dp_iotlb_init(struct dp_iotlb *tlb, int dev_fd, unsigned capacity);
void dp_iotlb_destroy(struct dp_iotlb *tlb);
int dp_iotlb_add(struct dp_iotlb *tlb, uint64_t start, uint64_t last, uint8_t *va, uint8_t perm);
void dp_iotlb_invalidate(struct dp_iotlb *tlb, uint64_t start, uint64_t last);
uint8_t *dp_iotlb_lookup(struct dp_iotlb *tlb, uint64_t iova, uint64_t len, uint8_t perm,
                         uint64_t *avail, bool *miss);
void dp_iotlb_pin(struct dp_iotlb *tlb, uint64_t iova);
int dp_iotlb_fault(struct dp_iotlb *tlb, uint64_t iova);

/* virtqueue.c */
void dp_vq_init(struct dp_vq *vq, struct dp_iotlb *tlb, uint16_t num, uint64_t desc,
                uint64_t avail, uint64_t used, uint16_t last_avail_idx, bool event_idx);
int dp_vq_map_rings(struct dp_vq *vq);
int dp_vq_pop(struct dp_vq *vq, struct dp_chain *c);
void dp_vq_push(struct dp_vq *vq, const struct dp_chain *c, uint32_t len);
int dp_vq_pop_head(struct dp_vq *vq, uint16_t head, struct dp_chain *c);
void dp_vq_push_unordered(struct dp_vq *vq, const struct dp_chain *c, uint32_t len);
bool dp_vq_should_notify(struct dp_vq *vq);
bool dp_vq_enable_notify(struct dp_vq *vq);
void dp_vq_disable_notify(struct dp_vq *vq);

/* blk.c */
#define DP_BLK_SUBMIT (UINT32_MAX - 1)
uint32_t dp_blk_handle(struct dp_blk *blk, struct dp_chain *c, struct iovec *iov,
                       struct dp_stats *stats, int *write_enospc);
uint32_t dp_blk_start(struct dp_blk *blk, struct dp_chain *c, struct iovec *iov,
                      struct dp_stats *stats, int *write_enospc, struct dp_io *io);
uint32_t dp_blk_finish(struct dp_chain *c, const struct dp_io *io, struct dp_stats *stats,
                       int *write_enospc);

/* guard.c */
void dp_guard_install(void);
int dp_guard_pop(struct dp_vq *vq, struct dp_chain *c);
bool dp_guard_load32(const uint8_t *p, uint32_t *out);
bool dp_guard_store(uint8_t *p, uint8_t value);
uint32_t dp_guard_execute(struct dp_blk *blk, struct dp_slot *s, struct dp_stats *stats,
                          struct dp_log *log, unsigned thread, int *write_enospc);
void dp_log_init(struct dp_log *log);
int dp_guard_pop_head(struct dp_vq *vq, uint16_t head, struct dp_chain *c);
uint32_t dp_guard_start(struct dp_blk *blk, struct dp_slot *s, struct dp_stats *stats,
                        struct dp_log *log, int *write_enospc, struct dp_io *io);
uint32_t dp_guard_finish(struct dp_slot *s, const struct dp_io *io, struct dp_stats *stats,
                         int *write_enospc);

/* worker.c */
struct dp_queue *dp_queue_new(uint32_t index, int dev_fd, int kick_fd, int stop_fd,
                              struct dp_blk *blk, struct dp_iotlb *tlb, uint32_t max_descs,
                              struct dp_log *log);
void dp_queue_free(struct dp_queue *q);
int dp_queue_process(struct dp_queue *q);
int dp_queue_resume(struct dp_queue *q);
int dp_queue_run(struct dp_queue *q);
void dp_queue_request_stop(struct dp_queue *q);

/* worker.c: shared with engine.c */
uint64_t dp_now_ns(void);
bool dp_queue_stopping(struct dp_queue *q);
void dp_queue_notify(struct dp_queue *q);
void dp_record_latency(struct dp_stats *st, uint32_t n, uint64_t ns);
void dp_queue_charge(struct dp_queue *q, const struct dp_stats *before);
bool dp_queue_enter_gate(struct dp_queue *q);
void dp_queue_report_broken(struct dp_queue *q);
void dp_vq_remember_failed_fault(struct dp_vq *vq);

/* engine.c */
int dp_queue_enable_async(struct dp_queue *q, uint32_t depth);
void dp_engine_free(struct dp_engine *e);
int dp_engine_process(struct dp_queue *q);
int dp_engine_run(struct dp_queue *q);
int dp_engine_resume(struct dp_queue *q, uint16_t used, uint16_t avail);

/* qos.c: `now_ns` is CLOCK_MONOTONIC, passed in so that the logic runs under tests */
void dp_qos_init(struct dp_qos *qos);
void dp_qos_destroy(struct dp_qos *qos);
void dp_qos_set(struct dp_qos *qos, const uint64_t limits[DP_QOS_KINDS], uint32_t burst_ms,
                uint64_t now_ns);
void dp_qos_charge(struct dp_qos *qos, const uint64_t used[DP_QOS_KINDS], uint64_t now_ns);
uint64_t dp_qos_wait_ns(struct dp_qos *qos, uint64_t now_ns);

/* worker.c: device-wide */
int dp_device_init(struct dp_device *dev);
void dp_device_destroy(struct dp_device *dev);
int dp_device_quiesce(struct dp_device *dev, uint32_t timeout_ms);
void dp_device_resume(struct dp_device *dev);

#endif
