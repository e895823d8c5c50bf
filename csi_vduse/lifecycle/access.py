from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


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
