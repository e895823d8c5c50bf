/* The asynchronous queue worker: requests go to the backend's aio context as they are
 * popped, up to `depth` at a time, and complete in whatever order the backend finishes
 * them. The in-flight log (inflight.c), not the used ring, is the queue's durable
 * progress: a head is logged before it is submitted and cleared as soon as its completion
 * is in the used ring, before anything else is popped.
 *
 * Guest memory must stay mapped while the kernel or the backend moves data into it, so
 * the worker holds the device's gate and the IOTLB read lock for as long as anything is
 * in flight. A writer waiting on either (an IOTLB update, another queue's fault, a
 * snapshot's quiesce) stops the popping; the requests in flight finish, the worker lets
 * go, and takes the locks again after the writer. */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "dataplane.h"

#define FAULTED UINT32_MAX

static struct dp_aslot *slot_of(struct dp_io *io)
{
    return (struct dp_aslot *)((uint8_t *)io - offsetof(struct dp_aslot, io));
}

void dp_engine_free(struct dp_engine *e)
{
    if (!e)
        return;
    if (e->slots)
        for (uint32_t i = 0; i < e->depth; i++) {
            free(e->slots[i].s.chain.segs);
            free(e->slots[i].s.iov);
        }
    free(e->slots);
    free(e->free);
    free(e->reaped);
    free(e->resubmit);
    if (e->notify_fd >= 0)
        close(e->notify_fd);
    free(e);
}

/* Serves the queue asynchronously when the backend can: 0, or a negative errno (then the
 * synchronous worker stays). Before the worker runs. */
int dp_queue_enable_async(struct dp_queue *q, uint32_t depth)
{
    const struct dp_backend_ops *ops = q->blk->ops;
    if (!ops->aio_open)
        return -EOPNOTSUPP;
    if (depth == 0 || depth > DP_MAX_QUEUE_SIZE)
        return -EINVAL;
    struct dp_engine *e = calloc(1, sizeof(*e));
    if (!e)
        return -ENOMEM;
    e->notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    e->depth = depth;
    e->slots = calloc(depth, sizeof(*e->slots));
    e->free = calloc(depth, sizeof(*e->free));
    e->reaped = calloc(depth, sizeof(*e->reaped));
    e->resubmit = calloc(DP_MAX_QUEUE_SIZE, sizeof(*e->resubmit));
    int err = -ENOMEM;
    if (e->notify_fd < 0 || !e->slots || !e->free || !e->reaped || !e->resubmit)
        goto fail;
    const struct dp_chain *model = &q->slots[0].chain;
    for (uint32_t i = 0; i < depth; i++) {
        struct dp_slot *s = &e->slots[i].s;
        s->chain.max_descs = model->max_descs;
        s->chain.max_segs = model->max_segs;
        s->chain.segs = calloc(model->max_segs, sizeof(*s->chain.segs));
        s->iov = calloc(model->max_segs, sizeof(*s->iov));
        if (!s->chain.segs || !s->iov)
            goto fail;
        e->free[e->nfree++] = depth - 1 - i;
    }
    e->aio = ops->aio_open(q->blk->ctx, depth, e->notify_fd, &err);
    if (!e->aio)
        goto fail;
    q->engine = e;
    return 0;
fail:
    dp_engine_free(e);
    return err;
}

/* Someone waits for the IOTLB write lock or for the device's gate. */
static bool others_wait(struct dp_queue *q)
{
    return __atomic_load_n(&q->vq.tlb->writers, __ATOMIC_ACQUIRE) ||
           (q->dev && __atomic_load_n(&q->dev->draining, __ATOMIC_ACQUIRE));
}

static bool lock(struct dp_queue *q)
{
    struct dp_engine *e = q->engine;
    if (e->locked)
        return true;
    if (q->dev && !dp_queue_enter_gate(q))
        return false;
    pthread_rwlock_rdlock(&q->vq.tlb->lock);
    e->locked = true;
    return true;
}

static void unlock(struct dp_queue *q)
{
    struct dp_engine *e = q->engine;
    if (!e->locked)
        return;
    pthread_rwlock_unlock(&q->vq.tlb->lock);
    if (q->dev)
        pthread_rwlock_unlock(&q->dev->gate);
    e->locked = false;
}

/* Puts a finished request in the used ring and clears it from the log. */
static void complete(struct dp_queue *q, struct dp_aslot *a, uint32_t used)
{
    struct dp_engine *e = q->engine;
    struct dp_vq *vq = &q->vq;
    if (used == FAULTED) {
        /* executed, but its status byte faulted: nobody can tell the guest */
        if (!vq->broken) {
            vq->broken = DP_BROKEN_FAULT;
            vq->broken_head = a->s.chain.head;
        }
    } else {
        dp_vq_push_unordered(vq, &a->s.chain, used);
        if (q->inflight)
            dp_inflight_completed(q->inflight, &a->s.chain.head, 1, vq->used_idx);
        if (a->s.chain.poisoned && q->log)
            __atomic_store_n(&q->log->crashed, 0, __ATOMIC_RELEASE);
    }
    dp_record_latency(&q->stats, 1, dp_now_ns() - a->popped_ns);
    e->free[e->nfree++] = (uint32_t)(a - e->slots);
}

/* Sends what was submitted to the backend; a refusal (a full completion queue, no
 * memory) is tried again on the next turn, after a short wait if nothing completes. */
static void kick(struct dp_queue *q)
{
    struct dp_engine *e = q->engine;
    e->kick_pending = q->blk->ops->aio_kick(e->aio) != 0;
}

/* Completes what the backend finished; returns how many. */
static int reap(struct dp_queue *q)
{
    struct dp_engine *e = q->engine;
    if (!e->in_flight)
        return 0;
    struct dp_stats before = q->stats;
    unsigned n = q->blk->ops->aio_reap(e->aio, e->reaped, e->depth);
    for (unsigned i = 0; i < n; i++) {
        struct dp_aslot *a = slot_of(e->reaped[i]);
        e->in_flight--;
        complete(q, a, dp_guard_finish(&a->s, &a->io, &q->stats, &q->write_enospc));
    }
    if (n && q->dev)
        dp_queue_charge(q, &before);
    if (e->in_flight)
        kick(q);  /* what the backend queued again (a short transfer) goes out */
    return (int)n;
}

static int pop_next(struct dp_queue *q, struct dp_chain *c)
{
    struct dp_engine *e = q->engine;
    if (e->next_resubmit < e->nresubmit) {
        uint16_t head = e->resubmit[e->next_resubmit];
        int r = dp_guard_pop_head(&q->vq, head, c);
        if (r == DP_POP_OK) {
            e->next_resubmit++;
            if (q->crashed_pending && head == q->crashed_head) {
                c->poisoned = true;  /* it crashed the previous process: fail it */
                q->crashed_pending = false;
            }
        }
        return r;
    }
    return dp_guard_pop(&q->vq, c);
}

/* Pops and starts requests while there is room. With requests in flight it stops for
 * anyone waiting on the locks; with none, taking the locks waits behind them. Returns
 * how many completed on the spot; `more` says the ring may hold more right now. */
static int fill(struct dp_queue *q, bool *more)
{
    struct dp_engine *e = q->engine;
    struct dp_vq *vq = &q->vq;
    int done = 0, submitted = 0, r = DP_POP_OK;
    *more = false;
    if (dp_queue_stopping(q) || vq->broken || e->fault_pending || !e->nfree)
        return 0;
    if (e->in_flight && others_wait(q))
        return 0;
    if (q->dev && q->dev->qos.limited) {
        uint64_t now = dp_now_ns();  /* asked every time: a raised limit applies at once */
        uint64_t wait = dp_qos_wait_ns(&q->dev->qos, now);
        if (wait) {
            e->throttle_ns = now + wait;
            return 0;
        }
    }
    e->throttle_ns = 0;
    if (!lock(q))
        return 0;
    r = dp_vq_map_rings(vq);
    if (r == 0) {
        struct dp_stats before = q->stats;
        e->ring_idle = false;
        dp_vq_disable_notify(vq);
        while (e->nfree && !others_wait(q) && !dp_queue_stopping(q)) {
            struct dp_aslot *a = &e->slots[e->free[e->nfree - 1]];
            if ((r = pop_next(q, &a->s.chain)) != DP_POP_OK)
                break;
            e->nfree--;
            a->popped_ns = dp_now_ns();
            if (q->inflight)
                dp_inflight_popped(q->inflight, a->s.chain.head);
            uint32_t used = dp_guard_start(q->blk, &a->s, &q->stats, q->log, &q->write_enospc,
                                           &a->io);
            if (used == DP_BLK_SUBMIT) {
                int err = q->blk->ops->aio_submit(e->aio, &a->io);
                if (err == 0) {
                    e->in_flight++;
                    submitted++;
                    continue;
                }
                a->io.result = err;
                used = dp_guard_finish(&a->s, &a->io, &q->stats, &q->write_enospc);
            }
            complete(q, a, used);
            done++;
        }
        if (q->dev)
            dp_queue_charge(q, &before);
        if (r == DP_POP_OK)
            *more = true;  /* stopped for room, a waiter or a stop: the ring may hold more */
        else if (r == DP_POP_EMPTY && dp_vq_enable_notify(vq))
            *more = true;  /* arrived while kicks were off */
        else if (r == DP_POP_EMPTY)
            e->ring_idle = true;
    }
    if (submitted || e->kick_pending)
        kick(q);
    if (r == DP_POP_FAULT)
        e->fault_pending = true;
    return done;
}

/* Once nothing is in flight: lets waiters in, and faults in what the ring walk missed
 * (true then: try again). */
static bool settle(struct dp_queue *q)
{
    struct dp_engine *e = q->engine;
    if (e->in_flight)
        return false;
    unlock(q);
    if (!e->fault_pending)
        return false;
    e->fault_pending = false;
    if (dp_iotlb_fault(q->vq.tlb, q->vq.fault_iova) < 0)
        dp_vq_remember_failed_fault(&q->vq);
    return true;
}

static void drain_eventfd(int fd)
{
    uint64_t count;
    if (read(fd, &count, sizeof(count)) < 0 && errno != EAGAIN)
        return;
}

/* Sleeps until a completion, a kick, a stop or the end of a QoS wait. */
static int wait_events(struct dp_queue *q, bool for_kicks)
{
    struct dp_engine *e = q->engine;
    /* stop_fd stays readable once written: while draining, only completions wake us */
    bool stopping = dp_queue_stopping(q);
    if (stopping && !e->in_flight)
        return 0;
    struct pollfd fds[3] = {{.fd = e->notify_fd, .events = POLLIN},
                            {.fd = stopping ? -1 : q->stop_fd, .events = POLLIN},
                            {.fd = for_kicks ? q->kick_fd : -1, .events = POLLIN}};
    struct timespec ts, *timeout = NULL;
    uint64_t now = dp_now_ns();
    if (e->kick_pending) {
        ts = (struct timespec){.tv_nsec = 1000000};
        timeout = &ts;
    } else if (e->throttle_ns) {
        if (e->throttle_ns <= now) {  /* passed since fill looked: fill looks again */
            e->throttle_ns = 0;
            return 0;
        }
        uint64_t wait = e->throttle_ns - now;
        ts = (struct timespec){.tv_sec = (time_t)(wait / 1000000000u),
                               .tv_nsec = (long)(wait % 1000000000u)};
        timeout = &ts;
    }
    int n = ppoll(fds, 3, timeout, NULL);
    if (n < 0)  /* with requests in flight the worker must stay: they hold guest memory */
        return errno == EINTR || e->in_flight ? 0 : -errno;
    if (timeout && !e->kick_pending)
        q->stats.throttled_us += (dp_now_ns() - now) / 1000;
    if (fds[0].revents & POLLIN)
        drain_eventfd(e->notify_fd);
    if (fds[2].revents & POLLIN) {
        drain_eventfd(q->kick_fd);
        e->ring_idle = false;
    }
    return 0;
}

/* One turn: completions, new requests, completions again, one interrupt. Returns the
 * requests completed; `busy` says whether to go on at once: also when fill stopped early
 * (a waiter, a full engine) and the last completion came in after it, since no kick
 * announces what the ring already held. */
static int turn(struct dp_queue *q, bool *busy)
{
    struct dp_engine *e = q->engine;
    bool more;
    if (e->kick_pending)
        kick(q);
    int done = reap(q);
    done += fill(q, &more);
    done += reap(q);
    if (done && e->locked && dp_vq_should_notify(&q->vq))
        dp_queue_notify(q);
    __atomic_store_n(&q->in_flight, e->in_flight, __ATOMIC_RELAXED);
    if (settle(q))
        more = true;
    *busy = more || (!e->ring_idle && !e->in_flight && !e->throttle_ns);
    if (q->vq.broken && !e->in_flight)
        dp_queue_report_broken(q);
    return done;
}

/* Until the ring is empty and nothing is in flight (unit tests, and what a kick starts).
 * Returns the requests completed, or -1 once the queue is broken. */
int dp_engine_process(struct dp_queue *q)
{
    struct dp_engine *e = q->engine;
    int done = 0;
    e->ring_idle = false;  /* called for a kick */
    for (;;) {
        bool busy;
        done += turn(q, &busy);
        if (!e->in_flight && (!busy || q->vq.broken || dp_queue_stopping(q)))
            break;
        if (!busy && wait_events(q, false) < 0)
            break;
    }
    return q->vq.broken ? -1 : done;
}

int dp_engine_run(struct dp_queue *q)
{
    struct dp_engine *e = q->engine;
    for (;;) {
        bool busy;
        turn(q, &busy);
        if (dp_queue_stopping(q) && !e->in_flight)
            return 0;
        if (busy && !q->vq.broken)
            continue;
        int r = wait_events(q, !q->vq.broken);
        if (r < 0)
            return r;
    }
}

/* Re-attach: the heads the log holds in flight run again first, in the order they were
 * popped, and popping goes on after them. Returns 0, or -EINVAL when the log cannot
 * describe these rings. */
int dp_engine_resume(struct dp_queue *q, uint16_t used, uint16_t avail)
{
    struct dp_engine *e = q->engine;
    struct dp_vq *vq = &q->vq;
    int n = dp_inflight_recover(q->inflight, vq->used->ring, used, avail, e->resubmit);
    if (n < 0)
        return n;
    e->nresubmit = (uint32_t)n;
    e->next_resubmit = 0;
    q->resumed = (uint32_t)n;
    vq->used_idx = used;
    vq->last_avail_idx = (uint16_t)(used + n);
    return 0;  /* the log keeps them in flight until they complete */
}
