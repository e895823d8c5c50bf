/* Thin wrappers over the VDUSE ioctls and messages, compiled against <linux/vduse.h>
 * so that no structure layout is retyped in Python. Each returns 0 or -errno. */
#include <endian.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <linux/vduse.h>
#include <linux/virtio_blk.h>

#include "vduse_ioctl.h"

static int check(int ret)
{
    return ret < 0 ? -errno : ret;
}

int vk_get_api_version(int ctrl_fd, uint64_t *version)
{
    return check(ioctl(ctrl_fd, VDUSE_GET_API_VERSION, version));
}

int vk_set_api_version(int ctrl_fd, uint64_t version)
{
    return check(ioctl(ctrl_fd, VDUSE_SET_API_VERSION, &version));
}

int vk_create_dev(int ctrl_fd, const char *name, uint32_t device_id, uint64_t features,
                  uint32_t vq_num, uint32_t vq_align, const uint8_t *config, uint32_t config_size)
{
    if (strlen(name) >= VDUSE_NAME_MAX)
        return -ENAMETOOLONG;
    struct vduse_dev_config *c = calloc(1, sizeof(*c) + config_size);
    if (!c)
        return -ENOMEM;
    strcpy(c->name, name);
    c->device_id = device_id;
    c->vendor_id = 0;
    c->features = features;
    c->vq_num = vq_num;
    c->vq_align = vq_align;
    c->config_size = config_size;
    memcpy(c->config, config, config_size);
    int ret = check(ioctl(ctrl_fd, VDUSE_CREATE_DEV, c));
    free(c);
    return ret;
}

int vk_destroy_dev(int ctrl_fd, const char *name)
{
    char buf[VDUSE_NAME_MAX] = {0};
    if (strlen(name) >= VDUSE_NAME_MAX)
        return -ENAMETOOLONG;
    strcpy(buf, name);
    return check(ioctl(ctrl_fd, VDUSE_DESTROY_DEV, buf));
}

int vk_dev_get_features(int dev_fd, uint64_t *features)
{
    return check(ioctl(dev_fd, VDUSE_DEV_GET_FEATURES, features));
}

int vk_dev_set_config(int dev_fd, uint32_t offset, const uint8_t *buf, uint32_t len)
{
    struct vduse_config_data *d = calloc(1, sizeof(*d) + len);
    if (!d)
        return -ENOMEM;
    d->offset = offset;
    d->length = len;
    memcpy(d->buffer, buf, len);
    int ret = check(ioctl(dev_fd, VDUSE_DEV_SET_CONFIG, d));
    free(d);
    return ret;
}

int vk_dev_inject_config_irq(int dev_fd)
{
    return check(ioctl(dev_fd, VDUSE_DEV_INJECT_CONFIG_IRQ));
}

int vk_vq_setup(int dev_fd, uint32_t index, uint16_t max_size)
{
    struct vduse_vq_config c = {.index = index, .max_size = max_size};
    return check(ioctl(dev_fd, VDUSE_VQ_SETUP, &c));
}

int vk_vq_get_info(int dev_fd, uint32_t index, struct vk_vq_info *out)
{
    struct vduse_vq_info info = {.index = index};
    int ret = check(ioctl(dev_fd, VDUSE_VQ_GET_INFO, &info));
    if (ret < 0)
        return ret;
    out->num = info.num;
    out->desc_addr = info.desc_addr;
    out->driver_addr = info.driver_addr;
    out->device_addr = info.device_addr;
    out->avail_index = info.split.avail_index;
    out->ready = info.ready;
    return 0;
}

int vk_vq_setup_kickfd(int dev_fd, uint32_t index, int fd)
{
    struct vduse_vq_eventfd e = {.index = index, .fd = fd};
    return check(ioctl(dev_fd, VDUSE_VQ_SETUP_KICKFD, &e));
}

int vk_vq_inject_irq(int dev_fd, uint32_t index)
{
    return check(ioctl(dev_fd, VDUSE_VQ_INJECT_IRQ, &index));
}

/* Reads one control message; -EAGAIN when none is pending on a non-blocking fd. */
int vk_read_request(int dev_fd, struct vk_request *out)
{
    struct vduse_dev_request req;
    ssize_t n = read(dev_fd, &req, sizeof(req));
    if (n < 0)
        return -errno;
    if ((size_t)n != sizeof(req))
        return -EIO;
    memset(out, 0, sizeof(*out));
    out->type = req.type;
    out->request_id = req.request_id;
    switch (req.type) {
    case VDUSE_GET_VQ_STATE:
        out->vq_index = req.vq_state.index;
        break;
    case VDUSE_SET_STATUS:
        out->status = req.s.status;
        break;
    case VDUSE_UPDATE_IOTLB:
        out->iova_start = req.iova.start;
        out->iova_last = req.iova.last;
        break;
    }
    return 0;
}

int vk_write_response(int dev_fd, uint32_t request_id, uint32_t result, uint32_t vq_index,
                      uint16_t avail_index)
{
    struct vduse_dev_response resp;
    memset(&resp, 0, sizeof(resp));
    resp.request_id = request_id;
    resp.result = result;
    resp.vq_state.index = vq_index;
    resp.vq_state.split.avail_index = avail_index;
    ssize_t n = write(dev_fd, &resp, sizeof(resp));
    if (n < 0)
        return -errno;
    return (size_t)n == sizeof(resp) ? 0 : -EIO;
}

/* virtio-blk config space, little-endian as VIRTIO_F_VERSION_1 requires. */
int vk_blk_config(const struct vk_blk_params *p, uint8_t *out, uint32_t out_len)
{
    struct virtio_blk_config c;
    if (out_len < sizeof(c))
        return -ENOSPC;
    memset(&c, 0, sizeof(c));
    c.capacity = htole64(p->capacity_sectors);
    c.size_max = htole32(p->size_max);
    c.seg_max = htole32(p->seg_max);
    c.blk_size = htole32(p->blk_size);
    c.physical_block_exp = p->physical_block_exp;
    c.min_io_size = htole16(p->min_io_size);
    c.opt_io_size = htole32(p->opt_io_size);
    c.num_queues = htole16(p->num_queues);
    c.max_discard_sectors = htole32(p->max_discard_sectors);
    c.max_discard_seg = htole32(p->max_discard_seg);
    c.discard_sector_alignment = htole32(p->discard_sector_alignment);
    c.max_write_zeroes_sectors = htole32(p->max_write_zeroes_sectors);
    c.max_write_zeroes_seg = htole32(p->max_write_zeroes_seg);
    c.write_zeroes_may_unmap = p->write_zeroes_may_unmap;
    memcpy(out, &c, sizeof(c));
    return (int)sizeof(c);
}

uint32_t vk_blk_config_size(void)
{
    return sizeof(struct virtio_blk_config);
}

uint32_t vk_blk_capacity_offset(void)
{
    return offsetof(struct virtio_blk_config, capacity);
}
