/* The per-queue worker: wait for a kick, drain the ring, interrupt once per batch. */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <linux/vduse.h>

#include "dataplane.h"

#define NOTIFY_EVERY 32  /* completions between interrupts inside one long batch */

struct dp_queue *dp_queue_new(uint32_t index, int dev_fd, int kick_fd, int stop_fd,
                              struct dp_blk *blk, struct dp_iotlb *tlb)
{
    struct dp_queue *q = calloc(1, sizeof(*q));
    if (!q)
        return NULL;
    q->index = index;
    q->dev_fd = dev_fd;
    q->kick_fd = kick_fd;
    q->stop_fd = stop_fd;
    q->blk = blk;
    q->vq.tlb = tlb;
    q->vq.broken = true;  /* until dp_vq_init gives it rings */
    return q;
}

void dp_queue_free(struct dp_queue *q)
{
    free(q);
}

static void notify(struct dp_queue *q)
{
    q->interrupts++;
    if (q->dev_fd >= 0)
        ioctl(q->dev_fd, VDUSE_VQ_INJECT_IRQ, &q->index);
}

/* Drains the ring once; returns the requests completed, or -1 once the ring is broken. */
int dp_queue_process(struct dp_queue *q)
{
    struct dp_vq *vq = &q->vq;
    struct dp_iotlb *tlb = vq->tlb;
    int done = 0, r;

    pthread_rwlock_rdlock(&tlb->lock);
    for (;;) {
        r = dp_vq_map_rings(vq);
        if (r == 0) {
            dp_vq_disable_notify(vq);
            while ((r = dp_vq_pop(vq, &q->chain)) == DP_POP_OK) {
                uint32_t len = dp_blk_handle(q->blk, &q->chain, q->iov, &q->stats);
                dp_vq_push(vq, q->chain.head, len);
                vq->fault_final = false;
                if (++done % NOTIFY_EVERY == 0 && dp_vq_should_notify(vq))
                    notify(q);
            }
            if (r == DP_POP_EMPTY && dp_vq_enable_notify(vq))
                continue;
        }
        if (r != DP_POP_FAULT)
            break;
        pthread_rwlock_unlock(&tlb->lock);
        if (dp_iotlb_fault(tlb, vq->fault_iova) < 0)
            vq->fault_final = true;
        pthread_rwlock_rdlock(&tlb->lock);
    }
    if (done % NOTIFY_EVERY && dp_vq_should_notify(vq))
        notify(q);
    pthread_rwlock_unlock(&tlb->lock);
    return vq->broken ? -1 : done;
}

/* Re-attach after the previous server died. Each queue completes requests in order
 * and publishes used->idx per request, so the used ring is the durable progress:
 * everything past used->idx was at most in flight and is executed again (re-running
 * a block read, write or flush is safe). Returns 0 or a DP_POP_* error. */
int dp_queue_resume(struct dp_queue *q)
{
    struct dp_vq *vq = &q->vq;
    int r;

    pthread_rwlock_rdlock(&vq->tlb->lock);
    while ((r = dp_vq_map_rings(vq)) == DP_POP_FAULT) {
        pthread_rwlock_unlock(&vq->tlb->lock);
        if (dp_iotlb_fault(vq->tlb, vq->fault_iova) < 0)
            vq->fault_final = true;
        pthread_rwlock_rdlock(&vq->tlb->lock);
    }
    if (r == 0) {
        uint16_t used = __atomic_load_n(&vq->used->idx, __ATOMIC_ACQUIRE);
        vq->last_avail_idx = vq->used_idx = used;
        vq->signalled_used_valid = false;
    }
    vq->fault_final = false;
    pthread_rwlock_unlock(&vq->tlb->lock);
    return r;
}

int dp_queue_run(struct dp_queue *q)
{
    struct pollfd fds[2] = {{.fd = q->kick_fd, .events = POLLIN},
                            {.fd = q->stop_fd, .events = POLLIN}};
    for (;;) {
        if (!q->vq.broken)
            dp_queue_process(q);
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
