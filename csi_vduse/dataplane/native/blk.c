/* virtio-blk request execution over a flattened descriptor chain. */
#include <endian.h>
#include <errno.h>
#include <limits.h>
#include <string.h>
#include <linux/virtio_blk.h>

#include "dataplane.h"

#define SECTOR 512u
#define HDR_LEN sizeof(struct virtio_blk_outhdr)
#define RANGE_LEN sizeof(struct virtio_blk_discard_write_zeroes)

/* Segment range of one direction: readable segments precede writable ones. */
static void dir_range(const struct dp_chain *c, bool write, uint32_t *first, uint32_t *end)
{
    uint32_t i = 0;
    while (i < c->nsegs && !c->segs[i].write)
        i++;
    *first = write ? i : 0;
    *end = write ? c->nsegs : i;
}

/* iovecs over bytes [off, off + len) of one direction; returns the count. */
static int build_iov(const struct dp_chain *c, bool write, uint64_t off, uint64_t len,
                     struct iovec *iov)
{
    uint32_t i, end;
    int n = 0;
    dir_range(c, write, &i, &end);
    for (; i < end && len; i++) {
        const struct dp_seg *s = &c->segs[i];
        if (off >= s->len) {
            off -= s->len;
            continue;
        }
        uint64_t take = s->len - off < len ? s->len - off : len;
        iov[n++] = (struct iovec){s->addr + off, (size_t)take};
        len -= take;
        off = 0;
    }
    return n;
}

static void copy_from_chain(const struct dp_chain *c, uint64_t off, void *dst, size_t len,
                            struct iovec *iov)
{
    int n = build_iov(c, false, off, len, iov);
    uint8_t *d = dst;
    for (int i = 0; i < n; i++) {
        memcpy(d, iov[i].iov_base, iov[i].iov_len);
        d += iov[i].iov_len;
    }
}

static void copy_to_chain(const struct dp_chain *c, uint64_t off, const void *src, size_t len,
                          struct iovec *iov)
{
    int n = build_iov(c, true, off, len, iov);
    const uint8_t *s = src;
    for (int i = 0; i < n; i++) {
        memcpy(iov[i].iov_base, s, iov[i].iov_len);
        s += iov[i].iov_len;
    }
}

static void iov_advance(struct iovec **iov, int *cnt, size_t n)
{
    while (*cnt && n >= (*iov)->iov_len) {
        n -= (*iov)->iov_len;
        (*iov)++;
        (*cnt)--;
    }
    if (*cnt && n) {
        (*iov)->iov_base = (uint8_t *)(*iov)->iov_base + n;
        (*iov)->iov_len -= n;
    }
}

static bool in_capacity(const struct dp_blk *blk, uint64_t sector, uint64_t sectors)
{
    return sector <= blk->capacity && sectors <= blk->capacity - sector;
}

static bool out_of_space(int err)
{
    return err == ENOSPC || err == EDQUOT;
}

/* Populates every page of the buffers (read, or rewritten with its own value where the
 * device writes), so that a page that cannot be populated faults here, inside the
 * caller's guard, and never in a backend's own thread. */
static void touch_pages(const struct iovec *iov, int cnt, bool device_writes)
{
    for (int i = 0; i < cnt; i++) {
        uintptr_t a = (uintptr_t)iov[i].iov_base, end = a + iov[i].iov_len;
        while (a < end) {
            volatile uint8_t *b = (volatile uint8_t *)a;
            uint8_t v = *b;
            if (device_writes)
                *b = v;
            a = (a | 4095u) + 1;
        }
    }
}

static uint8_t rw(struct dp_blk *blk, const struct dp_chain *c, bool is_read, uint64_t sector,
                  uint64_t len, struct iovec *iov, int *err)
{
    if (len == 0 || len % SECTOR || !in_capacity(blk, sector, len / SECTOR))
        return VIRTIO_BLK_S_IOERR;
    if (!is_read && blk->readonly)
        return VIRTIO_BLK_S_IOERR;
    /* Reads fill the writable segments (less the status byte); writes take the
     * readable ones after the header. */
    int cnt = build_iov(c, is_read, is_read ? 0 : HDR_LEN, len, iov);
    if (blk->ops->user_copies)
        touch_pages(iov, cnt, is_read);
    uint64_t off = sector * SECTOR;
    while (cnt > 0) {
        int chunk = cnt < IOV_MAX ? cnt : IOV_MAX;
        ssize_t n = is_read ? blk->ops->preadv(blk->ctx, iov, chunk, off)
                            : blk->ops->pwritev(blk->ctx, iov, chunk, off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            *err = n < 0 ? errno : EIO;
            return VIRTIO_BLK_S_IOERR;
        }
        off += (uint64_t)n;
        iov_advance(&iov, &cnt, (size_t)n);
    }
    return VIRTIO_BLK_S_OK;
}

static uint8_t ranges(struct dp_blk *blk, const struct dp_chain *c, uint32_t type, uint64_t len,
                      struct iovec *iov, int *errp)
{
    bool discard = type == VIRTIO_BLK_T_DISCARD;
    uint32_t max_seg = discard ? blk->max_discard_seg : blk->max_write_zeroes_seg;
    uint32_t max_sectors = discard ? blk->max_discard_sectors : blk->max_write_zeroes_sectors;
    uint64_t count = len / RANGE_LEN;

    if (max_seg == 0)
        return VIRTIO_BLK_S_UNSUPP;
    if (len == 0 || len % RANGE_LEN || count > max_seg)
        return VIRTIO_BLK_S_IOERR;
    if (blk->readonly)
        return VIRTIO_BLK_S_IOERR;
    for (uint64_t i = 0; i < count; i++) {
        struct virtio_blk_discard_write_zeroes r;
        copy_from_chain(c, HDR_LEN + i * RANGE_LEN, &r, sizeof(r), iov);
        uint64_t sector = le64toh(r.sector);
        uint32_t num = le32toh(r.num_sectors), flags = le32toh(r.flags);
        bool unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
        if ((flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) || (discard && unmap))
            return VIRTIO_BLK_S_UNSUPP;
        if (num > max_sectors || !in_capacity(blk, sector, num))
            return VIRTIO_BLK_S_IOERR;
        int err = discard ? blk->ops->discard(blk->ctx, sector * SECTOR, (uint64_t)num * SECTOR)
                          : blk->ops->write_zeroes(blk->ctx, sector * SECTOR,
                                                   (uint64_t)num * SECTOR, unmap);
        if (err) {
            *errp = -err;
            return VIRTIO_BLK_S_IOERR;
        }
    }
    return VIRTIO_BLK_S_OK;
}

static uint32_t finish(struct dp_chain *c, struct dp_stats *st, uint8_t s, int err,
                       uint32_t used, int *write_enospc)
{
    if (s == VIRTIO_BLK_S_IOERR)
        st->errors++;
    else if (s == VIRTIO_BLK_S_UNSUPP)
        st->unsupported++;
    if (out_of_space(err)) {
        st->enospc++;
        __atomic_store_n(write_enospc, 1, __ATOMIC_RELAXED);
    }
    *c->status = s;
    return used + 1;
}

/* Executes one request and writes its status. Returns the used length: the bytes
 * written into the driver's buffers, status byte included. A refused chain is not
 * executed; its status byte was found by the ring walk. */
uint32_t dp_blk_handle(struct dp_blk *blk, struct dp_chain *c, struct iovec *iov,
                       struct dp_stats *st, int *write_enospc)
{
    if (c->bad || c->poisoned) {
        if (c->bad)
            st->bad_chains++;
        else
            st->poisoned++;
        *c->status = VIRTIO_BLK_S_IOERR;
        return 1;
    }
    uint64_t data_in = c->in_len - 1, data_out;
    uint32_t used = 0;
    uint8_t s;
    int err = 0;

    if (c->out_len < HDR_LEN) {
        st->bad_chains++;
        *c->status = VIRTIO_BLK_S_IOERR;
        return 1;
    }
    data_out = c->out_len - HDR_LEN;
    struct virtio_blk_outhdr hdr;
    copy_from_chain(c, 0, &hdr, sizeof(hdr), iov);
    uint32_t type = le32toh(hdr.type);
    uint64_t sector = le64toh(hdr.sector);

    switch (type) {
    case VIRTIO_BLK_T_IN:
        s = rw(blk, c, true, sector, data_in, iov, &err);
        st->reads++;
        if (s == VIRTIO_BLK_S_OK) {
            st->read_bytes += data_in;
            used = (uint32_t)data_in;
        }
        break;
    case VIRTIO_BLK_T_OUT:
        s = rw(blk, c, false, sector, data_out, iov, &err);
        st->writes++;
        if (s == VIRTIO_BLK_S_OK) {
            st->written_bytes += data_out;
            __atomic_store_n(write_enospc, 0, __ATOMIC_RELAXED);
        }
        break;
    case VIRTIO_BLK_T_FLUSH:
        err = -blk->ops->flush(blk->ctx);
        s = err ? VIRTIO_BLK_S_IOERR : VIRTIO_BLK_S_OK;
        st->flushes++;
        break;
    case VIRTIO_BLK_T_GET_ID:
        used = data_in < DP_SERIAL_LEN ? (uint32_t)data_in : DP_SERIAL_LEN;
        copy_to_chain(c, 0, blk->serial, used, iov);
        s = VIRTIO_BLK_S_OK;
        st->get_ids++;
        break;
    case VIRTIO_BLK_T_DISCARD:
    case VIRTIO_BLK_T_WRITE_ZEROES:
        s = ranges(blk, c, type, data_out, iov, &err);
        if (type == VIRTIO_BLK_T_DISCARD)
            st->discards++;
        else
            st->write_zeroes++;
        break;
    default:
        s = VIRTIO_BLK_S_UNSUPP;
    }
    return finish(c, st, s, err, used, write_enospc);
}

/* Starts one request on the asynchronous path. A read or write within one system call's
 * iovec limit, or a flush, fills `io` and returns DP_BLK_SUBMIT; every other request
 * (and every refused one) executes here, as dp_blk_handle does, and returns its used
 * length. */
uint32_t dp_blk_start(struct dp_blk *blk, struct dp_chain *c, struct iovec *iov,
                      struct dp_stats *st, int *write_enospc, struct dp_io *io)
{
    if (c->bad || c->poisoned || c->out_len < HDR_LEN)
        return dp_blk_handle(blk, c, iov, st, write_enospc);
    struct virtio_blk_outhdr hdr;
    copy_from_chain(c, 0, &hdr, sizeof(hdr), iov);
    uint32_t type = le32toh(hdr.type);
    uint64_t sector = le64toh(hdr.sector);
    if (type == VIRTIO_BLK_T_FLUSH) {
        *io = (struct dp_io){.op = DP_IO_FLUSH};
        return DP_BLK_SUBMIT;
    }
    if (type != VIRTIO_BLK_T_IN && type != VIRTIO_BLK_T_OUT)
        return dp_blk_handle(blk, c, iov, st, write_enospc);
    bool is_read = type == VIRTIO_BLK_T_IN;
    uint64_t len = is_read ? c->in_len - 1 : c->out_len - HDR_LEN;
    if (len == 0 || len % SECTOR || !in_capacity(blk, sector, len / SECTOR) ||
        (!is_read && blk->readonly))
        return dp_blk_handle(blk, c, iov, st, write_enospc);  /* fails it */
    int cnt = build_iov(c, is_read, is_read ? 0 : HDR_LEN, len, iov);
    if (cnt > IOV_MAX)
        return dp_blk_handle(blk, c, iov, st, write_enospc);
    if (blk->ops->user_copies)
        touch_pages(iov, cnt, is_read);
    *io = (struct dp_io){.op = is_read ? DP_IO_READ : DP_IO_WRITE, .iovcnt = cnt, .iov = iov,
                         .offset = sector * SECTOR, .len = len};
    return DP_BLK_SUBMIT;
}

/* Completes a request the backend finished (dp_blk_start's `io`): counts it, writes its
 * status and returns its used length. */
uint32_t dp_blk_finish(struct dp_chain *c, const struct dp_io *io, struct dp_stats *st,
                       int *write_enospc)
{
    uint8_t s = io->result ? VIRTIO_BLK_S_IOERR : VIRTIO_BLK_S_OK;
    uint32_t used = 0;
    switch (io->op) {
    case DP_IO_READ:
        st->reads++;
        if (!io->result) {
            st->read_bytes += io->len;
            used = (uint32_t)io->len;
        }
        break;
    case DP_IO_WRITE:
        st->writes++;
        if (!io->result) {
            st->written_bytes += io->len;
            __atomic_store_n(write_enospc, 0, __ATOMIC_RELAXED);
        }
        break;
    default:
        st->flushes++;
    }
    return finish(c, st, s, -io->result, used, write_enospc);
}
