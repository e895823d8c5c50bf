"""The one file that names every backend. A backend lives in its own folder
(`backends/<kind>/`), whose `driver` module defines `Driver`, a `VolumeDriver`; adding one
means adding its folder and one line here. Drivers are imported when first used."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from csi_vduse.backends.api import DriverContext, VolumeDriver


class Kind(NamedTuple):
    module: str  # holds `Driver`
    id_tag: str  # in its volume and snapshot ids: vduse-[<tag>-]<hash>[-<location>]
    located: bool  # whether its ids carry a location (a call may bring nothing but the id)


KINDS: dict[str, Kind] = {
    "file": Kind("csi_vduse.backends.file.driver", id_tag="", located=False),
    "rbd": Kind("csi_vduse.backends.rbd.driver", id_tag="rbd", located=True),
}


def kinds() -> tuple[str, ...]:
    return tuple(KINDS)


def kind_of_tag(tag: str, located: bool) -> str | None:
    for name, kind in KINDS.items():
        if kind.id_tag == tag and kind.located == located:
            return name
    return None


def driver_class(kind: str) -> type[VolumeDriver]:
    cls: type[VolumeDriver] = importlib.import_module(KINDS[kind].module).Driver
    return cls


class Drivers:
    """One driver per kind for this process, made on first use."""

    def __init__(self, ctx: DriverContext) -> None:
        self.ctx = ctx
        self._made: dict[str, VolumeDriver] = {}

    def kind(self, kind: str) -> VolumeDriver:
        if kind not in self._made:
            self._made[kind] = driver_class(kind)(self.ctx)
        return self._made[kind]

    def startup(self) -> None:
        for kind in KINDS:
            self.kind(kind).startup()
