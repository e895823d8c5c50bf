"""What a virtio-blk device offers: feature bits and config space."""

from __future__ import annotations

from dataclasses import dataclass, field

from csi_vduse._native import ffi, lib
from csi_vduse.dataplane.qos import QosLimits
from csi_vduse.dataplane.tuning import DataPlaneTuning

SECTOR = 512
MAX_QUEUES = 64
MIN_QUEUE_SIZE = lib.DP_MIN_QUEUE_SIZE
MAX_QUEUE_SIZE = lib.DP_MAX_QUEUE_SIZE
DISCARD_MAX_SECTORS = (1 << 30) // SECTOR
DISCARD_MAX_SEGMENTS = 32
SIZE_MAX = 1 << 20


@dataclass(frozen=True)
class BlkParams:
    capacity: int  # bytes
    queues: int = 1
    queue_size: int = 256
    readonly: bool = False
    serial: str = ""
    blk_size: int = SECTOR
    tuning: DataPlaneTuning = field(default_factory=DataPlaneTuning)
    qos: QosLimits = field(default_factory=QosLimits)

    def __post_init__(self) -> None:
        check_queues(self.queues, self.queue_size)

    @property
    def seg_max(self) -> int:
        """Data segments per request: a ring without indirect descriptors must hold the
        header and the status besides them (at least 2 with the smallest queue)."""
        return int(min(self.queue_size, lib.DP_MAX_DESCS)) - 2


def check_queues(queues: int, queue_size: int) -> None:
    if not 1 <= queues <= MAX_QUEUES:
        raise ValueError(f"queues must be in [1, {MAX_QUEUES}], not {queues}")
    if not MIN_QUEUE_SIZE <= queue_size <= MAX_QUEUE_SIZE or queue_size & (queue_size - 1):
        raise ValueError(
            f"queue size must be a power of two in [{MIN_QUEUE_SIZE}, {MAX_QUEUE_SIZE}] "
            f"(room for a request's header, data and status), not {queue_size}"
        )


def features(p: BlkParams) -> int:
    bits = [
        lib.VIRTIO_F_VERSION_1,
        lib.VIRTIO_F_ACCESS_PLATFORM,
        lib.VIRTIO_RING_F_INDIRECT_DESC,
        lib.VIRTIO_BLK_F_SIZE_MAX,
        lib.VIRTIO_BLK_F_SEG_MAX,
        lib.VIRTIO_BLK_F_BLK_SIZE,
        lib.VIRTIO_BLK_F_FLUSH,
        lib.VIRTIO_BLK_F_TOPOLOGY,
    ]
    if p.tuning.event_idx:
        bits.append(lib.VIRTIO_RING_F_EVENT_IDX)
    if p.queues > 1:
        bits.append(lib.VIRTIO_BLK_F_MQ)
    if p.readonly:
        bits.append(lib.VIRTIO_BLK_F_RO)
    else:
        bits += [lib.VIRTIO_BLK_F_DISCARD, lib.VIRTIO_BLK_F_WRITE_ZEROES]
    return sum(1 << b for b in bits)


def config_space(p: BlkParams) -> bytes:
    c = ffi.new("struct vk_blk_params *")
    c.capacity_sectors = p.capacity // SECTOR
    c.size_max = SIZE_MAX
    c.seg_max = p.seg_max
    c.blk_size = p.blk_size
    c.physical_block_exp = max(0, (4096 // p.blk_size).bit_length() - 1)
    c.min_io_size = max(1, 4096 // p.blk_size)
    c.num_queues = p.queues
    if not p.readonly:
        c.max_discard_sectors = DISCARD_MAX_SECTORS
        c.max_discard_seg = DISCARD_MAX_SEGMENTS
        c.discard_sector_alignment = 4096 // SECTOR
        c.max_write_zeroes_sectors = DISCARD_MAX_SECTORS
        c.max_write_zeroes_seg = DISCARD_MAX_SEGMENTS
        c.write_zeroes_may_unmap = 1
    size = lib.vk_blk_config_size()
    out = ffi.new("uint8_t[]", size)
    lib.vk_blk_config(c, out, size)
    return bytes(ffi.buffer(out, size))


def capacity_field(capacity: int) -> tuple[int, bytes]:
    """(offset, bytes) of the capacity field, for a live resize."""
    return lib.vk_blk_capacity_offset(), (capacity // SECTOR).to_bytes(8, "little")
