/* Guest memory cannot kill the process. A page the kernel never populated (a bounce
 * page nobody mapped) raises SIGBUS on access; inside a guarded region that fails the
 * one request, or stops its queue when not even its status byte can be written.
 *
 * Any other crash while a request executes is recorded in the queue's log before the
 * signal goes on to its previous handler, so that the next process fails that request
 * instead of executing it again (and crashing again, forever). */
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <string.h>
#include <linux/virtio_blk.h>

#include "dataplane.h"

/* volatile, and fenced: the compiler must not move accesses across these stores, which
 * only the signal handler reads. */
static __thread sigjmp_buf *volatile guard_env;

static inline void enter(sigjmp_buf *env)
{
    guard_env = env;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
}

static inline void leave(sigjmp_buf *outer)
{
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    guard_env = outer;
}

static const int fatal_signals[] = {SIGBUS, SIGSEGV, SIGILL, SIGFPE, SIGABRT};
#define NSIGNALS (sizeof(fatal_signals) / sizeof(fatal_signals[0]))

static struct sigaction previous[NSIGNALS];
static pthread_mutex_t install_mu = PTHREAD_MUTEX_INITIALIZER;

static __thread volatile uint32_t *volatile executing;  /* this thread's slot in a queue log */
static __thread struct dp_log *volatile executing_log;

static void chain_to_previous(unsigned i, int sig, siginfo_t *si, void *uc)
{
    const struct sigaction *prev = &previous[i];
    if (prev->sa_flags & SA_SIGINFO) {
        prev->sa_sigaction(sig, si, uc);
        return;
    }
    if (prev->sa_handler != SIG_DFL && prev->sa_handler != SIG_IGN) {
        prev->sa_handler(sig);
        return;
    }
    /* Default action: a fault re-executes and kills; a raised signal is raised again. */
    signal(sig, SIG_DFL);
    if (si->si_code <= 0)
        raise(sig);
}

static void on_signal(int sig, siginfo_t *si, void *uc)
{
    if (sig == SIGBUS && guard_env) {
        sigjmp_buf *env = guard_env;
        guard_env = NULL;
        siglongjmp(*env, 1);
    }
    if (executing && executing_log && (*executing & DP_LOG_VALID)) {
        executing_log->crashed = *executing;
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
    }
    for (unsigned i = 0; i < NSIGNALS; i++)
        if (fatal_signals[i] == sig) {
            chain_to_previous(i, sig, si, uc);
            return;
        }
}

/* Installs the handler, keeping whatever was there (Python's faulthandler, say) as the
 * next in line. Called at every queue start: a handler installed after ours is kept
 * behind ours again. */
void dp_guard_install(void)
{
    pthread_mutex_lock(&install_mu);
    for (unsigned i = 0; i < NSIGNALS; i++) {
        struct sigaction cur, ours;
        sigaction(fatal_signals[i], NULL, &cur);
        if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_signal)
            continue;
        memset(&ours, 0, sizeof(ours));
        ours.sa_sigaction = on_signal;
        ours.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
        sigemptyset(&ours.sa_mask);
        previous[i] = cur;
        sigaction(fatal_signals[i], &ours, NULL);
    }
    pthread_mutex_unlock(&install_mu);
}

/* Pops a chain; a fault in guest memory while walking it stops the queue. */
int dp_guard_pop(struct dp_vq *vq, struct dp_chain *c)
{
    sigjmp_buf env;
    sigjmp_buf *volatile outer = guard_env;
    int r;
    if (sigsetjmp(env, 0)) {
        guard_env = outer;
        if (!vq->broken) {
            vq->broken = DP_BROKEN_FAULT;
            vq->broken_head = c->head;
        }
        return DP_POP_BROKEN;
    }
    enter(&env);
    r = dp_vq_pop(vq, c);
    leave(outer);
    return r;
}

/* Loads 4 bytes of guest memory; false when the page faulted. */
bool dp_guard_load32(const uint8_t *p, uint32_t *out)
{
    sigjmp_buf env;
    sigjmp_buf *volatile outer = guard_env;
    if (sigsetjmp(env, 0)) {
        guard_env = outer;
        return false;
    }
    enter(&env);
    memcpy(out, p, sizeof(*out));
    leave(outer);
    return true;
}

/* Stores one byte into guest memory; false when the page faulted. */
bool dp_guard_store(uint8_t *p, uint8_t value)
{
    sigjmp_buf env;
    sigjmp_buf *volatile outer = guard_env;
    if (sigsetjmp(env, 0)) {
        guard_env = outer;
        return false;
    }
    enter(&env);
    *(volatile uint8_t *)p = value;
    leave(outer);
    return true;
}

void dp_log_init(struct dp_log *log)
{
    if (log->magic != DP_LOG_MAGIC || log->version != DP_LOG_VERSION) {
        memset(log, 0, sizeof(*log));
        log->magic = DP_LOG_MAGIC;
        log->version = DP_LOG_VERSION;
    }
    log->executing[0] = log->executing[1] = 0;
}

/* Executes one request with guest-memory faults turned into a failed request.
 * Returns its used length, or UINT32_MAX when its status byte itself faulted. */
uint32_t dp_guard_execute(struct dp_blk *blk, struct dp_slot *s, struct dp_stats *stats,
                          struct dp_log *log, unsigned thread, int *write_enospc)
{
    sigjmp_buf env;
    sigjmp_buf *volatile outer = guard_env;
    volatile uint32_t *slot = log ? &log->executing[thread] : NULL;
    uint32_t used;

    executing = slot;
    executing_log = log;
    if (slot)
        *slot = DP_LOG_VALID | s->chain.avail_idx;
    if (sigsetjmp(env, 0)) {
        guard_env = outer;
        stats->faults++;
        stats->errors++;
        used = dp_guard_store(s->chain.status, VIRTIO_BLK_S_IOERR) ? 1 : UINT32_MAX;
    } else {
        enter(&env);
        used = dp_blk_handle(blk, &s->chain, s->iov, stats, write_enospc);
        leave(outer);
    }
    if (slot)
        *slot = 0;
    executing = NULL;
    executing_log = NULL;
    return used;
}

/* Pops the chain of a head the in-flight log names; a fault stops the queue. */
int dp_guard_pop_head(struct dp_vq *vq, uint16_t head, struct dp_chain *c)
{
    sigjmp_buf env;
    sigjmp_buf *volatile outer = guard_env;
    int r;
    if (sigsetjmp(env, 0)) {
        guard_env = outer;
        if (!vq->broken) {
            vq->broken = DP_BROKEN_FAULT;
            vq->broken_head = head;
        }
        return DP_POP_BROKEN;
    }
    enter(&env);
    r = dp_vq_pop_head(vq, head, c);
    leave(outer);
    return r;
}

/* dp_blk_start and dp_blk_finish with guest-memory faults turned into a failed request:
 * the used length, DP_BLK_SUBMIT, or UINT32_MAX when the status byte itself faulted.
 * What start executes on the spot is recorded by head in the log's first slot, so that
 * a request that crashes the process is not run again by the next one. */
uint32_t dp_guard_start(struct dp_blk *blk, struct dp_slot *s, struct dp_stats *stats,
                        struct dp_log *log, int *write_enospc, struct dp_io *io)
{
    sigjmp_buf env;
    sigjmp_buf *volatile outer = guard_env;
    volatile uint32_t *slot = log ? &log->executing[0] : NULL;
    uint32_t used;
    executing = slot;
    executing_log = log;
    if (slot)
        *slot = DP_LOG_VALID | DP_LOG_BY_HEAD | s->chain.head;
    if (sigsetjmp(env, 0)) {
        guard_env = outer;
        stats->faults++;
        stats->errors++;
        used = dp_guard_store(s->chain.status, VIRTIO_BLK_S_IOERR) ? 1 : UINT32_MAX;
    } else {
        enter(&env);
        used = dp_blk_start(blk, &s->chain, s->iov, stats, write_enospc, io);
        leave(outer);
    }
    if (slot)
        *slot = 0;
    executing = NULL;
    executing_log = NULL;
    return used;
}

uint32_t dp_guard_finish(struct dp_slot *s, const struct dp_io *io, struct dp_stats *stats,
                         int *write_enospc)
{
    sigjmp_buf env;
    sigjmp_buf *volatile outer = guard_env;
    uint32_t used;
    if (sigsetjmp(env, 0)) {
        guard_env = outer;
        return UINT32_MAX;
    }
    enter(&env);
    used = dp_blk_finish(&s->chain, io, stats, write_enospc);
    leave(outer);
    return used;
}
