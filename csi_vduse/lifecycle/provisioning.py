"""Controller-side volume lifecycle: sparse images in the data dir, one per volume."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from csi_vduse.dataplane.blk_device import MAX_QUEUE_SIZE, MAX_QUEUES
from csi_vduse.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from csi_vduse.kernel.vduse import DEVICE_DIR
from csi_vduse.lifecycle.capacity import ensure_space, pick_capacity
from csi_vduse.lifecycle.locks import VolumeLocks
from csi_vduse.state.atomic import fsync_dir
from csi_vduse.state.staging import StagingStore
from csi_vduse.state.volumes import (
    InvalidId,
    VolumeParams,
    VolumeRecord,
    VolumeStore,
    check_volume_id,
    volume_id_for,
)

MAX_NAME_BYTES = 128
K8S_PARAM_PREFIX = "csi.storage.k8s.io/"


def parse_parameters(params: dict[str, str]) -> VolumeParams:
    """StorageClass parameters: `queues` and `queueSize`; the CO's own keys are ignored."""
    values: dict[str, int] = {}
    for key, raw in params.items():
        if key.startswith(K8S_PARAM_PREFIX):
            continue
        field, low, high = {
            "queues": ("queues", 1, MAX_QUEUES),
            "queueSize": ("queue_size", 2, MAX_QUEUE_SIZE),
        }.get(key, ("", 0, 0))
        if not field:
            raise InvalidArgument(f"unknown parameter {key!r} (known: queues, queueSize)")
        try:
            value = int(raw)
        except ValueError:
            raise InvalidArgument(f"parameter {key}={raw!r} is not an integer") from None
        if not low <= value <= high or (field == "queue_size" and value & (value - 1)):
            rule = " and a power of two" if field == "queue_size" else ""
            raise InvalidArgument(f"parameter {key}={value} must be in [{low}, {high}]{rule}")
        values[field] = value
    return VolumeParams(**values)


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


class Provisioner:
    def __init__(self, data_dir: Path, staging: StagingStore, locks: VolumeLocks) -> None:
        self.data_dir = data_dir
        self.store = VolumeStore(data_dir)
        self.staging = staging
        self.locks = locks

    def create(self, name: str, required: int, limit: int, params: dict[str, str]) -> VolumeRecord:
        check_name(name)
        volume_params = parse_parameters(params)
        capacity = pick_capacity(required, limit)
        volume_id = volume_id_for(name)
        self.store.ensure()
        with self.locks.hold(volume_id):
            existing = self.store.get(volume_id)
            if existing is not None:
                fits = required <= existing.capacity and (not limit or existing.capacity <= limit)
                if not fits or existing.params != volume_params:
                    raise AlreadyExists(
                        f"volume {name} exists with {existing.capacity} bytes and "
                        f"{existing.params}; the request asks for something else"
                    )
                return existing
            image = self.store.image(volume_id)
            # An image without a record is a create that crashed: it never held data.
            image.unlink(missing_ok=True)
            ensure_space(self.data_dir, capacity)
            fd = os.open(image, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, capacity)
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(image.parent)
            record = VolumeRecord(
                volume_id=volume_id, name=name, capacity=capacity, params=volume_params
            )
            self.store.put(record)
            return record

    def is_staged(self, volume_id: str) -> bool:
        return self.staging.get(volume_id) is not None or (DEVICE_DIR / volume_id).exists()

    def delete(self, volume_id: str) -> None:
        if not volume_id_or_raise(volume_id):
            return
        with self.locks.hold(volume_id):
            if self.is_staged(volume_id):
                raise FailedPrecondition(
                    f"volume {volume_id} is staged on this node; unstage it before deleting"
                )
            self.store.delete(volume_id)

    def get(self, volume_id: str) -> VolumeRecord:
        record = self.store.get(volume_id) if volume_id_or_raise(volume_id) else None
        if record is None:
            raise NotFound(f"volume {volume_id} does not exist")
        return record

    def expand(self, volume_id: str, required: int, limit: int) -> VolumeRecord:
        record = self.get(volume_id)
        with self.locks.hold(volume_id):
            capacity = pick_capacity(required, limit, default=record.capacity)
            if capacity <= record.capacity:
                return record
            image = self.store.image(volume_id)
            ensure_space(self.data_dir, capacity - record.capacity)
            fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
            try:
                if os.fstat(fd).st_size < capacity:
                    os.ftruncate(fd, capacity)
                os.fsync(fd)
            finally:
                os.close(fd)
            record.capacity = capacity
            self.store.put(record)
            return record

    def list(self) -> list[VolumeRecord]:
        return list(self.store.list())

    def image_missing(self, record: VolumeRecord) -> bool:
        with contextlib.suppress(FileNotFoundError):
            return self.store.image(record.volume_id).stat().st_size < record.capacity
        return True
