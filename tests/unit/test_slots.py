"""Calls that wait on storage never take the workers the quick calls need."""

from __future__ import annotations

import threading

import pytest

from csi_vduse.csi.slots import KEPT_FOR_QUICK_CALLS, WORKERS, Slots
from csi_vduse.errors import Aborted


def test_one_call_more_than_the_slots_is_aborted_and_a_slot_freed_is_used_again() -> None:
    slots = Slots()
    assert slots.count == WORKERS - KEPT_FOR_QUICK_CALLS > 0
    release, entered = threading.Event(), threading.Semaphore(0)

    def waiting_stage() -> None:
        with slots.hold("NodeStageVolume"):
            entered.release()
            release.wait(10)

    callers = [threading.Thread(target=waiting_stage) for _ in range(slots.count)]
    for caller in callers:
        caller.start()
    for _ in callers:
        assert entered.acquire(timeout=10)
    with pytest.raises(Aborted, match="retried later"), slots.hold("NodeStageVolume"):
        pass
    release.set()
    for caller in callers:
        caller.join(10)
    with slots.hold("NodeStageVolume"):
        pass
