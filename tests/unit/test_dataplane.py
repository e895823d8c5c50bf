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


# Hostile chains: each must complete with IOERR (when it has a status byte we may
# write) and leave everything else untouched.


def hostile(guest: FakeGuest, kind: str) -> tuple[int, int | None]:
    """Builds a hostile chain; returns (head, iova of a status byte expected IOERR, or None)."""
    a = guest.arena
    hdr = a.alloc(16)
    a.write(hdr, struct.pack("<IIQ", T_IN, 0, 0))
    data, st = a.alloc(512), a.alloc(1)
    a.write(st, b"\xee")
    head = guest.next_desc
    guest.next_desc = (head + 4) % guest.num
    h, n1, n2 = head, (head + 1) % guest.num, (head + 2) % guest.num
    outside = a.size + 0x10_0000 + 4096
    if kind == "address outside the mapping":
        guest.set_desc(h, hdr, 16, NEXT, n1)
        guest.set_desc(n1, outside, 512, NEXT | WRITE, n2)
        guest.set_desc(n2, st, 1, WRITE, 0)
        expect = None
    elif kind == "buffer running off the end of the mapping":
        guest.set_desc(h, hdr, 16, NEXT, n1)
        guest.set_desc(n1, st, 1, WRITE | NEXT, n2)
        guest.set_desc(n2, data, 2**32 - 1, WRITE, 0)
        expect = st
    elif kind == "address wrapping around 2**64":
        guest.set_desc(h, hdr, 16, NEXT, n1)
        guest.set_desc(n1, 2**64 - 256, 512, WRITE, 0)
        expect = None
    elif kind == "loop":
        guest.set_desc(h, hdr, 16, NEXT, n1)
        guest.set_desc(n1, st, 1, NEXT | WRITE, n1)
        expect = st
    elif kind == "zero length":
        guest.set_desc(h, hdr, 16, NEXT, n1)
        guest.set_desc(n1, st, 1, NEXT | WRITE, n2)
        guest.set_desc(n2, data, 0, WRITE, 0)
        expect = st
    elif kind == "next index out of range":
        guest.set_desc(h, hdr, 16, NEXT, n1)
        guest.set_desc(n1, st, 1, NEXT | WRITE, guest.num + 7)
        expect = st
    elif kind == "readable after writable":
        guest.set_desc(h, hdr, 16, NEXT, n1)
        guest.set_desc(n1, st, 1, NEXT | WRITE, n2)
        guest.set_desc(n2, data, 512, 0, 0)
        expect = st
    elif kind == "header too short":
        guest.set_desc(h, hdr, 8, NEXT, n1)
        guest.set_desc(n1, st, 1, WRITE, 0)
        expect = st
    elif kind == "indirect with next":
        table = a.alloc(32)
        guest.set_desc(h, table, 32, INDIRECT | NEXT, n1)
        expect = None
    elif kind == "indirect table of bad length":
        table = a.alloc(32)
        guest.set_desc(h, table, 24, INDIRECT, 0)
        expect = None
    elif kind == "nested indirect":
        table = a.alloc(32)
        a.write(table, struct.pack("<QIHH", hdr, 16, NEXT, 1))
        a.write(table + 16, struct.pack("<QIHH", table, 32, INDIRECT, 0))
        guest.set_desc(h, table, 32, INDIRECT, 0)
        expect = None
    elif kind == "indirect loop":
        table = a.alloc(32)
        a.write(table, struct.pack("<QIHH", st, 1, NEXT | WRITE, 1))
        a.write(table + 16, struct.pack("<QIHH", st, 1, NEXT | WRITE, 0))
        guest.set_desc(h, table, 32, INDIRECT, 0)
        expect = st
    elif kind == "too many segments":
        n = lib.DP_MAX_SEGS + 1
        table = a.alloc(16 * n)
        for k in range(n):
            a.write(table + 16 * k, struct.pack("<QIHH", st, 1, NEXT | WRITE, k + 1))
        guest.set_desc(h, table, 16 * min(n, lib.DP_MAX_SEGS), INDIRECT, 0)
        expect = st
    else:
        raise AssertionError(kind)
    guest.publish(head)
    return head, expect


HOSTILE = [
    "address outside the mapping", "buffer running off the end of the mapping",
    "address wrapping around 2**64", "loop", "zero length", "next index out of range",
    "readable after writable", "header too short", "indirect with next",
    "indirect table of bad length", "nested indirect", "indirect loop", "too many segments",
]  # fmt: skip


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_chain_fails_with_ioerr_and_touches_nothing(kind: str) -> None:
    guest = FakeGuest(num=16, pages=64)
    dev = Device(guest)
    dev.file_write(0, b"\x5a" * 4096)
    head, expect = hostile(guest, kind)
    before = bytearray(guest.arena.snapshot())
    assert dev.process() == 1
    [(used_id, used_len)] = guest.reap()
    assert used_id == head
    after = guest.arena.snapshot()
    changed = {i for i in range(len(after)) if after[i] != before[i]}
    used_ring = set(range(guest.used - 0x10_0000, guest.used - 0x10_0000 + 6 + 8 * guest.num))
    if expect is not None:
        assert status(guest, expect) == IOERR
        assert used_len == 1
        changed.discard(expect - 0x10_0000)
    else:
        assert used_len == 0
    assert changed <= used_ring, f"{kind}: bytes outside the used ring changed"
    assert dev.file_read(0, 4096) == b"\x5a" * 4096
    assert dev.q.stats.bad_chains == 1
    assert not dev.broken
    # the queue keeps working afterwards
    _, _, st = guest.blk_request(T_FLUSH)
    dev.process()
    assert status(guest, st) == OK


def test_head_index_out_of_range_breaks_the_queue(guest: FakeGuest) -> None:
    dev = Device(guest)
    guest.publish(guest.num + 3)
    before = guest.arena.snapshot()
    assert dev.process() == -1
    assert dev.broken
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
    second = Device(guest)
    second.file = first.file
    second.blk.ctx = first.blk.ctx
    assert lib.dp_queue_resume(second.q) == 0
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
