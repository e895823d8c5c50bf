"""vdpa driver binding and device discovery through sysfs."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

VDPA_BUS = Path("/sys/bus/vdpa")
VIRTIO_VDPA = "virtio_vdpa"
VHOST_VDPA = "vhost_vdpa"
# What users write (`--attach`, the StorageClass parameter `attach`) and the driver it means.
ATTACH_DRIVERS = {"virtio-vdpa": VIRTIO_VDPA, "vhost-vdpa": VHOST_VDPA}


class SysfsError(RuntimeError):
    pass


def vdpa_device_dir(name: str) -> Path:
    return VDPA_BUS / "devices" / name


def bound_driver(name: str) -> str | None:
    return _driver_of(vdpa_device_dir(name))


def _driver_of(device: Path) -> str | None:
    link = device / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def bind(name: str, driver: str) -> None:
    """Pins the device to `driver` with driver_override, rebinding it if autoprobe chose
    another one (the first registered vdpa driver wins otherwise)."""
    dev = vdpa_device_dir(name)
    if not (VDPA_BUS / "drivers" / driver).is_dir():
        raise SysfsError(f"vdpa driver {driver} is not available (modprobe {driver})")
    (dev / "driver_override").write_text(driver)
    current = bound_driver(name)
    if current == driver:
        return
    if current is not None:
        (VDPA_BUS / "drivers" / current / "unbind").write_text(name)
    (VDPA_BUS / "drivers" / driver / "bind").write_text(name)
    if bound_driver(name) != driver:
        raise SysfsError(f"vdpa device {name} did not bind to {driver}")


def block_device_name(name: str) -> str | None:
    """The /dev/vdX name of a vdpa device bound to virtio_vdpa, if it has one yet."""
    for block in sorted(vdpa_device_dir(name).glob("virtio*/block/*")):
        return block.name
    return None


def vhost_device_name(name: str) -> str | None:
    """The vhost-vdpa-N name of a vdpa device bound to vhost_vdpa, if it has one yet."""
    for node in sorted(vdpa_device_dir(name).glob("vhost-vdpa-*")):
        return node.name
    return None


def wait_device(name: str, driver: str, timeout: float = 10.0) -> Path:
    """The device node the driver made for vdpa device `name`: /dev/vdX (a block device)
    for virtio_vdpa, /dev/vhost-vdpa-N (a character device) for vhost_vdpa."""
    find, kind = (
        (vhost_device_name, stat.S_ISCHR)
        if driver == VHOST_VDPA
        else (block_device_name, stat.S_ISBLK)
    )
    deadline = time.monotonic() + timeout
    while True:
        found = find(name)
        if found is not None:
            path = Path("/dev") / found
            try:
                if kind(path.stat().st_mode):
                    return path
            except FileNotFoundError:
                pass
        if time.monotonic() > deadline:
            raise SysfsError(
                f"vdpa device {name} has no device node from {driver} after {timeout:.0f}s "
                f"({describe(name)}; the kernel log says why)"
            )
        time.sleep(0.05)


def describe(name: str) -> str:
    """Where the device's probe stopped: its vdpa driver, its virtio device and that one's
    driver (none: virtio_blk's probe failed)."""
    dev = vdpa_device_dir(name)
    if not dev.is_dir():
        return "it is gone from the vdpa bus"
    found = [f"bound to {bound_driver(name) or 'no driver'}"]
    for virtio in sorted(dev.glob("virtio*")):
        found.append(f"{virtio.name} bound to {_driver_of(virtio) or 'no driver'}")
    return ", ".join(found)
