"""A sparse file on the node: created at the requested size, never truncated."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path
from typing import Any

from csi_vduse._native import ffi, lib
from csi_vduse.backends.base import SECTOR, Backend, BackendError


class FileBackend(Backend):
    def __init__(self, path: Path, fd: int, size: int, readonly: bool, created: bool) -> None:
        self.path = path
        self.fd = fd
        self.size = size
        self.readonly = readonly
        self.created = created

    @classmethod
    def open(cls, path: Path | str, size: int | None = None, readonly: bool = False) -> FileBackend:
        """Opens FILE, creating it sparse at `size` when missing. An existing file keeps its
        data: it may grow to `size` but is never shrunk. The file is locked against a second
        server for as long as it is open."""
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
        except BaseException:
            os.close(fd)
            if created:
                path.unlink(missing_ok=True)
            raise
        return cls(path, fd, size, readonly, created)

    @staticmethod
    def _lock(fd: int, path: Path) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise BackendError(f"{path} is already served by another process") from None
            raise

    def native_ops(self) -> tuple[Any, Any]:
        return ffi.addressof(lib.dp_file_ops), ffi.cast("void *", self.fd)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def grow(self, size: int) -> None:
        if size < self.size:
            raise BackendError(f"refusing to shrink {self.path} from {self.size} to {size}")
        if size % SECTOR:
            raise BackendError(f"size {size} is not a multiple of {SECTOR}")
        os.ftruncate(self.fd, size)
        self.size = size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard_created(self) -> None:
        """Removes the file if this open created it (used when a start-up fails)."""
        if self.created:
            self.path.unlink(missing_ok=True)
