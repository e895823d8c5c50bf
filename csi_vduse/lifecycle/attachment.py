"""A backend served as a VDUSE device on the vdpa bus, bound to virtio_vdpa (a host block
device) or vhost_vdpa (a character device a VMM drives): VDUSE device, data plane, driver.

Start-up order matters: the kernel talks to the device while `vdpa dev add` is still
running (the virtio-blk probe), so the message loop is served before the add.
Teardown is the reverse: vdpa del (the kernel resets the device through us), stop
serving, release the fd, destroy."""

from __future__ import annotations

import dataclasses
import errno
import logging
from dataclasses import dataclass
from pathlib import Path

from csi_vduse._native import lib
from csi_vduse.backends import Backend
from csi_vduse.dataplane.blk_device import BlkParams, config_space, features
from csi_vduse.dataplane.server import BlockServer
from csi_vduse.kernel import sysfs
from csi_vduse.kernel.vdpa import VdpaClient
from csi_vduse.kernel.vduse import DEVICE_DIR, VduseControl, VduseDevice, VduseError
from csi_vduse.lifecycle import mounts

log = logging.getLogger(__name__)
VQ_ALIGN = 4096


class AttachError(RuntimeError):
    pass


class DeviceBusy(AttachError):
    """The block device is still mounted or held: teardown would lose data."""


@dataclass
class Attachment:
    name: str
    backend: Backend
    params: BlkParams
    driver: str = sysfs.VIRTIO_VDPA
    log_path: Path | None = None  # the queues' crash records; must outlive the process
    device_path: Path | None = None
    _server: BlockServer | None = None
    _device: VduseDevice | None = None
    _created = False
    _added = False

    def start(self) -> Path:
        if (DEVICE_DIR / self.name).exists():
            raise AttachError(f"a VDUSE device named {self.name} already exists")
        vdpa = VdpaClient()
        try:
            with VduseControl() as control:
                try:
                    control.create(
                        self.name, lib.VIRTIO_ID_BLOCK, features(self.params),
                        self.params.queues, VQ_ALIGN, config_space(self.params),
                    )  # fmt: skip
                except VduseError as e:
                    if e.errno == errno.EEXIST:
                        raise AttachError(
                            f"a VDUSE device named {self.name} already exists"
                        ) from None
                    raise
            self._created = True
            self._device = VduseDevice(self.name)
            for index in range(self.params.queues):
                self._device.vq_setup(index, self.params.queue_size)
            self._server = BlockServer(self._device, self.backend, self.params, self.log_path)
            self._server.start()
            vdpa.add(self.name)
            self._added = True
            sysfs.bind(self.name, self.driver)
            self.device_path = sysfs.wait_device(self.name, self.driver)
        except BaseException:
            self._teardown()
            raise
        log.info("%s: serving %s", self.name, self.device_path)
        return self.device_path

    def reattach(self) -> Path:
        """Serves a device left by a previous process (it died or was upgraded): the
        kernel kept the device, the vdpa device and its device node; in-flight requests
        resume."""
        vdpa = VdpaClient()
        self._created = True
        try:
            self._device = VduseDevice(self.name)
            if self._device.features() & (1 << lib.VIRTIO_BLK_F_RO) and not self.params.readonly:
                self.params = dataclasses.replace(self.params, readonly=True)
            self._server = BlockServer(
                self._device, self.backend, self.params, self.log_path, fresh=False
            )
            self._server.start(resume=True)
            if vdpa.get(self.name) is None:
                vdpa.add(self.name)
            self._added = True
            sysfs.bind(self.name, self.driver)
            self.device_path = sysfs.wait_device(self.name, self.driver)
        except BaseException:
            # Not ours to remove on a failed re-attach: only let go of it.
            self._created = self._added = False
            self._teardown()
            raise
        log.info("%s: re-attached, serving %s", self.name, self.device_path)
        return self.device_path

    @property
    def server(self) -> BlockServer | None:
        return self._server

    def in_use(self) -> list[str]:
        if self.device_path is None:
            return []
        return mounts.users(self.device_path)

    def stop(self, force: bool = False) -> None:
        """Tears the device down; refuses while the block device is mounted, held or open."""
        reasons = [] if force else self.in_use()
        if reasons:
            raise DeviceBusy(f"{self.device_path} is in use: {', '.join(reasons)}")
        self._teardown()

    def release(self) -> None:
        """Stops serving and lets go of the device, which stays in the kernel (with its
        /dev/vdX and whatever is mounted on it) for the next process to re-attach. Every
        worker ends between two batches: nothing is half done."""
        self._stop_serving()
        self._created = self._added = False

    def _stop_serving(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._device is not None:
            self._device.close()
            self._device = None

    def _teardown(self) -> None:
        if self._added:
            VdpaClient().delete(self.name)
            self._added = False
        self._stop_serving()
        if self._created:
            with VduseControl() as control:
                control.destroy(self.name)
            self._created = False
        self.device_path = None
