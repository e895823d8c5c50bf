"""Data-plane scenarios that may kill their process, run in a child by the tests:
`python -m tests.unit.dataplane_child CASE DIR`; prints one JSON line of results."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import signal
import struct
import sys
import threading
from pathlib import Path
from typing import Any

from csi_vduse._native import ffi, lib
from tests.unit.fakeguest import OUTHDR, PAGE, Buf, Device, FakeGuest, callback_ops

RW = lib.DP_PERM_READ | lib.DP_PERM_WRITE
HOLE_IOVA = 0x9000_0000
CRASH = b"CRASH-THE-SERVER"


def _status(guest: FakeGuest, iova: int) -> int:
    return guest.arena.read(iova, 1)[0]


def map_hole(dev: Device) -> None:
    """Maps two pages at HOLE_IOVA whose second lies past the end of its file: any access
    to it raises SIGBUS, as an unpopulated VDUSE bounce page does."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]  # fmt: skip
    fd = os.memfd_create("unpopulated")
    os.ftruncate(fd, PAGE)
    addr = libc.mmap(None, 2 * PAGE, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    assert addr not in (None, ctypes.c_void_p(-1).value)
    va = ffi.cast("uint8_t *", addr)
    assert lib.dp_iotlb_add(dev.tlb, HOLE_IOVA, HOLE_IOVA + 2 * PAGE - 1, va, RW) == 0


def sigbus(workdir: Path) -> dict[str, Any]:
    """Guest buffers in a page the kernel would never populate (here: past the end of the
    file behind the mapping, which raises SIGBUS on access, as an unpopulated VDUSE bounce
    page does)."""
    guest = FakeGuest(num=16, pages=64)
    dev = Device(guest)
    map_hole(dev)
    hole = HOLE_IOVA + PAGE
    a = guest.arena
    results: dict[str, Any] = {}

    st = a.alloc(1)
    head = guest.submit([Buf(hole, OUTHDR.size), Buf(st, 1, True)])
    results["header_in_hole"] = [dev.process(), guest.reap(), _status(guest, st)]

    hdr, st = a.alloc(OUTHDR.size), a.alloc(1)
    a.write(hdr, OUTHDR.pack(lib.VIRTIO_BLK_T_IN, 0, 0))
    head = guest.submit([Buf(hdr, OUTHDR.size), Buf(hole, 512, True), Buf(st, 1, True)])
    results["read_into_hole"] = [dev.process(), guest.reap(), _status(guest, st)]

    _, _, st = guest.blk_request(lib.VIRTIO_BLK_T_FLUSH)
    results["flush_after"] = [dev.process(), guest.reap(), _status(guest, st)]

    hdr = a.alloc(OUTHDR.size)
    a.write(hdr, OUTHDR.pack(lib.VIRTIO_BLK_T_FLUSH, 0, 0))
    head = guest.submit([Buf(hdr, OUTHDR.size), Buf(hole, 1, True)])
    results["status_in_hole"] = [
        dev.process(),
        guest.reap(),
        dev.broken,
        int(dev.q.vq.broken_head),
        head,
    ]
    results["faults"] = int(dev.q.stats.faults)
    return results


def sigbus_user_copies(workdir: Path) -> dict[str, Any]:
    """A backend that copies guest memory itself (as librbd does) must never be handed a
    buffer that faults: the data plane touches the pages first, inside its guard."""
    guest = FakeGuest(num=16, pages=64)
    seen: list[bytes] = []
    ops, keep = callback_ops(lambda op, head: seen.append(head))  # reads the guest's bytes
    ops.user_copies = True
    dev = Device(guest, ops=ops)
    dev.keep = keep  # type: ignore[attr-defined]
    map_hole(dev)
    a = guest.arena
    hdr, st = a.alloc(OUTHDR.size), a.alloc(1)
    a.write(hdr, OUTHDR.pack(lib.VIRTIO_BLK_T_OUT, 0, 0))
    guest.submit([Buf(hdr, OUTHDR.size), Buf(HOLE_IOVA + PAGE, 512), Buf(st, 1, True)])
    _, _, ok_st = guest.blk_request(lib.VIRTIO_BLK_T_OUT, sector=1, out=b"w" * 512)
    done = dev.process()
    return {"done": done, "statuses": [_status(guest, st), _status(guest, ok_st)],
            "seen": [h.decode(errors="replace") for h in seen],
            "faults": int(dev.q.stats.faults)}  # fmt: skip


def _crash_setup(
    workdir: Path, resume: bool, asynchronous: bool = False
) -> tuple[FakeGuest, Device, list[bytes]]:
    guest = FakeGuest(num=16, pages=64, path=str(workdir / "guest-memory"))
    log_fd = os.open(workdir / "queue.log", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(log_fd, lib.DP_LOG_SIZE)
    log_map = mmap.mmap(log_fd, lib.DP_LOG_SIZE)
    log = ffi.cast("struct dp_log *", ffi.from_buffer(log_map))
    inflight_size = lib.dp_inflight_size(16)
    inflight_fd = os.open(workdir / "queue.inflight", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(inflight_fd, inflight_size)
    inflight_map = mmap.mmap(inflight_fd, inflight_size)
    inflight = ffi.cast("struct dp_inflight *", ffi.from_buffer(inflight_map))
    backing = open(workdir / "disk.img", "r+b" if resume else "w+b")  # noqa: SIM115
    if not resume:
        os.ftruncate(backing.fileno(), 1 << 20)
    writes: list[bytes] = []

    def on_io(op: str, head: bytes) -> None:
        if op != "write":
            return
        writes.append(head)
        if head == CRASH:  # the backend crashes the process while executing this request
            signal.pthread_kill(threading.get_ident(), signal.SIGSEGV)
        return

    ops, keep = callback_ops(on_io)
    if asynchronous:  # reads and writes through io_uring; a WRITE ZEROES crashes us
        uring = lib.dp_file_uring_ops
        for name in ("aio_open", "aio_submit", "aio_kick", "aio_reap", "aio_close"):
            setattr(ops, name, getattr(uring, name))

        def write_zeroes(ctx: Any, offset: int, length: int, may_unmap: bool) -> int:
            writes.append(b"ZEROES")
            if not resume:
                signal.pthread_kill(threading.get_ident(), signal.SIGSEGV)
            return int(lib.dp_file_ops.write_zeroes(ctx, offset, length, may_unmap))

        zeroes = ffi.callback("int(void *, uint64_t, uint64_t, bool)", write_zeroes)
        ops.write_zeroes = zeroes
        keep.append(zeroes)
    dev = Device(guest, ops=ops, log=log, file=backing, resume=resume, inflight=inflight,
                 depth=8 if asynchronous else 0)  # fmt: skip
    dev.keep = (keep, log_map, ops, inflight_map)  # type: ignore[attr-defined]
    return guest, dev, writes


def crash(workdir: Path) -> dict[str, Any]:
    guest, dev, _ = _crash_setup(workdir, resume=False)
    for k, payload in enumerate((b"A" * 512, CRASH + b"B" * 496, b"C" * 512)):
        guest.blk_request(lib.VIRTIO_BLK_T_OUT, sector=k, out=payload)
    dev.process()
    return {"survived": True}


def crash_async(workdir: Path) -> dict[str, Any]:
    guest, dev, _ = _crash_setup(workdir, resume=False, asynchronous=True)
    zeroes = struct.pack("<QII", 1, 1, 0)  # sector 1, one sector, no unmap
    guest.blk_request(lib.VIRTIO_BLK_T_OUT, sector=0, out=b"A" * 512)
    guest.blk_request(lib.VIRTIO_BLK_T_WRITE_ZEROES, out=zeroes)
    guest.blk_request(lib.VIRTIO_BLK_T_OUT, sector=2, out=b"C" * 512)
    dev.process()
    return {"survived": True}


def resume_async(workdir: Path) -> dict[str, Any]:
    return resume(workdir, asynchronous=True)


def resume(workdir: Path, asynchronous: bool = False) -> dict[str, Any]:
    guest, dev, writes = _crash_setup(workdir, resume=True, asynchronous=asynchronous)
    statuses = []
    done = dev.process()
    for head, _ in guest.reap():
        desc = guest.arena.read(guest.desc + 16 * ((head + 2) % guest.num), 16)
        status_iova = int.from_bytes(desc[:8], "little")
        statuses.append(_status(guest, status_iova))
    return {
        "done": done,
        "statuses": statuses,
        "writes": [w.decode() for w in writes],
        "poisoned": int(dev.q.stats.poisoned),
        "sectors": [dev.file_read(512 * k, 1).decode(errors="replace") for k in range(3)],
        "log_disagreed": bool(dev.q.inflight_disagreed),
        "broken": int(dev.q.vq.broken),
        "in_flight_after": [h for h in range(guest.num) if dev.q.inflight.desc[h].inflight],
        "logged_used_idx": int(dev.q.inflight.used_idx),
    }


CASES = {
    "sigbus": sigbus, "sigbus_user_copies": sigbus_user_copies, "crash": crash,
    "resume": resume, "crash_async": crash_async, "resume_async": resume_async,
}  # fmt: skip

if __name__ == "__main__":
    print(json.dumps(CASES[sys.argv[1]](Path(sys.argv[2]))), flush=True)
