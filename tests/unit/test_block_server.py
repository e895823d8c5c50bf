"""The Python shell around the C workers reports what breaks: a queue stopped by a corrupt
ring shows in the device's problems and in the log; a malformed request does not. The
real BlockServer and C workers; the VDUSE device is a stand-in with eventfds (the kernel
side is covered by the lab)."""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_vduse._native import ffi, lib
from csi_vduse.backends.file import FileBackend
from csi_vduse.dataplane.blk_device import BlkParams
from csi_vduse.dataplane.server import INFLIGHT_STRIDE, BlockServer
from csi_vduse.kernel.vduse import Request, VqInfo
from tests.unit.fakeguest import IOVA_BASE, FakeGuest

RW = lib.DP_PERM_READ | lib.DP_PERM_WRITE


class StandInDevice:
    """What BlockServer needs of a VduseDevice, over a fake guest's rings."""

    name = "stand-in"

    def __init__(self, guest: FakeGuest) -> None:
        self.guest = guest
        self.fd = os.eventfd(0, os.EFD_NONBLOCK)  # no control messages ever arrive
        self.kick_fds: dict[int, int] = {}

    def features(self) -> int:
        return 0

    def vq_info(self, index: int) -> VqInfo:
        g = self.guest
        return VqInfo(g.num, g.desc, g.avail, g.used, 0, True)

    def vq_set_kickfd(self, index: int, fd: int) -> None:
        self.kick_fds[index] = fd

    def inject_irq(self, index: int) -> None:
        pass

    def read_request(self) -> Request | None:
        return None

    def kick(self, index: int = 0) -> None:
        os.eventfd_write(self.kick_fds[index], 1)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[FakeGuest, StandInDevice, BlockServer]]:
    guest = FakeGuest(num=16, pages=64)
    device = StandInDevice(guest)
    backend = FileBackend.open(tmp_path / "disk.img", 1 << 20)
    params = BlkParams(capacity=1 << 20)
    server = BlockServer(device, backend, params, tmp_path / "log")  # type: ignore[arg-type]
    va = ffi.cast("uint8_t *", guest.arena.va)
    end = IOVA_BASE + guest.arena.size - 1
    assert lib.dp_iotlb_add(server._tlb, IOVA_BASE, end, va, RW) == 0
    server.start(resume=True)  # serves the queues the stand-in says are ready
    yield guest, device, server
    server.stop()
    backend.close()
    os.close(device.fd)


def wait_until(cond: object, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(cond) and cond():
            return True
        time.sleep(0.01)
    return False


def test_a_malformed_request_is_counted_not_a_lasting_problem(
    served: tuple[FakeGuest, StandInDevice, BlockServer],
) -> None:
    guest, device, server = served
    hdr, st = guest.arena.alloc(16), guest.arena.alloc(1)
    guest.arena.write(hdr, struct.pack("<IIQ", lib.VIRTIO_BLK_T_IN, 0, 0))
    head = guest.next_desc
    guest.set_desc(head, hdr, 8, lib.VRING_DESC_F_NEXT, head + 1)  # header too short
    guest.set_desc(head + 1, st, 1, lib.VRING_DESC_F_WRITE, 0)
    guest.next_desc += 2
    guest.publish(head)
    device.kick()
    assert wait_until(lambda: guest.used_idx() == 1)
    assert server.stats()["bad_chains"] == 1
    assert server.problems() == []


def test_a_stopped_queue_is_reported_in_problems_and_the_log(
    served: tuple[FakeGuest, StandInDevice, BlockServer], caplog: pytest.LogCaptureFixture
) -> None:
    guest, device, server = served
    caplog.set_level(logging.ERROR)
    guest.publish(guest.num + 5)  # a head out of range: the ring is corrupt
    device.kick()
    assert wait_until(lambda: server.broken_queues() == 1)
    assert wait_until(lambda: "queue 0 stopped" in caplog.text)
    [problem] = server.problems()
    assert problem.startswith("queue 0 stopped: its ring is corrupt")
    assert server.dead_threads() == []  # a restart would not fix it: not a liveness failure


def test_the_crash_log_is_a_file_the_next_process_finds(
    served: tuple[FakeGuest, StandInDevice, BlockServer], tmp_path: Path
) -> None:
    guest = served[0]
    log = bytearray((tmp_path / "log").read_bytes())
    assert len(log) == lib.DP_LOG_SIZE + INFLIGHT_STRIDE  # one queue
    assert struct.unpack_from("<II", log) == (lib.DP_LOG_MAGIC, lib.DP_LOG_VERSION)
    inflight = ffi.cast("struct dp_inflight *", ffi.from_buffer(log) + lib.DP_LOG_SIZE)
    assert lib.dp_inflight_valid(inflight, guest.num)


def test_the_server_says_which_path_serves_its_queues(
    served: tuple[FakeGuest, StandInDevice, BlockServer],
) -> None:
    server = served[2]
    if lib.dp_file_uring_probe() == 0:
        assert server.engine == "asynchronous"
        assert server._queues[0].native.engine != ffi.NULL
    else:
        assert server.engine.startswith("synchronous (io_uring: ")
        assert server._queues[0].native.engine == ffi.NULL
