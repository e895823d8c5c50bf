"""A fake virtio driver: split rings and buffers in an arena fenced by PROT_NONE pages,
so that any access by the data plane outside the arena kills the test process."""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from csi_vduse._native import ffi, lib

PAGE = mmap.PAGESIZE
PROT_NONE = 0
IOVA_BASE = 0x10_0000
DESC = struct.Struct("<QIHH")
NEXT, WRITE, INDIRECT = lib.VRING_DESC_F_NEXT, lib.VRING_DESC_F_WRITE, lib.VRING_DESC_F_INDIRECT
OUTHDR = struct.Struct("<IIQ")
RANGE = struct.Struct("<QII")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


@dataclass(frozen=True)
class Buf:
    iova: int
    len: int
    write: bool = False


class Arena:
    """Guest memory. With `path`, a shared file mapping that outlives the process (a
    second process can resume the same rings, as a restarted plugin does)."""

    def __init__(self, pages: int, path: str | None = None) -> None:
        self.size = pages * PAGE
        if path is None:
            self._map = mmap.mmap(-1, self.size + 2 * PAGE)
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            os.ftruncate(fd, self.size + 2 * PAGE)
            self._map = mmap.mmap(fd, self.size + 2 * PAGE)
            os.close(fd)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        for guard in (base, base + PAGE + self.size):
            if _libc.mprotect(guard, PAGE, PROT_NONE) != 0:
                raise OSError(ctypes.get_errno(), "mprotect")
        self.va = base + PAGE
        self.mem = memoryview(self._map)[PAGE : PAGE + self.size]
        self._heap = 0

    def alloc(self, n: int, align: int = 16) -> int:
        self._heap = (self._heap + align - 1) // align * align
        off = self._heap
        self._heap += n
        if self._heap > self.size:
            raise MemoryError("arena full")
        return IOVA_BASE + off

    def off(self, iova: int) -> int:
        return iova - IOVA_BASE

    def write(self, iova: int, data: bytes) -> None:
        o = self.off(iova)
        self.mem[o : o + len(data)] = data

    def read(self, iova: int, n: int) -> bytes:
        o = self.off(iova)
        return bytes(self.mem[o : o + n])

    def snapshot(self) -> bytes:
        return bytes(self.mem)


class FakeGuest:
    """Driver side of one split virtqueue."""

    def __init__(self, num: int = 16, pages: int = 256, path: str | None = None) -> None:
        self.num = num
        self.arena = Arena(pages, path)
        self.desc = self.arena.alloc(16 * num, PAGE)
        self.avail = self.arena.alloc(6 + 2 * num, 2)
        self.used = self.arena.alloc(6 + 8 * num, PAGE)
        self.next_desc = 0
        self.avail_idx = int(struct.unpack("<H", self.arena.read(self.avail + 2, 2))[0])
        self.used_seen = 0

    def set_desc(self, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.arena.write(self.desc + 16 * i, DESC.pack(addr, length, flags, nxt))

    def publish(self, head: int) -> None:
        self.arena.write(self.avail + 4 + 2 * (self.avail_idx % self.num), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.arena.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def submit(self, bufs: Sequence[Buf]) -> int:
        """Places a chain in consecutive descriptors and makes it available."""
        head = self.next_desc
        for k, b in enumerate(bufs):
            i = (head + k) % self.num
            last = k == len(bufs) - 1
            flags = (WRITE if b.write else 0) | (0 if last else NEXT)
            self.set_desc(i, b.iova, b.len, flags, (i + 1) % self.num)
        self.next_desc = (head + len(bufs)) % self.num
        self.publish(head)
        return head

    def submit_indirect(self, bufs: Sequence[Buf]) -> int:
        table = self.arena.alloc(16 * len(bufs))
        for k, b in enumerate(bufs):
            last = k == len(bufs) - 1
            flags = (WRITE if b.write else 0) | (0 if last else NEXT)
            self.arena.write(table + 16 * k, DESC.pack(b.iova, b.len, flags, k + 1))
        head = self.next_desc
        self.set_desc(head, table, 16 * len(bufs), INDIRECT, 0)
        self.next_desc = (head + 1) % self.num
        self.publish(head)
        return head

    def used_idx(self) -> int:
        return int(struct.unpack("<H", self.arena.read(self.used + 2, 2))[0])

    def reap(self) -> list[tuple[int, int]]:
        out = []
        while self.used_seen != self.used_idx():
            slot = self.used + 4 + 8 * (self.used_seen % self.num)
            out.append(struct.unpack("<II", self.arena.read(slot, 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out

    def set_used_event(self, value: int) -> None:
        self.arena.write(self.avail + 4 + 2 * self.num, struct.pack("<H", value))

    def avail_event(self) -> int:
        return int(struct.unpack("<H", self.arena.read(self.used + 4 + 8 * self.num, 2))[0])

    # virtio-blk request helpers
    def blk_request(
        self, rtype: int, sector: int = 0, out: bytes = b"", in_len: int = 0,
        indirect: bool = False, data_align: int = 16,
    ) -> tuple[int, int, int]:  # fmt: skip
        """Returns (head, data-in iova, status iova)."""
        hdr = self.arena.alloc(OUTHDR.size)
        self.arena.write(hdr, OUTHDR.pack(rtype, 0, sector))
        bufs = [Buf(hdr, OUTHDR.size)]
        if out:
            data = self.arena.alloc(len(out), data_align)
            self.arena.write(data, out)
            bufs.append(Buf(data, len(out)))
        din = 0
        if in_len:
            din = self.arena.alloc(in_len, data_align)
            bufs.append(Buf(din, in_len, write=True))
        status = self.arena.alloc(1)
        self.arena.write(status, b"\xee")
        bufs.append(Buf(status, 1, write=True))
        head = self.submit_indirect(bufs) if indirect else self.submit(bufs)
        return head, din, status


class Device:
    """The real C data plane (one queue) over a FakeGuest and a temporary file. `maps`
    splits the arena into several IOTLB mappings: (first page, pages, perm) each."""

    def __init__(
        self, guest: FakeGuest, size: int = 1 << 20, event_idx: bool = False,
        readonly: bool = False, serial: bytes = b"unit-serial", max_descs: int = 64,
        maps: Sequence[tuple[int, int, int]] | None = None, log: Any = None,
        ops: Any = None, file: Any = None, resume: bool = False, inflight: Any = None,
        depth: int = 0, kicks: bool = False, ctx: Any = None,
    ) -> None:  # fmt: skip
        """`depth` > 0 serves the queue on the asynchronous path (engine.c), `depth`
        requests in flight at most; the ops must have one. `kicks` gives the queue kick
        and stop eventfds, for `run`. `ctx` is the backend's, when not the file's."""
        self.guest = guest
        self.file = file or tempfile.TemporaryFile()  # noqa: SIM115 (lives with the device)
        if file is None:
            os.ftruncate(self.file.fileno(), size)
        self.tlb = ffi.new("struct dp_iotlb *")
        assert lib.dp_iotlb_init(self.tlb, -1, 0) == 0
        rw = lib.DP_PERM_READ | lib.DP_PERM_WRITE
        pages = guest.arena.size // PAGE
        for first, count, perm in maps or [(0, pages, rw)]:
            va = ffi.cast("uint8_t *", guest.arena.va + first * PAGE)
            start = IOVA_BASE + first * PAGE
            assert lib.dp_iotlb_add(self.tlb, start, start + count * PAGE - 1, va, perm) == 0
        self.native_file = ffi.new("struct dp_file *", {"fd": self.file.fileno()})
        self.blk = ffi.new("struct dp_blk *")
        self.blk.ops = ops if ops is not None else ffi.addressof(lib.dp_file_ops)
        self.blk.ctx = ctx if ctx is not None else self.native_file
        self.blk.capacity = size // 512
        self.blk.readonly = readonly
        self.blk.max_discard_sectors = self.blk.max_write_zeroes_sectors = 1 << 16
        self.blk.max_discard_seg = self.blk.max_write_zeroes_seg = 4
        ffi.memmove(self.blk.serial, serial, len(serial))
        self.log = log if log is not None else ffi.NULL
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if kicks else -1
        self.stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if kicks else -1
        q = lib.dp_queue_new(0, -1, self.kick_fd, self.stop_fd, self.blk, self.tlb, max_descs,
                             self.log)  # fmt: skip
        assert q != ffi.NULL
        self.q: Any = ffi.gc(q, lib.dp_queue_free)
        lib.dp_vq_init(ffi.addressof(self.q.vq), self.tlb, guest.num, guest.desc, guest.avail,
                       guest.used, 0, event_idx)  # fmt: skip
        if inflight is not None:  # as the server attaches it
            self.q.inflight = inflight
            if not resume:
                lib.dp_inflight_reset(inflight, guest.num, 0)
        if depth:
            assert lib.dp_queue_enable_async(self.q, depth) == 0
        if resume:
            assert lib.dp_queue_resume(self.q) == 0

    def process(self) -> int:
        return int(lib.dp_queue_process(self.q))

    def run(self) -> int:
        """The worker's loop, as the server runs it, until `stop`."""
        return int(lib.dp_queue_run(self.q))

    def kick(self) -> None:
        os.eventfd_write(self.kick_fd, 1)

    def stop(self) -> None:
        lib.dp_queue_request_stop(self.q)
        os.eventfd_write(self.stop_fd, 1)

    @property
    def interrupts(self) -> int:
        return int(self.q.interrupts)

    @property
    def broken(self) -> int:
        return int(self.q.vq.broken)

    def file_read(self, offset: int, n: int) -> bytes:
        return os.pread(self.file.fileno(), n, offset)

    def file_write(self, offset: int, data: bytes) -> None:
        os.pwrite(self.file.fileno(), data, offset)


def callback_ops(on_io: Callable[[str, bytes], int | None]) -> tuple[Any, list[Any]]:
    """File ops that call `on_io(op, first bytes)` before each read or write: a backend a
    test can slow down, fail (return an errno) or crash. Returns (ops, what must stay
    alive with them)."""
    file_ops = lib.dp_file_ops

    def head(iov: Any) -> bytes:
        return bytes(ffi.buffer(iov[0].iov_base, min(16, iov[0].iov_len)))

    def read(ctx: Any, iov: Any, cnt: int, off: int) -> int:
        if err := on_io("read", b""):
            ffi.errno = err
            return -1
        return int(file_ops.preadv(ctx, iov, cnt, off))

    def write(ctx: Any, iov: Any, cnt: int, off: int) -> int:
        if err := on_io("write", head(iov)):
            ffi.errno = err
            return -1
        return int(file_ops.pwritev(ctx, iov, cnt, off))

    io_type = "ssize_t(void *, const struct iovec *, int, uint64_t)"
    preadv, pwritev = ffi.callback(io_type, read), ffi.callback(io_type, write)
    ops = ffi.new("struct dp_backend_ops *")
    ops.preadv, ops.pwritev = preadv, pwritev
    ops.flush, ops.discard, ops.write_zeroes = (
        file_ops.flush,
        file_ops.discard,
        file_ops.write_zeroes,
    )
    return ops, [preadv, pwritev]
