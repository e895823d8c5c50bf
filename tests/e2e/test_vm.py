"""Virtual machines on csi-vduse volumes: QEMU 10 in the lab boots a tiny guest (see
tests/e2e/guest) from a volume staged and published through CSI. Software emulation inside
software emulation: every boot takes a while; the guest does as little as it can."""

from __future__ import annotations

import signal
import stat
import time
from pathlib import Path

import grpc
import pytest

from csi_vduse.csi.proto import csi_pb2 as pb
from csi_vduse.kernel import sysfs
from tests.csi_client import MiB, Plugin, block_cap, code_of, mount_cap
from tests.e2e.guest import NestedGuest
from tests.e2e.test_csi import create, publish, stage, unpublish, unstage

C = grpc.StatusCode
BOOT_TIMEOUT = 600
# The guest's pattern (tests/e2e/guest/init.c): its marks at 0, its data at 1 MiB.
DATA_OFF, DATA_LEN, SEED = 1 << 20, 4 << 20, 0xC51
DONE_MARK = b"CSI-VDUSE-DONE!\0"


def expected_pattern(off: int, length: int, seed: int) -> bytes:
    """What the guest writes at `off`: 8-byte groups of a 32-bit hash, twice, little-endian."""
    assert off % 8 == 0 and length % 8 == 0
    first = off // 8
    return b"".join(
        ((((i * 2654435761) & 0xFFFFFFFF) ^ seed).to_bytes(4, "little") * 2)
        for i in range(first, first + length // 8)
    )


def assert_guest_data(image: Path) -> None:
    with open(image, "rb") as f:
        assert f.read(len(DONE_MARK)) == DONE_MARK, "the guest never marked the disk verified"
        f.seek(DATA_OFF)
        assert f.read(DATA_LEN) == expected_pattern(DATA_OFF, DATA_LEN, SEED)


def vhost_volume(p: Plugin, workdir: Path, name: str) -> tuple[str, Path, Path]:
    """A vhost-vdpa volume staged and published as a pod would get it; returns the id, the
    staging path and the device node in the published volume."""
    cap = mount_cap()
    resp = p.controller.CreateVolume(pb.CreateVolumeRequest(
        name=name, capacity_range=pb.CapacityRange(required_bytes=64 * MiB),
        volume_capabilities=[cap], parameters={"attach": "vhost-vdpa"},
    ))  # fmt: skip
    vid = str(resp.volume.volume_id)
    staging, target = workdir / "staging", workdir / "pod-volume"
    staging.mkdir()
    assert code_of(lambda: stage(p, vid, staging, block_cap())) == C.INVALID_ARGUMENT
    assert not (Path("/dev/vduse") / vid).exists()
    stage(p, vid, staging, cap)
    publish(p, vid, staging, target, cap)
    publish(p, vid, staging, target, cap)  # idempotent
    read_only = code_of(lambda: publish(p, vid, staging, workdir / "ro", cap, readonly=True))
    assert read_only == C.INVALID_ARGUMENT
    assert sysfs.bound_driver(vid) == sysfs.VHOST_VDPA
    node = target / "vhost-vdpa"
    host = Path("/dev") / str(sysfs.vhost_device_name(vid))
    assert stat.S_ISCHR(node.stat().st_mode) and node.stat().st_rdev == host.stat().st_rdev
    return vid, staging, node


def vhost_disk(node: Path) -> list[str]:
    return ["-device", f"vhost-vdpa-device-pci,vhostdev={node}"]


@pytest.mark.timeout(3 * BOOT_TIMEOUT)
def test_vm_on_a_vhost_vdpa_volume_survives_reboot_and_plugin_kill(
    plugin: Plugin, workdir: Path
) -> None:
    """Boot 1 writes and flushes; the reboot resets and re-negotiates the device; boot 2 reads
    the data back and then does I/O while the plugin is killed and started again."""
    vid, staging, node = vhost_volume(plugin, workdir, "pvc-vm-vhost")
    guest = NestedGuest(workdir, vhost_disk(node), append="csi_vduse.soak=40")
    try:
        guest.wait_for_line("rebooting", BOOT_TIMEOUT)
        # The VMM holds the device: nothing tears it down under the guest.
        assert code_of(lambda: unstage(plugin, vid, staging)) == C.FAILED_PRECONDITION
        assert guest.wait_for_line("read back", BOOT_TIMEOUT) == "GUEST: read back mismatches=0"
        guest.wait_for_line("soak start", 60)
        time.sleep(3)  # well into the first round
        plugin.stop(signal.SIGKILL)  # requests in flight die with the process
        plugin.start()
        done = guest.wait_for_line("soak done", BOOT_TIMEOUT)
        fields = dict(kv.split("=") for kv in done.split()[3:])
        assert int(fields["rounds"]) > 0
        assert fields["errors"] == "0" and fields["mismatches"] == "0", guest.lines()
        guest.wait_for_line("verified", 60)
        assert guest.wait(120) == 0
    finally:
        guest.kill()
    unpublish(plugin, vid, workdir / "pod-volume")
    unstage(plugin, vid, staging)
    assert not (Path("/dev/vduse") / vid).exists()
    assert_guest_data(workdir / "data" / "volumes" / f"{vid}.img")


@pytest.mark.any_kernel
@pytest.mark.timeout(2 * BOOT_TIMEOUT)
def test_vm_on_a_block_volume_as_kubevirt_attaches_it(plugin: Plugin, workdir: Path) -> None:
    """KubeVirt today: a Block PVC (here /dev/vdX through virtio_vdpa) as QEMU's host_device."""
    cap = block_cap()
    vid = create(plugin, "pvc-vm-block", cap)
    staging, target = workdir / "staging", workdir / "disk"
    staging.mkdir()
    stage(plugin, vid, staging, cap)
    publish(plugin, vid, staging, target, cap)
    disk = [
        "-blockdev", f"host_device,node-name=disk0,filename={target},cache.direct=on",
        "-device", "virtio-blk-pci,drive=disk0",
    ]  # fmt: skip
    # One boot: the reboot test is the vhost-vdpa one; this is about the path to the disk.
    guest = NestedGuest(workdir, disk, append="csi_vduse.reboot=0")
    try:
        assert guest.wait_for_line("read back", BOOT_TIMEOUT) == "GUEST: read back mismatches=0"
        guest.wait_for_line("verified", 60)
        assert guest.wait(120) == 0
    finally:
        guest.kill()
    unpublish(plugin, vid, target)
    unstage(plugin, vid, staging)
    assert_guest_data(workdir / "data" / "volumes" / f"{vid}.img")
