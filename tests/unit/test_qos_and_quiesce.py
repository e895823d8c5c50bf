"""QoS token buckets (pure, on a clock the test drives) and the device gate, through the
real C worker over a fake guest."""

from __future__ import annotations

import errno
import os
import struct
import threading
import time
from typing import Any

import pytest

from csi_vduse._native import ffi, lib
from tests.unit.fakeguest import Buf, Device, FakeGuest, callback_ops

S = 1_000_000_000
READ_OPS, WRITE_OPS, READ_BYTES, WRITE_BYTES = range(4)


def qos(limits: list[int], burst_ms: int = 1000, now: int = 0) -> Any:
    q = ffi.new("struct dp_qos *")
    lib.dp_qos_init(q)
    lib.dp_qos_set(q, limits, burst_ms, now)
    return q


def used(kind: int, n: int) -> list[int]:
    out = [0, 0, 0, 0]
    out[kind] = n
    return out


def test_unlimited_never_waits() -> None:
    q = qos([0, 0, 0, 0])
    lib.dp_qos_charge(q, [10**9] * 4, 1)
    assert lib.dp_qos_wait_ns(q, 2) == 0


def test_a_burst_passes_then_the_rate_holds() -> None:
    q = qos([100, 0, 0, 0], burst_ms=1000)
    lib.dp_qos_charge(q, used(READ_OPS, 100), 0)  # the whole burst at once
    assert lib.dp_qos_wait_ns(q, 0) == 0
    lib.dp_qos_charge(q, used(READ_OPS, 50), 0)  # 50 into debt: half a second at 100/s
    assert lib.dp_qos_wait_ns(q, 0) == pytest.approx(S // 2, rel=1e-6)
    assert lib.dp_qos_wait_ns(q, S // 4) == pytest.approx(S // 4, rel=1e-6)
    assert lib.dp_qos_wait_ns(q, S // 2) == 0
    lib.dp_qos_charge(q, used(WRITE_OPS, 10**6), S // 2)  # writes are not limited
    assert lib.dp_qos_wait_ns(q, S // 2) == 0
    # an idle bucket refills to its burst and no further
    lib.dp_qos_charge(q, used(READ_OPS, 150), 100 * S)
    assert lib.dp_qos_wait_ns(q, 100 * S) == pytest.approx(S // 2, rel=1e-6)


def test_the_slowest_bucket_decides_and_bytes_count() -> None:
    q = qos([0, 1000, 0, 1 << 20], burst_ms=100)
    lib.dp_qos_charge(q, [0, 10, 0, 2 << 20], 0)  # 2 MiB: 1.9 s of debt at 1 MiB/s
    wait = lib.dp_qos_wait_ns(q, 0)
    assert wait == pytest.approx(1.9 * S, rel=1e-3)


def test_lowering_a_limit_under_load_keeps_the_debt() -> None:
    q = qos([0, 0, 1000, 0], burst_ms=1000)
    lib.dp_qos_charge(q, used(READ_BYTES, 3000), 0)  # 2000 in debt: 2 s
    lib.dp_qos_set(q, [0, 0, 500, 0], 1000, 0)  # now 4 s
    assert lib.dp_qos_wait_ns(q, 0) == pytest.approx(4 * S, rel=1e-6)
    lib.dp_qos_set(q, [0, 0, 0, 0], 1000, 0)  # lifted: no wait at all
    assert lib.dp_qos_wait_ns(q, 0) == 0


def device_with_gate(guest: FakeGuest, **kw: Any) -> tuple[Device, Any]:
    dev = Device(guest, **kw)
    shared = ffi.new("struct dp_device *")
    assert lib.dp_device_init(shared) == 0
    dev.q.dev = shared
    return dev, shared


def write(guest: FakeGuest, sector: int, data: bytes) -> int:
    head, _, _ = guest.blk_request(lib.VIRTIO_BLK_T_OUT, sector=sector, out=data)
    return head


def test_the_worker_waits_out_its_qos_debt() -> None:
    guest = FakeGuest(num=64)  # 3 descriptors per request
    dev, shared = device_with_gate(guest)
    lib.dp_qos_set(ffi.addressof(shared.qos), [0, 50, 0, 0], 100, time.monotonic_ns())
    for i in range(10):  # burst of 5, so 5 in debt: 0.1 s at 50/s before the next batch
        write(guest, i, b"x" * 512)
    assert dev.process() == 10
    assert dev.q.stats.writes == 10
    write(guest, 20, b"y" * 512)
    start = time.monotonic()
    assert dev.process() == 1
    assert time.monotonic() - start >= 0.08
    assert dev.q.stats.throttled_us >= 80_000
    assert dev.file_read(20 * 512, 1) == b"y"


def test_quiesce_holds_new_requests_until_resume() -> None:
    guest = FakeGuest(num=16)
    dev, shared = device_with_gate(guest)
    assert lib.dp_device_quiesce(shared, 1000) == 0
    write(guest, 3, b"z" * 512)
    worker = threading.Thread(target=dev.process)
    worker.start()
    time.sleep(0.2)
    assert guest.used_idx() == 0 and dev.file_read(3 * 512, 1) == b"\0"  # waits, not failed
    lib.dp_device_resume(shared)
    worker.join(5)
    assert guest.used_idx() == 1 and dev.file_read(3 * 512, 1) == b"z"


def test_quiesce_waits_for_the_running_batch_and_times_out_on_a_hung_one() -> None:
    started, release = threading.Event(), threading.Event()

    def on_io(op: str, head: bytes) -> int | None:
        started.set()
        release.wait(5)
        return None

    ops, keep = callback_ops(on_io)
    guest = FakeGuest(num=16)
    dev, shared = device_with_gate(guest, ops=ops)
    write(guest, 1, b"w" * 512)
    worker = threading.Thread(target=dev.process)
    worker.start()
    assert started.wait(5)
    assert lib.dp_device_quiesce(shared, 100) == -errno.ETIMEDOUT  # the write is still running
    release.set()
    assert lib.dp_device_quiesce(shared, 5000) == 0  # and now it completed
    assert guest.used_idx() == 1 and dev.file_read(512, 1) == b"w"
    lib.dp_device_resume(shared)
    worker.join(5)
    del keep
    os.sync()


def test_setting_the_same_limits_again_grants_no_new_burst() -> None:
    q = qos([0, 100, 0, 0], burst_ms=1000)
    lib.dp_qos_charge(q, used(WRITE_OPS, 150), 0)
    lib.dp_qos_set(q, [0, 100, 0, 0], 1000, 0)  # a no-op ModifyVolume, a restage
    assert lib.dp_qos_wait_ns(q, 0) == pytest.approx(S // 2, rel=1e-6)


def test_a_hostile_debt_waits_an_hour_at_most() -> None:
    q = qos([1, 0, 0, 0], burst_ms=1)
    lib.dp_qos_charge(q, used(READ_OPS, 2**62), 0)
    assert lib.dp_qos_wait_ns(q, 0) == 3600 * S


def test_a_split_header_is_charged_like_any_other() -> None:
    guest = FakeGuest(num=64)
    dev, shared = device_with_gate(guest)
    lib.dp_qos_set(ffi.addressof(shared.qos), [0, 1, 0, 1 << 20], 1, time.monotonic_ns())
    header = struct.pack("<IIQ", lib.VIRTIO_BLK_T_OUT, 0, 2)
    data, status = guest.arena.alloc(512), guest.arena.alloc(1)
    parts = [guest.arena.alloc(2) for _ in range(8)]  # the 16-byte header in 2-byte pieces
    for i, iova in enumerate(parts):
        guest.arena.write(iova, header[2 * i : 2 * i + 2])
    guest.arena.write(data, b"h" * 512)
    guest.submit([*(Buf(iova, 2) for iova in parts), Buf(data, 512), Buf(status, 1, write=True)])
    assert dev.process() == 1 and guest.arena.read(status, 1) == b"\0"
    assert dev.file_read(1024, 1) == b"h"
    tokens = [shared.qos.b[k].tokens for k in (WRITE_OPS, WRITE_BYTES)]
    assert tokens[0] < 1 and tokens[1] < (1 << 20) * 0.001  # one write and 512 bytes paid


def test_a_stop_gets_through_a_held_quiesce() -> None:
    guest = FakeGuest(num=16)
    dev, shared = device_with_gate(guest)
    assert lib.dp_device_quiesce(shared, 1000) == 0
    write(guest, 3, b"q" * 512)
    worker = threading.Thread(target=dev.process)
    worker.start()
    time.sleep(0.05)
    lib.dp_queue_request_stop(dev.q)  # a device reset while a snapshot is cut
    worker.join(2)
    assert not worker.is_alive() and guest.used_idx() == 0  # stopped, nothing run
    lib.dp_device_resume(shared)
