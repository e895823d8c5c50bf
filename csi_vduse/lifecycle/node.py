"""Node-side volume lifecycle: stage (device + file system), publish (bind mounts),
expand, stats, unstage. Teardown never discards a device that is mounted or open."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from csi_vduse.backends import FileBackend
from csi_vduse.dataplane.blk_device import SECTOR, BlkParams
from csi_vduse.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from csi_vduse.kernel.vduse import DEVICE_DIR
from csi_vduse.lifecycle import mounts
from csi_vduse.lifecycle.access import VolumeAccess
from csi_vduse.lifecycle.attachment import Attachment
from csi_vduse.lifecycle.capacity import pick_capacity
from csi_vduse.lifecycle.locks import VolumeLocks
from csi_vduse.lifecycle.provisioning import volume_id_or_raise
from csi_vduse.state.staging import StageRecord, StagingStore
from csi_vduse.state.volumes import VolumeRecord, VolumeStore

log = logging.getLogger(__name__)


@dataclass
class Attached:
    attachment: Attachment
    backend: FileBackend

    @property
    def device(self) -> Path:
        assert self.attachment.device_path is not None
        return self.attachment.device_path


@dataclass(frozen=True)
class VolumeStats:
    total: int
    available: int | None = None
    used: int | None = None
    inodes_total: int | None = None
    inodes_free: int | None = None
    inodes_used: int | None = None
    abnormal: bool = False
    message: str = "volume is healthy"


def _path_arg(value: str, what: str) -> Path:
    if not value:
        raise InvalidArgument(f"{what} is required")
    if "\0" in value or not os.path.isabs(value):
        raise InvalidArgument(f"{what} must be an absolute path")
    return Path(value)


class NodeVolumes:
    def __init__(
        self, data_dir: Path, state_dir: Path, locks: VolumeLocks, max_volumes: int
    ) -> None:
        self.store = VolumeStore(data_dir)
        self.staging = StagingStore(state_dir)
        self.locks = locks
        self.max_volumes = max_volumes
        self.attached: dict[str, Attached] = {}

    def _record(self, volume_id: str) -> VolumeRecord:
        record = self.store.get(volume_id) if volume_id_or_raise(volume_id) else None
        if record is None:
            raise NotFound(f"volume {volume_id} does not exist on this node")
        return record

    # staging

    def stage(self, volume_id: str, staging_path: str, access: VolumeAccess) -> None:
        target = _path_arg(staging_path, "staging_target_path")
        record = self._record(volume_id)
        if not target.is_dir():
            raise InvalidArgument(f"staging_target_path {target} is not an existing directory")
        with self.locks.hold(volume_id):
            staged = self.staging.get(volume_id)
            wanted = StageRecord(
                volume_id=volume_id, staging_path=str(target), access_type=access.access_type,
                access_mode=access.mode, fs_type=access.fs_type,
                mount_flags=list(access.mount_flags), readonly=access.readonly,
            )  # fmt: skip
            if staged is not None:
                if staged.model_copy(update={"device": ""}) != wanted:
                    raise AlreadyExists(
                        f"volume {volume_id} is already staged at {staged.staging_path} as "
                        f"{staged.access_type} (mode {staged.access_mode}); unstage it first"
                    )
                wanted.device = staged.device
            elif len(self.attached) >= self.max_volumes:
                raise ResourceExhausted(f"this node serves at most {self.max_volumes} volumes")
            self.staging.put(wanted)  # intent first: a crash leaves a record to converge from
            was_attached = volume_id in self.attached
            try:
                attached = self._attach(record, access.readonly)
                wanted.device = str(attached.device)
                self.staging.put(wanted)
                if not access.block:
                    self._mount_fs(record, attached.device, target, access)
            except BaseException:
                if staged is None:
                    self._roll_back(volume_id, was_attached)
                raise

    def _roll_back(self, volume_id: str, was_attached: bool) -> None:
        """Undoes a first stage that failed half-way, so a failed call changes nothing."""
        attached = self.attached.get(volume_id)
        if attached is not None and not was_attached:
            try:
                attached.attachment.stop()
            except Exception:
                log.exception("%s: cannot roll back its device", volume_id)
                return
            attached.backend.close()
            del self.attached[volume_id]
        self.staging.delete(volume_id)

    def _attach(self, record: VolumeRecord, readonly: bool) -> Attached:
        current = self.attached.get(record.volume_id)
        if current is not None:
            return current
        if (DEVICE_DIR / record.volume_id).exists():
            raise Unavailable(
                f"a VDUSE device for volume {record.volume_id} exists without a server "
                "(left by a previous plugin process); it is being recovered, retry"
            )
        attached = self._serve(record, readonly, resume=False)
        self.attached[record.volume_id] = attached
        return attached

    def _serve(self, record: VolumeRecord, readonly: bool, resume: bool) -> Attached:
        """Opens the volume's image and serves it: a new device, or (`resume`) the device a
        previous process left. Both ways must describe the device the same."""
        backend = FileBackend.open(self.store.image(record.volume_id), None, readonly)
        params = BlkParams(
            capacity=backend.size, queues=record.params.queues,
            queue_size=record.params.queue_size, readonly=readonly,
            serial=record.volume_id[-20:],
        )  # fmt: skip
        attachment = Attachment(record.volume_id, backend, params)
        try:
            if resume:
                attachment.reattach()
            else:
                attachment.start()
        except BaseException:
            backend.close()
            raise
        return Attached(attachment, backend)

    def _mount_fs(
        self, record: VolumeRecord, device: Path, target: Path, access: VolumeAccess
    ) -> None:
        current = mounts.mount_at(target)
        if current is not None:
            if current.major_minor == mounts.device_number(device):
                return
            raise AlreadyExists(f"{target} already has another file system mounted")
        found = mounts.probe_fs(device)
        if found is None:
            if record.formatted:
                raise FailedPrecondition(
                    f"volume {record.volume_id} was formatted ({record.fs_type}) but shows no "
                    "file system now; refusing to format it again (that would lose its data)"
                )
            if access.readonly:
                raise FailedPrecondition(
                    f"volume {record.volume_id} holds no file system and is staged read-only"
                )
            found = access.fs_type or mounts.DEFAULT_FS
            mounts.mkfs(device, found)
            log.info("%s: formatted %s as %s", record.volume_id, device, found)
        elif access.fs_type and found != access.fs_type:
            raise FailedPrecondition(
                f"volume {record.volume_id} holds {found}, not the requested {access.fs_type}"
            )
        if found not in mounts.SUPPORTED_FS:
            raise FailedPrecondition(f"volume {record.volume_id} holds unsupported {found}")
        if not record.formatted or record.fs_type != found:
            record.formatted, record.fs_type = True, found
            self.store.put(record)
        options = list(access.mount_flags)
        if access.readonly:
            options.append("ro")
        if found == "xfs":
            options.append("nouuid")
        mounts.mount(device, target, found, options)

    def unstage(self, volume_id: str, staging_path: str) -> None:
        target = _path_arg(staging_path, "staging_target_path")
        if not volume_id_or_raise(volume_id):
            raise NotFound(f"volume {volume_id} does not exist on this node")
        with self.locks.hold(volume_id):
            staged = self.staging.get(volume_id)
            attached = self.attached.get(volume_id)
            if staged is None and attached is None:
                return
            device = attached.device if attached else None
            if device is not None:
                reasons = mounts.users(device, frozenset({os.path.realpath(target)}))
                if reasons:
                    raise FailedPrecondition(
                        f"{device} of volume {volume_id} is still in use "
                        f"({'; '.join(reasons)}); unpublish or close it, then retry"
                    )
                entry = mounts.mount_at(target)
                if entry is not None and entry.major_minor == mounts.device_number(device):
                    mounts.umount(target)
            if attached is not None:
                attached.attachment.stop()
                attached.backend.close()
                del self.attached[volume_id]
            self.staging.delete(volume_id)

    # publishing

    def publish(
        self, volume_id: str, staging_path: str, target_path: str, access: VolumeAccess,
        readonly: bool,
    ) -> None:  # fmt: skip
        target = _path_arg(target_path, "target_path")
        staging = _path_arg(staging_path, "staging_target_path")
        self._record(volume_id)
        with self.locks.hold(volume_id):
            staged = self.staging.get(volume_id)
            attached = self.attached.get(volume_id)
            if staged is None or attached is None:
                raise FailedPrecondition(f"volume {volume_id} is not staged on this node")
            if staged.staging_path != str(staging):
                raise InvalidArgument(
                    f"volume {volume_id} is staged at {staged.staging_path}, not {staging}"
                )
            if access.block != (staged.access_type == "block"):
                raise InvalidArgument(
                    f"volume {volume_id} is staged as {staged.access_type}, "
                    f"not {access.access_type}"
                )
            ro = readonly or access.readonly
            if not target.parent.is_dir():
                raise NotFound(f"the parent directory of {target} does not exist")
            if access.block:
                self._publish_block(attached.device, target, ro)
            else:
                self._publish_mount(attached.device, staging, target, ro)

    def _publish_block(self, device: Path, target: Path, ro: bool) -> None:
        entry = mounts.mount_at(target) if target.exists() else None
        if entry is not None:
            if entry.fs_type == "devtmpfs" and entry.root == f"/{device.name}":
                return
            raise AlreadyExists(f"{target} is already published from another source")
        if target.is_dir():
            raise AlreadyExists(f"{target} is a directory; a block volume needs a file")
        target.touch(exist_ok=True)
        mounts.bind_mount(device, target, ro)

    def _publish_mount(self, device: Path, staging: Path, target: Path, ro: bool) -> None:
        target.mkdir(exist_ok=True)
        entry = mounts.mount_at(target)
        if entry is not None:
            read_only = "ro" in entry.options.split(",")
            if entry.major_minor == mounts.device_number(device) and read_only == ro:
                return
            raise AlreadyExists(f"{target} is already published with other options")
        mounts.bind_mount(staging, target, ro)

    def unpublish(self, volume_id: str, target_path: str) -> None:
        target = _path_arg(target_path, "target_path")
        if not volume_id_or_raise(volume_id):
            raise NotFound(f"volume {volume_id} does not exist on this node")
        with self.locks.hold(volume_id):
            while target.exists() and mounts.mount_at(target) is not None:
                mounts.umount(target)
            if target.is_dir():
                target.rmdir()
            elif target.exists():
                target.unlink()

    # expansion and health

    def expand(self, volume_id: str, volume_path: str, required: int, limit: int) -> int:
        _path_arg(volume_path, "volume_path")
        record = self._record(volume_id)
        with self.locks.hold(volume_id):
            attached = self.attached.get(volume_id)
            staged = self.staging.get(volume_id)
            if attached is None or staged is None:
                raise FailedPrecondition(f"volume {volume_id} is not staged on this node")
            wanted = pick_capacity(required, limit, default=record.capacity) if required else 0
            capacity = max(record.capacity, wanted, attached.backend.size)
            if capacity > attached.backend.size:
                attached.backend.grow(capacity)
            server = attached.attachment.server
            if server is None:
                raise Unavailable(f"volume {volume_id} has no data plane")
            size_file = Path("/sys/class/block") / attached.device.name / "size"
            if int(size_file.read_text()) * SECTOR < capacity:
                server.resize(capacity)
                deadline = time.monotonic() + 10
                while int(size_file.read_text()) * SECTOR < capacity:
                    if time.monotonic() > deadline:
                        raise Unavailable(f"{attached.device} did not pick up the new size")
                    time.sleep(0.05)
            if staged.access_type == "mount":
                fs_type = record.fs_type or mounts.DEFAULT_FS
                mounts.grow_fs(attached.device, Path(staged.staging_path), fs_type)
            if capacity > record.capacity:
                record.capacity = capacity
                self.store.put(record)
            return capacity

    def condition(self, volume_id: str) -> tuple[bool, str]:
        """(abnormal, message) as the data plane sees the volume."""
        attached = self.attached.get(volume_id)
        if attached is None:
            if self.staging.get(volume_id) is not None:
                return True, "volume is staged but its data plane is not running"
            return False, "volume is not staged on this node"
        server = attached.attachment.server
        if server is None or server.broken:
            return True, "the VDUSE device stopped answering; the volume needs restaging"
        stats = server.stats()
        if stats["bad_chains"]:
            return True, f"{stats['bad_chains']} malformed requests were refused"
        return False, f"served by {attached.device}; {stats['errors']} I/O errors so far"

    def stats(self, volume_id: str, volume_path: str) -> VolumeStats:
        path = _path_arg(volume_path, "volume_path")
        self._record(volume_id)
        if not path.exists():
            raise NotFound(f"volume_path {path} does not exist")
        abnormal, message = self.condition(volume_id)
        attached = self.attached.get(volume_id)
        if not path.is_dir():
            size = attached.backend.size if attached else 0
            return VolumeStats(total=size, abnormal=abnormal, message=message)
        st = os.statvfs(path)
        return VolumeStats(
            total=st.f_blocks * st.f_frsize, available=st.f_bavail * st.f_frsize,
            used=(st.f_blocks - st.f_bfree) * st.f_frsize, inodes_total=st.f_files,
            inodes_free=st.f_ffree, inodes_used=st.f_files - st.f_ffree,
            abnormal=abnormal, message=message,
        )  # fmt: skip

    def recover(self) -> None:
        """Serves again the devices a previous process left staged (plugin restart or
        upgrade): the kernel kept them, and their in-flight requests resume."""
        self.staging.ensure()
        for staged in self.staging.all():
            volume_id = staged.volume_id
            record = self.store.get(volume_id)
            if record is None or not (DEVICE_DIR / volume_id).exists():
                continue  # NodeStage or NodeUnstage converges from the record
            try:
                attached = self._serve(record, staged.readonly, resume=True)
            except Exception:
                log.exception("%s: cannot re-attach its VDUSE device", volume_id)
                continue
            self.attached[volume_id] = attached
            log.info("%s: re-attached at %s", volume_id, attached.device)

    def shutdown(self) -> None:
        """Leaves every volume staged: the kernel devices outlive this process."""
        log.info("leaving %d volume(s) staged", len(self.attached))
