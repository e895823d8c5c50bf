"""What keeps the data plane from lying or hanging: the smallest queue, completion order,
stops and IOTLB updates under load, guest-memory faults, and a request that crashed the
process. The real C code, a fake guest, no kernel."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from csi_vduse._native import ffi, lib
from csi_vduse.dataplane.blk_device import BlkParams, config_space
from csi_vduse.errors import InvalidArgument
from csi_vduse.lifecycle.export import ExportOptions
from csi_vduse.lifecycle.provisioning import parse_parameters
from tests.unit.fakeguest import OUTHDR, Buf, Device, FakeGuest, callback_ops

REPO = Path(__file__).resolve().parents[2]
OK, IOERR = lib.VIRTIO_BLK_S_OK, lib.VIRTIO_BLK_S_IOERR


def child(case: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.unit.dataplane_child", case, str(workdir)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


# The smallest queue


@pytest.mark.parametrize("size", [0, 1, 2, 3, 6, 2048])
def test_queue_sizes_without_room_for_a_request_are_refused(size: int, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="queue size"):
        BlkParams(capacity=1 << 20, queue_size=size)
    with pytest.raises(InvalidArgument):
        parse_parameters({"queueSize": str(size)})
    with pytest.raises(ValidationError):
        ExportOptions(file=tmp_path / "f", name="x", queue_size=size)
    assert lib.dp_queue_new(0, -1, -1, -1, ffi.NULL, ffi.NULL, 2, ffi.NULL) == ffi.NULL


def test_the_smallest_queue_serves_reads_and_writes() -> None:
    params = BlkParams(capacity=1 << 20, queue_size=4)
    assert params.seg_max == 2
    assert int.from_bytes(config_space(params)[12:16], "little") == 2
    guest = FakeGuest(num=4, pages=16)
    dev = Device(guest, max_descs=params.seg_max + 2)
    payload = os.urandom(1024)
    hdr, st = guest.arena.alloc(OUTHDR.size), guest.arena.alloc(1)
    guest.arena.write(hdr, OUTHDR.pack(lib.VIRTIO_BLK_T_OUT, 0, 0))
    halves = [guest.arena.alloc(512) for _ in range(2)]
    for buf, half in zip(halves, (payload[:512], payload[512:]), strict=True):
        guest.arena.write(buf, half)
    head = guest.submit([Buf(hdr, 16), Buf(halves[0], 512), Buf(halves[1], 512), Buf(st, 1, True)])
    assert dev.process() == 1
    assert guest.reap() == [(head, 1)] and guest.arena.read(st, 1)[0] == OK
    assert dev.file_read(0, 1024) == payload


# Completion order is what makes the used ring a record of progress


def test_a_completion_out_of_ring_order_stops_the_queue() -> None:
    guest = FakeGuest(num=16)
    dev = Device(guest)
    chain = ffi.new("struct dp_chain *")
    chain.head, chain.avail_idx = 3, 1  # the second request, while the first is pending
    lib.dp_vq_push(ffi.addressof(dev.q.vq), chain, 1)
    assert dev.broken == lib.DP_BROKEN_ORDER and guest.used_idx() == 0
    chain.avail_idx = 0
    lib.dp_vq_push(ffi.addressof(dev.q.vq), chain, 1)
    assert guest.used_idx() == 0  # nothing completes on a queue that broke the invariant


# Under load


class Load:
    """A guest that keeps `depth` reads in flight: each completion is submitted again."""

    def __init__(self, guest: FakeGuest, depth: int) -> None:
        self.guest = guest
        self.stop = threading.Event()
        self.heads = []
        for _ in range(depth):
            hdr, data, st = (guest.arena.alloc(n) for n in (16, 512, 1))
            guest.arena.write(hdr, OUTHDR.pack(lib.VIRTIO_BLK_T_IN, 0, 0))
            self.heads.append(guest.submit([Buf(hdr, 16), Buf(data, 512, True), Buf(st, 1, True)]))
        self.completed = 0
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self.stop.is_set():
            for head, _ in self.guest.reap():
                self.completed += 1
                self.guest.publish(head)
            time.sleep(0.0002)


def test_iotlb_updates_and_stops_get_in_while_the_ring_stays_busy() -> None:
    guest = FakeGuest(num=64, pages=64)

    def slow(op: str, head: bytes) -> None:
        time.sleep(0.002)  # a backend taking 2 ms

    ops, keep = callback_ops(slow)
    dev = Device(guest, ops=ops)
    load = Load(guest, depth=20)  # more than a batch: the ring is seldom empty
    stopped = threading.Event()

    def serve() -> None:
        # dp_queue_process returns once the ring runs empty, as it can when the guest's
        # thread is starved on a loaded machine; serve again until stopped, as dp_queue_run.
        while not stopped.is_set() and lib.dp_queue_process(dev.q) >= 0:
            pass

    load.thread.start()
    worker = threading.Thread(target=serve)
    worker.start()
    try:
        deadline = time.monotonic() + 20
        while load.completed < 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert load.completed >= 50 and worker.is_alive()
        start = time.monotonic()
        lib.dp_iotlb_invalidate(dev.tlb, 1 << 62, (1 << 62) + 4095)  # takes the write lock
        assert time.monotonic() - start < 1.0
        before = load.completed
        time.sleep(0.2)
        assert load.completed > before  # still serving
        start = time.monotonic()
        lib.dp_queue_request_stop(dev.q)
        stopped.set()
        worker.join(timeout=5)
        assert not worker.is_alive() and time.monotonic() - start < 1.0
    finally:
        load.stop.set()
        load.thread.join()
        lib.dp_queue_request_stop(dev.q)
        stopped.set()
        worker.join()
    assert keep


def test_the_iotlb_holds_a_mapping_per_queue_of_the_largest_device() -> None:
    tlb = ffi.new("struct dp_iotlb *")
    queues = 64
    assert lib.dp_iotlb_init(tlb, -1, 2 * queues + lib.DP_MIN_MAPS) == 0
    va = ffi.new("uint8_t[]", 4096)
    try:
        for k in range(2 * queues + 1):  # every ring, the bounce region and then some
            assert lib.dp_iotlb_add(tlb, k << 20, (k << 20) + 4095, va, lib.DP_PERM_READ) == 0
    finally:
        lib.dp_iotlb_destroy(tlb)


# ENOSPC shows


def test_a_write_failing_for_space_is_flagged_until_a_write_succeeds() -> None:
    guest = FakeGuest(num=16)
    full = [True]

    def on_io(op: str, _: bytes) -> int | None:
        return errno.ENOSPC if op == "write" and full[0] else None

    ops, keep = callback_ops(on_io)
    dev = Device(guest, ops=ops)
    _, _, st = guest.blk_request(lib.VIRTIO_BLK_T_OUT, out=b"x" * 512)
    dev.process()
    assert guest.arena.read(st, 1)[0] == IOERR
    assert dev.q.write_enospc == 1 and dev.q.stats.enospc == 1
    full[0] = False
    _, _, st = guest.blk_request(lib.VIRTIO_BLK_T_OUT, out=b"x" * 512)
    dev.process()
    assert guest.arena.read(st, 1)[0] == OK and dev.q.write_enospc == 0
    assert keep


# Guest memory cannot kill the process; a request that did is never executed again


def test_unpopulated_guest_memory_fails_the_request_not_the_process(tmp_path: Path) -> None:
    result = child("sigbus", tmp_path)
    assert result.returncode == 0, f"the data plane died: {result.returncode} {result.stderr}"
    r = json.loads(result.stdout)
    done, used, status = r["header_in_hole"]
    assert done == 1 and used[0][1] == 1 and status == IOERR
    done, used, status = r["read_into_hole"]
    assert done == 1 and used[0][1] == 1 and status == IOERR
    assert r["flush_after"][0] == 1 and r["flush_after"][2] == OK  # the queue goes on
    done, used, broken, broken_head, head = r["status_in_hole"]
    assert done == -1 and used == [] and broken == lib.DP_BROKEN_FAULT and broken_head == head
    assert r["faults"] >= 2


def test_a_backend_that_copies_guest_memory_itself_never_gets_a_faulting_buffer(
    tmp_path: Path,
) -> None:
    result = child("sigbus_user_copies", tmp_path)
    assert result.returncode == 0, f"the data plane died: {result.returncode} {result.stderr}"
    r = json.loads(result.stdout)
    assert r["done"] == 2 and r["statuses"] == [IOERR, OK] and r["faults"] == 1
    assert r["seen"] == ["w" * 16]  # the backend saw the good write only


def test_a_request_that_crashed_the_process_fails_instead_of_running_again(
    tmp_path: Path,
) -> None:
    first = child("crash", tmp_path)
    assert first.returncode == -signal.SIGSEGV, first.stderr
    log = (tmp_path / "queue.log").read_bytes()
    assert int.from_bytes(log[16:20], "little") == (1 << 16) | 1  # the second request
    # the killed process's in-flight log names the three popped heads, in pop order
    assert in_flight(tmp_path / "queue.inflight") == [(0, 1), (3, 2), (6, 3)]
    second = child("resume", tmp_path)
    assert second.returncode == 0, f"crashed again: {second.returncode} {second.stderr}"
    r = json.loads(second.stdout)
    assert r["done"] == 3 and r["statuses"] == [OK, IOERR, OK] and r["poisoned"] == 1
    assert not any(w.startswith("CRASH") for w in r["writes"])
    assert r["sectors"] == ["A", "\0", "C"]
    assert int.from_bytes((tmp_path / "queue.log").read_bytes()[16:20], "little") == 0
    assert not r["log_disagreed"]
    assert r["in_flight_after"] == [] and r["logged_used_idx"] == 3


def test_a_request_that_crashed_the_asynchronous_worker_fails_instead_of_running_again(
    tmp_path: Path,
) -> None:
    first = child("crash_async", tmp_path)
    assert first.returncode == -signal.SIGSEGV, first.stderr
    log = (tmp_path / "queue.log").read_bytes()
    head_of_zeroes = 3  # each request is a chain of three descriptors
    crashed = int.from_bytes(log[16:20], "little")
    assert crashed == (1 << 16) | (1 << 17) | head_of_zeroes
    assert in_flight(tmp_path / "queue.inflight") == [(0, 1), (3, 2)]
    second = child("resume_async", tmp_path)
    assert second.returncode == 0, f"crashed again: {second.returncode} {second.stderr}"
    r = json.loads(second.stdout)
    assert r["done"] == 3 and sorted(r["statuses"]) == [OK, OK, IOERR]
    assert r["poisoned"] == 1 and "ZEROES" not in r["writes"]
    assert r["sectors"] == ["A", "\0", "C"]
    assert int.from_bytes((tmp_path / "queue.log").read_bytes()[16:20], "little") == 0
    assert r["in_flight_after"] == [] and r["logged_used_idx"] == 3


def in_flight(path: Path) -> list[tuple[int, int]]:
    """(head, pop counter) of each request the in-flight log file holds in flight."""
    data = bytearray(path.read_bytes())
    log = ffi.cast("struct dp_inflight *", ffi.from_buffer(data))
    assert lib.dp_inflight_valid(log, 16)
    return [(h, int(log.desc[h].counter)) for h in range(16) if log.desc[h].inflight]


def test_a_log_of_requests_completed_out_of_order_stops_the_in_order_worker(
    tmp_path: Path,
) -> None:
    assert child("crash", tmp_path).returncode == -signal.SIGSEGV
    path = tmp_path / "queue.inflight"
    data = bytearray(path.read_bytes())
    log = ffi.cast("struct dp_inflight *", ffi.from_buffer(data))
    log.desc[3].inflight = 0  # as if the second request had completed, out of ring order
    path.write_bytes(bytes(data))
    r = json.loads(child("resume", tmp_path).stdout)
    assert r["log_disagreed"] and r["broken"] == lib.DP_BROKEN_LOG
    # ring order would run the "completed" second write again: nothing runs at all
    assert r["done"] == -1 and r["statuses"] == [] and r["writes"] == []
    assert r["sectors"] == ["A", "\0", "\0"]
    # the log is kept, for a worker that resumes from it
    assert in_flight(path) == [(0, 1), (6, 3)]


def test_the_data_plane_builds_for_arm64(tmp_path: Path) -> None:
    """No x86-only builtins: the C must compile and link on arm64 (cross-compiled; without
    io_uring, whose arm64 library is not installed here)."""
    sources = sorted((REPO / "csi_vduse").glob("*/native/*.c"))
    includes = [f"-I{d}" for d in {s.parent for s in sources}]
    objects = []
    for src in sources:
        obj = tmp_path / f"{src.stem}.o"
        subprocess.run(
            ["aarch64-linux-gnu-gcc", "-O2", "-std=gnu11", "-Wall", "-Werror", "-fPIC",
             "-Wno-unused-parameter", "-D_GNU_SOURCE", "-DCSI_VDUSE_NO_URING",
             "-DCSI_VDUSE_NO_RBD", "-pthread",
             *includes,
             "-c", str(src), "-o", str(obj)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        objects.append(str(obj))
    linked = subprocess.run(
        ["aarch64-linux-gnu-gcc", "-shared", "-pthread", "-Wl,-z,defs", "-o",
         str(tmp_path / "dataplane.so"), *objects],
        capture_output=True, text=True,
    )  # fmt: skip
    assert linked.returncode == 0, linked.stderr
    assert (
        b"AArch64"
        in subprocess.run(
            ["readelf", "-h", str(tmp_path / "dataplane.so")], capture_output=True, check=True
        ).stdout
    )
