"""The file backend's driver: a volume is `<data dir>/volumes/<id>.img` on the node that
made it (sparse, or allocated when thick), a snapshot a copy in `<data dir>/snapshots/`,
a clone a copy (a reflink where the file system has them) cut while the source's data
plane is quiesced."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

from csi_vduse.backends.api import ProvisionRequest, Secrets, VolumeDriver
from csi_vduse.backends.base import Backend
from csi_vduse.backends.file.copy import copy_image
from csi_vduse.backends.file.image import FileBackend
from csi_vduse.backends.file.space import available_bytes, ensure_space, exclusive
from csi_vduse.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
)
from csi_vduse.lifecycle.capacity import pick_capacity
from csi_vduse.state.atomic import fsync_dir, remove_durably
from csi_vduse.state.records import UnreadableRecord
from csi_vduse.state.snapshots import ID_PREFIX as SNAPSHOT_PREFIX
from csi_vduse.state.snapshots import SnapshotRecord, snapshot_id_for
from csi_vduse.state.volumes import InvalidId, VolumeParams, VolumeRecord, volume_id_for

log = logging.getLogger(__name__)


class Driver(VolumeDriver):
    kind = "file"
    locality = "node"

    def startup(self) -> None:
        """Snapshot images without a record: cuts or deletes a crash interrupted, never
        answered as made."""
        root = self.ctx.snapshots.root
        if not root.is_dir():
            return
        for image in root.glob(f"{SNAPSHOT_PREFIX}*.img"):
            if not image.with_suffix(".json").exists():
                log.warning("%s: removing a snapshot image without a record", image.stem)
                image.unlink(missing_ok=True)

    def volume_id(self, name: str, params: VolumeParams) -> str:
        return volume_id_for(name, self.kind)

    def snapshot_id(self, name: str, source_volume_id: str) -> str:
        return snapshot_id_for(name, self.kind)

    def available(self) -> int:
        volumes = self.ctx.volumes
        volumes.ensure()
        return available_bytes(self.ctx.data_dir, volumes.root)

    @contextlib.contextmanager
    def _reserve(self, needed: int) -> Iterator[None]:
        """Space for `needed` more bytes, promised to no one else while the block runs."""
        with exclusive(self.ctx.space):
            ensure_space(self.ctx.data_dir, self.ctx.volumes.root, needed)
            yield

    # volumes

    def provision(self, request: ProvisionRequest) -> VolumeRecord:
        volumes = self.ctx.volumes
        volume_id = self.volume_id(request.name, request.params)
        volumes.ensure()
        existing = self._local(volume_id)
        if existing is not None:
            capacity = existing.capacity
            fits = request.required <= capacity and (not request.limit or capacity <= request.limit)
            if not fits or existing.params != request.params or existing.source != request.source:
                raise AlreadyExists(
                    f"volume {request.name} exists with {capacity} bytes, {existing.params} and "
                    f"source {existing.source}; the request asks for something else"
                )
            return existing
        record = VolumeRecord(
            volume_id=volume_id, name=request.name, capacity=0, params=request.params,
            qos=request.qos, source=request.source,
        )  # fmt: skip
        image = volumes.image(volume_id)
        image.unlink(missing_ok=True)  # an image without a record never held data
        if request.source is None:
            record.capacity = pick_capacity(request.required, request.limit)
            with self._reserve(record.capacity):
                _write_image(image, record.capacity, request.params.provisioning == "thick")
        else:
            self._copy_source(record, request.required, request.limit)
        return record

    def _copy_source(self, record: VolumeRecord, required: int, limit: int) -> None:
        assert record.source is not None
        kind, source_id = record.source
        with self.ctx.locks.hold(source_id):
            if kind == "snapshot":
                snapshot = self._snapshot(source_id)
                origin, size = self.ctx.snapshots.image(source_id), snapshot.size
                record.formatted, record.fs_type = snapshot.formatted, snapshot.fs_type
                quiesce: AbstractContextManager[None] = contextlib.nullcontext()
                reflink = True  # a snapshot is never written
            else:
                volume = self._existing(source_id, "source volume")
                origin, size = self.ctx.volumes.image(source_id), volume.capacity
                record.formatted, record.fs_type = volume.formatted, volume.fs_type
                quiesce = self.ctx.quiesce(source_id)
                reflink = volume.params.provisioning != "thick"
            record.capacity = pick_capacity(required, limit, default=size)
            if record.capacity < size:
                raise OutOfRange(
                    f"the {kind} {source_id} holds {size} bytes, more than the "
                    f"{record.capacity} asked for"
                )
            with self._reserve(record.capacity):
                how = copy_image(
                    origin, self.ctx.volumes.image(record.volume_id), record.capacity,
                    thick=record.params.provisioning == "thick", reflink=reflink, hold=quiesce,
                )  # fmt: skip
        log.info("%s: made from %s %s (%s)", record.volume_id, kind, source_id, how)

    def grow(
        self, volume_id: str, required: int, limit: int, secrets: Secrets,
        known: VolumeRecord | None,
    ) -> tuple[VolumeRecord, bool]:  # fmt: skip
        if known is None:
            raise NotFound(f"volume {volume_id} does not exist")
        capacity = pick_capacity(required, limit, default=known.capacity)
        if capacity <= known.capacity:
            return known, False
        with self._reserve(capacity - known.capacity):
            fd = os.open(self.ctx.volumes.image(volume_id), os.O_RDWR | os.O_CLOEXEC)
            try:
                if known.params.provisioning == "thick":
                    os.posix_fallocate(fd, 0, capacity)
                elif os.fstat(fd).st_size < capacity:
                    os.ftruncate(fd, capacity)
                os.fsync(fd)
            finally:
                os.close(fd)
        known.capacity = capacity
        return known, True

    def delete(self, volume_id: str, secrets: Secrets) -> None:
        remove_durably(self.ctx.volumes.image(volume_id))

    def missing(self, record: VolumeRecord) -> bool:
        with contextlib.suppress(FileNotFoundError):
            return self.ctx.volumes.image(record.volume_id).stat().st_size < record.capacity
        return True

    def held_bytes(self, volume_id: str) -> int:
        with contextlib.suppress(FileNotFoundError):
            return self.ctx.volumes.image(volume_id).stat().st_size
        return 0

    # snapshots

    def snapshot_create(
        self, snapshot_id: str, name: str, source_volume_id: str, secrets: Secrets
    ) -> SnapshotRecord:
        snapshots = self.ctx.snapshots
        existing = self._local_snapshot(snapshot_id)
        if existing is not None:
            if existing.source_volume_id != source_volume_id:
                raise AlreadyExists(
                    f"snapshot {name} exists of volume {existing.source_volume_id}, "
                    f"not of {source_volume_id}"
                )
            return existing
        with self.ctx.locks.hold(source_volume_id):
            volume = self._existing(source_volume_id, "volume")
            source = self.ctx.volumes.image(volume.volume_id)
            image = snapshots.image(snapshot_id)
            snapshots.ensure()
            image.unlink(missing_ok=True)  # a cut that crashed before its record
            try:
                held = os.stat(source).st_blocks * 512
            except FileNotFoundError:
                raise FailedPrecondition(f"volume {volume.volume_id} has no image") from None
            with self._reserve(held):
                how = copy_image(
                    source, image, os.stat(source).st_size,
                    reflink=volume.params.provisioning != "thick",
                    hold=self.ctx.quiesce(volume.volume_id),
                )  # fmt: skip
                size = os.stat(image).st_size
        record = SnapshotRecord(
            snapshot_id=snapshot_id, name=name, source_volume_id=volume.volume_id, size=size,
            formatted=volume.formatted, fs_type=volume.fs_type,
        )  # fmt: skip
        log.info("%s: snapshot %s of %d bytes cut (%s)", volume.volume_id, snapshot_id, size, how)
        return record

    def snapshot_delete(self, snapshot_id: str, secrets: Secrets) -> None:
        remove_durably(self.ctx.snapshots.image(snapshot_id))

    # the node's side

    def open(self, record: VolumeRecord, readonly: bool) -> Backend:
        return FileBackend.open(
            self.ctx.volumes.image(record.volume_id), None, readonly,
            thick=record.params.provisioning == "thick", direct=record.params.cache == "direct",
        )  # fmt: skip

    # records on this node

    def _local(self, volume_id: str) -> VolumeRecord | None:
        try:
            return self.ctx.volumes.get(volume_id)
        except InvalidId as e:
            raise InvalidArgument(str(e)) from None
        except UnreadableRecord as e:
            raise FailedPrecondition(str(e)) from None

    def _existing(self, volume_id: str, what: str) -> VolumeRecord:
        record = self._local(volume_id)
        if record is None:
            raise NotFound(f"{what} {volume_id} does not exist")
        return record

    def _local_snapshot(self, snapshot_id: str) -> SnapshotRecord | None:
        try:
            return self.ctx.snapshots.get(snapshot_id)
        except InvalidId:  # a content source may name anybody's snapshot
            return None
        except UnreadableRecord as e:
            raise FailedPrecondition(str(e)) from None

    def _snapshot(self, snapshot_id: str) -> SnapshotRecord:
        record = self._local_snapshot(snapshot_id)
        if record is None:
            raise NotFound(f"snapshot {snapshot_id} does not exist")
        return record


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
