"""Snapshots, clones and live QoS on real VDUSE devices: a snapshot cut under write load
restores to a file system that checks clean, a clone of a volume in use mounts and reads,
and ModifyVolume changes the limits of a staged volume's data plane while fio runs."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from csi_vduse.csi.proto import csi_pb2 as pb
from tests.csi_client import MiB, Plugin, block_cap, mount_cap
from tests.e2e.helpers import run
from tests.e2e.test_csi import publish, stage, unpublish, unstage

pytestmark = pytest.mark.any_kernel  # the copies and QoS are the data plane's, not the kernel's


def create(p: Plugin, name: str, cap: pb.VolumeCapability, size: int, **kw: object) -> pb.Volume:
    resp = p.controller.CreateVolume(pb.CreateVolumeRequest(
        name=name, capacity_range=pb.CapacityRange(required_bytes=size),
        volume_capabilities=[cap], **kw,  # type: ignore[arg-type]
    ))  # fmt: skip
    volume: pb.Volume = resp.volume
    return volume


def staged_device(p: Plugin, vid: str) -> Path:
    record = json.loads((p.root / "state" / "staged" / f"{vid}.json").read_text())
    return Path(record["device"])


def test_snapshot_under_write_load_restores_clean_and_a_clone_reads(
    plugin: Plugin, workdir: Path
) -> None:
    cap = mount_cap("ext4")
    vid = create(plugin, "pvc-src", cap, 256 * MiB).volume_id
    staging, target = workdir / "src-staging", workdir / "src-pod"
    staging.mkdir()
    stage(plugin, vid, staging, cap)
    publish(plugin, vid, staging, target, cap)
    (target / "before").write_bytes(b"written and synced before the snapshot\n" * 100)
    run("sync")
    load = subprocess.Popen(
        ["fio", "--name=load", f"--directory={target}", "--rw=randwrite", "--bs=4k",
         "--size=32M", "--numjobs=2", "--ioengine=psync", "--fsync=16", "--time_based",
         "--runtime=25", "--verify=crc32c", "--verify_fatal=1", "--output-format=json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(8)
    assert load.poll() is None, "fio finished before the snapshot; make it longer"
    snap = plugin.controller.CreateSnapshot(
        pb.CreateSnapshotRequest(name="snap-under-load", source_volume_id=vid)
    ).snapshot
    assert snap.ready_to_use and snap.size_bytes == 256 * MiB
    clone_source = pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id=vid))
    clone = create(plugin, "pvc-clone", cap, 256 * MiB, volume_content_source=clone_source)
    assert load.poll() is None, "fio finished during the copies; make it longer"
    out, err = load.communicate(timeout=600)
    assert load.returncode == 0, err  # no guest request failed while it was cut
    assert sum(job["error"] for job in json.loads(out[out.index("{") :])["jobs"]) == 0

    # the clone mounts and reads while its source is still published and in use
    clone_staging = workdir / "clone-staging"
    clone_staging.mkdir()
    stage(plugin, clone.volume_id, clone_staging, cap)
    assert (clone_staging / "before").read_bytes().startswith(b"written and synced")
    unstage(plugin, clone.volume_id, clone_staging)

    # the snapshot restores into a larger volume: it mounts (the journal replays, the file
    # system grows), holds what was synced, and then checks clean
    snap_source = pb.VolumeContentSource(
        snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id)
    )
    restored = create(plugin, "pvc-restored", cap, 512 * MiB, volume_content_source=snap_source)
    assert restored.content_source.snapshot.snapshot_id == snap.snapshot_id
    restored_staging = workdir / "restored-staging"
    restored_staging.mkdir()
    stage(plugin, restored.volume_id, restored_staging, cap)
    assert (restored_staging / "before").read_bytes().startswith(b"written and synced")
    df = run("df", "-B1", "--output=size", str(restored_staging)).stdout.split()
    assert int(df[-1]) > 400 * MiB
    unstage(plugin, restored.volume_id, restored_staging)
    stage(plugin, restored.volume_id, restored_staging, block_cap())
    check = run("e2fsck", "-fn", str(staged_device(plugin, restored.volume_id)), check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    unstage(plugin, restored.volume_id, restored_staging)

    unpublish(plugin, vid, target)
    unstage(plugin, vid, staging)
    for volume_id in (vid, clone.volume_id, restored.volume_id):
        plugin.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id))
    plugin.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))


def fio_rate(device: Path, rw: str, bs: str, seconds: int = 8) -> tuple[float, float]:
    """(IOPS, bytes per second) of a direct fio run, its first second left out."""
    result = run(
        "fio", "--name=qos", f"--filename={device}", "--direct=1", "--ioengine=libaio",
        f"--rw={rw}", f"--bs={bs}", "--iodepth=8", "--time_based", f"--runtime={seconds}",
        "--ramp_time=1", "--size=64M", "--output-format=json",
    )  # fmt: skip
    job = json.loads(result.stdout[result.stdout.index("{") :])["jobs"][0]
    side = job["read"] if rw.endswith("read") else job["write"]
    assert job["error"] == 0
    return float(side["iops"]), float(side["bw_bytes"])


def test_qos_limits_hold_and_change_live(plugin: Plugin, workdir: Path) -> None:
    cap = block_cap()
    params = {"writeIOPS": "150", "readBytesPerSecond": "4Mi", "burstMilliseconds": "100"}
    vid = create(plugin, "pvc-qos", cap, 128 * MiB, parameters=params).volume_id
    staging, target = workdir / "staging", workdir / "pod-dev"
    staging.mkdir()
    stage(plugin, vid, staging, cap)
    publish(plugin, vid, staging, target, cap)

    iops, _ = fio_rate(target, "randwrite", "4k")
    _, bps = fio_rate(target, "randread", "64k")
    print(f"QoS writeIOPS=150: {iops:.1f} IOPS; readBytesPerSecond=4Mi: {bps / MiB:.2f} MiB/s")
    # a limit holds (never more than 10 % over) and is not much lower than asked; a lab
    # guest short of CPU may fall below a rate, never rise above it
    assert 0.8 * 150 <= iops <= 1.1 * 150, iops
    assert 0.8 * 4 * MiB <= bps <= 1.1 * 4 * MiB, bps

    plugin.controller.ControllerModifyVolume(pb.ControllerModifyVolumeRequest(
        volume_id=vid, mutable_parameters={"writeIOPS": "400", "readBytesPerSecond": "0"},
    ))  # fmt: skip
    iops, _ = fio_rate(target, "randwrite", "4k")
    _, unlimited = fio_rate(target, "randread", "64k", seconds=4)
    print(f"after ModifyVolume writeIOPS=400: {iops:.1f} IOPS; reads unlimited: "
          f"{unlimited / MiB:.1f} MiB/s")  # fmt: skip
    assert 1.5 * 150 <= iops <= 1.1 * 400, iops  # the old limit is gone, the new one holds
    assert unlimited > 3 * bps, (unlimited, bps)

    # persisted: a restaged volume keeps its limits
    unpublish(plugin, vid, target)
    unstage(plugin, vid, staging)
    stage(plugin, vid, staging, cap)
    publish(plugin, vid, staging, target, cap)
    iops, _ = fio_rate(target, "randwrite", "4k", seconds=5)
    assert 1.5 * 150 <= iops <= 1.1 * 400, iops  # 400, not the first 150
    unpublish(plugin, vid, target)
    unstage(plugin, vid, staging)
    plugin.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))
