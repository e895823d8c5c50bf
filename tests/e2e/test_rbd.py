"""The RBD backend through the real VDUSE kernel, against a real single-node Ceph started
in the lab (tests/ceph/cluster.py)."""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from pydantic import SecretStr

from csi_vduse.backends import rbd
from csi_vduse.backends.rbd.pool import image_of as rbd_image_of
from csi_vduse.csi.proto import csi_pb2 as pb
from csi_vduse.dataplane.blk_device import BlkParams
from csi_vduse.lifecycle.attachment import Attachment
from tests.ceph.cluster import CephCluster, missing_binaries
from tests.csi_client import Plugin, block_cap, code_of, mount_cap
from tests.e2e.helpers import Export, assert_gone, run, wait_for
from tests.e2e.test_csi import create, read_direct
from tests.e2e.test_safety import staged_device, write_direct

MiB = 1 << 20
C = grpc.StatusCode
pytestmark = pytest.mark.any_kernel  # the kernel's part is the file backend's


@pytest.fixture(scope="module")
def ceph() -> Iterator[CephCluster]:
    assert not missing_binaries(), f"install Debian's ceph: {missing_binaries()}"
    assert rbd.available(), "this build has no librbd: install librbd-dev and rebuild"
    parent = Path(os.environ.get("LAB_SCRATCH", "/run/scratch"))
    parent.mkdir(parents=True, exist_ok=True)
    with CephCluster(parent=parent) as cluster:
        yield cluster


@pytest.fixture
def pool(ceph: CephCluster) -> Iterator[rbd.RbdCluster]:
    access = rbd.RbdAccess(
        monitors=ceph.monitors, user=ceph.user, key=SecretStr(ceph.key), pool=ceph.pool
    )
    with rbd.RbdCluster(access) as cluster:
        yield cluster


def test_fio_verify_depth_32_over_two_queues_lands_in_the_image(
    pool: rbd.RbdCluster, ceph: CephCluster, name: str, workdir: Path
) -> None:
    pool.create(name, 256 * MiB)
    backend = rbd.RbdBackend.open(pool, name)
    att = Attachment(name, backend, BlkParams(capacity=backend.size, queues=2, queue_size=256))
    dev = att.start()
    try:
        assert att.server is not None and att.server.engine == "asynchronous"
        out = run(
            "fio", "--name=verify", f"--filename={dev}", "--direct=1", "--ioengine=libaio",
            "--rw=randwrite", "--bs=4k", "--iodepth=32", "--numjobs=2", "--size=32M",
            "--offset_increment=64M", "--verify=crc32c", "--verify_fatal=1",
            "--do_verify=1", "--group_reporting", "--output-format=json",
        ).stdout  # fmt: skip
        job = json.loads(out[out.index("{") :])["jobs"][0]
        assert job["error"] == 0
        assert job["read"]["total_ios"] >= 2 * 8192  # the verify pass read everything back
        print(f"\nrbd: fio randwrite 4k qd32 x2 jobs verify: {job['write']['iops']:.0f} IOPS")
        assert all(n > 0 for n in att.server.queue_requests())
        assert att.server.stats()["errors"] == 0
        # a pattern written through the device, flushed, is what the rbd tool reads
        pattern = os.urandom(MiB)
        fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, MiB)  # page-aligned, as O_DIRECT wants
            buf.write(pattern)
            os.pwrite(fd, buf, 128 * MiB)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        att.stop()
        backend.close()
    assert_gone(name)
    image = workdir / "image"
    ceph.rbd("export", f"{ceph.pool}/{name}", str(image))
    with open(image, "rb") as f:
        f.seek(128 * MiB)
        assert f.read(MiB) == pattern
    assert pool.remove(name)


def test_a_second_node_cannot_write_an_image_in_use(pool: rbd.RbdCluster, name: str) -> None:
    pool.create(name, 16 * MiB)
    owner = rbd.RbdBackend.open(pool, name)
    att = Attachment(name, owner, BlkParams(capacity=owner.size))
    att.start()
    try:
        with rbd.RbdCluster(pool.access) as other, pytest.raises(rbd.RbdLockHeld):
            rbd.RbdBackend.open(other, name, lock_wait=2)
    finally:
        att.stop()
        owner.close()
    assert pool.remove(name)


def test_export_serves_an_image_and_a_restart_keeps_its_data(
    pool: rbd.RbdCluster, ceph: CephCluster, name: str, workdir: Path
) -> None:
    pool.create(name, 64 * MiB)
    keyfile = workdir / "key"
    keyfile.write_text(pool.access.key.get_secret_value())
    keyfile.chmod(0o600)
    args = ("--ceph-monitors", ceph.monitors, "--ceph-user", ceph.user,
            "--ceph-keyfile", str(keyfile), "--queues", "2")  # fmt: skip
    exp = Export(Path(f"rbd:{ceph.pool}/{name}"), name, *args)
    fio = ("fio", "--name=v", f"--filename={exp.device}", "--direct=1", "--ioengine=libaio",
           "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=16M", "--verify=crc32c",
           "--verify_fatal=1", "--randseed=7")  # fmt: skip
    run(*fio)
    assert exp.stop() == 0, exp.stderr
    assert ceph.key not in exp.stderr
    assert_gone(name)
    exp = Export(Path(f"rbd:{ceph.pool}/{name}"), name, *args)
    try:
        run(*fio, "--verify_only=1")  # what the first export wrote, read back
    finally:
        assert exp.stop() == 0, exp.stderr
    assert pool.remove(name)


def test_an_rbd_volume_through_csi_outlives_a_killed_plugin(
    plugin: Plugin, ceph: CephCluster, workdir: Path
) -> None:
    """The kubelet's sequence on a backend=rbd class: the secret comes with each call;
    the volume's record (formatted) lands in the image; a plugin killed under fio comes
    back, opens the image with the secret it kept and fails no I/O."""
    secrets = {"monitors": ceph.monitors, "userID": ceph.user, "userKey": ceph.key}
    cap = mount_cap()
    resp = plugin.controller.CreateVolume(pb.CreateVolumeRequest(
        name="pvc-rbd", capacity_range=pb.CapacityRange(required_bytes=128 * MiB),
        volume_capabilities=[cap], parameters={"backend": "rbd", "pool": ceph.pool},
        secrets=secrets,
    ))  # fmt: skip
    vid = resp.volume.volume_id
    assert not resp.volume.accessible_topology  # any node may stage it
    image = f"{ceph.pool}/{rbd_image_of(vid)[1]}"  # type: ignore[index]
    staging, target = workdir / "s", workdir / "t"
    staging.mkdir()
    request = pb.NodeStageVolumeRequest(
        volume_id=vid, staging_target_path=str(staging), volume_capability=cap
    )
    assert code_of(lambda: plugin.node.NodeStageVolume(request)) == C.INVALID_ARGUMENT
    request.secrets.update(secrets)
    plugin.node.NodeStageVolume(request)
    unpublish = pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(target))
    unstage = pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(staging))
    kept = workdir / "state" / "ceph-access" / f"{vid}.json"
    delete = pb.DeleteVolumeRequest(volume_id=vid, secrets=secrets)
    try:
        assert '"formatted":true' in ceph.rbd("image-meta", "get", image, "csi-vduse.record")
        assert kept.stat().st_mode & 0o077 == 0
        plugin.node.NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id=vid, staging_target_path=str(staging), target_path=str(target),
            volume_capability=cap,
        ))  # fmt: skip
        fio = subprocess.Popen(
            ["fio", "--name=rbd", f"--filename={target / 'data'}", "--direct=1",
             "--ioengine=libaio", "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=32M",
             "--verify=crc32c", "--verify_fatal=1", "--output-format=json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        threading.Event().wait(1.5)
        assert fio.poll() is None, "fio finished before the kill; make it longer"
        plugin.stop(signal.SIGKILL)
        plugin.start()  # waits out the dead process's lock on the image
        out, err = fio.communicate(timeout=600)
        assert fio.returncode == 0, err
        assert json.loads(out[out.index("{") :])["jobs"][0]["error"] == 0

        assert code_of(lambda: plugin.controller.DeleteVolume(delete)) == C.FAILED_PRECONDITION
        grown = plugin.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
            volume_id=vid, capacity_range=pb.CapacityRange(required_bytes=256 * MiB),
            secrets=secrets,
        ))  # fmt: skip
        assert grown.capacity_bytes == 256 * MiB and grown.node_expansion_required
        plugin.node.NodeExpandVolume(pb.NodeExpandVolumeRequest(
            volume_id=vid, volume_path=str(target),
            capacity_range=pb.CapacityRange(required_bytes=256 * MiB),
        ))  # fmt: skip
        assert os.statvfs(target).f_blocks * os.statvfs(target).f_frsize > 200 * MiB
    finally:  # a device left without its server would hang the fixture's unmounts
        with contextlib.suppress(grpc.RpcError):
            plugin.node.NodeUnpublishVolume(unpublish)
        plugin.node.NodeUnstageVolume(unstage)
    assert not kept.exists()
    assert_gone(vid)
    plugin.controller.DeleteVolume(delete)
    assert rbd_image_of(vid)[1] not in ceph.rbd("ls", ceph.pool)  # type: ignore[index]
    assert ceph.key not in plugin.log.read_text()


HEALTH_PORT = 9812


def livez() -> int:
    """/livez's HTTP status; 0 while nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{HEALTH_PORT}/livez", timeout=5) as got:
            return int(got.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0


def served(p: Plugin, vid: str, path: Path) -> bool:
    stats = p.node.NodeGetVolumeStats(
        pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=str(path))
    )
    return "served by" in stats.volume_condition.message


@pytest.fixture
def outage(ceph: CephCluster, workdir: Path) -> Iterator[Plugin]:
    """A plugin with a health port; Ceph answers again and the plugin stops whatever the
    test left."""
    p = Plugin(workdir, "node-1", "", "--reconcile-interval=1",
               f"--health-address=127.0.0.1:{HEALTH_PORT}")  # fmt: skip
    yield p
    ceph.resume()
    if p.proc is not None and p.proc.poll() is None:
        p.stop()
    print("plugin log (tail):\n" + "\n".join(p.log.read_text().splitlines()[-60:]))


def test_a_ceph_outage_stops_only_the_rbd_volumes(
    outage: Plugin, ceph: CephCluster, workdir: Path
) -> None:
    """The plugin restarts while Ceph answers nothing: its socket and /livez come at once,
    the file volume is served, 20 stages of RBD volumes never starve the liveness check,
    the RBD volume is abnormal until Ceph is back and then served again by itself."""
    plugin = outage
    secrets = {"monitors": ceph.monitors, "userID": ceph.user, "userKey": ceph.key}
    rbd_class = {"backend": "rbd", "pool": ceph.pool}
    cap = block_cap()
    file_vid = create(plugin, "pvc-file", cap)
    rbd_vids = [
        plugin.controller.CreateVolume(pb.CreateVolumeRequest(
            name=f"pvc-rbd-{i}", capacity_range=pb.CapacityRange(required_bytes=16 * MiB),
            volume_capabilities=[cap], parameters=rbd_class, secrets=secrets,
        )).volume.volume_id
        for i in range(21)
    ]  # fmt: skip
    rbd_vid = rbd_vids[0]
    staged = {file_vid: workdir / "file", rbd_vid: workdir / "rbd"}
    for vid, path in staged.items():
        path.mkdir()
        plugin.node.NodeStageVolume(pb.NodeStageVolumeRequest(
            volume_id=vid, staging_target_path=str(path), volume_capability=cap, secrets=secrets,
        ))  # fmt: skip
    devices = {vid: staged_device(workdir, vid) for vid in staged}
    payload = os.urandom(MiB)
    for device in devices.values():
        write_direct(device, 0, payload)
    assert plugin.stop(signal.SIGTERM) == 0  # an upgrade: the devices stay staged
    ceph.pause()
    started = time.monotonic()
    plugin.start()
    stats = plugin.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(
        volume_id=rbd_vid, volume_path=str(staged[rbd_vid])))  # fmt: skip
    # the socket came while the RBD volume's re-attach still waits for the monitors (30 s)
    condition = stats.volume_condition
    assert condition.abnormal and "in progress" in condition.message, condition.message
    assert wait_for(lambda: livez() == 200, 30), "no /livez 200 within 30 s of the socket"
    assert time.monotonic() - started < 60
    assert read_direct(devices[file_vid], MiB) == payload  # served, Ceph or not
    assert wait_for(lambda: served(plugin, file_vid, staged[file_vid]), 30)

    codes: list[grpc.StatusCode] = []

    def stage_one(vid: str) -> None:
        path = workdir / f"s-{vid[-8:]}"
        path.mkdir()
        request = pb.NodeStageVolumeRequest(
            volume_id=vid, staging_target_path=str(path), volume_capability=cap,
            secrets=secrets,
        )  # fmt: skip
        codes.append(code_of(lambda: plugin.node.NodeStageVolume(request, timeout=300)))

    stages = [threading.Thread(target=stage_one, args=(v,)) for v in rbd_vids[1:]]
    for thread in stages:
        thread.start()
    answers: list[int] = []
    while any(t.is_alive() for t in stages) and len(answers) < 60:
        answers.append(livez())
        time.sleep(1)
    for thread in stages:
        thread.join(300)
        assert not thread.is_alive(), "a NodeStageVolume unanswered after 300 s"
    assert answers and set(answers) == {200}, answers
    assert C.OK not in codes and C.ABORTED in codes, codes  # 12 wait for Ceph at most

    ceph.resume()
    assert wait_for(lambda: served(plugin, rbd_vid, staged[rbd_vid]), 180), (
        "the RBD volume not served again within 180 s of Ceph's return"
    )
    assert read_direct(devices[rbd_vid], MiB) == payload
    for vid, path in staged.items():
        plugin.node.NodeUnstageVolume(
            pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(path))
        )
    assert not list((workdir / "state" / "ceph-access").glob("*.json"))
    for vid in rbd_vids:
        plugin.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid, secrets=secrets))
