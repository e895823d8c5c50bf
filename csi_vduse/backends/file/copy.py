"""Point-in-time copies of a file backend's image: a reflink (FICLONE; instant and
sharing every block, on XFS and btrfs) or, where the file system cannot, a streamed
copy of the data extents only, so that a sparse image stays sparse."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from csi_vduse.state.atomic import fsync_dir

log = logging.getLogger(__name__)
FICLONE = 0x40049409  # _IOW(0x94, 9, int), <linux/fs.h>
NO_REFLINK = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS}
CHUNK = 64 << 20
PROGRESS_EVERY = 5.0  # seconds between progress lines of a streamed copy


def copy_image(
    source: Path, target: Path, size: int, thick: bool = False, reflink: bool = True,
    hold: AbstractContextManager[None] | None = None,
) -> str:  # fmt: skip
    """Creates `target` (which must not exist) holding `source`'s bytes, then sized to
    `size` (at least the source's size) and on stable storage. Only the copy itself runs
    inside `hold` (a quiesced data plane). Without `reflink` (a thick source or target:
    shared blocks would make its writes able to fail for space) the bytes are copied.
    Returns "reflink" or "copy". `target` is removed again if this fails."""
    src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dst = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with hold or nullcontext():
                length = os.fstat(src).st_size
                if size < length:
                    raise ValueError(f"{source} holds {length} bytes, more than {size}")
                how = _clone_or_copy(src, dst, length, source, reflink and not thick)
            if size > length:
                os.ftruncate(dst, size)
            if thick:
                os.posix_fallocate(dst, 0, size)
            os.fsync(dst)
        except BaseException:
            os.close(dst)
            target.unlink(missing_ok=True)
            raise
        os.close(dst)
    finally:
        os.close(src)
    fsync_dir(target.parent)
    return how


def _clone_or_copy(src: int, dst: int, length: int, source: Path, reflink: bool) -> str:
    try:
        if reflink:
            fcntl.ioctl(dst, FICLONE, src)
            return "reflink"
    except OSError as e:
        if e.errno not in NO_REFLINK:
            raise
    os.ftruncate(dst, length)
    copied, started, told = 0, time.monotonic(), time.monotonic()
    for start, end in data_extents(src, length):
        offset = start
        while offset < end:
            n = os.copy_file_range(src, dst, min(CHUNK, end - offset), offset, offset)
            if n <= 0:
                raise OSError(errno.EIO, f"copy of {source} stopped at byte {offset}")
            offset += n
            copied += n
            if time.monotonic() - told >= PROGRESS_EVERY:
                told = time.monotonic()
                log.info("copying %s: %d of at most %d bytes (%.0f s)", source, offset,
                         length, told - started)  # fmt: skip
    log.info("copied %s without reflink: %d bytes of data in %.1f s", source, copied,
             time.monotonic() - started)  # fmt: skip
    return "copy"


def data_extents(fd: int, length: int) -> list[tuple[int, int]]:
    """[start, end) ranges that hold data; holes read as zeros and need no copy."""
    extents = []
    offset = 0
    while offset < length:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole is left
                break
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), length)
        extents.append((start, end))
        offset = end
    return extents
