/* The file backend: ctx is a struct dp_file. A thick file keeps every block allocated,
 * so that a write can never fail for lack of space: discards keep their blocks. */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <unistd.h>
#include <linux/falloc.h>

#include "backend.h"

static int fd_of(void *ctx)
{
    return ((const struct dp_file *)ctx)->fd;
}

static bool thick(void *ctx)
{
    return ((const struct dp_file *)ctx)->keep_allocated;
}

static ssize_t file_preadv(void *ctx, const struct iovec *iov, int cnt, uint64_t off)
{
    return preadv(fd_of(ctx), iov, cnt, (off_t)off);
}

static ssize_t file_pwritev(void *ctx, const struct iovec *iov, int cnt, uint64_t off)
{
    return pwritev(fd_of(ctx), iov, cnt, (off_t)off);
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
