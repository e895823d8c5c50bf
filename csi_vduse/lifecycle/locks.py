"""One operation per volume at a time; a second one is told to come back later."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from csi_vduse.errors import Aborted


class VolumeLocks:
    def __init__(self) -> None:
        self._busy: set[str] = set()
        self._mutex = threading.Lock()

    @contextmanager
    def hold(self, volume_id: str) -> Iterator[None]:
        with self._mutex:
            if volume_id in self._busy:
                raise Aborted(f"an operation on volume {volume_id} is already in progress")
            self._busy.add(volume_id)
        try:
            yield
        finally:
            with self._mutex:
                self._busy.discard(volume_id)
