"""The CSI driver as kubelet and the sidecars drive it, over real gRPC, with real VDUSE
devices, mounts and file systems."""

from __future__ import annotations

import json
import mmap
import os
import signal
import subprocess
import threading
from pathlib import Path

import grpc
import pytest

from csi_vduse.csi.proto import csi_pb2 as pb
from csi_vduse.kernel.vdpa import VdpaClient
from csi_vduse.lifecycle.mounts import mount_at
from tests.csi_client import MiB, Mode, Plugin, block_cap, code_of, error_of, mount_cap
from tests.e2e.helpers import mounts_under, run

C = grpc.StatusCode


def create(p: Plugin, name: str, cap: pb.VolumeCapability, size: int = 64 * MiB) -> str:
    resp = p.controller.CreateVolume(pb.CreateVolumeRequest(
        name=name, capacity_range=pb.CapacityRange(required_bytes=size),
        volume_capabilities=[cap],
    ))  # fmt: skip
    return str(resp.volume.volume_id)


def stage(p: Plugin, vid: str, path: Path, cap: pb.VolumeCapability) -> None:
    p.node.NodeStageVolume(pb.NodeStageVolumeRequest(
        volume_id=vid, staging_target_path=str(path), volume_capability=cap))  # fmt: skip


def unstage(p: Plugin, vid: str, path: Path) -> None:
    p.node.NodeUnstageVolume(
        pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(path))
    )


def publish(p: Plugin, vid: str, staging: Path, target: Path, cap: pb.VolumeCapability,
            readonly: bool = False) -> None:  # fmt: skip
    p.node.NodePublishVolume(pb.NodePublishVolumeRequest(
        volume_id=vid, staging_target_path=str(staging), target_path=str(target),
        volume_capability=cap, readonly=readonly))  # fmt: skip


def unpublish(p: Plugin, vid: str, target: Path) -> None:
    p.node.NodeUnpublishVolume(
        pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(target))
    )


def read_direct(path: Path, size: int) -> bytes:
    """Reads around the page cache, so the data plane must answer."""
    buf = mmap.mmap(-1, size)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.preadv(fd, [buf], 0) == size
    finally:
        os.close(fd)
    return bytes(buf)


def device_count() -> int:
    return len([d for d in os.listdir("/dev/vduse") if d != "control"])


def test_filesystem_volume_through_the_kubelet_sequence(plugin: Plugin, workdir: Path) -> None:
    cap = mount_cap("ext4")
    vid = create(plugin, "pvc-fs", cap)
    image = workdir / "data" / "volumes" / f"{vid}.img"
    staging = workdir / "globalmount"
    staging.mkdir()
    pods = [workdir / "pod-a" / "mount", workdir / "pod-b" / "mount"]
    for t in pods:
        t.parent.mkdir()

    stage(plugin, vid, staging, cap)
    stage(plugin, vid, staging, cap)  # idempotent
    for t in pods:
        publish(plugin, vid, staging, t, cap)
        publish(plugin, vid, staging, t, cap)
    payload = os.urandom(3 * MiB)
    (pods[0] / "data.bin").write_bytes(payload)
    assert (pods[1] / "data.bin").read_bytes() == payload
    stats = plugin.node.NodeGetVolumeStats(
        pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=str(pods[1]))
    )
    units = {u.unit: u for u in stats.usage}
    assert units[pb.VolumeUsage.BYTES].used >= 3 * MiB
    assert units[pb.VolumeUsage.INODES].total > 0
    assert not stats.volume_condition.abnormal

    # unstage refuses while a pod still has it
    code, message = error_of(lambda: unstage(plugin, vid, staging))
    assert code == C.FAILED_PRECONDITION and "in use" in message
    for t in pods:
        unpublish(plugin, vid, t)
        unpublish(plugin, vid, t)
        assert not t.exists()
    unstage(plugin, vid, staging)
    unstage(plugin, vid, staging)
    assert device_count() == 0 and mount_at(staging) is None

    stage(plugin, vid, staging, cap)  # must not reformat
    publish(plugin, vid, staging, pods[0], cap)
    assert (pods[0] / "data.bin").read_bytes() == payload

    grown = plugin.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
        volume_id=vid, capacity_range=pb.CapacityRange(required_bytes=128 * MiB)))  # fmt: skip
    assert grown.node_expansion_required
    before = os.statvfs(pods[0])
    resp = plugin.node.NodeExpandVolume(pb.NodeExpandVolumeRequest(
        volume_id=vid, volume_path=str(pods[0]),
        capacity_range=pb.CapacityRange(required_bytes=128 * MiB)))  # fmt: skip
    assert resp.capacity_bytes == 128 * MiB
    after = os.statvfs(pods[0])
    assert after.f_blocks * after.f_frsize > 1.8 * before.f_blocks * before.f_frsize
    df = run("df", "-B1", "--output=size", str(pods[0])).stdout.split()[-1]
    assert int(df) > 100 * MiB
    assert (pods[0] / "data.bin").read_bytes() == payload

    unpublish(plugin, vid, pods[0])
    unstage(plugin, vid, staging)
    plugin.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))
    assert not image.exists()
    assert VdpaClient().get(vid) is None


def test_block_volume_through_the_kubelet_sequence(plugin: Plugin, workdir: Path) -> None:
    cap = block_cap()
    vid = create(plugin, "pvc-block", cap)
    staging = workdir / "staging"
    staging.mkdir()
    (workdir / "pod").mkdir()
    targets = [workdir / "pod" / "dev-a", workdir / "pod" / "dev-b"]
    stage(plugin, vid, staging, cap)
    for t in targets:
        publish(plugin, vid, staging, t, cap)
        publish(plugin, vid, staging, t, cap)
    payload = os.urandom(MiB)
    buf = mmap.mmap(-1, MiB)  # page-aligned, as O_DIRECT wants
    buf[:] = payload
    fd = os.open(targets[0], os.O_WRONLY | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [buf], 4 * MiB) == MiB
    finally:
        os.close(fd)
    with open(targets[1], "rb") as f:
        f.seek(4 * MiB)
        assert f.read(MiB) == payload
    with open(workdir / "data" / "volumes" / f"{vid}.img", "rb") as f:
        f.seek(4 * MiB)
        assert f.read(MiB) == payload
    stats = plugin.node.NodeGetVolumeStats(
        pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=str(targets[0]))
    )
    assert stats.usage[0].total == 64 * MiB
    code, _ = error_of(lambda: unstage(plugin, vid, staging))
    assert code == C.FAILED_PRECONDITION
    for t in targets:
        unpublish(plugin, vid, t)
        assert not t.exists()
    unstage(plugin, vid, staging)
    stage(plugin, vid, staging, cap)
    publish(plugin, vid, staging, targets[0], cap, readonly=True)
    with open(targets[0], "rb") as f:
        f.seek(4 * MiB)
        assert f.read(MiB) == payload
    unpublish(plugin, vid, targets[0])
    unstage(plugin, vid, staging)
    plugin.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))
    assert device_count() == 0


def test_stage_racing_itself_gives_one_success_and_aborted(plugin: Plugin, workdir: Path) -> None:
    cap = mount_cap("xfs")
    vid = create(plugin, "pvc-race", cap, size=320 * MiB)
    staging = workdir / "staging"
    staging.mkdir()
    barrier = threading.Barrier(2)
    codes: list[grpc.StatusCode] = []

    def go() -> None:
        barrier.wait()
        codes.append(code_of(lambda: stage(plugin, vid, staging, cap)))

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "a NodeStageVolume still unanswered after 120 s"
    assert sorted(codes, key=str) == sorted([C.OK, C.ABORTED], key=str)
    assert mount_at(staging) is not None
    assert mount_at(staging).fs_type == "xfs"  # type: ignore[union-attr]
    unstage(plugin, vid, staging)


@pytest.mark.parametrize(
    ("what", "volume_id", "cap", "staging", "code"),
    [
        ("id with slash", "vduse-../../x", mount_cap(), "ok", C.INVALID_ARGUMENT),
        ("id with dot-dot", "..", mount_cap(), "ok", C.INVALID_ARGUMENT),
        ("id with NUL", "vduse-\0", mount_cap(), "ok", C.INVALID_ARGUMENT),
        ("unknown id", "vduse-" + "0" * 40, mount_cap(), "ok", C.NOT_FOUND),
        ("missing capability", "ours", None, "ok", C.INVALID_ARGUMENT),
        ("multi-node mode", "ours", mount_cap(mode=Mode.MULTI_NODE_MULTI_WRITER), "ok",
         C.INVALID_ARGUMENT),
        ("unknown fs", "ours", mount_cap("ntfs"), "ok", C.INVALID_ARGUMENT),
        ("missing staging path", "ours", mount_cap(), "missing", C.INVALID_ARGUMENT),
        ("relative staging path", "ours", mount_cap(), "relative", C.INVALID_ARGUMENT),
    ],
)  # fmt: skip
@pytest.mark.any_kernel
def test_bad_stage_requests_leave_nothing_behind(
    shared_plugin: Plugin, what: str, volume_id: str,
    cap: pb.VolumeCapability | None, staging: str, code: grpc.StatusCode,
) -> None:  # fmt: skip
    plugin, root = shared_plugin, shared_plugin.root
    work = root / what.replace(" ", "-")
    work.mkdir()
    vid = create(plugin, "pvc-bad", mount_cap()) if volume_id == "ours" else volume_id
    path = {"ok": work / "staging", "missing": work / "nope" / "staging",
            "relative": Path("staging")}[staging]  # fmt: skip
    if staging == "ok":
        path.mkdir()
    req = pb.NodeStageVolumeRequest(volume_id=vid, staging_target_path=str(path))
    if cap is not None:
        req.volume_capability.CopyFrom(cap)
    got, message = error_of(lambda: plugin.node.NodeStageVolume(req))
    assert got == code, f"{what}: {got} {message}"
    assert message
    assert device_count() == 0
    assert not mounts_under(root)
    assert not list((root / "state" / "staged").glob("*.json"))


def test_every_call_twice_gives_the_same_answer(plugin: Plugin, workdir: Path) -> None:
    cap = mount_cap()
    create_req = pb.CreateVolumeRequest(
        name="pvc-twice", capacity_range=pb.CapacityRange(required_bytes=32 * MiB),
        volume_capabilities=[cap],
    )  # fmt: skip
    vid = plugin.controller.CreateVolume(create_req).volume.volume_id
    staging, target = workdir / "s", workdir / "t"
    staging.mkdir()
    calls = [
        lambda: plugin.controller.CreateVolume(create_req),
        lambda: plugin.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vid)),
        lambda: plugin.node.NodeGetInfo(pb.NodeGetInfoRequest()),
        lambda: plugin.node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest()),
        lambda: stage(plugin, vid, staging, cap),
        lambda: publish(plugin, vid, staging, target, cap),
        lambda: plugin.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
            volume_id=vid, capacity_range=pb.CapacityRange(required_bytes=48 * MiB))),
        lambda: plugin.node.NodeExpandVolume(pb.NodeExpandVolumeRequest(
            volume_id=vid, volume_path=str(target),
            capacity_range=pb.CapacityRange(required_bytes=48 * MiB))),
        lambda: unpublish(plugin, vid, target),
        lambda: unstage(plugin, vid, staging),
        lambda: plugin.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid)),
    ]  # fmt: skip
    for call in calls:
        first, second = call(), call()
        assert first == second
    info = plugin.node.NodeGetInfo(pb.NodeGetInfoRequest())
    assert info.node_id == "node-1" and info.max_volumes_per_node == 64
    assert dict(info.accessible_topology.segments) == {"topology.vduse.csi.dev/node": "node-1"}


@pytest.mark.any_kernel
def test_a_formatted_volume_is_never_reformatted(plugin: Plugin, workdir: Path) -> None:
    cap = mount_cap()
    vid = create(plugin, "pvc-keep", cap)
    staging = workdir / "s"
    staging.mkdir()
    stage(plugin, vid, staging, cap)
    unstage(plugin, vid, staging)
    image = workdir / "data" / "volumes" / f"{vid}.img"
    with open(image, "r+b") as f:  # the signature is lost (a failing disk, say)
        f.seek(1024)
        f.write(bytes(4096))
    code, message = error_of(lambda: stage(plugin, vid, staging, cap))
    assert code == C.FAILED_PRECONDITION and "refusing to format" in message
    assert device_count() == 0
    code, _ = error_of(lambda: stage(plugin, vid, staging, mount_cap("xfs")))
    assert code == C.FAILED_PRECONDITION


def test_plugin_restart_keeps_serving_and_no_io_fails(plugin: Plugin, workdir: Path) -> None:
    cap = block_cap()
    vid = create(plugin, "pvc-restart", cap, size=128 * MiB)
    staging = workdir / "s"
    staging.mkdir()
    stage(plugin, vid, staging, cap)
    device = json.loads((workdir / "state" / "staged" / f"{vid}.json").read_text())["device"]
    fio = subprocess.Popen(
        ["fio", "--name=restart", f"--filename={device}", "--direct=1", "--ioengine=libaio",
         "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=32M", "--verify=crc32c",
         "--verify_fatal=1", "--time_based=0", "--output-format=json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    threading.Event().wait(1.5)
    assert fio.poll() is None, "fio finished before the restart; make it longer"
    plugin.stop(signal.SIGKILL)  # the process dies with requests in flight
    plugin.start()
    out, err = fio.communicate(timeout=600)
    assert fio.returncode == 0, err
    report = json.loads(out[out.index("{") :])
    assert report["jobs"][0]["error"] == 0

    # A graceful stop (an upgrade) leaves the volume staged; the next process serves it.
    before = read_direct(Path(device), MiB)
    assert plugin.stop(signal.SIGTERM) == 0
    assert device_count() == 1
    plugin.start()
    assert read_direct(Path(device), MiB) == before
    unstage(plugin, vid, staging)
    assert device_count() == 0


@pytest.mark.any_kernel
@pytest.mark.parametrize("block", [False, True])
def test_a_single_writer_volume_is_published_once(
    plugin: Plugin, workdir: Path, block: bool
) -> None:
    cap = (block_cap if block else mount_cap)(mode=Mode.SINGLE_NODE_SINGLE_WRITER)
    vid = create(plugin, "pvc-single", cap)
    staging = workdir / "staging"
    staging.mkdir()
    stage(plugin, vid, staging, cap)
    first, second = workdir / "pod-a" / "t", workdir / "pod-b" / "t"
    for t in (first, second):
        t.parent.mkdir()
    publish(plugin, vid, staging, first, cap)
    publish(plugin, vid, staging, first, cap)  # the same publication again: fine
    code, message = error_of(lambda: publish(plugin, vid, staging, second, cap))
    assert code == C.FAILED_PRECONDITION and str(first) in message
    assert not second.exists()
    code = code_of(lambda: publish(plugin, vid, staging, workdir / "gone" / "t", cap))
    assert code == C.FAILED_PRECONDITION  # a missing parent is not a missing volume
    unpublish(plugin, vid, first)
    publish(plugin, vid, staging, second, cap)  # once the first is gone
    unpublish(plugin, vid, second)
    unstage(plugin, vid, staging)
    plugin.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))
