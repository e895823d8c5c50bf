"""The in-flight log (dataplane/native/inflight.c): what a new process learns about the
requests an old one had popped and not completed, including from a killed process."""

from __future__ import annotations

import mmap
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from csi_vduse._native import ffi, lib

NUM = 8


class Queue:
    """A used ring (its id column and index) and a log, as the ring thread drives them."""

    def __init__(self, num: int = NUM, buffer: Any = None) -> None:
        self.num = num
        self.buffer = buffer if buffer is not None else bytearray(lib.dp_inflight_size(num))
        self.log = ffi.cast("struct dp_inflight *", ffi.from_buffer(self.buffer))
        self.used = ffi.new("struct vring_used_elem[]", num)
        self.used_idx = 0
        self.avail_idx = 0

    def offer(self, count: int) -> None:
        self.avail_idx = (self.avail_idx + count) & 0xFFFF

    def pop(self, head: int) -> None:
        lib.dp_inflight_popped(self.log, head)

    def publish(self, *heads: int) -> None:
        """Used elements and used->idx: what the guest sees, before the log hears of it."""
        for head in heads:
            self.used[self.used_idx % self.num].id = head
            self.used_idx = (self.used_idx + 1) & 0xFFFF

    def log_completed(self, *heads: int) -> None:
        lib.dp_inflight_completed(self.log, ffi.new("uint16_t[]", list(heads)), len(heads),
                                  self.used_idx)  # fmt: skip

    def complete(self, *heads: int) -> None:
        self.publish(*heads)
        self.log_completed(*heads)

    def recover(self) -> list[int]:
        heads = ffi.new("uint16_t[]", self.num)
        n = lib.dp_inflight_recover(self.log, self.used, self.used_idx, self.avail_idx, heads)
        assert n >= 0, n
        return list(heads[0:n])


def fresh(num: int = NUM) -> Queue:
    q = Queue(num)
    lib.dp_inflight_reset(q.log, num, 0)
    return q


def test_a_reset_log_is_valid_for_its_queue_size_only() -> None:
    q = Queue()
    assert not lib.dp_inflight_valid(q.log, NUM)  # zeroed memory is no log
    lib.dp_inflight_reset(q.log, NUM, 0)
    assert lib.dp_inflight_valid(q.log, NUM)
    assert not lib.dp_inflight_valid(q.log, NUM * 2)
    q.log.version = 99
    assert not lib.dp_inflight_valid(q.log, NUM)


def test_out_of_order_completions_leave_the_others_in_pop_order() -> None:
    q = fresh()
    q.offer(4)
    for head in (5, 2, 7, 0):
        q.pop(head)
    q.complete(7)
    q.complete(5)
    assert q.recover() == [2, 0]


def test_a_completion_the_guest_saw_but_the_log_missed_is_not_run_again() -> None:
    q = fresh()
    q.offer(3)
    for head in (1, 2, 3):
        q.pop(head)
    q.publish(2, 3)  # the process dies here, before dp_inflight_completed
    assert q.recover() == [1]
    assert q.log.used_idx == 2


def test_a_head_the_guest_offers_again_is_in_flight_again() -> None:
    q = fresh()
    q.offer(1)
    q.pop(4)
    q.complete(4)
    q.offer(1)
    q.pop(4)  # the same descriptor, a new request
    assert q.recover() == [4]


def test_pop_order_holds_across_index_wrap() -> None:
    q = Queue()
    lib.dp_inflight_reset(q.log, NUM, 0xFFFE)
    q.used_idx = q.avail_idx = 0xFFFE
    q.offer(6)
    for head in (3, 6, 1, 0, 5, 2):
        q.pop(head)
    q.publish(6, 0)  # used_idx wraps past 0xffff
    assert q.used_idx == 0
    assert q.recover() == [3, 1, 5, 2]


def test_a_log_that_cannot_describe_the_rings_is_refused() -> None:
    heads = ffi.new("uint16_t[]", NUM)
    q = fresh()
    q.offer(2)
    q.pop(1)
    q.pop(2)
    # more in flight than the guest offered past used->idx
    assert lib.dp_inflight_recover(q.log, q.used, 0, 1, heads) == -22
    # used->idx ahead of the log by more than the ring holds
    assert lib.dp_inflight_recover(q.log, q.used, NUM + 1, NUM + 3, heads) == -22


def test_out_of_range_heads_are_ignored() -> None:
    q = fresh()
    q.offer(1)
    q.pop(NUM)
    q.pop(0xFFFF)
    assert q.recover() == []


CHILD = """
import mmap, os, signal, sys
from csi_vduse._native import ffi, lib
num = int(sys.argv[2])
with open(sys.argv[1], "r+b") as f:
    m = mmap.mmap(f.fileno(), lib.dp_inflight_size(num))
log = ffi.cast("struct dp_inflight *", ffi.from_buffer(m))
lib.dp_inflight_reset(log, num, 0)
for head in range(num):
    lib.dp_inflight_popped(log, head)
done = ffi.new("uint16_t[]", [1, 3])
lib.dp_inflight_completed(log, done, 2, 2)
lib.dp_inflight_popped(log, 1)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("num", [NUM, 1024])
def test_the_log_outlives_a_killed_process(tmp_path: Path, num: int) -> None:
    path = tmp_path / "queue-0.inflight"
    path.write_bytes(b"\0" * lib.dp_inflight_size(num))
    child = subprocess.run([sys.executable, "-c", textwrap.dedent(CHILD), str(path), str(num)],
                           capture_output=True, text=True)  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr
    with path.open("r+b") as f:
        m = mmap.mmap(f.fileno(), lib.dp_inflight_size(num))
    q = Queue(num, m)
    assert lib.dp_inflight_valid(q.log, num)
    q.used[0].id, q.used[1].id = 1, 3
    q.used_idx = 2
    q.avail_idx = num + 1
    assert q.recover() == [0, 2, *range(4, num), 1]
    del q
    m.close()
