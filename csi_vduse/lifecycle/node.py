"""Node-side volume lifecycle: stage (device + file system), publish (bind mounts),
expand, stats, unstage, and the reconciler that serves again what a previous process
left. Teardown never discards a device that is mounted or open, and nothing answers
"done" while a device of the volume exists that this process does not serve."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from csi_vduse.backends.api import VolumeDriver
from csi_vduse.backends.base import Backend
from csi_vduse.dataplane.blk_device import SECTOR, BlkParams
from csi_vduse.dataplane.qos import QosLimits
from csi_vduse.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from csi_vduse.kernel import sysfs
from csi_vduse.kernel.vduse import DEVICE_DIR
from csi_vduse.lifecycle import mounts, vhost_nodes
from csi_vduse.lifecycle.access import VolumeAccess
from csi_vduse.lifecycle.attachment import Attachment
from csi_vduse.lifecycle.capacity import pick_capacity
from csi_vduse.lifecycle.io_health import IoHealth
from csi_vduse.lifecycle.locks import VolumeLocks
from csi_vduse.lifecycle.provisioning import fit_reason, volume_id_or_raise
from csi_vduse.lifecycle.snapshots import drivers_for
from csi_vduse.state.records import UnreadableRecord
from csi_vduse.state.staging import StageRecord, StagingStore
from csi_vduse.state.volumes import VolumeRecord, check_volume_id, kind_of_volume, serial_for

log = logging.getLogger(__name__)
# how long a call on a volume waits for its re-attach (an RBD one waits out a dead
# process's lock, 45 s) before it is told to come back
REATTACH_WAIT_S = 60.0


@dataclass
class Attached:
    attachment: Attachment
    backend: Backend

    @property
    def device(self) -> Path:
        assert self.attachment.device_path is not None
        return self.attachment.device_path

    @property
    def vhost(self) -> bool:
        """A character device for a VMM (see vhost_nodes), not a host block device."""
        return self.attachment.driver == sysfs.VHOST_VDPA


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


def vduse_devices() -> set[str]:
    """Volume ids that have a VDUSE device on this node, served or not."""
    try:
        names = os.listdir(DEVICE_DIR)
    except FileNotFoundError:
        return set()
    found = set()
    for name in names:
        try:
            if check_volume_id(name):
                found.add(name)
        except ValueError:
            continue
    return found


class NodeVolumes:
    def __init__(
        self, data_dir: Path, state_dir: Path, locks: VolumeLocks, max_volumes: int
    ) -> None:
        self.drivers = drivers_for(data_dir, state_dir, locks, self.quiesced)
        self.store = self.drivers.ctx.volumes
        self.staging = StagingStore(state_dir)
        self.log_dir = state_dir / "dataplane"
        self.locks = locks
        self.max_volumes = max_volumes
        self.attached: dict[str, Attached] = {}
        self.problems: dict[str, str] = {}  # why a staged volume is not served; for conditions
        self.io_health: dict[str, IoHealth] = {}  # of each served volume, per reconcile
        self._last_sample = time.monotonic()
        self._reattaching: dict[str, threading.Thread] = {}
        self._reattach_lock = threading.Lock()
        self._closing = False

    def _driver(self, volume_id: str) -> VolumeDriver:
        kind = kind_of_volume(volume_id)
        assert kind is not None, volume_id
        return self.drivers.kind(kind)

    def _record(self, volume_id: str) -> VolumeRecord:
        try:
            record = self.store.get(volume_id) if volume_id_or_raise(volume_id) else None
        except UnreadableRecord as e:
            raise FailedPrecondition(str(e)) from None
        if record is None:
            raise NotFound(f"volume {volume_id} does not exist on this node")
        return record

    def _staged(self, volume_id: str) -> StageRecord | None:
        try:
            return self.staging.get(volume_id)
        except UnreadableRecord as e:
            raise FailedPrecondition(f"{e}; NodeUnstageVolume clears it") from None

    # staging

    def stage(
        self, volume_id: str, staging_path: str, access: VolumeAccess,
        secrets: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        target = _path_arg(staging_path, "staging_target_path")
        if not volume_id_or_raise(volume_id):
            raise NotFound(f"volume {volume_id} does not exist on this node")
        self._after_reattach(volume_id)
        with self.locks.hold(volume_id):
            driver = self._driver(volume_id)
            driver.prepare_stage(volume_id, secrets or {})
            record = self._record(volume_id)
            if not target.is_dir():
                raise InvalidArgument(f"staging_target_path {target} is not an existing directory")
            if reason := fit_reason(record.params, access.block):
                raise InvalidArgument(reason)
            staged = self._staged(volume_id)
            wanted = StageRecord(
                volume_id=volume_id, staging_path=str(target), access_type=access.access_type,
                access_mode=access.mode, fs_type=access.fs_type,
                mount_flags=list(access.mount_flags), readonly=access.readonly,
            )  # fmt: skip
            if staged is not None:
                if not staged.same_stage(wanted):
                    raise AlreadyExists(
                        f"volume {volume_id} is already staged at {staged.staging_path} as "
                        f"{staged.access_type} (mode {staged.access_mode}); unstage it first"
                    )
                wanted.device, wanted.published = staged.device, staged.published
            elif len(self.attached) >= self.max_volumes:
                raise ResourceExhausted(f"this node serves at most {self.max_volumes} volumes")
            driver.keep_access(volume_id, secrets or {})
            self.staging.put(wanted)  # intent first: a crash leaves a record to converge from
            was_attached = volume_id in self.attached
            try:
                attached = self._attach(record, access.readonly)
                wanted.device = str(attached.device)
                self.staging.put(wanted)
                if attached.vhost:
                    vhost_nodes.stage(attached.device, target)
                elif not access.block:
                    self._mount_fs(record, attached, target, access)
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
        self._driver(volume_id).forget(volume_id)
        if volume_id not in self.attached:
            self._data_plane_log(volume_id).unlink(missing_ok=True)

    def _data_plane_log(self, volume_id: str) -> Path:
        return self.log_dir / f"{volume_id}.log"

    def _attach(self, record: VolumeRecord, readonly: bool) -> Attached:
        current = self.attached.get(record.volume_id)
        if current is not None:
            return current
        if (DEVICE_DIR / record.volume_id).exists():
            return self._adopt(record.volume_id, readonly)
        attached = self._serve(record, readonly, resume=False)
        self.attached[record.volume_id] = attached
        self.problems.pop(record.volume_id, None)  # a device made again: a gone one is past
        return attached

    def _serve(self, record: VolumeRecord, readonly: bool, resume: bool) -> Attached:
        """Opens the volume's image and serves it: a new device, or (`resume`) the device a
        previous process left. Both ways must describe the device the same."""
        backend = self._driver(record.volume_id).open(record, readonly)
        params = BlkParams(
            capacity=backend.size, queues=record.params.queues,
            queue_size=record.params.queue_size, readonly=readonly,
            serial=serial_for(record.volume_id), qos=record.qos,
        )  # fmt: skip
        attachment = Attachment(
            record.volume_id, backend, params, sysfs.ATTACH_DRIVERS[record.params.attach],
            log_path=self._data_plane_log(record.volume_id),
        )  # fmt: skip
        try:
            if resume:
                attachment.reattach()
            else:
                attachment.start()
        except BaseException:
            backend.close()
            raise
        return Attached(attachment, backend)

    def _adopt(self, volume_id: str, readonly: bool) -> Attached:
        """Serves the device a previous process left (caller holds the volume lock).
        Raises Unavailable, with the reason kept for the volume's condition, if it cannot."""
        try:
            record = self._record(volume_id)
            attached = self._serve(record, readonly, resume=True)
        except Exception as e:
            reason = f"its VDUSE device is not served: re-attach failed: {e}"
            if self.problems.get(volume_id) != reason:
                log.error("%s: %s", volume_id, reason)
            self.problems[volume_id] = reason
            raise Unavailable(
                f"volume {volume_id}: {reason}; the plugin retries, fix the cause"
            ) from None
        with self._reattach_lock:
            closing = self._closing
            if not closing:
                self.attached[volume_id] = attached
        if closing:  # served after shutdown() let go of the others: leave it as they are
            attached.attachment.release()
            attached.backend.close()
            raise Unavailable(f"volume {volume_id}: the plugin is stopping")
        self.problems.pop(volume_id, None)
        log.info("%s: re-attached, serving %s", volume_id, attached.device)
        return attached

    def _mount_fs(
        self, record: VolumeRecord, attached: Attached, target: Path, access: VolumeAccess
    ) -> None:
        device = attached.device
        current = mounts.mount_at(target)
        if current is not None:
            if current.major_minor == mounts.device_number(device):
                return
            raise AlreadyExists(f"{target} already has another file system mounted")
        found = mounts.probe(device)
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
            fs_type = access.fs_type or mounts.DEFAULT_FS
            mounts.mkfs(device, fs_type)
            log.info("%s: formatted %s as %s", record.volume_id, device, fs_type)
        elif not found.mountable:
            raise FailedPrecondition(
                f"volume {record.volume_id} holds a {found.usage} ({found.type}), not an ext4 "
                "or xfs file system; refusing to format or mount it (that would lose its data)"
            )
        else:
            fs_type = found.type
            if access.fs_type and fs_type != access.fs_type:
                raise FailedPrecondition(
                    f"volume {record.volume_id} holds {fs_type}, not the requested {access.fs_type}"
                )
        if not record.formatted or record.fs_type != fs_type:
            record.formatted, record.fs_type = True, fs_type
            self.store.put(record)
            if not access.readonly:
                self._driver(record.volume_id).record_changed(attached.backend, record)
        options = list(access.mount_flags)
        if access.readonly:
            options.append("ro")
        if fs_type == "xfs":
            options.append("nouuid")
        mounts.mount(device, target, fs_type, options)
        if record.source is not None and not access.readonly:
            mounts.grow_fs(device, target, fs_type)  # restored into a larger volume

    def unstage(self, volume_id: str, staging_path: str) -> None:
        target = _path_arg(staging_path, "staging_target_path")
        if not volume_id_or_raise(volume_id):
            raise NotFound(f"volume {volume_id} does not exist on this node")
        self._after_reattach(volume_id)
        with self.locks.hold(volume_id):
            attached = self.attached.get(volume_id)
            has_device = (DEVICE_DIR / volume_id).exists()
            if not self.staging.exists(volume_id) and attached is None and not has_device:
                return
            if attached is None and has_device:
                # A device nobody serves: unmounting would hang on it. Serve it first.
                attached = self._adopt(volume_id, readonly=False)
            if attached is not None:
                device = attached.device
                reasons = mounts.users(device, frozenset({os.path.realpath(target)}))
                if attached.vhost:
                    reasons += vhost_nodes.publications(target)
                if reasons:
                    raise FailedPrecondition(
                        f"{device} of volume {volume_id} is still in use "
                        f"({'; '.join(reasons)}); unpublish or close it, then retry"
                    )
                if attached.vhost:
                    vhost_nodes.unstage(target)
                elif (entry := mounts.mount_at(target)) is not None and (
                    entry.major_minor == mounts.device_number(device)
                ):
                    mounts.umount(target)
                attached.attachment.stop()
                attached.backend.close()
                del self.attached[volume_id]
            self.staging.delete(volume_id)
            self._driver(volume_id).forget(volume_id)
            self._data_plane_log(volume_id).unlink(missing_ok=True)
            self.problems.pop(volume_id, None)

    # publishing

    def publish(
        self, volume_id: str, staging_path: str, target_path: str, access: VolumeAccess,
        readonly: bool,
    ) -> None:  # fmt: skip
        target = _path_arg(target_path, "target_path")
        staging = _path_arg(staging_path, "staging_target_path")
        if not volume_id_or_raise(volume_id):
            raise NotFound(f"volume {volume_id} does not exist on this node")
        self._after_reattach(volume_id)
        with self.locks.hold(volume_id):
            self._record(volume_id)
            staged = self._staged(volume_id)
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
                raise FailedPrecondition(f"the parent directory of {target} does not exist")
            others = [t for t in staged.published if t != str(target) and mounts.mount_at(Path(t))]
            if access.single_publication and others:
                raise FailedPrecondition(
                    f"volume {volume_id} is SINGLE_NODE_SINGLE_WRITER and already published "
                    f"at {', '.join(others)}"
                )
            if str(target) not in staged.published:  # intent first; a crash leaves no mount
                staged.published.append(str(target))
                self.staging.put(staged)
            if access.block:
                self._publish_block(attached.device, target, ro)
            elif attached.vhost:
                if ro and not staged.readonly:
                    raise InvalidArgument(
                        f"volume {volume_id} is a vhost-vdpa device staged read-write: a "
                        "read-only mount cannot make a device read-only (use ReadOnlyMany)"
                    )
                number = vhost_nodes.staged_mount(staging, attached.device)
                self._publish_mount(number, staging, target, ro)
            else:
                self._publish_mount(mounts.device_number(attached.device), staging, target, ro)

    def _publish_block(self, device: Path, target: Path, ro: bool) -> None:
        entry = mounts.mount_at(target) if target.exists() else None
        if entry is not None:
            published = entry.root.lstrip("/")
            if entry.fs_type == "devtmpfs" and (
                published == device.name
                if not ro
                else mounts.loop_backing(published) == os.path.realpath(device)
            ):
                return
            raise AlreadyExists(f"{target} is already published from another source")
        if target.is_dir():
            raise AlreadyExists(f"{target} is a directory; a block volume needs a file")
        target.touch(exist_ok=True)
        if not ro:
            mounts.bind_mount(device, target, False)
            return
        view = mounts.readonly_view(device)
        try:
            mounts.bind_mount(view, target, True)
        except BaseException:
            mounts.detach_loop(view.name)
            raise

    def _publish_mount(self, number: str, staging: Path, target: Path, ro: bool) -> None:
        """Bind-mounts the staged file system (major:minor `number`) at `target`."""
        target.mkdir(exist_ok=True)
        entry = mounts.mount_at(target)
        if entry is not None:
            read_only = "ro" in entry.options.split(",")
            if entry.major_minor == number and read_only == ro:
                return
            raise AlreadyExists(f"{target} is already published with other options")
        mounts.bind_mount(staging, target, ro)

    def unpublish(self, volume_id: str, target_path: str) -> None:
        target = _path_arg(target_path, "target_path")
        if not volume_id_or_raise(volume_id):
            raise NotFound(f"volume {volume_id} does not exist on this node")
        with self.locks.hold(volume_id):
            views = set()
            while target.exists() and (entry := mounts.mount_at(target)) is not None:
                if entry.fs_type == "devtmpfs" and mounts.loop_backing(entry.root.lstrip("/")):
                    views.add(entry.root.lstrip("/"))
                mounts.umount(target)
            for view in views:
                if not any(e.root == f"/{view}" for e in mounts.mounts()):
                    mounts.detach_loop(view)
            if target.is_dir():
                target.rmdir()
            elif target.exists():
                target.unlink()
            with contextlib.suppress(FailedPrecondition):  # an unreadable record keeps it
                staged = self._staged(volume_id)
                if staged is not None and str(target) in staged.published:
                    staged.published.remove(str(target))
                    self.staging.put(staged)

    # expansion and health

    def expand(self, volume_id: str, volume_path: str, required: int, limit: int) -> int:
        if not volume_path:
            raise InvalidArgument("volume_path is required")
        if not volume_id_or_raise(volume_id):
            raise NotFound(f"volume {volume_id} does not exist on this node")
        self._after_reattach(volume_id)
        with self.locks.hold(volume_id):
            record = self._record(volume_id)
            _path_arg(volume_path, "volume_path")
            attached = self.attached.get(volume_id)
            staged = self._staged(volume_id)
            if attached is None or staged is None:
                raise FailedPrecondition(f"volume {volume_id} is not staged on this node")
            server = attached.attachment.server
            if server is None:
                raise Unavailable(f"volume {volume_id} has no data plane")
            wanted = pick_capacity(required, limit, default=record.capacity) if required else 0
            capacity = max(record.capacity, wanted, attached.backend.size)
            if capacity > attached.backend.size:
                attached.backend.grow(capacity)  # durable before any guest sees it
            if capacity > record.capacity:
                record.capacity = capacity
                self.store.put(record)
            if attached.vhost:  # the guest reads the new size from the config space
                server.resize(capacity)
                return capacity
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
            return capacity

    # for the controller, which holds the volume's lock

    @contextlib.contextmanager
    def quiesced(self, volume_id: str) -> Iterator[None]:
        """The volume's image holds every write its guest was answered for, on stable
        storage, and changes no more until the block ends (guest requests wait)."""
        attached = self.attached.get(volume_id)
        server = attached.attachment.server if attached else None
        if server is not None:
            with server.quiesced():
                yield
            return
        if volume_id in vduse_devices():  # a device nobody serves yet changes nothing
            log.info("%s: copied while its device waits to be served again", volume_id)
        yield

    def set_qos(self, volume_id: str, limits: QosLimits) -> bool:
        """Applies the limits to the volume's data plane if it runs here; True if it does."""
        attached = self.attached.get(volume_id)
        server = attached.attachment.server if attached else None
        if server is None:
            return False
        server.set_qos(limits)
        return True

    def condition(self, volume_id: str) -> tuple[bool, str]:
        """(abnormal, message) as this node sees the volume."""
        problem = self.problems.get(volume_id)
        if problem is not None:
            return True, problem
        attached = self.attached.get(volume_id)
        with self._reattach_lock:
            reattaching = volume_id in self._reattaching
        if attached is None and reattaching:
            return True, "its VDUSE device is being served again (re-attach in progress)"
        if attached is None:
            if self.staging.exists(volume_id):
                return True, "volume is staged but its data plane is not running"
            return False, "volume is not staged on this node"
        server = attached.attachment.server
        if server is None:
            return True, "volume has no data plane"
        found = server.problems()
        if (health := self.io_health.get(volume_id)) is not None and health.failing:
            found.append(health.failing)
        if found:
            return True, "; ".join(found)
        stats = server.stats()
        return False, (
            f"served by {attached.device}; {stats['errors']} I/O errors and "
            f"{stats['bad_chains']} malformed requests refused so far"
        )

    def stats(self, volume_id: str, volume_path: str) -> VolumeStats:
        """The volume is looked up first: an unknown volume is NOT_FOUND whatever the path,
        and so is a path where the volume is not (relative paths included)."""
        if not volume_path:
            raise InvalidArgument("volume_path is required")
        self._record(volume_id)
        path = Path(volume_path)
        if "\0" in volume_path or not path.is_absolute() or not path.exists():
            raise NotFound(f"volume {volume_id} is not at {volume_path!r}")
        abnormal, message = self.condition(volume_id)
        attached = self.attached.get(volume_id)
        if not path.is_dir() or (attached is not None and attached.vhost):
            size = attached.backend.size if attached else 0
            return VolumeStats(total=size, abnormal=abnormal, message=message)
        st = os.statvfs(path)
        return VolumeStats(
            total=st.f_blocks * st.f_frsize, available=st.f_bavail * st.f_frsize,
            used=(st.f_blocks - st.f_bfree) * st.f_frsize, inodes_total=st.f_files,
            inodes_free=st.f_ffree, inodes_used=st.f_files - st.f_ffree,
            abnormal=abnormal, message=message,
        )  # fmt: skip

    # reconciliation

    def reconcile(self) -> None:
        """Serves every VDUSE device of a volume on this node that nobody serves: at
        start-up (the devices a previous process left staged) and periodically (what
        failed before). Reports in the volumes' conditions what it cannot fix. Each volume
        is worked on in its own thread: a backend that hangs (a Ceph outage) holds back its
        own volumes only, never the others or the caller."""
        self._sample_io()
        self.staging.ensure()
        staged, unreadable = self.staging.scan()
        by_id = {r.volume_id: r for r in staged}
        for volume_id, reason in unreadable.items():
            log.error("%s: staging record unreadable: %s", volume_id, reason)
        devices = vduse_devices()
        for volume_id in sorted(set(by_id) | set(unreadable) | devices):
            if volume_id in self.attached:
                continue
            with self._reattach_lock:
                if self._closing or volume_id in self._reattaching:
                    continue
                worker = threading.Thread(
                    target=self._reconcile_task, name=f"reattach-{volume_id}", daemon=True,
                    args=(volume_id, by_id.get(volume_id), volume_id in devices),
                )  # fmt: skip
                self._reattaching[volume_id] = worker
            worker.start()

    def _after_reattach(self, volume_id: str, wait: float = REATTACH_WAIT_S) -> None:
        """A call on a volume that a re-attach is working on waits for it (a while), rather
        than being told to come back or reporting the state before it."""
        with self._reattach_lock:
            worker = self._reattaching.get(volume_id)
        if worker is not None and worker is not threading.current_thread():
            worker.join(wait)

    def _reconcile_task(self, volume_id: str, staged: StageRecord | None, has_device: bool) -> None:
        try:
            with self.locks.hold(volume_id):
                self._reconcile_one(volume_id, staged, has_device)
        except Exception as e:  # busy (retried next round) or reported in its condition
            log.debug("%s: not reconciled now: %s", volume_id, e)
        finally:
            with self._reattach_lock:
                self._reattaching.pop(volume_id, None)

    def _sample_io(self) -> None:
        now = time.monotonic()
        seconds, self._last_sample = now - self._last_sample, now
        for volume_id in list(self.io_health.keys() - self.attached.keys()):
            del self.io_health[volume_id]
        for volume_id, attached in list(self.attached.items()):
            server = attached.attachment.server
            if server is not None:
                self.io_health.setdefault(volume_id, IoHealth()).observe(server.stats(), seconds)

    def _reconcile_one(self, volume_id: str, staged: StageRecord | None, has_device: bool) -> None:
        if volume_id in self.attached:
            return
        if not has_device:
            if staged is not None:
                self.problems[volume_id] = (
                    "volume is staged but its VDUSE device is gone; NodeStageVolume "
                    "creates it again"
                )
            return
        attached = self._adopt(volume_id, staged.readonly if staged else False)
        if staged is not None or self.staging.exists(volume_id):
            return
        # A device without a staging record (its record was lost): released when unused.
        if attached.attachment.in_use():
            self.problems[volume_id] = (
                f"served at {attached.device}, but it has no staging record; "
                "NodeUnstageVolume releases it"
            )
            return
        log.warning("%s: released a VDUSE device without a staging record", volume_id)
        attached.attachment.stop()
        attached.backend.close()
        del self.attached[volume_id]
        self._driver(volume_id).forget(volume_id)
        self._data_plane_log(volume_id).unlink(missing_ok=True)
        self.problems.pop(volume_id, None)

    def dead_threads(self) -> list[str]:
        found = []
        for attached in list(self.attached.values()):
            server = attached.attachment.server
            if server is not None:
                found += server.dead_threads()
        return found

    def shutdown(self, wait: float = 10.0) -> None:
        """Leaves every volume staged: the kernel devices outlive this process, whose data
        plane stops cleanly first (no C code runs while the interpreter exits). Re-attaches
        still running get `wait` seconds; one that serves later lets go itself."""
        with self._reattach_lock:
            self._closing = True
            workers = list(self._reattaching.values())
        deadline = time.monotonic() + wait
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        with self._reattach_lock:
            attached = list(self.attached.items())
            self.attached.clear()
        for volume_id, volume in attached:
            try:
                volume.attachment.release()
            except Exception:
                log.exception("%s: cannot release its device cleanly", volume_id)
            volume.backend.close()
        log.info("leaving %d volume(s) staged", len(attached))
