"""Serves one VDUSE virtio-blk device: a Python thread answers the kernel's control
messages; one C worker per virtqueue serves requests without the GIL."""

from __future__ import annotations

import logging
import os
import select
import threading
from dataclasses import dataclass
from typing import Any

from csi_vduse._native import ffi, lib
from csi_vduse.backends import Backend
from csi_vduse.dataplane.blk_device import (
    DISCARD_MAX_SECTORS,
    DISCARD_MAX_SEGMENTS,
    SECTOR,
    BlkParams,
    capacity_field,
)
from csi_vduse.kernel.vduse import Request, VduseDevice

log = logging.getLogger(__name__)
ALL_IOVA = (0, 2**64 - 1)
STATS_FIELDS = (
    "reads", "writes", "flushes", "discards", "write_zeroes", "get_ids",
    "read_bytes", "written_bytes", "errors", "unsupported", "bad_chains",
)  # fmt: skip


@dataclass
class _Queue:
    index: int
    native: Any
    kick_fd: int
    thread: threading.Thread


class BlockServer:
    def __init__(self, device: VduseDevice, backend: Backend, params: BlkParams) -> None:
        self.device = device
        self.backend = backend
        self.params = params
        self._tlb = ffi.new("struct dp_iotlb *")
        if lib.dp_iotlb_init(self._tlb, device.fd) != 0:
            raise OSError("cannot initialise the IOTLB lock")
        self._blk = ffi.new("struct dp_blk *")
        ops, ctx = backend.native_ops()
        self._blk.ops = ops
        self._blk.ctx = ctx
        self._blk.capacity = backend.size // SECTOR
        self._blk.readonly = params.readonly
        if not params.readonly:
            self._blk.max_discard_sectors = DISCARD_MAX_SECTORS
            self._blk.max_discard_seg = DISCARD_MAX_SEGMENTS
            self._blk.max_write_zeroes_sectors = DISCARD_MAX_SECTORS
            self._blk.max_write_zeroes_seg = DISCARD_MAX_SEGMENTS
        serial = params.serial.encode()[: lib.VIRTIO_BLK_ID_BYTES]
        ffi.memmove(self._blk.serial, serial, len(serial))
        self._queues: list[_Queue] = []
        self._queue_stop_fd = -1
        self._last_avail: dict[int, int] = {}
        self._retired = dict.fromkeys(STATS_FIELDS, 0)
        self._lock = threading.Lock()
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC)
        self._thread = threading.Thread(
            target=self._serve_messages, name=f"vduse-{device.name}-ctl", daemon=True
        )
        self.broken = False

    def start(self, resume: bool = False) -> None:
        """Starts answering the kernel. With `resume`, queues the driver already runs
        (a device whose previous server died) are served again first."""
        if resume:
            self._start_queues(resume=True)
            for q in self._queues:
                self.device.inject_irq(q.index)  # completions the old server never signalled
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            os.eventfd_write(self._stop_fd, 1)
            self._thread.join()
        self._stop_queues()
        lib.dp_iotlb_destroy(self._tlb)
        os.close(self._stop_fd)

    @property
    def running_queues(self) -> int:
        return len(self._queues)

    def stats(self) -> dict[str, int]:
        with self._lock:
            totals = dict(self._retired)
            for q in self._queues:
                for name in STATS_FIELDS:
                    totals[name] += getattr(q.native.stats, name)
        return totals

    def queue_requests(self) -> list[int]:
        """Requests completed by each running queue."""
        with self._lock:
            return [int(q.native.vq.used_idx) for q in self._queues]

    def resize(self, size: int) -> None:
        """Publishes a new capacity: data plane bound first, then config space and IRQ."""
        self._blk.capacity = size // SECTOR
        offset, data = capacity_field(size)
        self.device.set_config(offset, data)
        self.device.inject_config_irq()

    def _serve_messages(self) -> None:
        poller = select.poll()
        poller.register(self.device.fd, select.POLLIN)
        poller.register(self._stop_fd, select.POLLIN)
        while True:
            for fd, events in poller.poll():
                if fd == self._stop_fd:
                    return
                if events & (select.POLLERR | select.POLLHUP):
                    log.error("VDUSE device %s is broken; no longer serving", self.device.name)
                    self.broken = True
                    return
            while (req := self.device.read_request()) is not None:
                try:
                    ok, vq, avail = self._handle(req)
                except Exception:
                    log.exception("VDUSE request %s failed", req)
                    ok, vq, avail = False, 0, 0
                self.device.respond(req.request_id, ok, vq, avail)

    def _handle(self, req: Request) -> tuple[bool, int, int]:
        if req.type == lib.VDUSE_GET_VQ_STATE:
            return True, req.vq_index, self._avail_index(req.vq_index)
        if req.type == lib.VDUSE_SET_STATUS:
            if req.status & lib.VIRTIO_CONFIG_S_DRIVER_OK:
                if not self._queues:
                    self._start_queues()
            else:
                self._stop_queues()
                lib.dp_iotlb_invalidate(self._tlb, *ALL_IOVA)
                if req.status == 0:
                    self._last_avail.clear()
            return True, 0, 0
        if req.type == lib.VDUSE_UPDATE_IOTLB:
            lib.dp_iotlb_invalidate(self._tlb, req.iova_start, req.iova_last)
            return True, 0, 0
        log.warning("unknown VDUSE request type %d", req.type)
        return False, 0, 0

    def _avail_index(self, index: int) -> int:
        with self._lock:
            for q in self._queues:
                if q.index == index:
                    return int(q.native.vq.last_avail_idx)
        return self._last_avail.get(index, 0)

    def _start_queues(self, resume: bool = False) -> None:
        event_idx = bool(self.device.features() & (1 << lib.VIRTIO_RING_F_EVENT_IDX))
        self._queue_stop_fd = os.eventfd(0, os.EFD_CLOEXEC)
        for index in range(self.params.queues):
            info = self.device.vq_info(index)
            if not info.ready:
                continue
            kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self.device.vq_set_kickfd(index, kick_fd)
            native = lib.dp_queue_new(
                index,
                self.device.fd,
                kick_fd,
                self._queue_stop_fd,
                self._blk,
                self._tlb,
                self.params.seg_max + 2,
            )
            if native == ffi.NULL:
                os.close(kick_fd)
                raise MemoryError("dp_queue_new")
            native = ffi.gc(native, lib.dp_queue_free)
            native.parallel_min_bytes = self.params.tuning.parallel_min_bytes
            native.poll_us = self.params.tuning.poll_us
            lib.dp_vq_init(
                ffi.addressof(native.vq), self._tlb, info.num, info.desc_addr,
                info.driver_addr, info.device_addr, info.avail_index, event_idx,
            )  # fmt: skip
            if resume and lib.dp_queue_resume(native) != 0:
                os.close(kick_fd)
                raise OSError(f"{self.device.name}: queue {index} rings cannot be mapped")
            thread = threading.Thread(
                target=lib.dp_queue_run, args=(native,),
                name=f"vduse-{self.device.name}-q{index}", daemon=True,
            )  # fmt: skip
            with self._lock:
                self._queues.append(_Queue(index, native, kick_fd, thread))
            thread.start()
        log.info("%s: serving %d queue(s)", self.device.name, len(self._queues))

    def _stop_queues(self) -> None:
        with self._lock:
            queues, self._queues = self._queues, []
        if not queues:
            return
        os.eventfd_write(self._queue_stop_fd, 1)
        for q in queues:
            q.thread.join()
            self._last_avail[q.index] = int(q.native.vq.last_avail_idx)
            with self._lock:
                for name in STATS_FIELDS:
                    self._retired[name] += getattr(q.native.stats, name)
            try:
                self.device.vq_set_kickfd(q.index, -1)
            except OSError as e:
                log.warning(
                    "%s: cannot detach kick eventfd of queue %d: %s", self.device.name, q.index, e
                )
            os.close(q.kick_fd)
        os.close(self._queue_stop_fd)
        self._queue_stop_fd = -1
