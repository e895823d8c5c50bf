/* The per-queue worker: wait for a kick, drain the ring in batches, complete in ring
 * order, interrupt once per batch. The IOTLB read lock is held for one batch at a
 * time, so that IOTLB updates, faults of other queues and stops get in under load. */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <linux/vduse.h>
#include <linux/virtio_blk.h>

#include "dataplane.h"

#define PARALLEL_MIN_BYTES (256u << 10)  /* below this a batch is cheaper on one thread */
#define FAULTED UINT32_MAX

static void *helper_main(void *arg);

uint64_t dp_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int dp_device_init(struct dp_device *dev)
{
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
    /* a waiting quiesce goes before new batches, or a busy queue would starve it */
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    int r = pthread_rwlock_init(&dev->gate, &attr);
    pthread_rwlockattr_destroy(&attr);
    if (r != 0)
        return -r;
    dp_qos_init(&dev->qos);
    return 0;
}

void dp_device_destroy(struct dp_device *dev)
{
    pthread_rwlock_destroy(&dev->gate);
    dp_qos_destroy(&dev->qos);
}

static struct timespec deadline_after(uint64_t ns)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    ns += (uint64_t)t.tv_nsec;
    t.tv_sec += (time_t)(ns / 1000000000u);
    t.tv_nsec = (long)(ns % 1000000000u);
    return t;
}

/* Waits for every batch in execution to complete (pushed to the used ring) and keeps new
 * ones from starting until dp_device_resume, called from the same thread. IOTLB updates
 * and faults still get through: the gate is taken before the IOTLB lock. Returns 0, or
 * -ETIMEDOUT when a request did not finish in time (a hung backend). */
int dp_device_quiesce(struct dp_device *dev, uint32_t timeout_ms)
{
    struct timespec deadline = deadline_after((uint64_t)timeout_ms * 1000000u);
    __atomic_add_fetch(&dev->draining, 1, __ATOMIC_SEQ_CST);
    int r = pthread_rwlock_clockwrlock(&dev->gate, CLOCK_MONOTONIC, &deadline);
    __atomic_sub_fetch(&dev->draining, 1, __ATOMIC_SEQ_CST);
    return -r;
}

void dp_device_resume(struct dp_device *dev)
{
    pthread_rwlock_unlock(&dev->gate);
}

struct dp_queue *dp_queue_new(uint32_t index, int dev_fd, int kick_fd, int stop_fd,
                              struct dp_blk *blk, struct dp_iotlb *tlb, uint32_t max_descs,
                              struct dp_log *log)
{
    if (max_descs < 3 || max_descs > DP_MAX_DESCS)
        return NULL;
    uint32_t max_segs = 2 * max_descs < DP_MAX_SEGS ? 2 * max_descs : DP_MAX_SEGS;
    struct dp_queue *q = calloc(1, sizeof(*q));
    if (!q)
        return NULL;
    pthread_mutex_init(&q->helper.mu, NULL);
    pthread_cond_init(&q->helper.work, NULL);
    pthread_cond_init(&q->helper.done, NULL);
    for (unsigned i = 0; i < DP_BATCH; i++) {
        struct dp_slot *s = &q->slots[i];
        s->chain.max_descs = max_descs;
        s->chain.max_segs = max_segs;
        s->chain.segs = calloc(max_segs, sizeof(*s->chain.segs));
        s->iov = calloc(max_segs, sizeof(*s->iov));
        if (!s->chain.segs || !s->iov) {
            dp_queue_free(q);
            return NULL;
        }
    }
    q->index = index;
    q->dev_fd = dev_fd;
    q->kick_fd = kick_fd;
    q->stop_fd = stop_fd;
    q->event_fd = -1;
    q->blk = blk;
    q->log = log;
    q->parallel_min_bytes = PARALLEL_MIN_BYTES;
    q->vq.tlb = tlb;
    q->vq.broken = DP_BROKEN_RING;  /* until dp_vq_init gives it rings */
    if (log)
        dp_log_init(log);
    dp_guard_install();
    return q;
}

void dp_queue_free(struct dp_queue *q)
{
    struct dp_helper *h = &q->helper;
    if (q->engine) {
        q->blk->ops->aio_close(q->engine->aio);
        dp_engine_free(q->engine);
    }
    if (h->started) {
        pthread_mutex_lock(&h->mu);
        h->stop = true;
        pthread_cond_signal(&h->work);
        pthread_mutex_unlock(&h->mu);
        pthread_join(h->thread, NULL);
    }
    pthread_mutex_destroy(&h->mu);
    pthread_cond_destroy(&h->work);
    pthread_cond_destroy(&h->done);
    for (unsigned i = 0; i < DP_BATCH; i++) {
        free(q->slots[i].chain.segs);
        free(q->slots[i].iov);
    }
    free(q);
}

void dp_queue_request_stop(struct dp_queue *q)
{
    __atomic_store_n(&q->stop, 1, __ATOMIC_RELEASE);
}

bool dp_queue_stopping(struct dp_queue *q)
{
    return __atomic_load_n(&q->stop, __ATOMIC_ACQUIRE);
}

void dp_queue_notify(struct dp_queue *q)
{
    q->interrupts++;
    if (q->dev_fd >= 0)
        ioctl(q->dev_fd, VDUSE_VQ_INJECT_IRQ, &q->index);
}

static void execute(struct dp_queue *q, struct dp_slot *s, struct dp_stats *stats,
                    unsigned thread)
{
    s->used_len = dp_guard_execute(q->blk, s, stats, q->log, thread, &q->write_enospc);
}

static void *helper_main(void *arg)
{
    struct dp_queue *q = arg;
    struct dp_helper *h = &q->helper;
    pthread_mutex_lock(&h->mu);
    for (;;) {
        while (!h->pending && !h->stop)
            pthread_cond_wait(&h->work, &h->mu);
        if (h->stop)
            break;
        uint32_t first = h->first, end = h->end;
        pthread_mutex_unlock(&h->mu);
        for (uint32_t i = first + 1; i < end; i += 2)
            execute(q, &q->slots[i], &h->stats, 1);
        pthread_mutex_lock(&h->mu);
        h->pending = false;
        pthread_cond_signal(&h->done);
    }
    pthread_mutex_unlock(&h->mu);
    return NULL;
}

static bool is_data(const struct dp_chain *c)
{
    /* Only IN and OUT may run side by side; the header was validated by nobody yet,
     * so peek at it the way dp_blk_handle will: anything unusual runs alone. */
    uint32_t type;
    if (c->bad || c->poisoned || c->nsegs == 0 || c->segs[0].write || c->segs[0].len < 4)
        return false;
    if (!dp_guard_load32(c->segs[0].addr, &type))
        return false;
    return type == VIRTIO_BLK_T_IN || type == VIRTIO_BLK_T_OUT;
}

static void merge_stats(struct dp_stats *into, struct dp_stats *from)
{
    uint64_t *a = (uint64_t *)into, *b = (uint64_t *)from;
    for (size_t i = 0; i < sizeof(*into) / sizeof(uint64_t); i++)
        a[i] += b[i];
    memset(from, 0, sizeof(*from));
}

/* Runs slots [first, end), all reads and writes, on two threads. */
static void execute_parallel(struct dp_queue *q, uint32_t first, uint32_t end)
{
    struct dp_helper *h = &q->helper;
    if (!h->started) {
        if (pthread_create(&h->thread, NULL, helper_main, q) != 0) {
            for (uint32_t i = first; i < end; i++)
                execute(q, &q->slots[i], &q->stats, 0);
            return;
        }
        h->started = true;
    }
    pthread_mutex_lock(&h->mu);
    h->first = first;
    h->end = end;
    h->pending = true;
    pthread_cond_signal(&h->work);
    pthread_mutex_unlock(&h->mu);
    for (uint32_t i = first; i < end; i += 2)
        execute(q, &q->slots[i], &q->stats, 0);
    pthread_mutex_lock(&h->mu);
    while (h->pending)
        pthread_cond_wait(&h->done, &h->mu);
    pthread_mutex_unlock(&h->mu);
    merge_stats(&q->stats, &h->stats);
    q->parallel_batches++;
}

/* Executes a batch. Runs of reads and writes that move enough bytes are split over two
 * threads; every other request runs alone after all before it finished, so a FLUSH
 * still covers every write completed before it. */
static void execute_batch(struct dp_queue *q, uint32_t n)
{
    uint32_t i = 0;
    while (i < n) {
        uint32_t end = i;
        uint64_t bytes = 0;
        while (end < n && is_data(&q->slots[end].chain)) {
            bytes += q->slots[end].chain.in_len + q->slots[end].chain.out_len;
            end++;
        }
        if (end - i >= 2 && q->parallel_min_bytes && bytes >= q->parallel_min_bytes) {
            execute_parallel(q, i, end);
            i = end;
            continue;
        }
        if (end == i)
            end = i + 1;
        for (; i < end; i++)
            execute(q, &q->slots[i], &q->stats, 0);
    }
}

static void complete_batch(struct dp_queue *q, uint32_t n)
{
    struct dp_vq *vq = &q->vq;
    uint16_t done[DP_BATCH];
    uint32_t pushed = 0;
    for (uint32_t i = 0; i < n; i++) {
        struct dp_slot *s = &q->slots[i];
        if (s->used_len == FAULTED) {
            /* Executed, but its status byte faulted: nobody can tell the guest. */
            if (!vq->broken) {
                vq->broken = DP_BROKEN_FAULT;
                vq->broken_head = s->chain.head;
            }
            break;
        }
        dp_vq_push(vq, &s->chain, s->used_len);
        if (vq->broken == DP_BROKEN_ORDER)
            break;
        done[pushed++] = s->chain.head;
        if (s->chain.poisoned && q->log)
            __atomic_store_n(&q->log->crashed, 0, __ATOMIC_RELEASE);
    }
    if (q->inflight && pushed)
        dp_inflight_completed(q->inflight, done, pushed, vq->used_idx);
}

static uint32_t pop_batch(struct dp_queue *q, int *r)
{
    uint32_t n = 0;
    while (n < DP_BATCH && (*r = dp_guard_pop(&q->vq, &q->slots[n].chain)) == DP_POP_OK) {
        struct dp_chain *c = &q->slots[n].chain;
        if (q->crashed_pending && c->avail_idx == q->crashed_idx) {
            c->poisoned = true;
            q->crashed_pending = false;
        }
        if (q->inflight)
            dp_inflight_popped(q->inflight, c->head);
        n++;
    }
    return n;
}

void dp_record_latency(struct dp_stats *st, uint32_t n, uint64_t ns)
{
    unsigned bucket = 0;
    while (bucket < DP_LATENCY_BUCKETS - 1 && ns > (uint64_t)DP_LATENCY_FIRST_NS << bucket)
        bucket++;
    st->latency[bucket] += n;
    st->latency_ns_sum += ns * n;
}

/* Charges what a batch did, as blk.c counted it (it decoded every header once, from a
 * copy): guest memory is not read again, and a header split over descriptors pays too. */
void dp_queue_charge(struct dp_queue *q, const struct dp_stats *before)
{
    const struct dp_stats *after = &q->stats;
    uint64_t used[DP_QOS_KINDS];
    used[DP_QOS_READ_OPS] = after->reads - before->reads;
    used[DP_QOS_WRITE_OPS] = (after->writes - before->writes) +
                             (after->discards - before->discards) +
                             (after->write_zeroes - before->write_zeroes);
    used[DP_QOS_READ_BYTES] = after->read_bytes - before->read_bytes;
    used[DP_QOS_WRITE_BYTES] = after->written_bytes - before->written_bytes;
    dp_qos_charge(&q->dev->qos, used, dp_now_ns());
}

/* Enters the device's gate, unless the queue is asked to stop while a quiesce holds it:
 * a reset or a shutdown must not wait for a snapshot's copy. */
bool dp_queue_enter_gate(struct dp_queue *q)
{
    while (!dp_queue_stopping(q)) {
        struct timespec deadline = deadline_after(10000000u);  /* 10 ms */
        if (pthread_rwlock_clockrdlock(&q->dev->gate, CLOCK_MONOTONIC, &deadline) == 0)
            return true;
    }
    return false;
}

/* Waits, outside every lock, until the volume's QoS budget allows another batch. */
static void throttle(struct dp_queue *q)
{
    uint64_t wait;
    while ((wait = dp_qos_wait_ns(&q->dev->qos, dp_now_ns())) && !dp_queue_stopping(q)) {
        struct pollfd stop = {.fd = q->stop_fd, .events = POLLIN};
        struct timespec ts = {.tv_sec = (time_t)(wait / 1000000000u),
                              .tv_nsec = (long)(wait % 1000000000u)};
        uint64_t start = dp_now_ns();
        if (ppoll(&stop, 1, &ts, NULL) > 0)
            break;
        q->stats.throttled_us += (dp_now_ns() - start) / 1000;
    }
}

void dp_queue_report_broken(struct dp_queue *q)
{
    uint64_t one = 1;
    if (!q->vq.broken || q->broken_reported)
        return;
    q->broken_reported = true;
    if (q->event_fd >= 0 && write(q->event_fd, &one, sizeof(one)) < 0)
        return;
}

void dp_vq_remember_failed_fault(struct dp_vq *vq)
{
    if (vq->nfailed < DP_FAILED_IOVAS)
        vq->failed[vq->nfailed++] = vq->fault_iova;
}

/* Drains the ring, one batch per read lock; returns the requests completed, or -1
 * once the queue is broken. Stops early when asked to. */
int dp_queue_process(struct dp_queue *q)
{
    struct dp_vq *vq = &q->vq;
    struct dp_iotlb *tlb = vq->tlb;
    int done = 0;

    if (q->engine)
        return dp_engine_process(q);

    while (!dp_queue_stopping(q)) {
        int r;
        struct dp_stats before = {0};
        if (q->dev) {
            throttle(q);
            if (!dp_queue_enter_gate(q))
                break;
            if (dp_queue_stopping(q)) {
                pthread_rwlock_unlock(&q->dev->gate);
                break;
            }
            before = q->stats;
        }
        pthread_rwlock_rdlock(&tlb->lock);
        r = dp_vq_map_rings(vq);
        if (r == 0) {
            dp_vq_disable_notify(vq);
            uint32_t n = pop_batch(q, &r);
            if (n) {
                uint64_t popped = dp_now_ns();
                __atomic_store_n(&q->in_flight, n, __ATOMIC_RELAXED);
                execute_batch(q, n);
                complete_batch(q, n);
                __atomic_store_n(&q->in_flight, 0, __ATOMIC_RELAXED);
                dp_record_latency(&q->stats, n, dp_now_ns() - popped);
                done += (int)n;
                if (dp_vq_should_notify(vq))
                    dp_queue_notify(q);
                if (q->dev)
                    dp_queue_charge(q, &before);
            }
            if (r == DP_POP_EMPTY && dp_vq_enable_notify(vq))
                r = DP_POP_OK;
        }
        pthread_rwlock_unlock(&tlb->lock);
        if (q->dev)
            pthread_rwlock_unlock(&q->dev->gate);
        if (vq->broken)
            break;
        if (r == DP_POP_FAULT) {
            if (dp_iotlb_fault(tlb, vq->fault_iova) < 0)
                dp_vq_remember_failed_fault(vq);
            continue;
        }
        if (r != DP_POP_OK)
            break;
    }
    dp_queue_report_broken(q);
    return vq->broken ? -1 : done;
}

/* This worker completes in ring order, so what the in-flight log recovers must be the
 * avail ring's entries from used->idx on, in that order. */
static bool log_matches_ring(struct dp_queue *q, uint16_t used, uint16_t avail)
{
    struct dp_vq *vq = &q->vq;
    uint16_t heads[DP_MAX_QUEUE_SIZE];
    int n = dp_inflight_recover(q->inflight, vq->used->ring, used, avail, heads);
    if (n < 0)
        return false;
    for (int i = 0; i < n; i++)
        if (heads[i] != ((volatile uint16_t *)vq->avail->ring)[(uint16_t)(used + i) % vq->num])
            return false;
    return true;
}

/* Where the request that crashed the previous process is now, by avail index for this
 * worker and by head for the asynchronous one; false when it is no longer in flight. */
static bool find_crashed(struct dp_queue *q, uint32_t crashed, uint16_t used, uint16_t avail)
{
    struct dp_vq *vq = &q->vq;
    volatile uint16_t *ring = vq->avail->ring;
    if (q->engine) {
        uint16_t head = (uint16_t)crashed;
        if (!(crashed & DP_LOG_BY_HEAD)) {
            if ((uint16_t)((uint16_t)crashed - used) >= (uint16_t)(avail - used))
                return false;
            head = ring[(uint16_t)crashed % vq->num];
        }
        for (uint32_t i = q->engine->next_resubmit; i < q->engine->nresubmit; i++)
            if (q->engine->resubmit[i] == head) {
                q->crashed_head = head;
                return true;
            }
        return false;
    }
    for (uint16_t idx = used; idx != avail; idx++) {
        bool match = crashed & DP_LOG_BY_HEAD ? ring[idx % vq->num] == (uint16_t)crashed
                                              : idx == (uint16_t)crashed;
        if (match) {
            q->crashed_idx = idx;
            return true;
        }
    }
    return false;
}

/* Re-attach after the previous server died. This worker completes requests in ring
 * order and publishes used->idx per request, so the used ring is the durable progress:
 * everything past used->idx was at most in flight and is executed again (re-running
 * a block read, write or flush is safe), except a request whose execution crashed the
 * previous process: that one fails. That holds only if the previous worker completed in
 * ring order too, which the in-flight log must confirm; the asynchronous worker resumes
 * from the log instead (dp_engine_resume). Returns 0 or a DP_POP_* error. */
int dp_queue_resume(struct dp_queue *q)
{
    struct dp_vq *vq = &q->vq;
    int r;

    pthread_rwlock_rdlock(&vq->tlb->lock);
    while ((r = dp_vq_map_rings(vq)) == DP_POP_FAULT) {
        pthread_rwlock_unlock(&vq->tlb->lock);
        if (dp_iotlb_fault(vq->tlb, vq->fault_iova) < 0)
            dp_vq_remember_failed_fault(vq);
        pthread_rwlock_rdlock(&vq->tlb->lock);
    }
    if (r == 0) {
        uint16_t used = __atomic_load_n(&vq->used->idx, __ATOMIC_ACQUIRE);
        uint16_t avail = __atomic_load_n(&vq->avail->idx, __ATOMIC_ACQUIRE);
        vq->last_avail_idx = vq->used_idx = used;
        vq->signalled_used_valid = false;
        if (q->engine && q->inflight && dp_inflight_valid(q->inflight, vq->num)) {
            /* out of order: only the log knows what was in flight */
            if (dp_engine_resume(q, used, avail) < 0)
                vq->broken = DP_BROKEN_LOG;
            else
                q->resumed_from_log = true;
        } else if (q->inflight) {
            q->inflight_disagreed = dp_inflight_valid(q->inflight, vq->num) &&
                                    !log_matches_ring(q, used, avail);
            /* Requests completed out of order (an asynchronous worker ran before): ring
             * order would run completed writes again over newer data. Stop, and keep the
             * log for a worker that can resume from it. */
            if (q->inflight_disagreed)
                vq->broken = DP_BROKEN_LOG;
            else
                dp_inflight_reset(q->inflight, vq->num, used);
        }
        uint32_t crashed = q->log ? q->log->crashed : 0;
        if ((crashed & DP_LOG_VALID) && !vq->broken) {
            q->crashed_pending = find_crashed(q, crashed, used, avail);
            if (!q->crashed_pending)
                q->log->crashed = 0;
        }
    }
    vq->nfailed = 0;
    pthread_rwlock_unlock(&vq->tlb->lock);
    return r;
}

static uint64_t now_us(void)
{
    return dp_now_ns() / 1000;
}

/* Watches the avail ring with kicks off for up to poll_us; true when work arrived. */
static bool poll_ring(struct dp_queue *q)
{
    struct dp_vq *vq = &q->vq;
    bool found = false;
    if (!q->poll_us || vq->broken)
        return false;
    pthread_rwlock_rdlock(&vq->tlb->lock);
    if (dp_vq_map_rings(vq) == 0) {
        uint64_t deadline = now_us() + q->poll_us;
        dp_vq_disable_notify(vq);
        do {
            if (__atomic_load_n(&vq->avail->idx, __ATOMIC_ACQUIRE) != vq->last_avail_idx) {
                found = true;
                break;
            }
            dp_cpu_relax();
        } while (now_us() < deadline && !dp_queue_stopping(q));
        if (!found)
            found = dp_vq_enable_notify(vq);
    }
    pthread_rwlock_unlock(&vq->tlb->lock);
    return found;
}

int dp_queue_run(struct dp_queue *q)
{
    if (q->engine)
        return dp_engine_run(q);
    struct pollfd fds[2] = {{.fd = q->kick_fd, .events = POLLIN},
                            {.fd = q->stop_fd, .events = POLLIN}};
    for (;;) {
        if (!q->vq.broken)
            while (dp_queue_process(q) >= 0 && !dp_queue_stopping(q) && poll_ring(q))
                ;
        else
            dp_queue_report_broken(q);
        if (dp_queue_stopping(q))
            return 0;
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (fds[1].revents)
            return 0;
        if (fds[0].revents & POLLIN) {
            uint64_t count;
            if (read(q->kick_fd, &count, sizeof(count)) < 0 && errno != EAGAIN)
                return -errno;
        }
    }
}
