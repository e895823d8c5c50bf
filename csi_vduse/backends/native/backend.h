/* What the data plane asks of a backend, per request, from C and without Python. A new
 * backend implements these and hands (ops, ctx) to the data plane through
 * Backend.native_ops(); the virtqueue and virtio-blk code never change for it. */
#ifndef CSI_VDUSE_BACKEND_H
#define CSI_VDUSE_BACKEND_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

enum dp_io_op { DP_IO_READ = 0, DP_IO_WRITE = 1, DP_IO_FLUSH = 2 };

/* One request on the asynchronous path: a read or write of `len` bytes at `offset`, or a
 * flush of every write completed before it was submitted. The backend owns `iov` until it
 * hands the request back (it may advance it to finish a short transfer) and sets `result`:
 * 0 when all of it was done, else a negative errno. */
struct dp_io {
    uint8_t op;                  /* enum dp_io_op */
    int iovcnt;
    struct iovec *iov;
    uint64_t offset, len;
    uint64_t moved;              /* the backend's progress */
    int result;
};

/* preadv and pwritev behave as the system calls do (bytes moved, or -1 and errno);
 * the others return 0 or a negative errno. ENOSPC and EDQUOT are counted apart.
 *
 * The aio_* members are optional (NULL aio_open: every request runs synchronously). A
 * queue opens one context for its thread alone, at most `depth` requests in flight;
 * `notify_fd`, an eventfd, turns readable when completions wait to be reaped. */
struct dp_backend_ops {
    ssize_t (*preadv)(void *ctx, const struct iovec *iov, int iovcnt, uint64_t offset);
    ssize_t (*pwritev)(void *ctx, const struct iovec *iov, int iovcnt, uint64_t offset);
    int (*flush)(void *ctx);
    int (*discard)(void *ctx, uint64_t offset, uint64_t len);
    int (*write_zeroes)(void *ctx, uint64_t offset, uint64_t len, bool may_unmap);
    void *(*aio_open)(void *ctx, unsigned depth, int notify_fd, int *err);
    int (*aio_submit)(void *aio, struct dp_io *io);    /* queues it: 0 or -errno */
    int (*aio_kick)(void *aio);                        /* starts what was queued */
    unsigned (*aio_reap)(void *aio, struct dp_io **done, unsigned max);  /* never waits */
    void (*aio_close)(void *aio);                      /* nothing in flight any more */
    /* The backend reads or writes the iovecs' memory itself, in user space (librbd
     * copies on its own threads), instead of handing them to the kernel: the data plane
     * then touches every page first, where a fault fails the one request, since a fault
     * in the backend would kill the process. */
    bool user_copies;
};

/* file.c: a sparse (or thick) file on the node; ctx is a struct dp_file */
struct dp_file {
    int fd;
    bool keep_allocated;         /* thick: discards never give space back */
    /* cache=direct: reads and writes whose offset, lengths and buffers are multiples of
     * direct_align go to direct_fd (the same file opened O_DIRECT); 0: page cache only */
    unsigned direct_align;
    int direct_fd;
};
extern const struct dp_backend_ops dp_file_ops;       /* synchronous system calls */
extern const struct dp_backend_ops dp_file_uring_ops; /* reads, writes, flushes on io_uring */
int dp_file_uring_probe(void);   /* 0 when this process may use io_uring, else -errno */
/* The descriptor a read or write of these iovecs at `off` goes to. */
int dp_file_fd_for(const struct dp_file *f, const struct iovec *iov, int cnt, uint64_t off);
/* The O_DIRECT alignment the file system reports for fd (statx), or 0 when it says none. */
unsigned dp_file_direct_align(int fd);

/* rbd.c: an image in a Ceph pool through librbd; ctx is a struct dp_rbd. Functions return
 * 0 or a negative errno (-ENOSYS when built without librbd); `err` gets a message. */
struct dp_rbd_cluster {
    void *cluster, *ioctx;       /* rados_t, rados_ioctx_t of one pool */
};
struct dp_rbd {
    void *image;                 /* rbd_image_t */
    uint64_t size;
};
extern const struct dp_backend_ops dp_rbd_ops;
bool dp_rbd_built(void);
int dp_rbd_connect(struct dp_rbd_cluster *c, const char *monitors, const char *user,
                   const char *key, const char *pool, char *err, size_t errlen);
void dp_rbd_disconnect(struct dp_rbd_cluster *c);
int dp_rbd_create(struct dp_rbd_cluster *c, const char *name, uint64_t size);
int dp_rbd_remove(struct dp_rbd_cluster *c, const char *name);
int dp_rbd_open(struct dp_rbd_cluster *c, struct dp_rbd *r, const char *name, bool readonly,
                char *err, size_t errlen);
int dp_rbd_resize(struct dp_rbd *r, uint64_t size);
void dp_rbd_close(struct dp_rbd *r);
/* Image metadata: set `key` to `value`, or (value NULL) read it into out, *outlen bytes
 * (-ENODATA: unset; -ENOENT: no such image; -ERANGE: out too small). dp_rbd_meta opens
 * the image by name. */
int dp_rbd_meta(struct dp_rbd_cluster *c, const char *name, const char *key,
                const char *value, char *out, size_t *outlen);
int dp_rbd_image_meta(struct dp_rbd *r, const char *key, const char *value, char *out,
                      size_t *outlen);
int dp_rbd_grow(struct dp_rbd_cluster *c, const char *name, uint64_t *size);
/* Snapshots, format-2 clones, the trash and the pool's metadata (rbd.c says what each
 * does). */
int dp_rbd_snap_create(struct dp_rbd_cluster *c, const char *name, const char *snap,
                       uint64_t *size);
int dp_rbd_snap_remove(struct dp_rbd_cluster *c, const char *name, const char *snap);
int dp_rbd_snap_names(struct dp_rbd_cluster *c, const char *name, char *out, size_t *outlen);
int dp_rbd_clone(struct dp_rbd_cluster *c, const char *parent, const char *snap,
                 const char *child);
int dp_rbd_parent(struct dp_rbd_cluster *c, const char *name, const char *id,
                  const char *prefix, char *parent_id, size_t idlen, bool *ours);
int dp_rbd_trash_move(struct dp_rbd_cluster *c, const char *name, char *id, size_t idlen);
int dp_rbd_trash_remove(struct dp_rbd_cluster *c, const char *id);
int dp_rbd_pool_meta(struct dp_rbd_cluster *c, const char *key, const char *value, char *out,
                     size_t *outlen);

#endif
