/* The file backend: ctx is a struct dp_file. A thick file keeps every block allocated,
 * so that a write can never fail for lack of space: discards keep their blocks. */
#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>
#include <linux/falloc.h>
#if __has_include(<liburing.h>) && !defined(CSI_VDUSE_NO_URING)
#define HAVE_URING 1
#include <liburing.h>
#endif

#include "backend.h"

static int fd_of(void *ctx)
{
    return ((const struct dp_file *)ctx)->fd;
}

static bool thick(void *ctx)
{
    return ((const struct dp_file *)ctx)->keep_allocated;
}

/* A transfer the file system would refuse under O_DIRECT (a 512-byte write on a 4k
 * disk, a buffer not aligned) goes through the page cache instead: the kernel keeps the
 * two views of the file coherent, so the guest sees one file either way. */
int dp_file_fd_for(const struct dp_file *f, const struct iovec *iov, int cnt, uint64_t off)
{
    uint64_t a = f->direct_align;
    if (!a || off % a)
        return f->fd;
    for (int i = 0; i < cnt; i++)
        if ((uintptr_t)iov[i].iov_base % a || iov[i].iov_len % a)
            return f->fd;
    return f->direct_fd;
}

unsigned dp_file_direct_align(int fd)
{
    struct statx st;
    if (statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &st) != 0 ||
        !(st.stx_mask & STATX_DIOALIGN))
        return 0;
    unsigned a = st.stx_dio_mem_align > st.stx_dio_offset_align ? st.stx_dio_mem_align
                                                                  : st.stx_dio_offset_align;
    return a;
}

static ssize_t file_preadv(void *ctx, const struct iovec *iov, int cnt, uint64_t off)
{
    return preadv(dp_file_fd_for(ctx, iov, cnt, off), iov, cnt, (off_t)off);
}

static ssize_t file_pwritev(void *ctx, const struct iovec *iov, int cnt, uint64_t off)
{
    return pwritev(dp_file_fd_for(ctx, iov, cnt, off), iov, cnt, (off_t)off);
}

static int file_flush(void *ctx)
{
    return fdatasync(fd_of(ctx)) ? -errno : 0;
}

static int punch(int fd, uint64_t off, uint64_t len)
{
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len);
}

/* A discard is a hint: a file system that cannot punch holes still succeeds. */
static int file_discard(void *ctx, uint64_t off, uint64_t len)
{
    if (thick(ctx) || punch(fd_of(ctx), off, len) == 0 || errno == EOPNOTSUPP)
        return 0;
    return -errno;
}

static int write_zero_pages(int fd, uint64_t off, uint64_t len)
{
    static const uint8_t zeros[65536];
    while (len) {
        size_t n = len < sizeof(zeros) ? (size_t)len : sizeof(zeros);
        ssize_t w = pwrite(fd, zeros, n, (off_t)off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return w < 0 ? -errno : -EIO;
        off += (uint64_t)w;
        len -= (uint64_t)w;
    }
    return 0;
}

static int file_write_zeroes(void *ctx, uint64_t off, uint64_t len, bool may_unmap)
{
    int fd = fd_of(ctx);
    if (may_unmap && !thick(ctx) && punch(fd, off, len) == 0)
        return 0;
    if (fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) == 0)
        return 0;
    if (!thick(ctx) && punch(fd, off, len) == 0)
        return 0;
    return write_zero_pages(fd, off, len);
}

const struct dp_backend_ops dp_file_ops = {
    .preadv = file_preadv,
    .pwritev = file_pwritev,
    .flush = file_flush,
    .discard = file_discard,
    .write_zeroes = file_write_zeroes,
};

/* io_uring: reads, writes and flushes in flight together and completing in any order;
 * discards and zeroing stay synchronous (rare, and fallocate blocks anyway). Built when
 * liburing's header is there (Debian: liburing-dev). */
#ifdef HAVE_URING
struct file_uring {
    struct io_uring ring;
    const struct dp_file *file;
};

int dp_file_uring_probe(void)
{
    struct io_uring ring;
    int r = io_uring_queue_init(2, &ring, 0);
    if (r == 0)
        io_uring_queue_exit(&ring);
    return r;
}

static void *uring_open(void *ctx, unsigned depth, int notify_fd, int *err)
{
    struct file_uring *u = calloc(1, sizeof(*u));
    if (!u) {
        *err = -ENOMEM;
        return NULL;
    }
    u->file = ctx;
    int r = io_uring_queue_init(depth, &u->ring, 0);
    if (r == 0 && (r = io_uring_register_eventfd(&u->ring, notify_fd)) != 0)
        io_uring_queue_exit(&u->ring);
    if (r != 0) {
        free(u);
        *err = r;
        return NULL;
    }
    return u;
}

static int prep(struct file_uring *u, struct dp_io *io)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&u->ring);
    if (!sqe) {
        int r = io_uring_submit(&u->ring);
        if (r < 0)
            return r;
        if (!(sqe = io_uring_get_sqe(&u->ring)))
            return -EBUSY;
    }
    uint64_t off = io->offset + io->moved;
    int fd = dp_file_fd_for(u->file, io->iov, io->iovcnt, off);
    if (io->op == DP_IO_READ)
        io_uring_prep_readv(sqe, fd, io->iov, (unsigned)io->iovcnt, (off_t)off);
    else if (io->op == DP_IO_WRITE)
        io_uring_prep_writev(sqe, fd, io->iov, (unsigned)io->iovcnt, (off_t)off);
    else
        io_uring_prep_fsync(sqe, u->file->fd, IORING_FSYNC_DATASYNC);
    io_uring_sqe_set_data(sqe, io);
    return 0;
}

static int uring_submit(void *aio, struct dp_io *io)
{
    io->moved = 0;
    io->result = 0;
    return prep(aio, io);
}

/* Until the kernel holds every prepared request; an error leaves the rest queued for
 * the next kick. */
static int uring_kick(void *aio)
{
    struct file_uring *u = aio;
    while (io_uring_sq_ready(&u->ring)) {
        int r = io_uring_submit(&u->ring);
        if (r == 0)
            return -EAGAIN;
        if (r < 0 && r != -EINTR)
            return r;
    }
    return 0;
}

static void advance(struct dp_io *io, size_t n)
{
    while (io->iovcnt && n >= io->iov->iov_len) {
        n -= io->iov->iov_len;
        io->iov++;
        io->iovcnt--;
    }
    if (io->iovcnt && n) {
        io->iov->iov_base = (uint8_t *)io->iov->iov_base + n;
        io->iov->iov_len -= n;
    }
}

/* A short read or write goes on from where it stopped; nothing moved at all (end of
 * file) is an I/O error, as on the synchronous path. */
static unsigned uring_reap(void *aio, struct dp_io **done, unsigned max)
{
    struct file_uring *u = aio;
    struct io_uring_cqe *cqe;
    unsigned n = 0;
    bool resubmitted = false;
    while (n < max && io_uring_peek_cqe(&u->ring, &cqe) == 0) {
        struct dp_io *io = io_uring_cqe_get_data(cqe);
        int res = cqe->res;
        io_uring_cqe_seen(&u->ring, cqe);
        if (res == -EINTR || res == -EAGAIN) {
            res = prep(u, io);
            if (res == 0) {
                resubmitted = true;
                continue;
            }
        } else if (io->op != DP_IO_FLUSH && res >= 0) {
            if (res == 0) {
                res = -EIO;
            } else {
                io->moved += (uint64_t)res;
                if (io->moved < io->len) {
                    advance(io, (size_t)res);
                    if ((res = prep(u, io)) == 0) {
                        resubmitted = true;
                        continue;
                    }
                } else {
                    res = 0;
                }
            }
        }
        io->result = res < 0 ? res : 0;
        done[n++] = io;
    }
    if (resubmitted)
        uring_kick(u);
    return n;
}

static void uring_close(void *aio)
{
    struct file_uring *u = aio;
    io_uring_queue_exit(&u->ring);
    free(u);
}

const struct dp_backend_ops dp_file_uring_ops = {
    .preadv = file_preadv,
    .pwritev = file_pwritev,
    .flush = file_flush,
    .discard = file_discard,
    .write_zeroes = file_write_zeroes,
    .aio_open = uring_open,
    .aio_submit = uring_submit,
    .aio_kick = uring_kick,
    .aio_reap = uring_reap,
    .aio_close = uring_close,
};
#else
int dp_file_uring_probe(void)
{
    return -ENOSYS;
}

const struct dp_backend_ops dp_file_uring_ops = {
    .preadv = file_preadv,
    .pwritev = file_pwritev,
    .flush = file_flush,
    .discard = file_discard,
    .write_zeroes = file_write_zeroes,
};
#endif
