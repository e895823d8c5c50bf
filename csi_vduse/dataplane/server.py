"""Serves one VDUSE virtio-blk device: a Python thread answers the kernel's control
messages; one C worker per virtqueue serves requests without the GIL."""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import select
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
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
from csi_vduse.dataplane.qos import QosLimits
from csi_vduse.errors import Unavailable
from csi_vduse.kernel.vduse import Request, VduseDevice

log = logging.getLogger(__name__)
ALL_IOVA = (0, 2**64 - 1)
STATS_FIELDS = (
    "reads", "writes", "flushes", "discards", "write_zeroes", "get_ids",
    "read_bytes", "written_bytes", "errors", "unsupported", "bad_chains",
    "faults", "poisoned", "enospc", "throttled_us",
)  # fmt: skip
# upper bounds, in seconds, of the service-time buckets the C workers count in
LATENCY_BOUNDS = tuple(
    lib.DP_LATENCY_FIRST_NS * (1 << i) / 1e9 for i in range(lib.DP_LATENCY_BUCKETS - 1)
)
BROKEN_REASONS = {
    lib.DP_BROKEN_RING: "its ring is corrupt (an index or a ring address out of range)",
    lib.DP_BROKEN_NO_STATUS: "the guest sent a request without a status byte to fail it in",
    lib.DP_BROKEN_FAULT: "guest memory faulted where no request could be failed",
    lib.DP_BROKEN_ORDER: "internal error: a completion out of ring order",
    lib.DP_BROKEN_LOG: "its in-flight log does not match its rings, so no request can be "
    "safely run again",
}


@dataclass
class _Queue:
    index: int
    native: Any
    kick_fd: int
    thread: threading.Thread | None = None
    exit_code: int = 0


INFLIGHT_STRIDE = -(-lib.dp_inflight_size(lib.DP_MAX_QUEUE_SIZE) // mmap.PAGESIZE) * mmap.PAGESIZE


class RequestLog:
    """The queues' crash records (struct dp_log, one page per queue), then their in-flight
    logs (struct dp_inflight), in a shared file mapping, so that they outlive the process;
    anonymous memory without a path. A file from before the in-flight logs grows with
    zeros, which no log takes for valid."""

    def __init__(self, queues: int, path: Path | None, fresh: bool) -> None:
        self._queues = queues
        size = queues * (lib.DP_LOG_SIZE + INFLIGHT_STRIDE)
        if path is None:
            self._map = mmap.mmap(-1, size)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                if fresh:
                    os.ftruncate(fd, 0)
                os.ftruncate(fd, size)
                self._map = mmap.mmap(fd, size, mmap.MAP_SHARED)
            finally:
                os.close(fd)
        self._base = ffi.from_buffer(self._map)

    def queue(self, index: int) -> Any:
        return ffi.cast("struct dp_log *", self._base + index * lib.DP_LOG_SIZE)

    def inflight(self, index: int) -> Any:
        offset = self._queues * lib.DP_LOG_SIZE + index * INFLIGHT_STRIDE
        return ffi.cast("struct dp_inflight *", self._base + offset)

    def close(self) -> None:
        del self._base
        self._map.close()


class BlockServer:
    def __init__(
        self, device: VduseDevice, backend: Backend, params: BlkParams,
        log_path: Path | None = None, fresh: bool = True,
    ) -> None:  # fmt: skip
        self.device = device
        self.backend = backend
        self.params = params
        self._tlb = ffi.new("struct dp_iotlb *")
        if lib.dp_iotlb_init(self._tlb, device.fd, 2 * params.queues + lib.DP_MIN_MAPS) != 0:
            raise OSError("cannot initialise the IOTLB")
        self._device = ffi.new("struct dp_device *")
        if lib.dp_device_init(self._device) != 0:
            lib.dp_iotlb_destroy(self._tlb)
            raise OSError("cannot initialise the device's gate")
        self._queues: list[_Queue] = []
        self._lock = threading.Lock()
        try:
            self.set_qos(params.qos)
        except BaseException:
            lib.dp_device_destroy(self._device)
            lib.dp_iotlb_destroy(self._tlb)
            raise
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
        self._log = RequestLog(params.queues, log_path, fresh)
        self._queue_stop_fd = -1
        self._last_avail: dict[int, int] = {}
        self._retired = dict.fromkeys(STATS_FIELDS, 0)
        self._retired_latency = [0] * (lib.DP_LATENCY_BUCKETS + 1)  # buckets, then the sum
        self._reported: set[int] = set()
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC)
        self._events_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._thread = threading.Thread(
            target=self._serve_messages, name=f"vduse-{device.name}-ctl", daemon=True
        )
        self._stopping = False
        self.broken = False
        self.control_error = ""
        self.engine = ""

    def start(self, resume: bool = False) -> None:
        """Starts answering the kernel. With `resume`, queues the driver already runs
        (a device whose previous server died) are served again first."""
        if resume:
            self._start_queues(resume=True)
            for q in self._queues:
                self.device.inject_irq(q.index)  # completions the old server never signalled
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        if self._thread.is_alive():
            os.eventfd_write(self._stop_fd, 1)
            self._thread.join()
        self._stop_queues()
        lib.dp_iotlb_destroy(self._tlb)
        lib.dp_device_destroy(self._device)
        for fd in (self._stop_fd, self._events_fd):
            os.close(fd)
        self._log.close()

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

    def latency(self) -> tuple[list[int], float]:
        """Requests per service-time bucket (LATENCY_BOUNDS, then the rest; not cumulative)
        and the sum of their service times in seconds, since the server started."""
        with self._lock:
            totals = list(self._retired_latency)
            for q in self._queues:
                for i, count in enumerate(_latency_of(q.native.stats)):
                    totals[i] += count
        return totals[:-1], totals[-1] / 1e9

    def in_flight(self) -> int:
        with self._lock:
            return sum(int(q.native.in_flight) for q in self._queues)

    def queue_requests(self) -> list[int]:
        """Requests completed by each running queue."""
        with self._lock:
            return [int(q.native.vq.used_idx) for q in self._queues]

    def dead_threads(self) -> list[str]:
        """Threads of this device that died while it is served: a new process would
        serve it again (unlike a broken device or queue, which needs a reset)."""
        if self._stopping or self.broken:
            return []
        found = []
        if not self._thread.is_alive():
            detail = f": {self.control_error}" if self.control_error else ""
            found.append(f"{self.device.name}: its control thread stopped{detail}")
        with self._lock:
            queues = list(self._queues)
        for q in queues:
            if q.thread is not None and not q.thread.is_alive():
                found.append(
                    f"{self.device.name}: queue {q.index} worker exited "
                    f"({os.strerror(-q.exit_code) if q.exit_code else 'no error'})"
                )
        return found

    def problems(self) -> list[str]:
        """What keeps this device from serving its guest; empty when healthy."""
        found = []
        if self.broken:
            found.append(
                "the kernel marked the VDUSE device broken (a control message timed out); "
                "restage the volume"
            )
        found += self.dead_threads()
        with self._lock:
            queues = list(self._queues)
        for q in queues:
            broken = int(q.native.vq.broken)
            if broken:
                found.append(
                    f"queue {q.index} stopped: {BROKEN_REASONS.get(broken, 'unknown')} "
                    f"(head {int(q.native.vq.broken_head)}); its requests wait for a device reset"
                )
        if any(q.native.write_enospc for q in queues):
            found.append("writes fail: the node's data dir is out of space (ENOSPC)")
        return found

    def broken_queues(self) -> int:
        with self._lock:
            return sum(1 for q in self._queues if q.native.vq.broken)

    def resize(self, size: int) -> None:
        """Publishes a new capacity: data plane bound first, then config space and IRQ."""
        self._blk.capacity = size // SECTOR
        offset, data = capacity_field(size)
        self.device.set_config(offset, data)
        self.device.inject_config_irq()

    def set_qos(self, limits: QosLimits) -> None:
        """Applies new limits to the running queues at once; no request waits for it."""
        lib.dp_qos_set(
            ffi.addressof(self._device.qos), limits.native(), limits.burst_ms,
            time.monotonic_ns(),
        )  # fmt: skip
        with self._lock:  # a worker waiting out the old limit looks again
            for q in self._queues:
                os.eventfd_write(q.kick_fd, 1)

    @contextlib.contextmanager
    def quiesced(self, timeout: float = 10.0) -> Iterator[None]:
        """Every request the guest got an answer for is in the backend and flushed, and
        none runs, until the block ends. Requests wait; none fails."""
        r = lib.dp_device_quiesce(self._device, int(timeout * 1000))
        if r != 0:
            raise Unavailable(
                f"{self.device.name}: requests still running after {timeout:g} s "
                f"({os.strerror(-r)}); the backend may hang"
            )
        try:
            self.backend.flush()
            yield
        finally:
            lib.dp_device_resume(self._device)

    def _serve_messages(self) -> None:
        try:
            self._message_loop()
        except Exception as e:
            log.exception("%s: the control thread failed", self.device.name)
            self.control_error = str(e)

    def _message_loop(self) -> None:
        poller = select.poll()
        poller.register(self.device.fd, select.POLLIN)
        poller.register(self._stop_fd, select.POLLIN)
        poller.register(self._events_fd, select.POLLIN)
        while True:
            for fd, events in poller.poll():
                if fd == self._stop_fd:
                    return
                if fd == self._events_fd:
                    self._report_broken_queues()
                elif events & (select.POLLERR | select.POLLHUP):
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

    def _report_broken_queues(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._events_fd)
        with self._lock:
            queues = list(self._queues)
        for q in queues:
            reason = int(q.native.vq.broken)
            if reason and q.index not in self._reported:
                self._reported.add(q.index)
                log.error(
                    "%s: queue %d stopped: %s (head %d); its requests wait until the driver "
                    "resets the device", self.device.name, q.index,
                    BROKEN_REASONS.get(reason, "unknown"), int(q.native.vq.broken_head),
                )  # fmt: skip

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
                    self._reported.clear()
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

    def _new_queue(self, index: int, event_idx: bool) -> _Queue | None:
        info = self.device.vq_info(index)
        if not info.ready:
            return None
        kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        native = lib.dp_queue_new(
            index, self.device.fd, kick_fd, self._queue_stop_fd, self._blk, self._tlb,
            self.params.seg_max + 2, self._log.queue(index),
        )  # fmt: skip
        if native == ffi.NULL:
            os.close(kick_fd)
            raise MemoryError("dp_queue_new")
        native = ffi.gc(native, lib.dp_queue_free)
        native.parallel_min_bytes = self.params.tuning.parallel_min_bytes
        native.poll_us = self.params.tuning.poll_us
        native.event_fd = self._events_fd
        native.dev = self._device
        native.inflight = self._log.inflight(index)
        lib.dp_vq_init(
            ffi.addressof(native.vq), self._tlb, info.num, info.desc_addr,
            info.driver_addr, info.device_addr, info.avail_index, event_idx,
        )  # fmt: skip
        if self.params.tuning.engine == "async":
            depth = min(info.num, self.params.tuning.depth)
            if (r := lib.dp_queue_enable_async(native, depth)) != 0:
                why = self.backend.async_unavailable or os.strerror(-r)
                self.engine = f"synchronous ({why})"
        self.device.vq_set_kickfd(index, kick_fd)
        return _Queue(index, native, kick_fd)

    def _start_queues(self, resume: bool = False) -> None:
        """Sets every queue up (and on resume maps every ring) before any worker runs: a
        worker under load would otherwise delay the ring faults of the queues after it."""
        event_idx = bool(self.device.features() & (1 << lib.VIRTIO_RING_F_EVENT_IDX))
        async_ = self.params.tuning.engine == "async"
        self.engine = "asynchronous" if async_ else "synchronous (CSI_VDUSE_DP_ENGINE=sync)"
        self._queue_stop_fd = os.eventfd(0, os.EFD_CLOEXEC)
        queues: list[_Queue] = []
        try:
            for index in range(self.params.queues):
                q = self._new_queue(index, event_idx)
                if q is None:
                    continue
                queues.append(q)
                if not resume:
                    lib.dp_inflight_reset(q.native.inflight, q.native.vq.num, q.native.vq.used_idx)
                    continue
                if lib.dp_queue_resume(q.native) != 0:
                    raise OSError(f"{self.device.name}: queue {index} rings cannot be mapped")
                if q.native.resumed_from_log:
                    log.info("%s: queue %d: resumed from its in-flight log, %d request(s) in "
                             "flight before run again", self.device.name, index,
                             q.native.resumed)  # fmt: skip
                if q.native.inflight_disagreed:
                    log.error("%s: queue %d: its in-flight log says requests completed out "
                              "of ring order, which only the asynchronous worker can resume; "
                              "the queue stops and the log is kept", self.device.name,
                              index)  # fmt: skip
        except BaseException:
            for q in queues:
                os.close(q.kick_fd)
            os.close(self._queue_stop_fd)
            self._queue_stop_fd = -1
            raise
        for q in queues:
            q.thread = threading.Thread(
                target=self._run_queue, args=(q,), name=f"vduse-{self.device.name}-q{q.index}",
                daemon=True,
            )  # fmt: skip
        with self._lock:
            self._queues = queues
        for q in queues:
            assert q.thread is not None
            q.thread.start()
        log.info("%s: serving %d queue(s), %s", self.device.name, len(queues), self.engine)

    def _run_queue(self, q: _Queue) -> None:
        q.exit_code = lib.dp_queue_run(q.native)
        if q.exit_code:
            log.error("%s: queue %d worker failed: %s", self.device.name, q.index,
                      os.strerror(-q.exit_code))  # fmt: skip

    def _stop_queues(self) -> None:
        with self._lock:
            queues, self._queues = self._queues, []
        if not queues:
            return
        for q in queues:
            lib.dp_queue_request_stop(q.native)
        os.eventfd_write(self._queue_stop_fd, 1)
        for q in queues:
            if q.thread is not None:
                q.thread.join()
            self._last_avail[q.index] = int(q.native.vq.last_avail_idx)
            with self._lock:
                for name in STATS_FIELDS:
                    self._retired[name] += getattr(q.native.stats, name)
                for i, count in enumerate(_latency_of(q.native.stats)):
                    self._retired_latency[i] += count
            try:
                self.device.vq_set_kickfd(q.index, -1)
            except OSError as e:
                log.warning(
                    "%s: cannot detach kick eventfd of queue %d: %s", self.device.name, q.index, e
                )
            os.close(q.kick_fd)
        os.close(self._queue_stop_fd)
        self._queue_stop_fd = -1


def _latency_of(stats: Any) -> list[int]:
    return [int(stats.latency[i]) for i in range(lib.DP_LATENCY_BUCKETS)] + [
        int(stats.latency_ns_sum)
    ]
