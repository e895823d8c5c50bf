"""cache=direct on the file backend: aligned transfers bypass the node's page cache (seen
with mincore), every other transfer still lands, and both paths see one file."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import pytest

from csi_vduse._native import ffi, lib
from csi_vduse.backends.file import FileBackend
from tests.unit.fakeguest import PAGE, Device, FakeGuest

OK = lib.VIRTIO_BLK_S_OK
IN, OUT = lib.VIRTIO_BLK_T_IN, lib.VIRTIO_BLK_T_OUT
SIZE = 4 << 20
_libc = ctypes.CDLL(None, use_errno=True)


def resident_pages(path: Path, offset: int, length: int) -> int:
    """How many pages of [offset, offset + length) of the file the page cache holds."""
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, SIZE) as m:
            first = ctypes.c_char.from_buffer(m)
            vec = (ctypes.c_ubyte * (length // PAGE))()
            addr = ctypes.c_void_p(ctypes.addressof(first) + offset)
            r = _libc.mincore(addr, ctypes.c_size_t(length), vec)
            del first  # the map cannot close while a ctypes object points into it
            if r != 0:
                raise OSError(ctypes.get_errno(), "mincore")
            return sum(v & 1 for v in vec)
    finally:
        os.close(fd)


def request(guest: FakeGuest, dev: Device, rtype: int, sector: int, **kw: object) -> int:
    _, din, st = guest.blk_request(rtype, sector=sector, **kw)  # type: ignore[arg-type]
    assert dev.process() == 1
    assert guest.arena.read(st, 1)[0] == OK
    return din


def serve(backend: FileBackend, depth: int) -> tuple[FakeGuest, Device]:
    if depth and backend.async_unavailable:
        pytest.skip(backend.async_unavailable)
    guest = FakeGuest(num=16, pages=128)
    ops, ctx = backend.native_ops()
    return guest, Device(guest, size=SIZE, ops=ops, ctx=ctx, depth=depth)


@pytest.mark.parametrize("depth", [0, 8], ids=["sync", "io_uring"])
def test_direct_transfers_bypass_the_page_cache(tmp_path: Path, depth: int) -> None:
    path = tmp_path / "direct.img"
    with FileBackend.open(path, SIZE, direct=True) as backend:
        assert backend.direct
        guest, dev = serve(backend, depth)
        data = os.urandom(64 << 10)
        request(guest, dev, OUT, 0, out=data, data_align=PAGE)
        din = request(guest, dev, IN, 0, in_len=len(data), data_align=PAGE)
        assert guest.arena.read(din, len(data)) == data
        assert resident_pages(path, 0, len(data)) == 0


@pytest.mark.parametrize("depth", [0, 8], ids=["sync", "io_uring"])
def test_page_cache_holds_what_a_cached_volume_moves(tmp_path: Path, depth: int) -> None:
    """The contrast to the test above: without cache=direct the same write stays cached."""
    path = tmp_path / "cached.img"
    with FileBackend.open(path, SIZE) as backend:
        assert not backend.direct
        guest, dev = serve(backend, depth)
        request(guest, dev, OUT, 0, out=os.urandom(64 << 10), data_align=PAGE)
        assert resident_pages(path, 0, 64 << 10) == 16


@pytest.mark.parametrize("depth", [0, 8], ids=["sync", "io_uring"])
def test_unaligned_transfers_go_through_the_cache_and_agree(tmp_path: Path, depth: int) -> None:
    path = tmp_path / "mixed.img"
    with FileBackend.open(path, SIZE, direct=True) as backend:
        guest, dev = serve(backend, depth)
        base = os.urandom(16 << 10)
        request(guest, dev, OUT, 0, out=base, data_align=PAGE)
        guest.arena.alloc(PAGE, PAGE)
        guest.arena.alloc(8)  # the next buffer starts off any alignment O_DIRECT takes
        patch = os.urandom(PAGE)
        request(guest, dev, OUT, 8, out=patch)
        assert resident_pages(path, 0, 16 << 10) > 0
        din = request(guest, dev, IN, 0, in_len=len(base), data_align=PAGE)
        assert guest.arena.read(din, len(base)) == base[:4096] + patch + base[8192:]
        assert os.pread(backend.fd, len(base), 0) == base[:4096] + patch + base[8192:]


def test_the_descriptor_follows_the_alignment() -> None:
    f = ffi.new("struct dp_file *", {"fd": 3, "direct_fd": 4, "direct_align": 512})
    buf = ffi.new("char[]", 8192)
    start = (int(ffi.cast("uintptr_t", buf)) + 511) // 512 * 512 - int(ffi.cast("uintptr_t", buf))
    iov = ffi.new("struct iovec[2]")
    iov[0].iov_base, iov[0].iov_len = buf + start, 1024
    iov[1].iov_base, iov[1].iov_len = buf + start + 2048, 512
    assert lib.dp_file_fd_for(f, iov, 2, 4096) == 4
    assert lib.dp_file_fd_for(f, iov, 2, 4096 + 256) == 3  # the offset
    iov[1].iov_len = 500
    assert lib.dp_file_fd_for(f, iov, 2, 4096) == 3  # a length
    iov[1].iov_len, iov[0].iov_base = 512, buf + start + 8
    assert lib.dp_file_fd_for(f, iov, 2, 4096) == 3  # a buffer
    f.direct_align = 0
    iov[0].iov_base = buf + start
    assert lib.dp_file_fd_for(f, iov, 2, 4096) == 3  # page cache only


def test_a_direct_open_reports_an_alignment_o_direct_accepts(tmp_path: Path) -> None:
    path = tmp_path / "align.img"
    with FileBackend.open(path, SIZE, direct=True) as backend:
        align = backend._native.direct_align
        assert align and PAGE % align == 0
        buf = mmap.mmap(-1, PAGE)
        assert os.preadv(backend.direct_fd, [memoryview(buf)[:align]], align) == align
