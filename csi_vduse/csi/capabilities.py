"""CSI volume capabilities <-> the driver's VolumeAccess."""

from __future__ import annotations

import re
from collections.abc import Sequence

from csi_vduse.csi.proto import csi_pb2 as pb
from csi_vduse.errors import InvalidArgument
from csi_vduse.lifecycle.access import VolumeAccess
from csi_vduse.lifecycle.mounts import SUPPORTED_FS

Mode = pb.VolumeCapability.AccessMode
WRITERS = {Mode.SINGLE_NODE_WRITER, Mode.SINGLE_NODE_SINGLE_WRITER, Mode.SINGLE_NODE_MULTI_WRITER}
READERS = {Mode.SINGLE_NODE_READER_ONLY}
SUPPORTED_MODES = WRITERS | READERS
_FLAG = re.compile(r"^[A-Za-z0-9_=.:,/+-]+$")


def unsupported(cap: pb.VolumeCapability) -> str | None:
    """Why the driver cannot serve `cap`, or None."""
    kind = cap.WhichOneof("access_type")
    if kind is None:
        return "volume capability needs an access type (block or mount)"
    if not cap.HasField("access_mode"):
        return "volume capability needs an access mode"
    mode = cap.access_mode.mode
    if mode not in SUPPORTED_MODES:
        name = Mode.Mode.Name(mode) if mode in Mode.Mode.values() else str(mode)
        return f"access mode {name} is not supported (volumes attach to one node)"
    if kind == "mount":
        fs = cap.mount.fs_type
        if fs and fs not in SUPPORTED_FS:
            return f"fs_type {fs!r} is not supported (choose {' or '.join(SUPPORTED_FS)})"
        bad = [f for f in cap.mount.mount_flags if not _FLAG.match(f)]
        if bad:
            return f"mount flags {bad} hold characters that are not allowed"
    return None


def parse(cap: pb.VolumeCapability) -> VolumeAccess:
    reason = unsupported(cap)
    if reason:
        raise InvalidArgument(reason)
    mode = cap.access_mode.mode
    if cap.WhichOneof("access_type") == "block":
        return VolumeAccess(block=True, mode=mode, readonly=mode in READERS)
    return VolumeAccess(
        block=False, mode=mode, readonly=mode in READERS, fs_type=cap.mount.fs_type,
        mount_flags=tuple(cap.mount.mount_flags),
    )  # fmt: skip


def parse_all(caps: Sequence[pb.VolumeCapability]) -> list[VolumeAccess]:
    if not caps:
        raise InvalidArgument("volume_capabilities is required")
    return [parse(c) for c in caps]


def require_one(cap: pb.VolumeCapability, present: bool) -> VolumeAccess:
    if not present:
        raise InvalidArgument("volume_capability is required")
    return parse(cap)
