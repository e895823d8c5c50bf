/* Per-volume QoS: four token buckets (read/write operations and bytes) shared by the
 * device's queues. Pure logic on a clock passed in; worker.c does the waiting. */
#include <string.h>

#include "dataplane.h"

#define NS_PER_S 1e9

#define MAX_WAIT_S 3600.0  /* a debt longer than this is a hostile request: cap the wait */

void dp_qos_init(struct dp_qos *qos)
{
    memset(qos, 0, sizeof(*qos));
    pthread_mutex_init(&qos->mu, NULL);
}

void dp_qos_destroy(struct dp_qos *qos)
{
    pthread_mutex_destroy(&qos->mu);
}

static void refill(struct dp_qos *qos, uint64_t now_ns)
{
    double elapsed = now_ns > qos->last_ns ? (double)(now_ns - qos->last_ns) / NS_PER_S : 0;
    qos->last_ns = now_ns > qos->last_ns ? now_ns : qos->last_ns;
    for (int k = 0; k < DP_QOS_KINDS; k++) {
        struct dp_qos_bucket *b = &qos->b[k];
        if (b->rate <= 0)
            continue;
        b->tokens += elapsed * b->rate;
        if (b->tokens > b->burst)
            b->tokens = b->burst;
    }
}

/* A bucket whose limit does not change keeps its tokens (a no-op change grants no new
 * burst); a new limit starts with a full burst, or with the debt the old one left, so that
 * lowering a limit under load takes effect at once. */
void dp_qos_set(struct dp_qos *qos, const uint64_t limits[DP_QOS_KINDS], uint32_t burst_ms,
                uint64_t now_ns)
{
    bool limited = false;
    pthread_mutex_lock(&qos->mu);
    refill(qos, now_ns);
    for (int k = 0; k < DP_QOS_KINDS; k++) {
        struct dp_qos_bucket *b = &qos->b[k];
        double rate = (double)limits[k];
        double burst = rate * burst_ms / 1000.0;
        if (rate > 0 && burst < 1)
            burst = 1;
        if (rate == b->rate && rate > 0) {
            b->burst = burst;
            if (b->tokens > burst)
                b->tokens = burst;
            continue;
        }
        double debt = b->rate > 0 && b->tokens < 0 ? b->tokens : 0;
        b->rate = rate;
        b->burst = burst;
        b->tokens = rate > 0 ? (debt < 0 ? debt : burst) : 0;
    }
    for (int k = 0; k < DP_QOS_KINDS; k++)
        limited |= qos->b[k].rate > 0;
    __atomic_store_n(&qos->limited, limited, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&qos->mu);
}

void dp_qos_charge(struct dp_qos *qos, const uint64_t used[DP_QOS_KINDS], uint64_t now_ns)
{
    if (!__atomic_load_n(&qos->limited, __ATOMIC_ACQUIRE))
        return;  /* most volumes: no lock per batch */
    pthread_mutex_lock(&qos->mu);
    refill(qos, now_ns);
    for (int k = 0; k < DP_QOS_KINDS; k++)
        if (qos->b[k].rate > 0)
            qos->b[k].tokens -= (double)used[k];
    pthread_mutex_unlock(&qos->mu);
}

/* How long until no bucket is in debt; 0 when a batch may run now. */
uint64_t dp_qos_wait_ns(struct dp_qos *qos, uint64_t now_ns)
{
    double wait = 0;
    if (!__atomic_load_n(&qos->limited, __ATOMIC_ACQUIRE))
        return 0;
    pthread_mutex_lock(&qos->mu);
    refill(qos, now_ns);
    for (int k = 0; k < DP_QOS_KINDS; k++) {
        const struct dp_qos_bucket *b = &qos->b[k];
        if (b->rate > 0 && b->tokens < 0 && -b->tokens / b->rate > wait)
            wait = -b->tokens / b->rate;
    }
    pthread_mutex_unlock(&qos->mu);
    return (uint64_t)((wait < MAX_WAIT_S ? wait : MAX_WAIT_S) * NS_PER_S);
}
