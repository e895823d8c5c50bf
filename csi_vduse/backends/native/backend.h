/* What the data plane asks of a backend, per request, from C and without Python. A new
 * backend implements these and hands (ops, ctx) to the data plane through
 * Backend.native_ops(); the virtqueue and virtio-blk code never change for it. */
#ifndef CSI_VDUSE_BACKEND_H
#define CSI_VDUSE_BACKEND_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

/* preadv and pwritev behave as the system calls do (bytes moved, or -1 and errno);
 * the others return 0 or a negative errno. ENOSPC and EDQUOT are counted apart. */
struct dp_backend_ops {
    ssize_t (*preadv)(void *ctx, const struct iovec *iov, int iovcnt, uint64_t offset);
    ssize_t (*pwritev)(void *ctx, const struct iovec *iov, int iovcnt, uint64_t offset);
    int (*flush)(void *ctx);
    int (*discard)(void *ctx, uint64_t offset, uint64_t len);
    int (*write_zeroes)(void *ctx, uint64_t offset, uint64_t len, bool may_unmap);
};

/* file.c: a sparse (or thick) file on the node; ctx is a struct dp_file */
struct dp_file {
    int fd;
    bool keep_allocated;         /* thick: discards never give space back */
};
extern const struct dp_backend_ops dp_file_ops;

#endif
