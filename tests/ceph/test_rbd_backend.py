"""The RBD backend against a real single-node Ceph (tests/ceph/cluster.py): the data
plane's asynchronous worker over librbd on a fake guest, and the image's exclusive lock."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import SecretStr

from csi_vduse._native import lib
from csi_vduse.backends import rbd
from csi_vduse.backends.base import BackendError
from tests.ceph.cluster import CephCluster
from tests.unit.fakeguest import Device, FakeGuest

OK, IOERR = lib.VIRTIO_BLK_S_OK, lib.VIRTIO_BLK_S_IOERR
IN, OUT, FLUSH = lib.VIRTIO_BLK_T_IN, lib.VIRTIO_BLK_T_OUT, lib.VIRTIO_BLK_T_FLUSH
MiB = 1 << 20


def status(guest: FakeGuest, iova: int) -> int:
    return guest.arena.read(iova, 1)[0]


def test_requests_in_flight_together_read_back_what_was_written(
    access: rbd.RbdAccess, ceph: CephCluster
) -> None:
    with rbd.RbdCluster(access) as cluster:
        cluster.create("data", 16 * MiB)
        backend = rbd.RbdBackend.open(cluster, "data")
        try:
            ops, ctx = backend.native_ops()
            guest = FakeGuest(num=256, pages=1024)  # 3 descriptors a request
            dev = Device(guest, size=backend.size, ops=ops, ctx=ctx, depth=64)
            blocks = {k: os.urandom(4096) for k in range(48)}
            writes = [guest.blk_request(OUT, sector=8 * k * 37 % 32768, out=data)
                      for k, data in blocks.items()]  # fmt: skip
            assert dev.process() == len(writes)
            assert all(status(guest, st) == OK for _, _, st in writes)
            flush = guest.blk_request(FLUSH)
            reads = [guest.blk_request(IN, sector=8 * k * 37 % 32768, in_len=4096)
                     for k in blocks]  # fmt: skip
            assert dev.process() == 1 + len(reads)
            assert status(guest, flush[2]) == OK
            for (_, din, st), data in zip(reads, blocks.values(), strict=True):
                assert status(guest, st) == OK
                assert guest.arena.read(din, 4096) == data
        finally:
            backend.close()
        # what the guest wrote is in the image, as the rbd tool reads it
        out = ceph.dir / "export"
        ceph.rbd("export", f"{access.pool}/data", str(out))
        image = out.read_bytes()
        k = 5
        offset = 512 * (8 * k * 37 % 32768)
        assert image[offset : offset + 4096] == blocks[k]
        assert cluster.remove("data")


def test_write_zeroes_zeroes_and_discard_succeeds(access: rbd.RbdAccess) -> None:
    with rbd.RbdCluster(access) as cluster:
        cluster.create("zeroes", 4 * MiB)
        backend = rbd.RbdBackend.open(cluster, "zeroes")
        try:
            ops, ctx = backend.native_ops()
            guest = FakeGuest(num=16, pages=64)
            dev = Device(guest, size=backend.size, ops=ops, ctx=ctx, depth=8)
            guest.blk_request(OUT, sector=0, out=b"\xff" * 8192)
            assert dev.process() == 1
            # One request at a time: requests in flight together have no order in virtio-blk.
            zeroes = struct.pack("<QII", 4, 8, 0)  # sectors 4..11
            _, _, st = guest.blk_request(lib.VIRTIO_BLK_T_WRITE_ZEROES, out=zeroes)
            assert dev.process() == 1
            _, din, rst = guest.blk_request(IN, sector=0, in_len=8192)
            assert dev.process() == 1
            discard = struct.pack("<QII", 0, 8192, 0)  # the first 4 MiB object
            _, _, dst = guest.blk_request(lib.VIRTIO_BLK_T_DISCARD, out=discard)
            assert dev.process() == 1
            assert status(guest, st) == OK and status(guest, rst) == OK
            assert guest.arena.read(din, 8192) == b"\xff" * 2048 + bytes(4096) + b"\xff" * 2048
            assert status(guest, dst) == OK  # a hint: what it reads back is not promised
            assert dev.q.stats.errors == 0
        finally:
            backend.close()
        cluster.remove("zeroes")


def test_a_second_writer_cannot_open_an_image_in_use(access: rbd.RbdAccess) -> None:
    with rbd.RbdCluster(access) as first, rbd.RbdCluster(access) as second:
        first.create("locked", 4 * MiB)
        owner = rbd.RbdBackend.open(first, "locked")
        try:
            with pytest.raises(rbd.RbdLockHeld):
                rbd.RbdBackend.open(second, "locked", lock_wait=2)
            reader = rbd.RbdBackend.open(second, "locked", readonly=True)
            reader.close()
        finally:
            owner.close()
        rbd.RbdBackend.open(second, "locked").close()  # free again once the owner closed
        first.remove("locked")


def test_a_wrong_key_is_refused(access: rbd.RbdAccess, ceph: CephCluster) -> None:
    other = subprocess.run(["ceph-authtool", "--gen-print-key"], capture_output=True,
                           text=True, check=True).stdout.strip()  # fmt: skip
    bad = rbd.RbdAccess(**(access.model_dump() | {"key": SecretStr(other)}))
    with pytest.raises(BackendError):
        rbd.RbdCluster(bad)


def child(script: str, access: rbd.RbdAccess, image: str, says: str) -> subprocess.Popen[str]:
    """A process running `script` on the image (the key on its stdin), once it printed
    `says`: a plugin the test can kill."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script, access.monitors, access.user, access.pool, image],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(access.key.get_secret_value() + "\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == says
    return proc


def test_a_dead_writers_lock_lapses_and_the_image_opens_again(
    access: rbd.RbdAccess, ceph: CephCluster
) -> None:
    """A process killed while it held the exclusive lock (a plugin restart) does not keep
    the image from its successor: the open waits for the lock to lapse."""
    with rbd.RbdCluster(access) as cluster:
        cluster.create("orphan", 4 * MiB)
    holder = child(HOLD_LOCK, access, "orphan", says="locked")
    holder.kill()
    holder.wait()
    with rbd.RbdCluster(access) as cluster:
        started = time.monotonic()
        backend = rbd.RbdBackend.open(cluster, "orphan")
        print(f"\nthe dead writer's lock lapsed after {time.monotonic() - started:.1f} s")
        backend.close()
        cluster.remove("orphan")


def test_a_completed_write_outlives_the_process_that_made_it(
    access: rbd.RbdAccess, ceph: CephCluster, tmp_path: Path
) -> None:
    """A write the guest was answered for is in the cluster, not in librbd's cache in the
    plugin's memory: killed right after, nothing is lost. (A flush first, since librbd's
    cache turns to write-back at the first flush.)"""
    with rbd.RbdCluster(access) as cluster:
        cluster.create("durable", 4 * MiB)
    writer = child(WRITE_THEN_WAIT, access, "durable", says="written")
    writer.kill()
    writer.wait()
    exported = tmp_path / "durable"
    ceph.rbd("export", f"{ceph.pool}/durable", str(exported))
    assert exported.read_bytes()[:MiB] == bytes(range(256)) * (MiB // 256)
    with rbd.RbdCluster(access) as cluster:
        rbd.RbdBackend.open(cluster, "durable").close()  # waits out the dead writer's lock
        cluster.remove("durable")


WRITE_THEN_WAIT = """
import sys, time
from pydantic import SecretStr
from csi_vduse._native import lib
from csi_vduse.backends import rbd
from tests.unit.fakeguest import Device, FakeGuest
monitors, user, pool, image = sys.argv[1:]
access = rbd.RbdAccess(monitors=monitors, user=user, key=SecretStr(input()), pool=pool)
backend = rbd.RbdBackend.open(rbd.RbdCluster(access), image)
ops, ctx = backend.native_ops()
guest = FakeGuest(num=64, pages=512)
dev = Device(guest, size=backend.size, ops=ops, ctx=ctx, depth=8)
guest.blk_request(lib.VIRTIO_BLK_T_FLUSH)
assert dev.process() == 1
chunk = bytes(range(256)) * 512
statuses = [guest.blk_request(lib.VIRTIO_BLK_T_OUT, sector=k * 256, out=chunk)[2]
            for k in range(8)]
assert dev.process() == 8
assert all(guest.arena.read(st, 1)[0] == lib.VIRTIO_BLK_S_OK for st in statuses)
print("written", flush=True)
time.sleep(3600)
"""


HOLD_LOCK = """
import sys, time
from pydantic import SecretStr
from csi_vduse.backends import rbd
monitors, user, pool, image = sys.argv[1:]
access = rbd.RbdAccess(monitors=monitors, user=user, key=SecretStr(input()), pool=pool)
backend = rbd.RbdBackend.open(rbd.RbdCluster(access), image)
print("locked", flush=True)
time.sleep(3600)
"""
