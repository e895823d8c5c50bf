"""`csi-vduse export` against the real VDUSE kernel."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from csi_vduse.backends.file import FileBackend
from csi_vduse.dataplane.blk_device import BlkParams
from csi_vduse.kernel import sysfs
from csi_vduse.kernel.vdpa import VdpaClient
from csi_vduse.lifecycle.attachment import Attachment, DeviceBusy
from tests.e2e.helpers import Export, allocated_bytes, assert_gone, run, sha256_file

MiB = 1 << 20


def test_filesystem_data_survives_a_restart_of_the_export(workdir: Path, name: str) -> None:
    image = workdir / "disk.img"
    mnt = workdir / "mnt"
    mnt.mkdir()
    exp = Export(image, name, "--size", "1G")
    assert image.stat().st_size == 1 << 30
    assert allocated_bytes(image) == 0  # created sparse
    run("mkfs.ext4", "-q", "-E", "nodiscard", str(exp.device))
    run("mount", str(exp.device), str(mnt))
    with open(mnt / "random.bin", "wb") as f:
        for _ in range(256):
            f.write(os.urandom(MiB))
    before = sha256_file(mnt / "random.bin")
    run("umount", str(mnt))
    assert exp.stop() == 0, exp.stderr
    assert_gone(name)

    exp = Export(image, name)  # size from the existing file; never truncated
    assert image.stat().st_size == 1 << 30
    run("mount", str(exp.device), str(mnt))
    assert sha256_file(mnt / "random.bin") == before
    run("umount", str(mnt))
    assert exp.stop() == 0


def test_fio_verify_random_writes_depth_32_over_two_queues(workdir: Path, name: str) -> None:
    backend = FileBackend.open(workdir / "fio.img", 256 * MiB)
    att = Attachment(name, backend, BlkParams(capacity=backend.size, queues=2, queue_size=256))
    dev = att.start()
    try:
        assert len(list(Path(f"/sys/block/{dev.name}/mq").iterdir())) == 2
        out = run(
            "fio", "--name=verify", f"--filename={dev}", "--direct=1", "--ioengine=libaio",
            "--rw=randwrite", "--bs=4k", "--iodepth=32", "--numjobs=2", "--size=64M",
            "--offset_increment=64M", "--verify=crc32c", "--verify_fatal=1",
            "--do_verify=1", "--group_reporting", "--output-format=json",
        ).stdout  # fmt: skip
        report = json.loads(out[out.index("{") :])
        job = report["jobs"][0]
        assert job["error"] == 0
        assert job["write"]["total_ios"] >= 2 * 16384
        assert job["read"]["total_ios"] >= 2 * 16384  # the verify pass read everything back
        print(f"\nfio randwrite 4k qd32 x2 jobs verify: {job['write']['iops']:.0f} IOPS")
        assert att.server is not None
        per_queue = att.server.queue_requests()
        assert len(per_queue) == 2 and all(n > 0 for n in per_queue), per_queue
        assert att.server.stats()["errors"] == 0
    finally:
        att.stop()
        backend.close()
    assert_gone(name)
    assert not [t for t in threading.enumerate() if t.name.startswith(f"vduse-{name}")]


def test_flush_puts_the_data_in_the_backing_file(workdir: Path, name: str) -> None:
    backend = FileBackend.open(workdir / "flush.img", 64 * MiB)
    att = Attachment(name, backend, BlkParams(capacity=backend.size))
    dev = att.start()
    try:
        assert att.server is not None
        flushes = att.server.stats()["flushes"]
        payload = os.urandom(MiB)
        fd = os.open(dev, os.O_WRONLY)
        try:
            os.pwrite(fd, payload, 3 * MiB)  # buffered: sits in the guest page cache
            os.fsync(fd)  # writes back, then sends FLUSH
        finally:
            os.close(fd)
        assert att.server.stats()["flushes"] > flushes
        with open(workdir / "flush.img", "rb") as f:
            f.seek(3 * MiB)
            assert f.read(MiB) == payload
    finally:
        att.stop()
        backend.close()


def test_discard_lowers_the_allocated_blocks(workdir: Path, name: str) -> None:
    image = workdir / "discard.img"
    exp = Export(image, name, "--size", "128M")
    try:
        run("dd", "if=/dev/urandom", f"of={exp.device}", "bs=1M", "count=32", "oflag=direct")
        full = allocated_bytes(image)
        assert full >= 32 * MiB
        run("blkdiscard", "--offset", "0", "--length", str(32 * MiB), str(exp.device))
        assert allocated_bytes(image) <= full - 30 * MiB
        run("blkdiscard", "--zeroout", "--offset", "0", "--length", str(MiB), str(exp.device))
        with open(exp.device, "rb") as f:
            assert f.read(MiB) == bytes(MiB)
    finally:
        assert exp.stop() == 0


def test_device_identity_and_geometry(workdir: Path, name: str) -> None:
    exp = Export(workdir / "id.img", name, "--size", "64M", "--queues", "2")
    try:
        block = Path("/sys/block") / exp.device.name
        assert (block / "serial").read_text().strip() == name[:20]
        assert int((block / "size").read_text()) == 64 * MiB // 512
        assert (block / "ro").read_text().strip() == "0"
        assert int((block / "queue" / "discard_max_bytes").read_text()) > 0
        assert (Path("/sys/bus/vdpa/devices") / name / "driver").resolve().name == "virtio_vdpa"
        dev = VdpaClient().get(name)
        assert dev is not None and dev.mgmtdev == "vduse" and dev.max_vqs == 2
    finally:
        assert exp.stop() == 0


def test_readonly_export_refuses_writes(workdir: Path, name: str) -> None:
    image = workdir / "ro.img"
    image.write_bytes(b"\x42" * MiB)
    exp = Export(image, name, "--readonly")
    try:
        assert (Path("/sys/block") / exp.device.name / "ro").read_text().strip() == "1"
        with open(exp.device, "rb") as f:
            assert f.read(MiB) == b"\x42" * MiB
        with pytest.raises(OSError), open(exp.device, "r+b", buffering=0) as f:
            f.write(b"\0" * 4096)
            os.fsync(f.fileno())
    finally:
        assert exp.stop() == 0
    assert image.read_bytes() == b"\x42" * MiB


def test_two_devices_are_independent_and_a_duplicate_name_disturbs_nothing(
    workdir: Path, name: str
) -> None:
    a = Export(workdir / "a.img", name, "--size", "64M")
    b = Export(workdir / "b.img", f"{name}-b", "--size", "64M")
    try:
        for exp, byte in ((a, b"\xaa"), (b, b"\xbb")):
            with open(exp.device, "r+b", buffering=0) as f:
                f.write(byte * MiB)
                os.fsync(f.fileno())
        dup = run("python", "-m", "csi_vduse", "export", str(workdir / "c.img"),
                  "--name", name, "--size", "64M", check=False)  # fmt: skip
        assert dup.returncode != 0
        assert "already exists" in dup.stderr and len(dup.stderr.strip().splitlines()) == 1
        assert not (workdir / "c.img").exists()
        same_file = run("python", "-m", "csi_vduse", "export", str(workdir / "a.img"),
                        "--name", f"{name}-c", check=False)  # fmt: skip
        assert same_file.returncode != 0 and "already served" in same_file.stderr
        assert_gone(f"{name}-c")
        for exp, byte in ((a, b"\xaa"), (b, b"\xbb")):
            with open(exp.device, "rb") as f:
                assert f.read(MiB) == byte * MiB
    finally:
        assert a.stop() == 0
        assert b.stop() == 0
    assert_gone(name)
    assert_gone(f"{name}-b")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{dir}/missing/disk.img", "--size", "1G"], "does not exist"),
        (["{dir}/disk.img", "--size", "0"], "greater than zero"),
        (["{dir}/disk.img", "--size", "1G", "--name", "n" * 256], "the kernel allows 255"),
        (["{dir}/disk.img", "--size", "1000"], "multiple of 512"),
        (["{dir}/disk.img", "--size", "1G", "--queue-size", "100"], "power of two"),
        (["{dir}/disk.img", "--size", "1G", "--name", "../evil"], "may hold only"),
    ],
)
@pytest.mark.any_kernel
def test_bad_export_arguments_fail_in_one_line_and_create_nothing(
    workdir: Path, name: str, args: list[str], message: str
) -> None:
    argv = [a.format(dir=workdir) for a in args]
    if "--name" not in argv:
        argv += ["--name", name]
    before_devs = {d.name for d in VdpaClient().list()}
    result = run("python", "-m", "csi_vduse", "export", *argv, check=False)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert sorted(os.listdir(workdir)) == []
    assert sorted(os.listdir("/dev/vduse")) == ["control"]
    assert {d.name for d in VdpaClient().list()} == before_devs


def test_teardown_refuses_while_mounted(workdir: Path, name: str) -> None:
    backend = FileBackend.open(workdir / "busy.img", 64 * MiB)
    att = Attachment(name, backend, BlkParams(capacity=backend.size))
    dev = att.start()
    mnt = workdir / "mnt"
    mnt.mkdir()
    run("mkfs.ext4", "-q", str(dev))
    run("mount", str(dev), str(mnt))
    try:
        with pytest.raises(DeviceBusy, match="mounted at"):
            att.stop()
        (mnt / "still-here").write_text("ok")
    finally:
        run("umount", str(mnt))
    att.stop()
    backend.close()
    assert_gone(name)


def test_vhost_vdpa_export_serves_until_its_vmm_lets_go(workdir: Path, name: str) -> None:
    exp = Export(workdir / "vm.img", name, "--size", "16M", "--attach", "vhost-vdpa")
    try:
        assert exp.device.name.startswith("vhost-vdpa-")
        assert stat.S_ISCHR(exp.device.stat().st_mode)
        assert sysfs.bound_driver(name) == sysfs.VHOST_VDPA
        vmm = os.open(exp.device, os.O_RDWR)  # what a VMM holds while its guest runs
        try:
            exp.proc.send_signal(signal.SIGTERM)
            with pytest.raises(subprocess.TimeoutExpired):
                exp.proc.wait(timeout=3)
            assert VdpaClient().get(name) is not None
        finally:
            os.close(vmm)
        assert exp.proc.wait(timeout=30) == 0
    finally:
        if exp.proc.poll() is None:
            exp.proc.kill()
    assert_gone(name)


def test_doctor_reports_a_ready_host() -> None:
    result = run("python", "-m", "csi_vduse", "doctor", check=False)
    assert result.returncode == 0, result.stdout
    assert "FAIL" not in result.stdout
