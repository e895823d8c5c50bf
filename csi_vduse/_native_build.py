"""cffi (API mode) build of csi_vduse._native: the VDUSE ioctl wrappers and the C data plane.

Built by `pip install .` through setup.py's cffi_modules; compiled against the system's
<linux/vduse.h>, <linux/virtio_blk.h> and <linux/virtio_ring.h>.
"""

from pathlib import Path

from cffi import FFI

PKG = Path(__file__).resolve().parent
KERNEL_NATIVE = PKG / "kernel" / "native"
DATAPLANE_NATIVE = PKG / "dataplane" / "native"
BACKENDS_NATIVE = PKG / "backends" / "native"

CDEF = """
/* constants from the kernel headers */
#define VDUSE_API_VERSION ...
#define VDUSE_NAME_MAX ...
#define VDUSE_GET_VQ_STATE ...
#define VDUSE_SET_STATUS ...
#define VDUSE_UPDATE_IOTLB ...
#define VDUSE_REQ_RESULT_OK ...
#define VDUSE_REQ_RESULT_FAILED ...
#define VIRTIO_ID_BLOCK ...
#define VIRTIO_CONFIG_S_DRIVER_OK ...
#define VIRTIO_F_VERSION_1 ...
#define VIRTIO_F_ACCESS_PLATFORM ...
#define VIRTIO_RING_F_EVENT_IDX ...
#define VIRTIO_RING_F_INDIRECT_DESC ...
#define VIRTIO_BLK_F_SIZE_MAX ...
#define VIRTIO_BLK_F_SEG_MAX ...
#define VIRTIO_BLK_F_RO ...
#define VIRTIO_BLK_F_BLK_SIZE ...
#define VIRTIO_BLK_F_FLUSH ...
#define VIRTIO_BLK_F_TOPOLOGY ...
#define VIRTIO_BLK_F_MQ ...
#define VIRTIO_BLK_F_DISCARD ...
#define VIRTIO_BLK_F_WRITE_ZEROES ...
#define VIRTIO_BLK_T_IN ...
#define VIRTIO_BLK_T_OUT ...
#define VIRTIO_BLK_T_FLUSH ...
#define VIRTIO_BLK_T_GET_ID ...
#define VIRTIO_BLK_T_DISCARD ...
#define VIRTIO_BLK_T_WRITE_ZEROES ...
#define VIRTIO_BLK_S_OK ...
#define VIRTIO_BLK_S_IOERR ...
#define VIRTIO_BLK_S_UNSUPP ...
#define VIRTIO_BLK_ID_BYTES ...
#define VRING_DESC_F_NEXT ...
#define VRING_DESC_F_WRITE ...
#define VRING_DESC_F_INDIRECT ...
#define VRING_AVAIL_F_NO_INTERRUPT ...
#define VRING_USED_F_NO_NOTIFY ...
#define DP_MAX_DESCS ...
#define DP_MAX_SEGS ...
#define DP_BATCH ...
#define DP_MIN_QUEUE_SIZE ...
#define DP_MAX_QUEUE_SIZE ...
#define DP_MIN_MAPS ...
#define DP_LOG_SIZE ...
#define DP_LATENCY_BUCKETS ...
#define DP_LATENCY_FIRST_NS ...
#define DP_LOG_MAGIC ...
#define DP_LOG_VERSION ...
#define DP_PERM_READ ...
#define DP_PERM_WRITE ...

/* <linux/netlink.h>, <linux/genetlink.h>, <linux/vdpa.h> */
#define NETLINK_GENERIC ...
#define NLM_F_REQUEST ...
#define NLM_F_MULTI ...
#define NLM_F_ACK ...
#define NLM_F_DUMP ...
#define NLM_F_ACK_TLVS ...
#define NLMSG_ERROR ...
#define NLMSG_DONE ...
#define NETLINK_EXT_ACK ...
#define NETLINK_CAP_ACK ...
#define SOL_NETLINK ...
#define GENL_ID_CTRL ...
static const int CTRL_CMD_GETFAMILY;
static const int CTRL_ATTR_FAMILY_ID;
static const int CTRL_ATTR_FAMILY_NAME;
static const int NLMSGERR_ATTR_MSG;
static const int VDPA_CMD_MGMTDEV_GET;
static const int VDPA_CMD_DEV_NEW;
static const int VDPA_CMD_DEV_DEL;
static const int VDPA_CMD_DEV_GET;
static const int VDPA_ATTR_MGMTDEV_BUS_NAME;
static const int VDPA_ATTR_MGMTDEV_DEV_NAME;
static const int VDPA_ATTR_MGMTDEV_SUPPORTED_CLASSES;
static const int VDPA_ATTR_DEV_NAME;
static const int VDPA_ATTR_DEV_ID;
static const int VDPA_ATTR_DEV_VENDOR_ID;
static const int VDPA_ATTR_DEV_MAX_VQS;
static const int VDPA_ATTR_DEV_MAX_VQ_SIZE;

/* <sys/uio.h> */
struct iovec { void *iov_base; size_t iov_len; };

/* <linux/virtio_ring.h> */
struct vring_used_elem { uint32_t id; uint32_t len; };

/* dataplane/native/dataplane.h */
enum dp_broken { DP_OK, DP_BROKEN_RING, DP_BROKEN_NO_STATUS, DP_BROKEN_FAULT, DP_BROKEN_ORDER,
                 DP_BROKEN_LOG };
struct dp_iotlb { int dev_fd; uint32_t gen; unsigned nmaps, cap; uint32_t writers; ...; };
struct dp_stats {
    uint64_t reads, writes, flushes, discards, write_zeroes, get_ids;
    uint64_t read_bytes, written_bytes;
    uint64_t errors, unsupported, bad_chains;
    uint64_t faults, poisoned, enospc;
    uint64_t throttled_us;
    uint64_t latency_ns_sum;
    uint64_t latency[19];
};
enum dp_qos_kind { DP_QOS_READ_OPS, DP_QOS_WRITE_OPS, DP_QOS_READ_BYTES, DP_QOS_WRITE_BYTES,
                   DP_QOS_KINDS };
struct dp_qos_bucket { double rate; double burst; double tokens; };
struct dp_qos { uint64_t last_ns; struct dp_qos_bucket b[4]; ...; };
struct dp_device { struct dp_qos qos; ...; };
struct dp_blk {
    const struct dp_backend_ops *ops;
    void *ctx;
    uint64_t capacity;
    bool readonly;
    uint32_t max_discard_sectors, max_discard_seg;
    uint32_t max_write_zeroes_sectors, max_write_zeroes_seg;
    char serial[...];
    ...;
};
struct dp_chain { uint16_t head; uint16_t avail_idx; ...; };
struct dp_vq {
    uint16_t num;
    uint16_t last_avail_idx;
    uint16_t used_idx;
    bool event_idx;
    uint8_t broken;
    uint16_t broken_head;
    ...;
};
struct dp_log {
    uint32_t magic, version;
    uint32_t executing[2];
    uint32_t crashed;
};
struct dp_queue {
    uint32_t index;
    int event_fd;
    int write_enospc;
    uint64_t interrupts;
    uint32_t in_flight;
    uint64_t parallel_batches;
    uint64_t parallel_min_bytes;
    uint32_t poll_us;
    bool crashed_pending;
    uint16_t crashed_idx;
    struct dp_vq vq;
    struct dp_device *dev;
    struct dp_inflight *inflight;
    bool inflight_disagreed;
    struct dp_engine *engine;
    uint32_t resumed;
    bool resumed_from_log;
    struct dp_stats stats;
    ...;
};

int dp_iotlb_init(struct dp_iotlb *tlb, int dev_fd, unsigned capacity);
void dp_iotlb_destroy(struct dp_iotlb *tlb);
int dp_iotlb_add(struct dp_iotlb *tlb, uint64_t start, uint64_t last, uint8_t *va, uint8_t perm);
void dp_iotlb_invalidate(struct dp_iotlb *tlb, uint64_t start, uint64_t last);
void dp_vq_init(struct dp_vq *vq, struct dp_iotlb *tlb, uint16_t num, uint64_t desc,
                uint64_t avail, uint64_t used, uint16_t last_avail_idx, bool event_idx);
void dp_vq_push(struct dp_vq *vq, const struct dp_chain *c, uint32_t len);
struct dp_queue *dp_queue_new(uint32_t index, int dev_fd, int kick_fd, int stop_fd,
                              struct dp_blk *blk, struct dp_iotlb *tlb, uint32_t max_descs,
                              struct dp_log *log);
void dp_queue_free(struct dp_queue *q);
int dp_queue_process(struct dp_queue *q);
int dp_queue_resume(struct dp_queue *q);
int dp_queue_enable_async(struct dp_queue *q, uint32_t depth);
int dp_queue_run(struct dp_queue *q);
void dp_queue_request_stop(struct dp_queue *q);
void dp_qos_init(struct dp_qos *qos);
void dp_qos_destroy(struct dp_qos *qos);
void dp_qos_set(struct dp_qos *qos, const uint64_t limits[4], uint32_t burst_ms,
                uint64_t now_ns);
void dp_qos_charge(struct dp_qos *qos, const uint64_t used[4], uint64_t now_ns);
uint64_t dp_qos_wait_ns(struct dp_qos *qos, uint64_t now_ns);
int dp_device_init(struct dp_device *dev);
void dp_device_destroy(struct dp_device *dev);
int dp_device_quiesce(struct dp_device *dev, uint32_t timeout_ms);
void dp_device_resume(struct dp_device *dev);
"""

SOURCES = [
    KERNEL_NATIVE / "vduse_ioctl.c",
    DATAPLANE_NATIVE / "iotlb.c",
    DATAPLANE_NATIVE / "virtqueue.c",
    DATAPLANE_NATIVE / "blk.c",
    DATAPLANE_NATIVE / "worker.c",
    DATAPLANE_NATIVE / "guard.c",
    BACKENDS_NATIVE / "file.c",
    BACKENDS_NATIVE / "rbd.c",
    DATAPLANE_NATIVE / "qos.c",
    DATAPLANE_NATIVE / "inflight.c",
    DATAPLANE_NATIVE / "engine.c",
]
# io_uring for the file backend when liburing is installed (file.c checks for the header).
HEADER_DIRS = (Path("/usr/include"), Path("/usr/local/include"))
URING = ["uring"] if any((d / "liburing.h").exists() for d in HEADER_DIRS) else []
# Ceph RBD when librbd is installed (rbd.c checks for the header).
RBD = ["rbd", "rados"] if any((d / "rbd" / "librbd.h").exists() for d in HEADER_DIRS) else []


def header_declarations(path: Path) -> str:
    """A plain C header as cffi's cdef takes it: the declarations without preprocessor lines."""
    return "\n".join(
        line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")
    )


ffibuilder = FFI()
# backend.h goes before the data plane's declarations, which use its types
HEAD, DATAPLANE = CDEF.split("/* dataplane/native/dataplane.h */")
ffibuilder.cdef(
    HEAD
    + header_declarations(BACKENDS_NATIVE / "backend.h")
    + DATAPLANE
    + header_declarations(KERNEL_NATIVE / "vduse_ioctl.h")
    + header_declarations(DATAPLANE_NATIVE / "inflight.h")
)
ffibuilder.set_source(
    "csi_vduse._native",
    """
    #include <sys/socket.h>
    #include <linux/netlink.h>
    #include <linux/genetlink.h>
    #include <linux/vdpa.h>
    #include <linux/vduse.h>
    #include <linux/virtio_ids.h>
    #include <linux/virtio_config.h>
    #include <linux/virtio_blk.h>
    #include <linux/virtio_ring.h>
    #include "vduse_ioctl.h"
    #include "dataplane.h"
    """,
    sources=[str(p.relative_to(PKG.parent)) for p in SOURCES],
    include_dirs=[
        str(KERNEL_NATIVE.relative_to(PKG.parent)),
        str(DATAPLANE_NATIVE.relative_to(PKG.parent)),
        str(BACKENDS_NATIVE.relative_to(PKG.parent)),
    ],
    extra_compile_args=[
        "-O2",
        "-std=gnu11",
        "-Wall",
        "-Wextra",
        "-Wno-unused-parameter",
        "-D_GNU_SOURCE",
        "-pthread",
    ],
    libraries=URING + RBD,
    extra_link_args=["-pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=False)
