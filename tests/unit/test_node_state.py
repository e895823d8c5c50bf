"""Records that cannot be read, the formatted flag, capacity promised once, signatures,
durable growth, and liveness apart from the host's readiness: on the host, no kernel."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_vduse.backends.file import FileBackend
from csi_vduse.csi.proto import csi_pb2 as pb
from csi_vduse.lifecycle import mounts
from csi_vduse.state.records import UnreadableRecord
from csi_vduse.state.volumes import VolumeRecord, VolumeStore, volume_id_for
from tests.csi_client import MiB, Plugin, block_cap, code_of, error_of, mount_cap
from tests.unit.http import get

C = grpc.StatusCode
GiB = 1 << 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[Plugin]:
    p = Plugin(tmp_path, "node-1", "identity,controller")
    yield p
    assert p.stop() == 0


def create(p: Plugin, name: str, size: int, **params: str) -> str:
    return str(p.controller.CreateVolume(pb.CreateVolumeRequest(
        name=name, capacity_range=pb.CapacityRange(required_bytes=size),
        volume_capabilities=[block_cap()], parameters=params,
    )).volume.volume_id)  # fmt: skip


def available(p: Plugin) -> int:
    return int(p.controller.GetCapacity(pb.GetCapacityRequest()).available_capacity)


# records


def test_an_unreadable_or_newer_record_is_reported_and_hides_nothing(
    controller: Plugin,
) -> None:
    ids = [create(controller, f"pvc-{k}", 4 * MiB) for k in range(3)]
    volumes = controller.root / "data" / "volumes"
    (volumes / f"{ids[0]}.json").write_text("{not json")
    newer = json.loads((volumes / f"{ids[1]}.json").read_text())
    (volumes / f"{ids[1]}.json").write_text(json.dumps({**newer, "version": 99, "new": 1}))
    listed = controller.controller.ListVolumes(pb.ListVolumesRequest()).entries
    conditions = {e.volume.volume_id: e.status.volume_condition for e in listed}
    assert set(conditions) == set(ids)
    assert conditions[ids[0]].abnormal and "not a valid record" in conditions[ids[0]].message
    assert conditions[ids[1]].abnormal and "newer csi-vduse" in conditions[ids[1]].message
    assert not conditions[ids[2]].abnormal
    got = controller.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=ids[1]))
    assert got.status.volume_condition.abnormal and got.volume.capacity_bytes == 4 * MiB
    # never overwritten by an older writer
    grow = pb.ControllerExpandVolumeRequest(
        volume_id=ids[1], capacity_range=pb.CapacityRange(required_bytes=8 * MiB)
    )
    assert code_of(lambda: controller.controller.ControllerExpandVolume(grow)) == (
        C.FAILED_PRECONDITION
    )
    assert json.loads((volumes / f"{ids[1]}.json").read_text())["version"] == 99


def test_records_ignore_fields_a_newer_version_added(tmp_path: Path) -> None:
    store = VolumeStore(tmp_path)
    store.ensure()
    vid = volume_id_for("pvc")
    record = VolumeRecord(volume_id=vid, name="pvc", capacity=MiB)
    store.put(record)
    path = store.root / f"{vid}.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "snapshots": []}))
    got = store.get(vid)
    assert got is not None and got.capacity == MiB
    path.write_text(json.dumps({"volume_id": vid}))
    with pytest.raises(UnreadableRecord):
        store.get(vid)


def test_the_formatted_flag_is_never_cleared(tmp_path: Path) -> None:
    """A writer holding an old copy (an expansion that read the record before a stage
    formatted the volume) must not erase the flag that prevents a second mkfs."""
    store = VolumeStore(tmp_path)
    store.ensure()
    vid = volume_id_for("pvc")
    store.put(VolumeRecord(volume_id=vid, name="pvc", capacity=MiB))
    stale = store.get(vid)
    assert stale is not None
    fresh = store.get(vid)
    assert fresh is not None
    fresh.formatted, fresh.fs_type = True, "xfs"
    store.put(fresh)
    stale.capacity = 2 * MiB
    store.put(stale)
    final = store.get(vid)
    assert final is not None
    assert (final.capacity, final.formatted, final.fs_type) == (2 * MiB, True, "xfs")


def test_a_node_starts_with_an_unreadable_staging_record(tmp_path: Path) -> None:
    staged = tmp_path / "state" / "staged"
    staged.mkdir(parents=True)
    vid = volume_id_for("pvc")
    (staged / f"{vid}.json").write_text("\0\0\0")
    p = Plugin(tmp_path)
    try:
        assert p.controller.ListVolumes(pb.ListVolumesRequest()).entries == []
        unstage = pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(tmp_path))
        p.node.NodeUnstageVolume(unstage)  # clears what cannot be read
        assert not (staged / f"{vid}.json").exists()
    finally:
        assert p.stop() == 0
    assert "staging record unreadable" in p.log.read_text()


# capacity


def test_capacity_is_promised_once(controller: Plugin) -> None:
    first = available(controller)
    half = first // 2 // MiB * MiB
    create(controller, "pvc-half", half)
    assert abs(available(controller) - (first - half)) < GiB  # the sparse file takes no space
    code, message = error_of(lambda: create(controller, "pvc-too-much", half + 2 * GiB))
    assert code == C.RESOURCE_EXHAUSTED and "may still write" in message
    assert not (
        controller.root / "data" / "volumes" / f"{volume_id_for('pvc-too-much')}.img"
    ).exists()


def test_a_thick_volume_is_allocated_when_created_and_grown(controller: Plugin) -> None:
    vid = create(controller, "pvc-thick", 16 * MiB, provisioning="thick")
    image = controller.root / "data" / "volumes" / f"{vid}.img"
    assert image.stat().st_blocks * 512 >= 16 * MiB
    controller.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
        volume_id=vid, capacity_range=pb.CapacityRange(required_bytes=32 * MiB)))  # fmt: skip
    assert image.stat().st_size == 32 * MiB and image.stat().st_blocks * 512 >= 32 * MiB
    got = controller.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vid))
    assert got.volume.volume_context["provisioning"] == "thick"
    bad = pb.CreateVolumeRequest(name="x", volume_capabilities=[mount_cap()],
                                 parameters={"provisioning": "fat"})  # fmt: skip
    assert code_of(lambda: controller.controller.CreateVolume(bad)) == C.INVALID_ARGUMENT


def test_a_grown_file_is_durable_before_anyone_learns_its_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real_truncate, real_fsync = os.ftruncate, os.fsync

    def truncate(fd: int, size: int) -> None:
        calls.append("truncate")
        real_truncate(fd, size)

    def fsync(fd: int) -> None:
        calls.append("fsync")
        real_fsync(fd)

    monkeypatch.setattr(os, "ftruncate", truncate)
    monkeypatch.setattr(os, "fsync", fsync)
    with FileBackend.open(tmp_path / "disk.img", MiB) as backend:
        calls.clear()
        backend.grow(2 * MiB)
        assert calls == ["truncate", "fsync"] and backend.size == 2 * MiB


# signatures


def image_with(tmp_path: Path, setup: str) -> Path:
    path = tmp_path / f"{setup}.img"
    size = 320 * MiB  # xfs wants at least 300 MiB
    with open(path, "wb") as f:
        f.truncate(size)
    if setup == "mbr":
        entry = (
            bytes([0x80, 0, 2, 0, 0x83, 0, 0, 0])
            + (2048).to_bytes(4, "little")
            + ((size // 512 - 2048).to_bytes(4, "little"))
        )
        with open(path, "r+b") as f:
            f.seek(446)
            f.write(entry)
            f.seek(510)
            f.write(b"\x55\xaa")
    elif setup in ("ext4", "xfs"):
        subprocess.run([f"mkfs.{setup}", "-q", str(path)], check=True, capture_output=True)
    return path


def test_a_partition_table_is_data(tmp_path: Path) -> None:
    found = mounts.probe(image_with(tmp_path, "mbr"))
    assert found is not None and found.usage == "partition table" and found.type == "dos"
    assert not found.mountable


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_file_systems_are_found(tmp_path: Path, fs: str) -> None:
    found = mounts.probe(image_with(tmp_path, fs))
    assert found is not None and found.mountable and found.type == fs


def test_only_a_blank_device_is_blank(tmp_path: Path) -> None:
    assert mounts.probe(image_with(tmp_path, "blank")) is None
    with pytest.raises(mounts.MountError):
        mounts.probe(tmp_path / "missing")


def test_mkfs_is_never_forced(tmp_path: Path) -> None:
    image = image_with(tmp_path, "mbr")
    with pytest.raises(mounts.MountError, match=r"mkfs\.xfs"):
        mounts.mkfs(image, "xfs")  # a second line of defence: xfs refuses without -f
    assert mounts.probe(image) == mounts.Signature("partition table", "dos")


# liveness is the process, readiness is the host


def test_liveness_does_not_depend_on_the_host(tmp_path: Path) -> None:
    """This host has no VDUSE: not ready (the provisioner waits, an operator sees why),
    but alive (a restart would fix nothing and pause every volume on the node)."""
    port = free_port()
    p = Plugin(tmp_path, "node-1", "", f"--health-address=127.0.0.1:{port}")
    try:
        assert p.identity.Probe(pb.ProbeRequest()).ready.value is False
        code, body = get(f"http://127.0.0.1:{port}/livez")
        assert (code, body.strip()) == (200, "ok")
        code, body = get(f"http://127.0.0.1:{port}/readyz")
        assert code == 503 and "VDUSE control device" in body and "modprobe vduse" in body
        code, body = get(f"http://127.0.0.1:{port}/metrics")
        assert code == 200 and "python_info" not in body
    finally:
        assert p.stop() == 0
    assert "cannot serve VDUSE volumes yet" in p.log.read_text()
