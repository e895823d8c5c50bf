"""The asynchronous queue worker (engine.c) against a fake guest: io_uring on a file, and a
scripted backend that completes requests in an order the test chooses."""

from __future__ import annotations

import errno
import os
import threading
import time
from typing import Any

import pytest

from csi_vduse._native import ffi, lib
from tests.unit.fakeguest import Device, FakeGuest

OK, IOERR = lib.VIRTIO_BLK_S_OK, lib.VIRTIO_BLK_S_IOERR
IN, OUT, FLUSH = lib.VIRTIO_BLK_T_IN, lib.VIRTIO_BLK_T_OUT, lib.VIRTIO_BLK_T_FLUSH

pytestmark = pytest.mark.skipif(
    lib.dp_file_uring_probe() != 0, reason="io_uring is not available to this process"
)


def status(guest: FakeGuest, iova: int) -> int:
    return guest.arena.read(iova, 1)[0]


class Scripted:
    """aio ops whose requests complete only when the test releases them, in its order;
    the data moves with the file's synchronous ops at release."""

    def __init__(self) -> None:
        self.held: list[Any] = []
        self.ready: list[Any] = []
        self.skip_reaps = 0  # reap calls that find nothing, whatever is ready
        self.refused_kicks = 0  # kicks that fail with EAGAIN, the requests staying queued
        self.queued: list[Any] = []
        self.notify_fd = -1
        self.ctx: Any = None
        self.lock = threading.Lock()
        file_ops = lib.dp_file_ops

        def aio_open(ctx: Any, depth: int, notify_fd: int, err: Any) -> Any:
            self.ctx, self.notify_fd = ctx, notify_fd
            return ffi.cast("void *", 1)

        def aio_submit(aio: Any, io: Any) -> int:
            with self.lock:
                self.queued.append(io)
            return 0

        def aio_kick(aio: Any) -> int:
            with self.lock:
                if self.refused_kicks:
                    self.refused_kicks -= 1
                    return -errno.EAGAIN
                self.held += self.queued
                self.queued.clear()
            return 0

        def aio_reap(aio: Any, done: Any, most: int) -> int:
            with self.lock:
                if self.skip_reaps:
                    self.skip_reaps -= 1
                    return 0
                n = min(most, len(self.ready))
                for i in range(n):
                    done[i] = self.ready.pop(0)
            return n

        def aio_close(aio: Any) -> None:
            return None

        callbacks = {
            "aio_open": ffi.callback("void *(void *, unsigned, int, int *)", aio_open),
            "aio_submit": ffi.callback("int(void *, struct dp_io *)", aio_submit),
            "aio_kick": ffi.callback("int(void *)", aio_kick),
            "aio_reap": ffi.callback("unsigned(void *, struct dp_io **, unsigned)", aio_reap),
            "aio_close": ffi.callback("void(void *)", aio_close),
        }
        self.keep = list(callbacks.values())
        self.ops = ffi.new("struct dp_backend_ops *")
        for name in ("preadv", "pwritev", "flush", "discard", "write_zeroes"):
            setattr(self.ops, name, getattr(file_ops, name))
        for name, callback in callbacks.items():
            setattr(self.ops, name, callback)
        self._file_ops = file_ops

    def release(self, *positions: int, signal: bool = True) -> None:
        """Completes the held requests at these positions (in submission order)."""
        with self.lock:
            chosen = [self.held[p] for p in positions]
            for io in chosen:
                self.held.remove(io)
                if io.op == lib.DP_IO_READ:
                    n = self._file_ops.preadv(self.ctx, io.iov, io.iovcnt, io.offset)
                elif io.op == lib.DP_IO_WRITE:
                    n = self._file_ops.pwritev(self.ctx, io.iov, io.iovcnt, io.offset)
                else:
                    n = 0
                io.result = 0 if n >= 0 else -1
                self.ready.append(io)
        if signal:
            os.eventfd_write(self.notify_fd, 1)


def test_reads_and_writes_through_io_uring_beyond_the_depth() -> None:
    guest = FakeGuest(num=64, pages=256)
    dev = Device(guest, ops=ffi.addressof(lib.dp_file_uring_ops), depth=4)
    written = {k: bytes([65 + k]) * 512 for k in range(12)}
    for k, data in written.items():
        guest.blk_request(OUT, sector=k, out=data)
    assert dev.process() == 12
    reads = [guest.blk_request(IN, sector=k, in_len=512) for k in range(12)]
    guest.blk_request(FLUSH)
    assert dev.process() == 13
    for k, (_, din, st) in enumerate(reads):
        assert status(guest, st) == OK
        assert guest.arena.read(din, 512) == written[k]
    assert dev.file_read(5 * 512, 512) == written[5]
    assert dev.q.stats.reads == 12 and dev.q.stats.writes == 12 and dev.q.stats.flushes == 1


def test_requests_complete_in_the_order_the_backend_finishes_them() -> None:
    guest = FakeGuest(num=16, pages=64)
    scripted = Scripted()
    log = bytearray(lib.dp_inflight_size(16))
    inflight = ffi.cast("struct dp_inflight *", ffi.from_buffer(log))
    dev = Device(guest, ops=scripted.ops, depth=8, inflight=inflight)
    heads = [guest.blk_request(OUT, sector=k, out=bytes([49 + k]) * 512)[0] for k in range(3)]
    runner = threading.Thread(target=dev.process)
    runner.start()
    deadline = time.monotonic() + 10
    while len(scripted.held) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert sorted(h for h in range(16) if inflight.desc[h].inflight) == sorted(heads)
    scripted.release(2)
    scripted.release(0)
    deadline = time.monotonic() + 10
    while guest.used_idx() < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert [h for h, _ in guest.reap()] == [heads[2], heads[0]]
    assert [h for h in range(16) if inflight.desc[h].inflight] == [heads[1]]
    scripted.release(0)
    runner.join(10)
    assert not runner.is_alive()
    assert [h for h, _ in guest.reap()] == [heads[1]]
    assert dev.file_read(0, 1) + dev.file_read(512, 1) + dev.file_read(1024, 1) == b"123"


def test_a_new_process_runs_again_exactly_what_the_log_holds_in_flight() -> None:
    guest = FakeGuest(num=16, pages=64)
    scripted = Scripted()
    log = bytearray(lib.dp_inflight_size(16))
    inflight = ffi.cast("struct dp_inflight *", ffi.from_buffer(log))
    first = Device(guest, ops=scripted.ops, depth=8, inflight=inflight)
    writes = [guest.blk_request(OUT, sector=k, out=bytes([65 + k]) * 512) for k in range(3)]
    runner = threading.Thread(target=first.process)
    runner.start()
    deadline = time.monotonic() + 10
    while len(scripted.held) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    scripted.release(1)  # the second write completes; the others never do: the process "dies"
    while guest.used_idx() < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert [h for h, _ in guest.reap()] == [writes[1][0]]
    # more requests arrive, never popped by the dead process
    later = guest.blk_request(OUT, sector=7, out=b"Z" * 512)
    # a new process, the same rings, file and log: it resumes from the log
    second = Device(guest, ops=ffi.addressof(lib.dp_file_uring_ops), depth=8,
                    inflight=inflight, file=first.file, resume=True)  # fmt: skip
    assert second.q.vq.last_avail_idx == 3  # used 1 + 2 in flight
    assert second.process() == 3
    done = sorted(h for h, _ in guest.reap())
    assert done == sorted([writes[0][0], writes[2][0], later[0]])
    for _, _, st in (writes[0], writes[2], later):
        assert status(guest, st) == OK
    assert [second.file_read(512 * k, 1) for k in (0, 2, 7)] == [b"A", b"C", b"Z"]
    assert not any(inflight.desc[h].inflight for h in range(16))
    lib.dp_queue_request_stop(first.q)  # the "dead" worker drains and ends
    scripted.release(0, 1)
    runner.join(10)
    assert not runner.is_alive()


def test_an_iotlb_update_waits_for_the_requests_in_flight_and_stops_new_ones() -> None:
    guest = FakeGuest(num=16, pages=64)
    scripted = Scripted()
    dev = Device(guest, ops=scripted.ops, depth=8)
    for k in range(2):
        guest.blk_request(OUT, sector=k, out=b"x" * 512)
    runner = threading.Thread(target=dev.process)
    runner.start()
    deadline = time.monotonic() + 10
    while len(scripted.held) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # the guest's memory must stay mapped while the backend may still write into it
    update = threading.Thread(target=lib.dp_iotlb_invalidate, args=(dev.tlb, 1 << 40, 1 << 41))
    update.start()
    time.sleep(0.2)
    assert update.is_alive()
    guest.blk_request(OUT, sector=5, out=b"y" * 512)
    time.sleep(0.2)
    assert len(scripted.held) == 2  # nothing new starts while the update waits
    scripted.release(0, 1)
    update.join(10)
    assert not update.is_alive()
    while len(scripted.held) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    scripted.release(0)
    runner.join(10)
    assert not runner.is_alive()
    assert len(guest.reap()) == 3


def test_a_log_that_cannot_describe_the_rings_stops_the_queue_instead_of_guessing() -> None:
    guest = FakeGuest(num=16, pages=64)
    log = bytearray(lib.dp_inflight_size(16))
    inflight = ffi.cast("struct dp_inflight *", ffi.from_buffer(log))
    lib.dp_inflight_reset(inflight, 16, 0)
    for head in (0, 3):  # two requests in flight, but the guest never offered any
        lib.dp_inflight_popped(inflight, head)
    dev = Device(guest, ops=ffi.addressof(lib.dp_file_uring_ops), depth=4, inflight=inflight,
                 resume=True)  # fmt: skip
    assert dev.broken == lib.DP_BROKEN_LOG
    guest.blk_request(IN, sector=0, in_len=512)
    assert dev.process() == -1
    assert guest.reap() == []


def wait_until(condition: Any, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_kick_taken_while_a_writer_waits_is_not_lost() -> None:
    """The worker wakes for a kick while an IOTLB update waits for its request in flight:
    it pops nothing, and that request completes later in the same turn. The new request
    must still be popped once the update is done, though no kick will come for it."""
    guest = FakeGuest(num=16, pages=64)
    scripted = Scripted()
    dev = Device(guest, ops=scripted.ops, depth=8, kicks=True)
    guest.blk_request(OUT, sector=0, out=b"a" * 512)
    dev.kick()
    runner = threading.Thread(target=dev.run)
    runner.start()
    wait_until(lambda: len(scripted.held) == 1)
    update = threading.Thread(target=lib.dp_iotlb_invalidate, args=(dev.tlb, 1 << 40, 1 << 41))
    update.start()
    wait_until(lambda: dev.tlb.writers == 1)
    # the first reap of the next turn finds nothing; the one after fill finds the write done
    scripted.skip_reaps = 1
    scripted.release(0, signal=False)
    guest.blk_request(OUT, sector=1, out=b"b" * 512)
    dev.kick()
    update.join(10)
    assert not update.is_alive()
    wait_until(lambda: len(scripted.held) == 1)
    scripted.release(0)
    wait_until(lambda: guest.used_idx() == 2)
    dev.stop()
    runner.join(10)
    assert not runner.is_alive()
    assert dev.file_read(0, 1) + dev.file_read(512, 1) == b"ab"


def test_a_refused_submission_is_sent_again_not_forgotten() -> None:
    guest = FakeGuest(num=16, pages=64)
    scripted = Scripted()
    scripted.refused_kicks = 3
    dev = Device(guest, ops=scripted.ops, depth=8, kicks=True)
    guest.blk_request(OUT, sector=0, out=b"k" * 512)
    dev.kick()
    runner = threading.Thread(target=dev.run)
    runner.start()
    wait_until(lambda: len(scripted.held) == 1)
    assert scripted.refused_kicks == 0
    scripted.release(0)
    wait_until(lambda: guest.used_idx() == 1)
    dev.stop()
    runner.join(10)
    assert not runner.is_alive()
    assert dev.file_read(0, 1) == b"k"
