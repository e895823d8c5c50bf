"""The C ring walk and virtio-blk request logic, driven by a fake guest (no kernel)."""

from __future__ import annotations

import os
import struct

import pytest

from csi_vduse._native import lib
from tests.unit.fakeguest import INDIRECT, NEXT, RANGE, WRITE, Buf, Device, FakeGuest

OK, IOERR, UNSUPP = lib.VIRTIO_BLK_S_OK, lib.VIRTIO_BLK_S_IOERR, lib.VIRTIO_BLK_S_UNSUPP
T_IN, T_OUT, T_FLUSH = lib.VIRTIO_BLK_T_IN, lib.VIRTIO_BLK_T_OUT, lib.VIRTIO_BLK_T_FLUSH
T_GET_ID, T_DISCARD, T_WZ = (
    lib.VIRTIO_BLK_T_GET_ID,
    lib.VIRTIO_BLK_T_DISCARD,
    lib.VIRTIO_BLK_T_WRITE_ZEROES,
)


def status(g: FakeGuest, iova: int) -> int:
    return g.arena.read(iova, 1)[0]


@pytest.fixture
def guest() -> FakeGuest:
    return FakeGuest(num=16)


@pytest.mark.parametrize("indirect", [False, True])
def test_write_then_read_round_trips(guest: FakeGuest, indirect: bool) -> None:
    dev = Device(guest)
    payload = os.urandom(4096)
    head, _, st = guest.blk_request(T_OUT, sector=8, out=payload, indirect=indirect)
    assert dev.process() == 1
    assert guest.reap() == [(head, 1)]
    assert status(guest, st) == OK
    assert dev.file_read(8 * 512, 4096) == payload

    head, din, st = guest.blk_request(T_IN, sector=8, in_len=4096, indirect=indirect)
    dev.process()
    assert guest.reap() == [(head, 4097)]
    assert status(guest, st) == OK
    assert guest.arena.read(din, 4096) == payload


def test_read_split_over_many_segments_and_status_sharing_last_buffer(guest: FakeGuest) -> None:
    dev = Device(guest)
    dev.file_write(0, bytes(range(256)) * 8)
    hdr = guest.arena.alloc(16)
    guest.arena.write(hdr, struct.pack("<IIQ", T_IN, 0, 0))
    a, b = guest.arena.alloc(1000), guest.arena.alloc(25)  # 1024 data + status in b's tail
    head = guest.submit([Buf(hdr, 7), Buf(hdr + 7, 9), Buf(a, 1000, True), Buf(b, 25, True)])
    dev.process()
    assert guest.reap() == [(head, 1025)]
    assert guest.arena.read(a, 1000) + guest.arena.read(b, 24) == (bytes(range(256)) * 8)[:1024]
    assert status(guest, b + 24) == OK


def test_flush_get_id_and_unsupported(guest: FakeGuest) -> None:
    dev = Device(guest, serial=b"serial-123")
    _, _, st_flush = guest.blk_request(T_FLUSH)
    _, din, st_id = guest.blk_request(T_GET_ID, in_len=20)
    _, _, st_bad = guest.blk_request(99)
    assert dev.process() == 3
    assert [status(guest, s) for s in (st_flush, st_id, st_bad)] == [OK, OK, UNSUPP]
    assert guest.arena.read(din, 20) == b"serial-123".ljust(20, b"\0")
    assert dev.q.stats.flushes == 1 and dev.q.stats.unsupported == 1


def test_out_of_capacity_and_unaligned_io_fail(guest: FakeGuest) -> None:
    dev = Device(guest, size=1 << 20)
    _, _, past_end = guest.blk_request(T_IN, sector=2048, in_len=512)
    _, _, straddle = guest.blk_request(T_OUT, sector=2047, out=b"x" * 1024)
    _, _, unaligned = guest.blk_request(T_OUT, sector=0, out=b"x" * 100)
    _, _, huge_sector = guest.blk_request(T_IN, sector=2**64 - 1, in_len=512)
    dev.process()
    assert [status(guest, s) for s in (past_end, straddle, unaligned, huge_sector)] == [IOERR] * 4
    assert dev.file_read(2047 * 512, 512) == bytes(512)


def test_readonly_refuses_writes_and_discards(guest: FakeGuest) -> None:
    dev = Device(guest, readonly=True)
    _, _, w = guest.blk_request(T_OUT, out=b"y" * 512)
    _, _, d = guest.blk_request(T_DISCARD, out=RANGE.pack(0, 8, 0))
    _, _, r = guest.blk_request(T_IN, in_len=512)
    dev.process()
    assert [status(guest, s) for s in (w, d, r)] == [IOERR, IOERR, OK]
    assert dev.file_read(0, 512) == bytes(512)


def test_discard_and_write_zeroes(guest: FakeGuest) -> None:
    dev = Device(guest)
    dev.file_write(0, b"\xff" * 65536)
    _, _, d = guest.blk_request(T_DISCARD, out=RANGE.pack(0, 64, 0))
    _, _, z = guest.blk_request(T_WZ, out=RANGE.pack(64, 8, 0) + RANGE.pack(72, 8, 1))
    _, _, bad_flag = guest.blk_request(T_DISCARD, out=RANGE.pack(0, 8, 1))
    _, _, too_many = guest.blk_request(T_DISCARD, out=RANGE.pack(0, 8, 0) * 5)
    _, _, past = guest.blk_request(T_WZ, out=RANGE.pack(2047, 2, 0))
    dev.process()
    assert [status(guest, s) for s in (d, z, bad_flag, too_many, past)] == [
        OK, OK, UNSUPP, IOERR, IOERR,
    ]  # fmt: skip
    assert dev.file_read(0, 40960) == bytes(40960)
    assert dev.file_read(40960, 512) == b"\xff" * 512


def test_event_idx_suppresses_interrupts_until_used_event(guest: FakeGuest) -> None:
    dev = Device(guest, event_idx=True)
    guest.set_used_event(5)  # the driver wants an interrupt once used passes 5
    for _ in range(3):
        guest.blk_request(T_FLUSH)
    dev.process()
    assert dev.interrupts == 1  # the first batch always signals
    for _ in range(2):
        guest.blk_request(T_FLUSH)
    dev.process()
    assert dev.interrupts == 1  # used went 3 -> 5: event 5 not crossed
    guest.blk_request(T_FLUSH)
    dev.process()
    assert dev.interrupts == 2  # 5 -> 6 crosses it
    assert guest.avail_event() == 6  # kicks re-armed at the next avail index


def test_no_interrupt_flag_is_honoured_without_event_idx(guest: FakeGuest) -> None:
    dev = Device(guest)
    guest.arena.write(guest.avail, struct.pack("<H", lib.VRING_AVAIL_F_NO_INTERRUPT))
    guest.blk_request(T_FLUSH)
    dev.process()
    assert dev.interrupts == 0 and len(guest.reap()) == 1


def test_batch_is_drained_with_one_interrupt(guest: FakeGuest) -> None:
    dev = Device(guest)
    for _ in range(10):
        guest.blk_request(T_FLUSH)
    assert dev.process() == 10
    assert dev.interrupts == 1
    assert len(guest.reap()) == 10


# Hostile chains. A chain that is refused completes with IOERR written into its real
# status byte (the last byte of its last descriptor, when the guest made it writable) and
# nothing else; without such a byte the request cannot be answered, and the queue stops
# with the reason, touching nothing.

IOERR_AT_STATUS, STOPS = "ioerr", "stops"


def hostile(guest: FakeGuest, kind: str) -> tuple[int, str, int | None]:
    """Builds a hostile chain; returns (head, expected outcome, status iova or None)."""
    a = guest.arena
    hdr = a.alloc(16)
    a.write(hdr, struct.pack("<IIQ", T_IN, 0, 0))
    data, st = a.alloc(512), a.alloc(1)
    a.write(data, b"\xdd" * 512)
    a.write(st, b"\xee")
    head = guest.next_desc
    guest.next_desc = (head + 4) % guest.num
    h, n1, n2 = head, (head + 1) % guest.num, (head + 2) % guest.num
    outside = a.size + 0x10_0000 + 4096
    expect, status_at = STOPS, None
    if kind == "data buffer outside the mapping":
        guest.set_desc(h, hdr, 16, NEXT, n1)
        guest.set_desc(n1, outside, 512, NEXT | WRITE, n2)
        guest.set_desc(n2, st, 1, WRITE, 0)
        expect, status_at = IOERR_AT_STATUS, st
    elif kind == "header outside the mapping":
        guest.set_desc(h, outside, 16, NEXT, n1)
        guest.set_desc(n1, data, 512, NEXT | WRITE, n2)
        guest.set_desc(n2, st, 1, WRITE, 0)
        expect, status_at = IOERR_AT_STATUS, st
    elif kind == "data buffer running off the end of the mapping":
        guest.set_desc(h, hdr, 16, NEXT, n1)
        guest.set_desc(n1, data, 2**31, NEXT | WRITE, n2)
        guest.set_desc(n2, st, 1, WRITE, 0)
        expect, status_at = IOERR_AT_STATUS, st
    elif kind == "status running off the end of the mapping":
        guest.set_desc(h, hdr, 16, NEXT, n1)
        guest.set_desc(n1, st, 1, WRITE | NEXT, n2)
        guest.set_desc(n2, data, 2**32 - 1, WRITE, 0)
    elif kind == "address wrapping around 2**64":
        guest.set_desc(h, hdr, 16, NEXT, n1)
        guest.set_desc(n1, 2**64 - 256, 512, WRITE, 0)
    elif kind == "loop":
        guest.set_desc(h, hdr, 16, NEXT, n1)
        guest.set_desc(n1, st, 1, NEXT | WRITE, n1)
    elif kind == "zero-length data buffer":
        guest.set_desc(h, hdr, 16, NEXT, n1)
        guest.set_desc(n1, data, 0, NEXT | WRITE, n2)
        guest.set_desc(n2, st, 1, WRITE, 0)
        expect, status_at = IOERR_AT_STATUS, st
    elif kind == "zero-length last buffer":
        guest.set_desc(h, hdr, 16, NEXT, n1)
        guest.set_desc(n1, st, 1, NEXT | WRITE, n2)
        guest.set_desc(n2, data, 0, WRITE, 0)
    elif kind == "next index out of range":
        guest.set_desc(h, hdr, 16, NEXT, n1)
        guest.set_desc(n1, st, 1, NEXT | WRITE, guest.num + 7)
    elif kind == "readable after writable":
        guest.set_desc(h, hdr, 16, NEXT, n1)
        guest.set_desc(n1, st, 1, NEXT | WRITE, n2)
        guest.set_desc(n2, data, 512, 0, 0)
    elif kind == "readable status":
        guest.set_desc(h, hdr, 16, NEXT, n1)
        guest.set_desc(n1, data, 512, NEXT | WRITE, n2)
        guest.set_desc(n2, st, 1, 0, 0)
    elif kind == "header too short":
        guest.set_desc(h, hdr, 8, NEXT, n1)
        guest.set_desc(n1, st, 1, WRITE, 0)
        expect, status_at = IOERR_AT_STATUS, st
    elif kind == "indirect with next":
        table = a.alloc(32)
        guest.set_desc(h, table, 32, INDIRECT | NEXT, n1)
    elif kind == "indirect table of bad length":
        table = a.alloc(32)
        guest.set_desc(h, table, 24, INDIRECT, 0)
    elif kind == "nested indirect":
        table = a.alloc(32)
        a.write(table, struct.pack("<QIHH", hdr, 16, NEXT, 1))
        a.write(table + 16, struct.pack("<QIHH", table, 32, INDIRECT, 0))
        guest.set_desc(h, table, 32, INDIRECT, 0)
    elif kind == "indirect loop":
        table = a.alloc(32)
        a.write(table, struct.pack("<QIHH", st, 1, NEXT | WRITE, 1))
        a.write(table + 16, struct.pack("<QIHH", st, 1, NEXT | WRITE, 0))
        guest.set_desc(h, table, 32, INDIRECT, 0)
    elif kind == "more descriptors than offered":
        n = 70  # the device offered 64 (seg_max + 2)
        table = a.alloc(16 * n)
        a.write(table, struct.pack("<QIHH", hdr, 16, NEXT, 1))
        for k in range(1, n - 1):
            a.write(table + 16 * k, struct.pack("<QIHH", data + 8 * k, 8, NEXT | WRITE, k + 1))
        a.write(table + 16 * (n - 1), struct.pack("<QIHH", st, 1, WRITE, 0))
        guest.set_desc(h, table, 16 * n, INDIRECT, 0)
        expect, status_at = IOERR_AT_STATUS, st
    else:
        raise AssertionError(kind)
    guest.publish(head)
    return head, expect, status_at


HOSTILE = [
    "data buffer outside the mapping", "header outside the mapping",
    "data buffer running off the end of the mapping", "status running off the end of the mapping",
    "address wrapping around 2**64", "loop", "zero-length data buffer", "zero-length last buffer",
    "next index out of range", "readable after writable", "readable status", "header too short",
    "indirect with next", "indirect table of bad length", "nested indirect", "indirect loop",
    "more descriptors than offered",
]  # fmt: skip


def changed_bytes(guest: FakeGuest, before: bytes) -> set[int]:
    after = guest.arena.snapshot()
    return {i for i in range(len(after)) if after[i] != before[i]}


def ring_bytes(guest: FakeGuest) -> set[int]:
    """The device-owned used ring (flags, idx, elements, avail_event)."""
    used = guest.used - 0x10_0000
    return set(range(used, used + 6 + 8 * guest.num))


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_chain_fails_in_its_status_byte_or_stops_the_queue(kind: str) -> None:
    guest = FakeGuest(num=16, pages=64)
    dev = Device(guest)
    dev.file_write(0, b"\x5a" * 4096)
    head, expect, status_at = hostile(guest, kind)
    before = guest.arena.snapshot()
    result = dev.process()
    changed = changed_bytes(guest, before)
    assert dev.file_read(0, 4096) == b"\x5a" * 4096
    if expect == STOPS:
        assert result == -1
        assert dev.broken == lib.DP_BROKEN_NO_STATUS and dev.q.vq.broken_head == head
        assert guest.used_idx() == 0
        assert changed <= ring_bytes(guest), f"{kind}: bytes outside the used ring changed"
        return
    assert result == 1
    assert status_at is not None
    [(used_id, used_len)] = guest.reap()
    assert (used_id, used_len) == (head, 1)
    assert status(guest, status_at) == IOERR
    changed.discard(status_at - 0x10_0000)
    assert changed <= ring_bytes(guest), f"{kind}: bytes outside the used ring changed"
    assert dev.q.stats.bad_chains == 1
    assert not dev.broken
    # the queue keeps working afterwards
    _, _, st = guest.blk_request(T_FLUSH)
    dev.process()
    assert status(guest, st) == OK


def test_a_buffer_may_straddle_two_mappings() -> None:
    """vhost-vdpa and VMs map guest memory in several regions; a buffer may cross one."""
    guest = FakeGuest(num=16, pages=64)
    rw = lib.DP_PERM_READ | lib.DP_PERM_WRITE
    dev = Device(guest, maps=[(0, 20, rw), (20, 24, rw), (44, 20, rw)])
    payload = os.urandom(3 * 4096)
    guest.arena.alloc(20 * 4096 - guest.arena._heap - 4096)  # the buffers start in map 0
    head, _, st = guest.blk_request(T_OUT, sector=16, out=payload)
    assert dev.process() == 1
    assert guest.reap() == [(head, 1)] and status(guest, st) == OK
    assert dev.file_read(16 * 512, len(payload)) == payload
    guest.arena.alloc(44 * 4096 - guest.arena._heap - 4096)  # and now across maps 1 and 2
    head, din, st = guest.blk_request(T_IN, sector=16, in_len=len(payload), indirect=True)
    assert din < 0x10_0000 + 44 * 4096 < din + len(payload)
    assert dev.process() == 1
    assert guest.reap() == [(head, len(payload) + 1)] and status(guest, st) == OK
    assert guest.arena.read(din, len(payload)) == payload


def test_write_into_read_only_guest_memory_is_refused() -> None:
    guest = FakeGuest(num=16, pages=64)
    rw = lib.DP_PERM_READ | lib.DP_PERM_WRITE
    dev = Device(guest, maps=[(0, 32, rw), (32, 32, lib.DP_PERM_READ)])
    dev.file_write(0, b"\x11" * 512)
    hdr, st = guest.arena.alloc(16), guest.arena.alloc(1)
    guest.arena.write(hdr, struct.pack("<IIQ", T_IN, 0, 0))
    readonly_page = 0x10_0000 + 40 * 4096
    head = guest.submit([Buf(hdr, 16), Buf(readonly_page, 512, True), Buf(st, 1, True)])
    before = guest.arena.snapshot()
    assert dev.process() == 1
    assert guest.reap() == [(head, 1)] and status(guest, st) == IOERR
    assert changed_bytes(guest, before) - ring_bytes(guest) == {st - 0x10_0000}


def test_head_index_out_of_range_breaks_the_queue(guest: FakeGuest) -> None:
    dev = Device(guest)
    guest.publish(guest.num + 3)
    before = guest.arena.snapshot()
    assert dev.process() == -1
    assert dev.broken == lib.DP_BROKEN_RING
    assert guest.used_idx() == 0
    used_ring = guest.used - 0x10_0000
    after = guest.arena.snapshot()
    assert after[:used_ring] == before[:used_ring]  # only the device-owned used flags may move
    assert after[used_ring + 2 :] == before[used_ring + 2 :]


def test_avail_index_jumping_past_the_ring_breaks_the_queue(guest: FakeGuest) -> None:
    dev = Device(guest)
    guest.arena.write(guest.avail + 2, struct.pack("<H", guest.num + 1))
    assert dev.process() == -1
    assert dev.broken


def test_a_new_server_resumes_from_the_used_ring(guest: FakeGuest) -> None:
    first = Device(guest)
    for _ in range(3):
        guest.blk_request(T_FLUSH)
    assert first.process() == 3
    payload = os.urandom(512)
    _, _, st = guest.blk_request(T_OUT, sector=1, out=payload)  # arrives while no one serves
    second = Device(guest, file=first.file, resume=True)
    assert second.q.vq.last_avail_idx == 3
    assert second.process() == 1
    assert status(guest, st) == OK
    assert first.file_read(512, 512) == payload
    assert [u[0] for u in guest.reap()] == [0, 2, 4, 6]  # descriptor heads, in order


def test_large_reads_and_writes_of_a_batch_run_in_parallel_and_complete_in_order() -> None:
    guest = FakeGuest(num=64, pages=2048)
    dev = Device(guest, size=8 << 20)
    chunks = [os.urandom(256 << 10) for _ in range(6)]
    for k, chunk in enumerate(chunks):
        dev.file_write(k * len(chunk), chunk)
    reads = [guest.blk_request(T_IN, sector=k * 512, in_len=256 << 10) for k in range(6)]
    flush_head, _, flush = guest.blk_request(T_FLUSH)
    writes = [guest.blk_request(T_OUT, sector=4096 + k * 512, out=c) for k, c in enumerate(chunks)]
    assert dev.process() == 13
    assert dev.q.parallel_batches == 2  # the reads, then the writes; the flush alone between
    heads = [h for h, _, _ in reads] + [flush_head] + [h for h, _, _ in writes]
    assert [u[0] for u in guest.reap()] == heads  # completed in ring order
    for (_, din, st), chunk in zip(reads, chunks, strict=True):
        assert status(guest, st) == OK
        assert guest.arena.read(din, len(chunk)) == chunk
    assert status(guest, flush) == OK
    for (_, _, st), (k, chunk) in zip(writes, enumerate(chunks), strict=True):
        assert status(guest, st) == OK
        assert dev.file_read((4096 + k * 512) * 512, len(chunk)) == chunk
    stats = dev.q.stats
    assert stats.reads == 6 and stats.writes == 6 and stats.flushes == 1


def test_every_request_lands_in_one_service_time_bucket(guest: FakeGuest) -> None:
    dev = Device(guest)
    for sector in range(4):
        guest.blk_request(T_OUT, sector=sector, out=b"s" * 512)
    assert dev.process() == 4
    counts = [int(dev.q.stats.latency[i]) for i in range(lib.DP_LATENCY_BUCKETS)]
    assert sum(counts) == 4 and dev.q.stats.latency_ns_sum > 0
    assert dev.q.in_flight == 0
