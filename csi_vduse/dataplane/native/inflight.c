/* The in-flight log (inflight.h): pure logic over a caller's memory, so that it runs under
 * unit tests on a plain buffer and in the data plane on a shared file mapping. */
#include <errno.h>
#include <string.h>

#include "inflight.h"

size_t dp_inflight_size(uint16_t num)
{
    return sizeof(struct dp_inflight) + (size_t)num * sizeof(struct dp_inflight_desc);
}

bool dp_inflight_valid(const struct dp_inflight *log, uint16_t num)
{
    return log->magic == DP_INFLIGHT_MAGIC && log->version == DP_INFLIGHT_VERSION &&
           log->num == num;
}

/* A log for a queue with nothing in flight; the magic goes last, so that a crash half
 * way leaves a log that is not valid rather than one that lies. */
void dp_inflight_reset(struct dp_inflight *log, uint16_t num, uint16_t used_idx)
{
    __atomic_store_n(&log->magic, 0, __ATOMIC_RELEASE);
    memset(log->desc, 0, (size_t)num * sizeof(log->desc[0]));
    log->version = DP_INFLIGHT_VERSION;
    log->num = num;
    log->used_idx = used_idx;
    log->counter = 0;
    __atomic_store_n(&log->magic, DP_INFLIGHT_MAGIC, __ATOMIC_RELEASE);
}

void dp_inflight_popped(struct dp_inflight *log, uint16_t head)
{
    if (head >= log->num)
        return;
    log->desc[head].counter = ++log->counter;
    /* in flight before the request can touch the backend */
    __atomic_store_n(&log->desc[head].inflight, 1, __ATOMIC_SEQ_CST);
}

void dp_inflight_completed(struct dp_inflight *log, const uint16_t *heads, unsigned n,
                           uint16_t used_idx)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);  /* after the used ring's stores */
    for (unsigned i = 0; i < n; i++)
        if (heads[i] < log->num)
            __atomic_store_n(&log->desc[heads[i]].inflight, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&log->used_idx, used_idx, __ATOMIC_RELEASE);
}

/* After a crash: drops the completions the used ring shows past the logged used_idx
 * (`used` is the used ring's elements, `used_idx` its index), then writes to `heads`
 * (room for num) the heads still in flight in pop order and returns their count, which is
 * how far last_avail_idx runs ahead of used_idx. -EINVAL when the log cannot describe
 * these rings: more completions than the ring holds, or more in flight than offered. */
int dp_inflight_recover(struct dp_inflight *log, const struct vring_used_elem *used,
                        uint16_t used_idx, uint16_t avail_idx, uint16_t *heads)
{
    uint16_t num = log->num;
    uint16_t unlogged = (uint16_t)(used_idx - log->used_idx);
    if (num == 0 || unlogged > num)
        return -EINVAL;
    volatile const struct vring_used_elem *ring = used;
    for (uint16_t i = 0; i < unlogged; i++) {
        uint32_t id = ring[(uint16_t)(log->used_idx + i) % num].id;
        if (id < num)
            log->desc[id].inflight = 0;
    }
    log->used_idx = used_idx;

    unsigned n = 0;
    for (uint16_t head = 0; head < num; head++) {
        if (!log->desc[head].inflight)
            continue;
        /* insertion by counter: at most num entries, once per attach */
        unsigned at = n++;
        while (at > 0 && log->desc[heads[at - 1]].counter > log->desc[head].counter) {
            heads[at] = heads[at - 1];
            at--;
        }
        heads[at] = head;
    }
    if (n > (uint16_t)(avail_idx - used_idx))
        return -EINVAL;
    return (int)n;
}
