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
from tests.csi_client import Plugin, code_of, mount_cap
from tests.e2e.helpers import Export, assert_gone, run

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
