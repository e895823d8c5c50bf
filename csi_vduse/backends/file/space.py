"""Free space in the data dir: what the file backend's sparse images may still take is
never promised twice."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from csi_vduse.errors import Aborted, ResourceExhausted


@contextmanager
def exclusive(space: threading.Lock, timeout: float = 5.0) -> Iterator[None]:
    """One reservation of free space at a time (no byte promised twice); a call that waits
    longer (another volume's copy holds it) is told to come back, not left holding a
    gRPC thread."""
    if not space.acquire(timeout=timeout):
        raise Aborted("another volume is reserving space or being copied; retry")
    try:
        yield
    finally:
        space.release()


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def unwritten_bytes(images: Path) -> int:
    """What the sparse images under `images` may still take: their sizes less what they
    already hold. Space promised to a volume is not promised again."""
    total = 0
    for image in images.glob("*.img"):
        try:
            st = image.stat()
        except FileNotFoundError:
            continue
        total += max(0, st.st_size - st.st_blocks * 512)
    return total


def available_bytes(data_dir: Path, images: Path) -> int:
    return max(0, free_bytes(data_dir) - unwritten_bytes(images))


def ensure_space(data_dir: Path, images: Path, needed: int) -> None:
    available = available_bytes(data_dir, images)
    if needed > available:
        raise ResourceExhausted(
            f"{needed} bytes requested but only {available} are free in {data_dir} "
            "(free space less what existing volumes may still write)"
        )
