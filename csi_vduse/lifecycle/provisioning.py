"""Controller-side volume lifecycle: sparse images in the data dir, one per volume."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from csi_vduse.backends.file_copy import copy_image
from csi_vduse.dataplane.blk_device import check_queues
from csi_vduse.dataplane.qos import QosLimits
from csi_vduse.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
)
from csi_vduse.kernel.vduse import DEVICE_DIR
from csi_vduse.lifecycle import rbd_volumes
from csi_vduse.lifecycle.capacity import (
    available_bytes,
    ensure_space,
    exclusive,
    pick_capacity,
)
from csi_vduse.lifecycle.locks import VolumeLocks
from csi_vduse.state.atomic import fsync_dir
from csi_vduse.state.records import UnreadableRecord
from csi_vduse.state.snapshots import rbd_snapshot_of
from csi_vduse.state.staging import StagingStore
from csi_vduse.state.volumes import (
    POOL_NAME,
    InvalidId,
    Source,
    VolumeParams,
    VolumeRecord,
    VolumeStore,
    check_volume_id,
    rbd_image_of,
    rbd_volume_id_for,
    volume_id_for,
)
from csi_vduse.units import parse_size

if TYPE_CHECKING:
    from csi_vduse.lifecycle.snapshots import Snapshots

log = logging.getLogger(__name__)
MAX_NAME_BYTES = 128
K8S_PARAM_PREFIX = "csi.storage.k8s.io/"
# StorageClass or VolumeAttributesClass parameter -> QosLimits field
QOS_PARAMS = {
    "readIOPS": "read_iops", "writeIOPS": "write_iops",
    "readBytesPerSecond": "read_bps", "writeBytesPerSecond": "write_bps",
    "burstMilliseconds": "burst_ms",
}  # fmt: skip


# StorageClass parameters that take one of a few words (the VolumeParams field of that name)
CHOICE_PARAMS = {
    "provisioning": ("thin", "thick"), "attach": ("virtio-vdpa", "vhost-vdpa"),
    "cache": ("page", "direct"), "backend": ("file", "rbd"),
}  # fmt: skip


def parse_parameters(params: dict[str, str]) -> VolumeParams:
    """StorageClass parameters: `queues`, `queueSize`, `provisioning`, `attach`, `cache`,
    `backend` and `pool`; the CO's own keys are ignored."""
    values: dict[str, object] = {}
    for key, raw in params.items():
        if key.startswith(K8S_PARAM_PREFIX) or key in QOS_PARAMS:
            continue
        if (choices := CHOICE_PARAMS.get(key)) is not None:
            if raw not in choices:
                raise InvalidArgument(f"parameter {key}={raw!r} must be {' or '.join(choices)}")
            values[key] = raw
            continue
        if key == "pool":
            if not POOL_NAME.match(raw):
                raise InvalidArgument(f"parameter pool={raw!r} is not a pool name")
            values["pool"] = raw
            continue
        field = {"queues": "queues", "queueSize": "queue_size"}.get(key)
        if field is None:
            raise InvalidArgument(
                f"unknown parameter {key!r} (known: queues, queueSize, provisioning, attach, "
                f"cache, backend, pool, {', '.join(QOS_PARAMS)})"
            )
        try:
            values[field] = int(raw)
        except ValueError:
            raise InvalidArgument(f"parameter {key}={raw!r} is not an integer") from None
    result = VolumeParams.model_validate(values)
    if reason := backend_reason(result):
        raise InvalidArgument(reason)
    try:
        check_queues(result.queues, result.queue_size)
    except ValueError as e:
        raise InvalidArgument(f"parameters queues/queueSize: {e}") from None
    return result


def backend_reason(params: VolumeParams) -> str | None:
    if params.backend == "file":
        return "parameter pool is for backend=rbd" if params.pool is not None else None
    if params.pool is None:
        return "backend=rbd needs the parameter pool"
    if params.provisioning != "thin" or params.cache != "page":
        return "backend=rbd takes neither provisioning nor cache (librbd has its own cache)"
    return None


def parse_qos(
    params: dict[str, str], base: QosLimits | None = None, only_qos: bool = True
) -> QosLimits:
    """QoS limits from `params` on top of `base`: a key not given keeps its value, 0 lifts
    a limit. Byte rates take binary units (100Mi). With `only_qos` any other key is refused
    (mutable parameters); without, other keys are left to parse_parameters."""
    values = (base or QosLimits()).model_dump()
    for key, raw in params.items():
        field = QOS_PARAMS.get(key)
        if field is None:
            if only_qos:
                raise InvalidArgument(
                    f"parameter {key!r} cannot be changed (mutable: {', '.join(QOS_PARAMS)})"
                )
            continue
        try:
            value = parse_size(raw) if field.endswith("_bps") else int(raw)
        except ValueError:
            raise InvalidArgument(f"parameter {key}={raw!r} is not a whole number") from None
        values[field] = value
    try:
        return QosLimits.model_validate(values)
    except ValidationError as e:
        names = {field: key for key, field in QOS_PARAMS.items()}
        problems = "; ".join(
            f"{names.get(str(err['loc'][0]), err['loc'][0])}: {err['msg']}" for err in e.errors()
        )
        raise InvalidArgument(f"QoS parameters: {problems}") from None


def fit_reason(params: VolumeParams, block: bool) -> str | None:
    """Why a volume with `params` cannot be used as a block (or mount) volume, or None."""
    if block and params.attach == "vhost-vdpa":
        return (
            "a vhost-vdpa volume is a character device for a VMM; the kubelet publishes only "
            "block devices as Block volumes: request it with volumeMode Filesystem"
        )
    return None


def check_name(name: str) -> None:
    if not name:
        raise InvalidArgument("name is required")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise InvalidArgument(f"name is longer than {MAX_NAME_BYTES} bytes")
    if "\0" in name or "/" in name or not name.isprintable():
        raise InvalidArgument("name may not hold '/', NUL or control characters")


def volume_id_or_raise(volume_id: str) -> bool:
    try:
        return check_volume_id(volume_id)
    except InvalidId as e:
        raise InvalidArgument(str(e)) from None


def existing_volume(store: VolumeStore, volume_id: str, what: str = "volume") -> VolumeRecord:
    """The record of one of our volumes: INVALID_ARGUMENT for a malformed id, NOT_FOUND
    for none, FAILED_PRECONDITION for one that cannot be read."""
    try:
        record = store.get(volume_id) if volume_id_or_raise(volume_id) else None
    except UnreadableRecord as e:
        raise FailedPrecondition(str(e)) from None
    if record is None:
        raise NotFound(f"{what} {volume_id} does not exist")
    return record


class Provisioner:
    def __init__(
        self, data_dir: Path, staging: StagingStore, locks: VolumeLocks,
        snapshots: Snapshots | None = None,
        set_qos: Callable[[str, QosLimits], bool] | None = None,
    ) -> None:  # fmt: skip
        self.data_dir = data_dir
        self.store = VolumeStore(data_dir)
        self.staging = staging
        self.locks = locks
        self.snapshots = snapshots
        self.set_qos = set_qos
        self.space = snapshots.space if snapshots else threading.Lock()  # no space promised twice

    def available(self) -> int:
        self.store.ensure()
        return available_bytes(self.data_dir, self.store.root)

    def create(
        self, name: str, required: int, limit: int, params: dict[str, str],
        mutable: dict[str, str] | None = None, source: Source | None = None,
        secrets: dict[str, str] | None = None,
    ) -> VolumeRecord:  # fmt: skip
        """A new volume, empty or (`source`) holding a copy of a snapshot or a volume made
        while that volume's data plane is quiesced."""
        check_name(name)
        volume_params = parse_parameters(params)
        qos = parse_qos(mutable or {}, parse_qos(params, only_qos=False))
        if volume_params.backend == "rbd":
            return self._create_rbd(name, required, limit, volume_params, qos, source, secrets)
        volume_id = volume_id_for(name)
        self.store.ensure()
        with self.locks.hold(volume_id):
            existing = self._get(volume_id)
            if existing is not None:
                fits = required <= existing.capacity and (not limit or existing.capacity <= limit)
                if not fits or existing.params != volume_params or existing.source != source:
                    raise AlreadyExists(
                        f"volume {name} exists with {existing.capacity} bytes, "
                        f"{existing.params} and source {existing.source}; the request asks "
                        "for something else"
                    )
                return existing
            record = VolumeRecord(
                volume_id=volume_id, name=name, capacity=0, params=volume_params, qos=qos,
                source=source,
            )  # fmt: skip
            image = self.store.image(volume_id)
            # An image without a record is a create that crashed: it never held data.
            image.unlink(missing_ok=True)
            if source is None:
                record.capacity = pick_capacity(required, limit)
                with exclusive(self.space):
                    ensure_space(self.data_dir, self.store.root, record.capacity)
                    self._write_image(image, record.capacity, volume_params.provisioning == "thick")
            else:
                self._copy_source(record, source, required, limit)
            self.store.put(record)
            return record

    def _create_rbd(
        self, name: str, required: int, limit: int, params: VolumeParams, qos: QosLimits,
        source: Source | None, secrets: dict[str, str] | None,
    ) -> VolumeRecord:  # fmt: skip
        assert params.pool is not None
        with self.locks.hold(rbd_volume_id_for(name, params.pool)):
            record = rbd_volumes.provision(
                name, required, limit, params, qos, secrets or {}, source
            )
            self.store.ensure()
            self.store.put(record)
            return record

    def _copy_source(self, record: VolumeRecord, source: Source, required: int, limit: int) -> None:
        kind, source_id = source
        if self.snapshots is None:
            raise InvalidArgument("this controller makes no volumes from sources")
        if rbd_snapshot_of(source_id) or rbd_image_of(source_id):
            raise InvalidArgument(
                f"the {kind} {source_id} is an rbd one: it makes rbd volumes only"
            )
        with self.locks.hold(source_id):
            if kind == "snapshot":
                snapshot = self.snapshots.get(source_id)
                origin, size = self.snapshots.store.image(source_id), snapshot.size
                record.formatted, record.fs_type = snapshot.formatted, snapshot.fs_type
                quiesce: AbstractContextManager[None] = contextlib.nullcontext()
                reflink = True  # a snapshot is never written
            else:
                volume = existing_volume(self.store, source_id, "source volume")
                if volume.params.backend != record.params.backend:
                    raise InvalidArgument("a volume is cloned only within its backend")
                origin, size = self.store.image(source_id), volume.capacity
                record.formatted, record.fs_type = volume.formatted, volume.fs_type
                quiesce = self.snapshots.quiesce(source_id)
                reflink = volume.params.provisioning != "thick"
            record.capacity = pick_capacity(required, limit, default=size)
            if record.capacity < size:
                raise OutOfRange(
                    f"the {kind} {source_id} holds {size} bytes, more than the "
                    f"{record.capacity} asked for"
                )
            with exclusive(self.space):
                ensure_space(self.data_dir, self.store.root, record.capacity)
                how = copy_image(
                    origin, self.store.image(record.volume_id), record.capacity,
                    thick=record.params.provisioning == "thick", reflink=reflink, hold=quiesce,
                )  # fmt: skip
            log.info("%s: made from %s %s (%s)", record.volume_id, kind, source_id, how)

    def modify(self, volume_id: str, mutable: dict[str, str]) -> VolumeRecord:
        """New QoS limits, persisted first, then applied to the running data plane."""
        with self.locks.hold(volume_id):
            record = existing_volume(self.store, volume_id)
            qos = parse_qos(mutable, record.qos)
            if qos != record.qos:
                record.qos = qos
                self.store.put(record)
            if self.set_qos is not None and self.set_qos(volume_id, qos):
                log.info("%s: QoS now %s", volume_id, qos)
            return record

    @staticmethod
    def _write_image(image: Path, capacity: int, thick: bool) -> None:
        fd = os.open(image, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            if thick:
                os.posix_fallocate(fd, 0, capacity)
            else:
                os.ftruncate(fd, capacity)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            image.unlink(missing_ok=True)
            raise
        os.close(fd)
        fsync_dir(image.parent)

    def is_staged(self, volume_id: str) -> bool:
        return self.staging.exists(volume_id) or (DEVICE_DIR / volume_id).exists()

    def delete(self, volume_id: str, secrets: dict[str, str] | None = None) -> None:
        if not volume_id_or_raise(volume_id):
            return
        with self.locks.hold(volume_id):
            if self.is_staged(volume_id):
                raise FailedPrecondition(
                    f"volume {volume_id} is staged on this node; unstage it before deleting"
                )
            if rbd_image_of(volume_id) is not None:
                rbd_volumes.delete(volume_id, secrets or {})
            self.store.delete(volume_id)

    def _get(self, volume_id: str) -> VolumeRecord | None:
        try:
            return self.store.get(volume_id)
        except UnreadableRecord as e:
            raise FailedPrecondition(str(e)) from None

    def get(self, volume_id: str) -> VolumeRecord:
        """The volume's record; UnreadableRecord when it exists but cannot be used."""
        record = self.store.get(volume_id) if volume_id_or_raise(volume_id) else None
        if record is None:
            raise NotFound(f"volume {volume_id} does not exist")
        return record

    def expand(
        self, volume_id: str, required: int, limit: int, secrets: dict[str, str] | None = None
    ) -> VolumeRecord:
        if not volume_id_or_raise(volume_id):
            raise NotFound(f"volume {volume_id} does not exist")
        with self.locks.hold(volume_id):
            record = self._get(volume_id)
            if rbd_image_of(volume_id) is not None:
                record, grown = rbd_volumes.expand(volume_id, required, limit, secrets or {},
                                                   record)  # fmt: skip
                if grown:
                    self.store.put(record)
                return record
            if record is None:
                raise NotFound(f"volume {volume_id} does not exist")
            capacity = pick_capacity(required, limit, default=record.capacity)
            if capacity <= record.capacity:
                return record
            image = self.store.image(volume_id)
            with exclusive(self.space):
                ensure_space(self.data_dir, self.store.root, capacity - record.capacity)
                fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
                try:
                    if record.params.provisioning == "thick":
                        os.posix_fallocate(fd, 0, capacity)
                    elif os.fstat(fd).st_size < capacity:
                        os.ftruncate(fd, capacity)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            record.capacity = capacity
            self.store.put(record)
            return record

    def scan(self) -> tuple[list[VolumeRecord], dict[str, str]]:
        return self.store.scan()

    def image_missing(self, record: VolumeRecord) -> bool:
        """Whether the node-local image is gone (an RBD image is not looked up: that needs
        the secret the call does not bring)."""
        if record.params.backend == "rbd":
            return False
        with contextlib.suppress(FileNotFoundError):
            return self.store.image(record.volume_id).stat().st_size < record.capacity
        return True

    def image_size(self, volume_id: str) -> int:
        if rbd_image_of(volume_id) is not None:
            return 0
        with contextlib.suppress(FileNotFoundError):
            return self.store.image(volume_id).stat().st_size
        return 0
