"""RBD snapshots, restores and clones through the controller's Provisioner and Snapshots
against a real single-node Ceph: what each image holds, and that deleting them in any order
leaves no image behind, in the pool or in its trash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from csi_vduse._native import ffi
from csi_vduse.backends import rbd
from csi_vduse.backends.rbd.pool import image_of as rbd_image_of
from csi_vduse.backends.rbd.pool import snapshot_of as rbd_snapshot_of
from csi_vduse.errors import AlreadyExists, FailedPrecondition, InvalidArgument, OutOfRange
from csi_vduse.lifecycle.locks import VolumeLocks
from csi_vduse.lifecycle.provisioning import Provisioner
from csi_vduse.lifecycle.snapshots import Snapshots, drivers_for, refuse_staged
from csi_vduse.state.staging import StagingStore
from csi_vduse.state.volumes import Source
from tests.ceph.cluster import CephCluster

MiB = 1 << 20
BLOCK = 4096


@pytest.fixture
def secrets(ceph: CephCluster) -> dict[str, str]:
    return {"monitors": ceph.monitors, "userID": ceph.user, "userKey": ceph.key}


@pytest.fixture
def services(tmp_path: Path) -> tuple[Provisioner, Snapshots]:
    data, staging, locks = tmp_path / "data", StagingStore(tmp_path / "state"), VolumeLocks()
    drivers = drivers_for(data, tmp_path / "state", locks, refuse_staged(staging))
    return Provisioner(drivers, staging, locks), Snapshots(drivers, locks)


def image_of(volume_id: str) -> str:
    return (rbd_image_of(volume_id) or ("", ""))[1]


def io(access: rbd.RbdAccess, image: str, offset: int, data: bytes | None = None) -> bytes:
    """Writes `data` at `offset` (and returns it), or reads a block there, through librbd."""
    with rbd.RbdCluster(access) as cluster:
        backend = rbd.RbdBackend.open(cluster, image)
        try:
            ops, ctx = backend.native_ops()
            buf = ffi.new("char[]", data) if data is not None else ffi.new("char[]", BLOCK)
            size = len(data) if data is not None else BLOCK
            iov = ffi.new("struct iovec *", {"iov_base": buf, "iov_len": size})
            call = ops.pwritev if data is not None else ops.preadv
            assert call(ctx, iov, 1, offset) == size
            if data is not None:
                assert ops.flush(ctx) == 0
            return bytes(ffi.buffer(buf, size))
        finally:
            backend.close()


def images(ceph: CephCluster) -> tuple[list[str], list[str]]:
    """The pool's images and the names of those in its trash."""
    listed = ceph.rbd("ls", ceph.pool).split()
    trash = [e["name"] for e in json.loads(ceph.rbd("trash", "ls", ceph.pool, "--format", "json"))]
    return listed, trash


def test_snapshots_restores_and_clones_hold_their_data_and_leave_nothing_behind(
    services: tuple[Provisioner, Snapshots], ceph: CephCluster, secrets: dict[str, str],
    access: rbd.RbdAccess,
) -> None:  # fmt: skip
    provisioner, snapshots = services
    rbd_class = {"backend": "rbd", "pool": ceph.pool}
    source = provisioner.create("pvc-source", 8 * MiB, 0, rbd_class, secrets=secrets)
    io(access, image_of(source.volume_id), 0, b"a" * BLOCK)
    io(access, image_of(source.volume_id), 4 * MiB, b"A" * BLOCK)

    snapshot = snapshots.create("snap-1", source.volume_id, secrets)
    assert rbd_snapshot_of(snapshot.snapshot_id) is not None
    assert snapshot.size == 8 * MiB and snapshot.source_volume_id == source.volume_id
    assert snapshots.create("snap-1", source.volume_id, secrets) == snapshot
    assert [r.snapshot_id for r in snapshots.scan()] == [snapshot.snapshot_id]
    other = provisioner.create("pvc-other", 4 * MiB, 0, rbd_class, secrets=secrets)
    with pytest.raises(AlreadyExists):
        snapshots.create("snap-1", other.volume_id, secrets)
    io(access, image_of(source.volume_id), 0, b"b" * BLOCK)  # after the snapshot

    with pytest.raises(OutOfRange):
        provisioner.create("pvc-small", 4 * MiB, 4 * MiB, rbd_class,
                           source=("snapshot", snapshot.snapshot_id), secrets=secrets)  # fmt: skip
    with pytest.raises(InvalidArgument):
        provisioner.create("pvc-file", 8 * MiB, 0, {}, source=("snapshot", snapshot.snapshot_id))
    from_snapshot: Source = ("snapshot", snapshot.snapshot_id)
    restored = provisioner.create("pvc-restored", 16 * MiB, 0, rbd_class, source=from_snapshot,
                                  secrets=secrets)  # fmt: skip
    assert restored.capacity == 16 * MiB and restored.source == from_snapshot
    assert provisioner.create("pvc-restored", 16 * MiB, 0, rbd_class, source=from_snapshot,
                              secrets=secrets) == restored  # fmt: skip
    info = json.loads(ceph.rbd("info", f"{ceph.pool}/{image_of(restored.volume_id)}",
                               "--format", "json"))  # fmt: skip
    assert info["size"] == 16 * MiB
    clone = provisioner.create("pvc-clone", 0, 0, rbd_class,
                               source=("volume", source.volume_id), secrets=secrets)  # fmt: skip
    assert clone.capacity == 8 * MiB

    assert io(access, image_of(restored.volume_id), 0) == b"a" * BLOCK
    assert io(access, image_of(restored.volume_id), 4 * MiB) == b"A" * BLOCK
    assert io(access, image_of(clone.volume_id), 0) == b"b" * BLOCK
    io(access, image_of(restored.volume_id), 0, b"r" * BLOCK)  # clones are their own
    assert io(access, image_of(source.volume_id), 0) == b"b" * BLOCK

    # The source carries a snapshot: deleting it is refused and changes nothing.
    with pytest.raises(FailedPrecondition, match=snapshot.snapshot_id):
        provisioner.delete(source.volume_id, secrets)
    assert io(access, image_of(source.volume_id), 0) == b"b" * BLOCK
    snapshots.delete(snapshot.snapshot_id, secrets)
    snapshots.delete(snapshot.snapshot_id, secrets)  # idempotent
    assert snapshots.scan() == []
    # Now the source goes, into the trash: the restored volume and the clone need it.
    provisioner.delete(source.volume_id, secrets)
    listed, trash = images(ceph)
    assert image_of(source.volume_id) not in listed and trash == [image_of(source.volume_id)]
    assert io(access, image_of(restored.volume_id), 4 * MiB) == b"A" * BLOCK
    assert io(access, image_of(clone.volume_id), 0) == b"b" * BLOCK

    provisioner.delete(restored.volume_id, secrets)
    assert images(ceph)[1] == [image_of(source.volume_id)]  # the clone still needs it
    provisioner.delete(clone.volume_id, secrets)
    provisioner.delete(other.volume_id, secrets)
    assert images(ceph) == ([], [])


def test_a_snapshot_of_a_volume_in_use_holds_every_completed_write(
    services: tuple[Provisioner, Snapshots], ceph: CephCluster, secrets: dict[str, str],
    access: rbd.RbdAccess,
) -> None:  # fmt: skip
    """A writer holds the image's exclusive lock, as a node serving it does: librbd has it
    take the snapshot."""
    provisioner, snapshots = services
    rbd_class = {"backend": "rbd", "pool": ceph.pool}
    source = provisioner.create("pvc-busy", 8 * MiB, 0, rbd_class, secrets=secrets)
    with rbd.RbdCluster(access) as cluster:
        writer = rbd.RbdBackend.open(cluster, image_of(source.volume_id))
        try:
            ops, ctx = writer.native_ops()
            buf = ffi.new("char[]", b"w" * BLOCK)
            iov = ffi.new("struct iovec *", {"iov_base": buf, "iov_len": BLOCK})
            assert ops.pwritev(ctx, iov, 1, MiB) == BLOCK
            snapshot = snapshots.create("snap-busy", source.volume_id, secrets)
            with pytest.raises(FailedPrecondition):
                provisioner.delete(source.volume_id, secrets)  # open, and has a snapshot
        finally:
            writer.close()
    from_snapshot: Source = ("snapshot", snapshot.snapshot_id)
    restored = provisioner.create("pvc-busy-restored", 0, 0, rbd_class, source=from_snapshot,
                                  secrets=secrets)  # fmt: skip
    assert io(access, image_of(restored.volume_id), MiB) == b"w" * BLOCK
    provisioner.delete(restored.volume_id, secrets)
    snapshots.delete(snapshot.snapshot_id, secrets)
    provisioner.delete(source.volume_id, secrets)
    assert images(ceph) == ([], [])


def test_sources_from_another_pool_or_backend_are_refused_before_any_call(
    services: tuple[Provisioner, Snapshots], ceph: CephCluster, secrets: dict[str, str],
) -> None:  # fmt: skip
    provisioner, _ = services
    elsewhere = "vduse-snap-rbd-" + "0" * 40 + "-otherpool"
    for source in [("snapshot", elsewhere), ("snapshot", "vduse-snap-" + "0" * 40),
                   ("volume", "vduse-" + "0" * 40)]:  # fmt: skip
        with pytest.raises(InvalidArgument):
            provisioner.create("pvc-x", 0, 0, {"backend": "rbd", "pool": ceph.pool},
                               source=source, secrets=secrets)  # type: ignore[arg-type]  # fmt: skip
    assert images(ceph) == ([], [])


def test_a_snapshot_deleted_before_its_restore_leaves_nothing_once_both_volumes_go(
    services: tuple[Provisioner, Snapshots], ceph: CephCluster, secrets: dict[str, str],
    access: rbd.RbdAccess,
) -> None:  # fmt: skip
    """The other order: the snapshot waits in its image's trash namespace for the restored
    volume, which takes it along when it goes; the source then goes as any volume."""
    provisioner, snapshots = services
    rbd_class = {"backend": "rbd", "pool": ceph.pool}
    source = provisioner.create("pvc-order", 8 * MiB, 0, rbd_class, secrets=secrets)
    io(access, image_of(source.volume_id), 0, b"o" * BLOCK)
    snapshot = snapshots.create("snap-order", source.volume_id, secrets)
    restored = provisioner.create("pvc-order-restored", 0, 0, rbd_class,
                                  source=("snapshot", snapshot.snapshot_id),
                                  secrets=secrets)  # fmt: skip
    snapshots.delete(snapshot.snapshot_id, secrets)
    assert io(access, image_of(restored.volume_id), 0) == b"o" * BLOCK
    provisioner.delete(restored.volume_id, secrets)
    provisioner.delete(source.volume_id, secrets)
    assert images(ceph) == ([], [])


def test_a_volume_and_its_last_clone_deleted_together_leave_nothing(
    services: tuple[Provisioner, Snapshots], ceph: CephCluster, secrets: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The provisioner deletes volumes concurrently. The source's removal fails (its trashed
    snapshot is still needed), the clone then goes and takes that snapshot along while the
    source is not yet in the trash, and only then does the source move there: whichever
    deletion comes last still removes it."""
    provisioner, snapshots = services
    rbd_class = {"backend": "rbd", "pool": ceph.pool}
    source = provisioner.create("pvc-race", 8 * MiB, 0, rbd_class, secrets=secrets)
    snapshot = snapshots.create("snap-race", source.volume_id, secrets)
    restored = provisioner.create("pvc-race-restored", 0, 0, rbd_class,
                                  source=("snapshot", snapshot.snapshot_id),
                                  secrets=secrets)  # fmt: skip
    snapshots.delete(snapshot.snapshot_id, secrets)
    remove = rbd.RbdCluster.remove
    interleaved: list[str] = []

    def remove_then_delete_the_clone(cluster: rbd.RbdCluster, image: str) -> bool:
        try:
            return remove(cluster, image)
        except rbd.ImageHasSnapshots:
            if not interleaved:
                interleaved.append(image)
                provisioner.delete(restored.volume_id, secrets)
            raise

    monkeypatch.setattr(rbd.RbdCluster, "remove", remove_then_delete_the_clone)
    provisioner.delete(source.volume_id, secrets)
    assert interleaved == [image_of(source.volume_id)]
    assert images(ceph) == ([], [])
