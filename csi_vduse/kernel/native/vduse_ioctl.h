#ifndef CSI_VDUSE_VDUSE_IOCTL_H
#define CSI_VDUSE_VDUSE_IOCTL_H

#include <stddef.h>
#include <stdint.h>

struct vk_vq_info {
    uint32_t num;
    uint64_t desc_addr, driver_addr, device_addr;
    uint16_t avail_index;
    uint8_t ready;
};

struct vk_request {
    uint32_t type, request_id;
    uint32_t vq_index;
    uint8_t status;
    uint64_t iova_start, iova_last;
};

struct vk_blk_params {
    uint64_t capacity_sectors;
    uint32_t size_max, seg_max, blk_size;
    uint8_t physical_block_exp;
    uint16_t min_io_size;
    uint32_t opt_io_size;
    uint16_t num_queues;
    uint32_t max_discard_sectors, max_discard_seg, discard_sector_alignment;
    uint32_t max_write_zeroes_sectors, max_write_zeroes_seg;
    uint8_t write_zeroes_may_unmap;
};

int vk_get_api_version(int ctrl_fd, uint64_t *version);
int vk_set_api_version(int ctrl_fd, uint64_t version);
int vk_create_dev(int ctrl_fd, const char *name, uint32_t device_id, uint64_t features,
                  uint32_t vq_num, uint32_t vq_align, const uint8_t *config, uint32_t config_size);
int vk_destroy_dev(int ctrl_fd, const char *name);
int vk_dev_get_features(int dev_fd, uint64_t *features);
int vk_dev_set_config(int dev_fd, uint32_t offset, const uint8_t *buf, uint32_t len);
int vk_dev_inject_config_irq(int dev_fd);
int vk_vq_setup(int dev_fd, uint32_t index, uint16_t max_size);
int vk_vq_get_info(int dev_fd, uint32_t index, struct vk_vq_info *out);
int vk_vq_setup_kickfd(int dev_fd, uint32_t index, int fd);
int vk_vq_inject_irq(int dev_fd, uint32_t index);
int vk_read_request(int dev_fd, struct vk_request *out);
int vk_write_response(int dev_fd, uint32_t request_id, uint32_t result, uint32_t vq_index,
                      uint16_t avail_index);
int vk_blk_config(const struct vk_blk_params *p, uint8_t *out, uint32_t out_len);
uint32_t vk_blk_config_size(void);
uint32_t vk_blk_capacity_offset(void);

#endif
