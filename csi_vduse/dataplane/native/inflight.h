/* A queue's in-flight log: which requests were popped and not yet completed, kept in a
 * shared file mapping under the state dir so that it outlives the process (the role of
 * libvduse's VduseVirtqLogInflight). With completions out of ring order the used ring no
 * longer tells a new process what was in flight; this does.
 *
 * The queue's one ring thread keeps three rules:
 *   1. dp_inflight_popped(head) before the request is executed;
 *   2. the used elements and used->idx are published before dp_inflight_completed;
 *   3. no pop between publishing a completion and dp_inflight_completed, so a head the
 *      guest re-offers is never marked in flight while an earlier use of it is unlogged.
 * A crash between 2 and its dp_inflight_completed leaves heads marked in flight that the
 * used ring shows as done: dp_inflight_recover reads them back from the used ring. */
#ifndef CSI_VDUSE_INFLIGHT_H
#define CSI_VDUSE_INFLIGHT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <linux/virtio_ring.h>

#define DP_INFLIGHT_MAGIC 0x666e6971u  /* "qinf" */
#define DP_INFLIGHT_VERSION 1u

struct dp_inflight_desc {
    uint8_t inflight;
    uint8_t pad[7];
    uint64_t counter;            /* pop order, to re-execute in the order first popped */
};

struct dp_inflight {
    uint32_t magic, version;
    uint16_t num;                /* queue size the log was made for */
    uint16_t used_idx;           /* used->idx as of the latest logged completion */
    uint32_t pad;
    uint64_t counter;            /* requests popped so far */
    struct dp_inflight_desc desc[];
};

size_t dp_inflight_size(uint16_t num);
bool dp_inflight_valid(const struct dp_inflight *log, uint16_t num);
void dp_inflight_reset(struct dp_inflight *log, uint16_t num, uint16_t used_idx);
void dp_inflight_popped(struct dp_inflight *log, uint16_t head);
void dp_inflight_completed(struct dp_inflight *log, const uint16_t *heads, unsigned n,
                           uint16_t used_idx);
int dp_inflight_recover(struct dp_inflight *log, const struct vring_used_elem *used,
                        uint16_t used_idx, uint16_t avail_idx, uint16_t *heads);

#endif
