"""The vdpa bus over generic netlink: management devices and vdpa devices."""

from __future__ import annotations

import errno
from dataclasses import dataclass

from csi_vduse._native import lib
from csi_vduse.kernel.netlink import GenlSocket, NetlinkError, attr_int, attr_str, pack_attr, strz

VDPA_FAMILY = "vdpa"
VDUSE_MGMTDEV = "vduse"


@dataclass(frozen=True)
class MgmtDev:
    bus: str | None
    name: str
    supported_classes: int


@dataclass(frozen=True)
class VdpaDev:
    name: str
    mgmtdev: str | None
    device_id: int | None
    max_vqs: int | None
    max_vq_size: int | None


class VdpaClient:
    """Each call opens its own socket: the calls are rare and this keeps threads apart."""

    def _socket(self) -> GenlSocket:
        return GenlSocket(VDPA_FAMILY)

    def mgmtdevs(self) -> list[MgmtDev]:
        with self._socket() as s:
            replies = s.request(lib.VDPA_CMD_MGMTDEV_GET, [], dump=True)
        return [
            MgmtDev(
                bus=attr_str(r, lib.VDPA_ATTR_MGMTDEV_BUS_NAME),
                name=attr_str(r, lib.VDPA_ATTR_MGMTDEV_DEV_NAME) or "",
                supported_classes=attr_int(r, lib.VDPA_ATTR_MGMTDEV_SUPPORTED_CLASSES) or 0,
            )
            for r in replies
        ]

    def add(self, name: str, mgmtdev: str = VDUSE_MGMTDEV) -> None:
        """Adds the device; returns once a bound driver has finished probing it."""
        with self._socket() as s:
            s.request(
                lib.VDPA_CMD_DEV_NEW,
                [
                    pack_attr(lib.VDPA_ATTR_MGMTDEV_DEV_NAME, strz(mgmtdev)),
                    pack_attr(lib.VDPA_ATTR_DEV_NAME, strz(name)),
                ],
            )

    def delete(self, name: str) -> None:
        with self._socket() as s:
            s.request(lib.VDPA_CMD_DEV_DEL, [pack_attr(lib.VDPA_ATTR_DEV_NAME, strz(name))])

    def get(self, name: str) -> VdpaDev | None:
        try:
            with self._socket() as s:
                replies = s.request(
                    lib.VDPA_CMD_DEV_GET, [pack_attr(lib.VDPA_ATTR_DEV_NAME, strz(name))]
                )
        except NetlinkError as e:
            if e.errno == errno.ENODEV:
                return None
            raise
        return _dev(replies[0]) if replies else None

    def list(self) -> list[VdpaDev]:
        with self._socket() as s:
            return [_dev(r) for r in s.request(lib.VDPA_CMD_DEV_GET, [], dump=True)]


def _dev(attrs: dict[int, bytes]) -> VdpaDev:
    return VdpaDev(
        name=attr_str(attrs, lib.VDPA_ATTR_DEV_NAME) or "",
        mgmtdev=attr_str(attrs, lib.VDPA_ATTR_MGMTDEV_DEV_NAME),
        device_id=attr_int(attrs, lib.VDPA_ATTR_DEV_ID),
        max_vqs=attr_int(attrs, lib.VDPA_ATTR_DEV_MAX_VQS),
        max_vq_size=attr_int(attrs, lib.VDPA_ATTR_DEV_MAX_VQ_SIZE),
    )
