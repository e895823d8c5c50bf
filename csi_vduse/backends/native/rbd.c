/* The Ceph RBD backend: ctx is a struct dp_rbd, an image open through librbd. Reads,
 * writes and flushes go through librbd's asynchronous API; its completion callbacks run
 * on librbd's threads, so they only hand the request back (a list and an eventfd) to the
 * queue's worker, which reaps it. Built when librbd's headers are there (Debian:
 * librbd-dev); without them every entry point says -ENOSYS. */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#if __has_include(<rbd/librbd.h>) && !defined(CSI_VDUSE_NO_RBD)
#define HAVE_RBD 1
#include <rados/librados.h>
#include <rbd/librbd.h>
#endif

#include "backend.h"

#ifdef HAVE_RBD

static void set_error(char *err, size_t len, const char *what, int r)
{
    if (err && len)
        snprintf(err, len, "%s: %s", what, strerror(-r));
}

/* Connects as `user` (without "client.") to the monitors with `key`; no ceph.conf and no
 * keyring file are read, so the CSI secret is all a node needs. */
int dp_rbd_connect(struct dp_rbd_cluster *c, const char *monitors, const char *user,
                   const char *key, const char *pool, char *err, size_t errlen)
{
    rados_t cluster;
    int r = rados_create(&cluster, user);
    if (r < 0) {
        set_error(err, errlen, "rados_create", r);
        return r;
    }
    const char *settings[][2] = {
        {"mon_host", monitors}, {"key", key}, {"keyring", ""},
        {"log_to_stderr", "false"}, {"err_to_stderr", "false"},
        {"client_mount_timeout", "30"}, {"rados_mon_op_timeout", "30"},
        {"rados_osd_op_timeout", "0"},  /* a slow OSD is waited for, never an error */
        /* librbd's cache would answer writes from this process's memory: a killed plugin
         * would lose writes the guest was told were done. A write completes in the OSDs. */
        {"rbd_cache", "false"},
    };
    for (size_t i = 0; i < sizeof(settings) / sizeof(settings[0]); i++)
        if ((r = rados_conf_set(cluster, settings[i][0], settings[i][1])) < 0) {
            set_error(err, errlen, settings[i][0], r);
            goto fail;
        }
    if ((r = rados_connect(cluster)) < 0) {
        set_error(err, errlen, "connecting to the monitors", r);
        goto fail;
    }
    if ((r = rados_ioctx_create(cluster, pool, &c->ioctx)) < 0) {
        set_error(err, errlen, "opening the pool", r);
        goto fail;
    }
    c->cluster = cluster;
    return 0;
fail:
    rados_shutdown(cluster);
    return r;
}

void dp_rbd_disconnect(struct dp_rbd_cluster *c)
{
    if (c->ioctx)
        rados_ioctx_destroy(c->ioctx);
    if (c->cluster)
        rados_shutdown(c->cluster);
    c->ioctx = c->cluster = NULL;
}

int dp_rbd_create(struct dp_rbd_cluster *c, const char *name, uint64_t size)
{
    int order = 0;  /* 4 MiB objects */
    return rbd_create2(c->ioctx, name, size,
                       RBD_FEATURE_LAYERING | RBD_FEATURE_EXCLUSIVE_LOCK, &order);
}

int dp_rbd_remove(struct dp_rbd_cluster *c, const char *name)
{
    return rbd_remove(c->ioctx, name);
}

/* Opens the image; a writer takes the exclusive lock and keeps it (no transparent
 * hand-over), so that a second node writing the same image fails to open it. */
int dp_rbd_open(struct dp_rbd_cluster *c, struct dp_rbd *r, const char *name, bool readonly,
                char *err, size_t errlen)
{
    rbd_image_t image;
    int ret = readonly ? rbd_open_read_only(c->ioctx, name, &image, NULL)
                       : rbd_open(c->ioctx, name, &image, NULL);
    if (ret < 0) {
        set_error(err, errlen, "opening the image", ret);
        return ret;
    }
    if (!readonly && (ret = rbd_lock_acquire(image, RBD_LOCK_MODE_EXCLUSIVE)) < 0) {
        if (ret == -EINVAL)
            set_error(err, errlen, "the image lacks the exclusive-lock feature", ret);
        else
            set_error(err, errlen, "its exclusive lock is held by another client", ret);
        rbd_close(image);
        return ret;
    }
    uint64_t size;
    if ((ret = rbd_get_size(image, &size)) < 0) {
        set_error(err, errlen, "reading the image's size", ret);
        rbd_close(image);
        return ret;
    }
    r->image = image;
    r->size = size;
    return 0;
}

int dp_rbd_resize(struct dp_rbd *r, uint64_t size)
{
    int ret = rbd_resize(r->image, size);
    if (ret == 0)
        r->size = size;
    return ret;
}

void dp_rbd_close(struct dp_rbd *r)
{
    if (r->image)
        rbd_close(r->image);
    r->image = NULL;
}

/* The image's metadata `key`: set to `value`, or (value NULL) read into out (*outlen
 * bytes, set to the length on return; -ERANGE when it is too small, -ENODATA when unset,
 * as -ENOENT says the image is missing). */
static int meta(rbd_image_t image, const char *key, const char *value, char *out,
                size_t *outlen)
{
    if (value)
        return rbd_metadata_set(image, key, value);
    int r = rbd_metadata_get(image, key, out, outlen);
    return r == -ENOENT ? -ENODATA : r;
}

int dp_rbd_meta(struct dp_rbd_cluster *c, const char *name, const char *key,
                const char *value, char *out, size_t *outlen)
{
    rbd_image_t image;
    int r = value ? rbd_open(c->ioctx, name, &image, NULL)
                  : rbd_open_read_only(c->ioctx, name, &image, NULL);
    if (r < 0)
        return r;
    r = meta(image, key, value, out, outlen);
    rbd_close(image);
    return r;
}

int dp_rbd_image_meta(struct dp_rbd *r, const char *key, const char *value, char *out,
                      size_t *outlen)
{
    return meta(r->image, key, value, out, outlen);
}

/* Grows a closed image, or one another client holds (librbd asks the lock's owner to do
 * it); the size it has after is in *size. Never shrinks. */
int dp_rbd_grow(struct dp_rbd_cluster *c, const char *name, uint64_t *size)
{
    rbd_image_t image;
    uint64_t now;
    int r = rbd_open(c->ioctx, name, &image, NULL);
    if (r < 0)
        return r;
    if ((r = rbd_get_size(image, &now)) == 0 && now < *size)
        r = rbd_resize(image, *size);
    if (r == 0 && now > *size)
        *size = now;
    rbd_close(image);
    return r;
}

/* Snapshots, clones and the trash: the controller's operations on images it does not
 * serve. Each opens the image by name (or, in the trash, by id) for the one call. */

/* Creates snapshot `snap` of image `name` (an existing one of that name is kept: a cut that
 * was never answered) and sets *size to the image's size at it. Works while another client
 * holds the image's lock: librbd asks the owner to take it. */
int dp_rbd_snap_create(struct dp_rbd_cluster *c, const char *name, const char *snap,
                       uint64_t *size)
{
    rbd_image_t image;
    int r = rbd_open(c->ioctx, name, &image, NULL);
    if (r < 0)
        return r;
    r = rbd_snap_create(image, snap);
    if (r == -EEXIST)
        r = 0;
    if (r == 0 && (r = rbd_snap_set(image, snap)) == 0) {
        r = rbd_get_size(image, size);
        rbd_snap_set(image, NULL);
    }
    rbd_close(image);
    return r;
}

/* Removes the snapshot (none is not an error). One that clones still need stays in the
 * image's trash namespace until the last of them is removed (clone format 2). */
int dp_rbd_snap_remove(struct dp_rbd_cluster *c, const char *name, const char *snap)
{
    rbd_image_t image;
    int r = rbd_open(c->ioctx, name, &image, NULL);
    if (r < 0)
        return r;
    bool exists = false;
    if ((r = rbd_snap_exists(image, snap, &exists)) == 0 && exists)
        r = rbd_snap_remove(image, snap);
    rbd_close(image);
    return r == -ENOENT ? 0 : r;
}

/* The names of the image's user snapshots (not those in the trash namespace), each ended by NUL, in
 * out (*outlen bytes; -ERANGE with the size needed in *outlen). */
int dp_rbd_snap_names(struct dp_rbd_cluster *c, const char *name, char *out, size_t *outlen)
{
    rbd_image_t image;
    int r = rbd_open_read_only(c->ioctx, name, &image, NULL);
    if (r < 0)
        return r;
    int max = 16;
    rbd_snap_info_t *snaps = NULL;
    for (;;) {
        snaps = calloc(max, sizeof(*snaps));
        if (!snaps) {
            r = -ENOMEM;
            break;
        }
        r = rbd_snap_list(image, snaps, &max);
        if (r != -ERANGE)
            break;
        free(snaps);
        snaps = NULL;
    }
    if (r >= 0) {
        int count = r;
        size_t need = 0, at = 0;
        r = 0;
        for (int i = 0; i < count && r == 0; i++) {
            rbd_snap_namespace_type_t type;
            if ((r = rbd_snap_get_namespace_type(image, snaps[i].id, &type)) < 0)
                break;
            if (type != RBD_SNAP_NAMESPACE_TYPE_USER)
                continue;  /* in the trash namespace: a clone still needs it */
            size_t len = strlen(snaps[i].name) + 1;
            need += len;
            if (need <= *outlen) {
                memcpy(out + at, snaps[i].name, len);
                at += len;
            }
        }
        if (r == 0 && need > *outlen)
            r = -ERANGE;
        *outlen = need;
        rbd_snap_list_end(snaps);
    }
    free(snaps);
    rbd_close(image);
    return r;
}

/* Clones `parent`@`snap` into a new image `child` of the same pool: clone format 2, so
 * the snapshot needs no protection and may be removed while the clone lives. */
int dp_rbd_clone(struct dp_rbd_cluster *c, const char *parent, const char *snap,
                 const char *child)
{
    rbd_image_options_t opts;
    rbd_image_options_create(&opts);
    int r = rbd_image_options_set_uint64(opts, RBD_IMAGE_OPTION_CLONE_FORMAT, 2);
    if (r == 0)
        r = rbd_image_options_set_uint64(opts, RBD_IMAGE_OPTION_FEATURES,
                                         RBD_FEATURE_LAYERING | RBD_FEATURE_EXCLUSIVE_LOCK);
    if (r == 0)
        r = rbd_clone3(c->ioctx, parent, snap, c->ioctx, child, opts);
    rbd_image_options_destroy(opts);
    return r;
}

/* The id of the parent of the image `name` (or, name NULL, of the image with id `id`, as
 * one in the trash is reached), with *ours set when its name starts with `prefix`.
 * -ENOENT: no such image, or no parent. */
int dp_rbd_parent(struct dp_rbd_cluster *c, const char *name, const char *id,
                  const char *prefix, char *parent_id, size_t idlen, bool *ours)
{
    rbd_image_t image;
    int r = name ? rbd_open_read_only(c->ioctx, name, &image, NULL)
                 : rbd_open_by_id_read_only(c->ioctx, id, &image, NULL);
    if (r < 0)
        return r;
    rbd_linked_image_spec_t spec;
    rbd_snap_spec_t snap;
    r = rbd_get_parent(image, &spec, &snap);
    rbd_close(image);
    if (r < 0)
        return r;
    if (strlen(spec.image_id) >= idlen) {
        r = -ERANGE;
    } else {
        strcpy(parent_id, spec.image_id);
        *ours = strncmp(spec.image_name, prefix, strlen(prefix)) == 0;
    }
    rbd_linked_image_spec_cleanup(&spec);
    rbd_snap_spec_cleanup(&snap);
    return r;
}

/* Moves the image to the pool's trash, where it stays while clones need it; its id (what
 * names it there) goes to `id`. */
int dp_rbd_trash_move(struct dp_rbd_cluster *c, const char *name, char *id, size_t idlen)
{
    rbd_image_t image;
    int r = rbd_open_read_only(c->ioctx, name, &image, NULL);
    if (r < 0)
        return r;
    r = rbd_get_id(image, id, idlen);
    rbd_close(image);
    return r < 0 ? r : rbd_trash_move(c->ioctx, name, 0);
}

/* Removes the image with id `id` from the trash; -ENOTEMPTY while it has snapshots (a
 * clone still needs one). */
int dp_rbd_trash_remove(struct dp_rbd_cluster *c, const char *id)
{
    return rbd_trash_remove(c->ioctx, id, false);
}

/* The pool's metadata `key`, as dp_rbd_meta does an image's; remove when value and out are
 * both NULL. */
int dp_rbd_pool_meta(struct dp_rbd_cluster *c, const char *key, const char *value, char *out,
                     size_t *outlen)
{
    if (value)
        return rbd_pool_metadata_set(c->ioctx, key, value);
    if (!out)
        return rbd_pool_metadata_remove(c->ioctx, key);
    int r = rbd_pool_metadata_get(c->ioctx, key, out, outlen);
    return r == -ENOENT ? -ENODATA : r;
}

static rbd_image_t image_of(void *ctx)
{
    return ((struct dp_rbd *)ctx)->image;
}

/* The synchronous ops: the same asynchronous calls, waited for. */
static ssize_t wait_for(rbd_completion_t c, int submitted)
{
    if (submitted < 0) {
        rbd_aio_release(c);
        return submitted;
    }
    rbd_aio_wait_for_complete(c);
    ssize_t r = rbd_aio_get_return_value(c);
    rbd_aio_release(c);
    return r;
}

static ssize_t img_preadv(void *ctx, const struct iovec *iov, int cnt, uint64_t off)
{
    rbd_completion_t c;
    int r = rbd_aio_create_completion(NULL, NULL, &c);
    if (r < 0)
        goto fail;
    ssize_t n = wait_for(c, rbd_aio_readv(image_of(ctx), iov, cnt, off, c));
    if (n >= 0)
        return n;
    r = (int)n;
fail:
    errno = -r;
    return -1;
}

static ssize_t img_pwritev(void *ctx, const struct iovec *iov, int cnt, uint64_t off)
{
    rbd_completion_t c;
    int r = rbd_aio_create_completion(NULL, NULL, &c);
    if (r < 0)
        goto fail;
    ssize_t n = wait_for(c, rbd_aio_writev(image_of(ctx), iov, cnt, off, c));
    if (n >= 0) {
        size_t len = 0;
        for (int i = 0; i < cnt; i++)
            len += iov[i].iov_len;
        return (ssize_t)len;  /* librbd's writes complete with 0, all of it written */
    }
    r = (int)n;
fail:
    errno = -r;
    return -1;
}

static int img_flush(void *ctx)
{
    return rbd_flush(image_of(ctx));
}

/* Smaller than the image's discard granularity, a discard succeeds and changes nothing:
 * a hint, as virtio-blk allows. */
static int img_discard(void *ctx, uint64_t off, uint64_t len)
{
    int r = rbd_discard(image_of(ctx), off, len);  /* the length, on success */
    return r < 0 ? r : 0;
}

static int img_write_zeroes(void *ctx, uint64_t off, uint64_t len, bool may_unmap)
{
    ssize_t r = rbd_write_zeroes(image_of(ctx), off, (size_t)len, 0, 0);
    return r < 0 ? (int)r : 0;
}

struct img_aio {
    rbd_image_t image;
    int notify_fd;
    pthread_mutex_t mu;
    struct dp_io **done;
    unsigned ndone, cap;
};

struct img_req {
    struct img_aio *aio;
    struct dp_io *io;
};

/* On a librbd thread: the result goes with the request to the worker. */
static void on_complete(rbd_completion_t c, void *arg)
{
    struct img_req *req = arg;
    struct dp_io *io = req->io;
    struct img_aio *a = req->aio;
    ssize_t r = rbd_aio_get_return_value(c);
    rbd_aio_release(c);
    free(req);
    if (r < 0)
        io->result = (int)r;
    else if (io->op == DP_IO_READ && (uint64_t)r != io->len)
        io->result = -EIO;  /* a short read inside the image: never hand back stale bytes */
    else
        io->result = 0;
    io->moved = io->result == 0 ? io->len : 0;
    /* Under the lock to the end: once the worker reaped the last request it may close the
     * context (img_aio_close takes the lock first) and the eventfd. */
    pthread_mutex_lock(&a->mu);
    a->done[a->ndone++] = io;  /* at most `depth` in flight: never past cap */
    uint64_t one = 1;
    if (write(a->notify_fd, &one, sizeof(one)) < 0) {
        /* an eventfd write fails only on overflow; the worker is awake then anyway */
    }
    pthread_mutex_unlock(&a->mu);
}

static void *img_aio_open(void *ctx, unsigned depth, int notify_fd, int *err)
{
    struct img_aio *a = calloc(1, sizeof(*a));
    if (a)
        a->done = calloc(depth, sizeof(*a->done));
    if (!a || !a->done) {
        free(a);
        *err = -ENOMEM;
        return NULL;
    }
    a->image = image_of(ctx);
    a->notify_fd = notify_fd;
    a->cap = depth;
    pthread_mutex_init(&a->mu, NULL);
    return a;
}

static int img_aio_submit(void *aio, struct dp_io *io)
{
    struct img_aio *a = aio;
    struct img_req *req = malloc(sizeof(*req));
    if (!req)
        return -ENOMEM;
    *req = (struct img_req){a, io};
    io->moved = 0;
    io->result = 0;
    rbd_completion_t c;
    int r = rbd_aio_create_completion(req, on_complete, &c);
    if (r < 0) {
        free(req);
        return r;
    }
    if (io->op == DP_IO_READ)
        r = rbd_aio_readv(a->image, io->iov, io->iovcnt, io->offset, c);
    else if (io->op == DP_IO_WRITE)
        r = rbd_aio_writev(a->image, io->iov, io->iovcnt, io->offset, c);
    else
        r = rbd_aio_flush(a->image, c);
    if (r < 0) {  /* not queued: the callback will not run */
        rbd_aio_release(c);
        free(req);
    }
    return r;
}

static int img_aio_kick(void *aio)
{
    return 0;  /* librbd starts each request as it is submitted */
}

static unsigned img_aio_reap(void *aio, struct dp_io **done, unsigned max)
{
    struct img_aio *a = aio;
    pthread_mutex_lock(&a->mu);
    unsigned n = a->ndone < max ? a->ndone : max;
    memcpy(done, a->done, n * sizeof(*done));
    memmove(a->done, a->done + n, (a->ndone - n) * sizeof(*done));
    a->ndone -= n;
    pthread_mutex_unlock(&a->mu);
    return n;
}

static void img_aio_close(void *aio)
{
    struct img_aio *a = aio;
    pthread_mutex_lock(&a->mu);  /* a callback still inside its critical section ends */
    pthread_mutex_unlock(&a->mu);
    pthread_mutex_destroy(&a->mu);
    free(a->done);
    free(a);
}

const struct dp_backend_ops dp_rbd_ops = {
    .preadv = img_preadv,
    .pwritev = img_pwritev,
    .flush = img_flush,
    .discard = img_discard,
    .write_zeroes = img_write_zeroes,
    .aio_open = img_aio_open,
    .aio_submit = img_aio_submit,
    .aio_kick = img_aio_kick,
    .aio_reap = img_aio_reap,
    .aio_close = img_aio_close,
    .user_copies = true,
};

bool dp_rbd_built(void)
{
    return true;
}

#else

int dp_rbd_connect(struct dp_rbd_cluster *c, const char *monitors, const char *user,
                   const char *key, const char *pool, char *err, size_t errlen)
{
    if (err && errlen)
        snprintf(err, errlen, "built without librbd");
    return -ENOSYS;
}

void dp_rbd_disconnect(struct dp_rbd_cluster *c) {}

int dp_rbd_create(struct dp_rbd_cluster *c, const char *name, uint64_t size)
{
    return -ENOSYS;
}

int dp_rbd_remove(struct dp_rbd_cluster *c, const char *name)
{
    return -ENOSYS;
}

int dp_rbd_open(struct dp_rbd_cluster *c, struct dp_rbd *r, const char *name, bool readonly,
                char *err, size_t errlen)
{
    return -ENOSYS;
}

int dp_rbd_resize(struct dp_rbd *r, uint64_t size)
{
    return -ENOSYS;
}

void dp_rbd_close(struct dp_rbd *r) {}

int dp_rbd_meta(struct dp_rbd_cluster *c, const char *name, const char *key,
                const char *value, char *out, size_t *outlen)
{
    return -ENOSYS;
}

int dp_rbd_image_meta(struct dp_rbd *r, const char *key, const char *value, char *out,
                      size_t *outlen)
{
    return -ENOSYS;
}

int dp_rbd_grow(struct dp_rbd_cluster *c, const char *name, uint64_t *size)
{
    return -ENOSYS;
}

int dp_rbd_snap_create(struct dp_rbd_cluster *c, const char *name, const char *snap,
                       uint64_t *size)
{
    return -ENOSYS;
}

int dp_rbd_snap_remove(struct dp_rbd_cluster *c, const char *name, const char *snap)
{
    return -ENOSYS;
}

int dp_rbd_snap_names(struct dp_rbd_cluster *c, const char *name, char *out, size_t *outlen)
{
    return -ENOSYS;
}

int dp_rbd_clone(struct dp_rbd_cluster *c, const char *parent, const char *snap,
                 const char *child)
{
    return -ENOSYS;
}

int dp_rbd_parent(struct dp_rbd_cluster *c, const char *name, const char *id,
                  const char *prefix, char *parent_id, size_t idlen, bool *ours)
{
    return -ENOSYS;
}

int dp_rbd_trash_move(struct dp_rbd_cluster *c, const char *name, char *id, size_t idlen)
{
    return -ENOSYS;
}

int dp_rbd_trash_remove(struct dp_rbd_cluster *c, const char *id)
{
    return -ENOSYS;
}

int dp_rbd_pool_meta(struct dp_rbd_cluster *c, const char *key, const char *value, char *out,
                     size_t *outlen)
{
    return -ENOSYS;
}

const struct dp_backend_ops dp_rbd_ops = {0};

bool dp_rbd_built(void)
{
    return false;
}

#endif
