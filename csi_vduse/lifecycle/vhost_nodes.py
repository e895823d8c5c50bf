"""A vhost-vdpa volume on the node: its character device, handed over as a file system.

The kubelet publishes only block devices as Block volumes (it pins each with a loop device,
which a character device cannot back), so a vhost-vdpa volume is a Filesystem volume:
staging mounts a small tmpfs that holds one device node, `vhost-vdpa`, for the volume's
/dev/vhost-vdpa-N, and publishing bind-mounts that tmpfs into the pod like any file system.
A VMM in the pod opens `<mountPath>/vhost-vdpa`; the container's device cgroup must allow
the device (a privileged container's does)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from csi_vduse.errors import AlreadyExists, FailedPrecondition
from csi_vduse.lifecycle import mounts

NODE_NAME = "vhost-vdpa"
TMPFS_OPTIONS = ["mode=0755", "size=16k", "nosuid", "noexec"]


def _same_device(node: Path, device: Path) -> bool:
    try:
        have, want = os.stat(node), os.stat(device)
    except OSError:
        return False
    return stat.S_ISCHR(have.st_mode) and have.st_rdev == want.st_rdev


def stage(device: Path, target: Path) -> None:
    entry = mounts.mount_at(target)
    node = target / NODE_NAME
    if entry is not None:
        if entry.fs_type == "tmpfs" and _same_device(node, device):
            return
        raise AlreadyExists(f"{target} already has something else mounted")
    mounts.mount(Path("tmpfs"), target, "tmpfs", TMPFS_OPTIONS)
    try:
        os.mknod(node, stat.S_IFCHR | 0o600, os.stat(device).st_rdev)
    except BaseException:
        mounts.umount(target)
        raise


def staged_mount(staging: Path, device: Path) -> str:
    """The major:minor of the staging tmpfs that holds `device`'s node."""
    entry = mounts.mount_at(staging)
    if entry is None or entry.fs_type != "tmpfs" or not _same_device(staging / NODE_NAME, device):
        raise FailedPrecondition(f"{staging} does not hold the volume's vhost-vdpa device node")
    return entry.major_minor


def publications(staging: Path) -> list[str]:
    """Where the staging tmpfs is bind-mounted (published) besides itself."""
    entry = mounts.mount_at(staging)
    if entry is None:
        return []
    return [
        f"published at {m.target}"
        for m in mounts.mounts()
        if m.major_minor == entry.major_minor and m.target != str(staging)
    ]


def unstage(staging: Path) -> None:
    entry = mounts.mount_at(staging)
    if entry is not None and entry.fs_type == "tmpfs":
        mounts.umount(staging)
