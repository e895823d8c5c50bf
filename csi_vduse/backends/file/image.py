"""A file on the node: created at the requested size (sparse, or allocated when thick),
never truncated. Served through the node's page cache, or (cache=direct) with O_DIRECT
for every transfer the file system can take that way."""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import stat
from pathlib import Path
from typing import Any

from csi_vduse._native import ffi, lib
from csi_vduse.backends.base import SECTOR, Backend, BackendError

log = logging.getLogger(__name__)
# O_DIRECT alignment when the file system does not report one (statx): a page suits any
# block device
DIRECT_ALIGN_FALLBACK = 4096


class FileBackend(Backend):
    def __init__(
        self, path: Path, fd: int, size: int, readonly: bool, created: bool, thick: bool = False,
        direct_fd: int = -1,
    ) -> None:  # fmt: skip
        self.path = path
        self.fd = fd
        self.size = size
        self.readonly = readonly
        self.created = created
        self.thick = thick
        self.direct_fd = direct_fd
        align = 0
        if direct_fd >= 0:
            align = lib.dp_file_direct_align(direct_fd) or DIRECT_ALIGN_FALLBACK
        self._native = ffi.new(
            "struct dp_file *",
            {"fd": fd, "keep_allocated": thick, "direct_fd": direct_fd, "direct_align": align},
        )

    @property
    def direct(self) -> bool:
        return self.direct_fd >= 0

    @classmethod
    def open(
        cls, path: Path | str, size: int | None = None, readonly: bool = False,
        thick: bool = False, direct: bool = False,
    ) -> FileBackend:  # fmt: skip
        """Opens FILE, creating it sparse at `size` when missing. An existing file keeps its
        data: it may grow to `size` but is never shrunk. The file is locked against a second
        server for as long as it is open. A thick file keeps every block allocated.
        `direct` bypasses the page cache where the file system allows O_DIRECT (logged
        when it does not)."""
        path = Path(path)
        if size is not None and (size <= 0 or size % SECTOR):
            raise BackendError(f"size {size} is not a positive multiple of {SECTOR} bytes")
        if not path.parent.is_dir():
            raise BackendError(f"directory {path.parent} does not exist")
        created = False
        try:
            fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        except FileNotFoundError:
            if readonly:
                raise BackendError(
                    f"{path} does not exist (a read-only export needs data)"
                ) from None
            if size is None:
                raise BackendError(f"{path} does not exist: give --size to create it") from None
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            created = True
        try:
            cls._lock(fd, path)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise BackendError(f"{path} is not a regular file")
            if created:
                os.ftruncate(fd, size or 0)
            current = os.fstat(fd).st_size
            if size is None:
                size = current
            elif size < current:
                raise BackendError(f"{path} holds {current} bytes; refusing to shrink it to {size}")
            elif size > current:
                if readonly:
                    raise BackendError(f"{path} is {current} bytes; cannot grow a read-only file")
                os.ftruncate(fd, size)
            if size <= 0 or size % SECTOR:
                raise BackendError(f"{path} size {size} is not a positive multiple of {SECTOR}")
            if thick and not readonly:
                os.posix_fallocate(fd, 0, size)
            direct_fd = cls._open_direct(path, readonly) if direct else -1
        except BaseException:
            os.close(fd)
            if created:
                path.unlink(missing_ok=True)
            raise
        return cls(path, fd, size, readonly, created, thick, direct_fd)

    @staticmethod
    def _open_direct(path: Path, readonly: bool) -> int:
        """The same file with O_DIRECT, or -1 where the file system refuses it (tmpfs
        before Linux 6.6): the volume is then served through the page cache."""
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC | os.O_DIRECT
        try:
            return os.open(path, flags)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            log.warning("%s: the file system refuses O_DIRECT; serving through the page cache",
                        path)  # fmt: skip
            return -1

    @staticmethod
    def _lock(fd: int, path: Path) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise BackendError(f"{path} is already served by another process") from None
            raise

    @property
    def async_unavailable(self) -> str | None:
        return None if uring_error() is None else f"io_uring: {uring_error()}"

    def native_ops(self) -> tuple[Any, Any]:
        ops = lib.dp_file_uring_ops if uring_error() is None else lib.dp_file_ops
        return ffi.addressof(ops), self._native

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def grow(self, size: int) -> None:
        """Grows the file durably: the new size is on stable storage when this returns,
        before any guest learns of it."""
        if size < self.size:
            raise BackendError(f"refusing to shrink {self.path} from {self.size} to {size}")
        if size % SECTOR:
            raise BackendError(f"size {size} is not a multiple of {SECTOR}")
        if self.thick:
            os.posix_fallocate(self.fd, 0, size)
        elif os.fstat(self.fd).st_size < size:
            os.ftruncate(self.fd, size)
        os.fsync(self.fd)
        self.size = size

    def close(self) -> None:
        if self.direct_fd >= 0:
            os.close(self.direct_fd)
            self.direct_fd = -1
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard_created(self) -> None:
        """Removes the file if this open created it (used when a start-up fails)."""
        if self.created:
            self.path.unlink(missing_ok=True)


@functools.cache
def uring_error() -> str | None:
    """Why this process cannot use io_uring (not built in, an old kernel, a seccomp profile
    that blocks it), or None when it can."""
    r = lib.dp_file_uring_probe()
    return None if r == 0 else os.strerror(-r)
