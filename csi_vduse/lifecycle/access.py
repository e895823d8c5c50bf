from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SINGLE_NODE_SINGLE_WRITER = 6  # csi.v1.VolumeCapability.AccessMode: one publication at a time


@dataclass(frozen=True)
class VolumeAccess:
    """How a workload uses a volume, from its CSI volume capability."""

    block: bool
    mode: int
    readonly: bool  # the access mode only reads
    fs_type: str = ""
    mount_flags: tuple[str, ...] = ()

    @property
    def access_type(self) -> Literal["mount", "block"]:
        return "block" if self.block else "mount"

    @property
    def single_publication(self) -> bool:
        return self.mode == SINGLE_NODE_SINGLE_WRITER
