"""Device names: what the kernel and sysfs accept, checked before anything is created."""

from __future__ import annotations

import re

from csi_vduse.kernel.vduse import NAME_MAX

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_device_name(name: str) -> str:
    if not name:
        raise ValueError("device name is empty")
    if len(name.encode()) > NAME_MAX:
        raise ValueError(f"device name is {len(name.encode())} bytes; the kernel allows {NAME_MAX}")
    if not _NAME.match(name):
        raise ValueError(
            f"device name {name!r} may hold only letters, digits, '.', '_' and '-' "
            "and must start with a letter or digit"
        )
    return name
