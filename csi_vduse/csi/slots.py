"""Calls that may wait on a backend (a stage against an unreachable Ceph waits for its
timeouts) share the gRPC workers with calls that must always answer (Probe, the liveness
check's GetPluginInfo, NodeGetVolumeStats): they get all workers but a few; one more is
told to come back (ABORTED, which the CO retries)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from csi_vduse.errors import Aborted

WORKERS = 16  # the CSI server's threads
KEPT_FOR_QUICK_CALLS = 4


class Slots:
    def __init__(self, count: int = WORKERS - KEPT_FOR_QUICK_CALLS) -> None:
        self.count = count
        self._free = threading.BoundedSemaphore(count)

    @contextmanager
    def hold(self, call: str) -> Iterator[None]:
        if not self._free.acquire(blocking=False):
            raise Aborted(
                f"{self.count} calls that wait on storage are in progress; {call} is retried later"
            )
        try:
            yield
        finally:
            self._free.release()
