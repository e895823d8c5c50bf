"""Controller-side snapshots: a crash-consistent copy of a volume's image, cut while the
volume's data plane (if it runs on this node) is quiesced and flushed."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

from csi_vduse.backends.file_copy import copy_image
from csi_vduse.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from csi_vduse.kernel.vduse import DEVICE_DIR
from csi_vduse.lifecycle import rbd_snapshots
from csi_vduse.lifecycle.capacity import ensure_space, exclusive
from csi_vduse.lifecycle.locks import VolumeLocks
from csi_vduse.lifecycle.provisioning import check_name, existing_volume
from csi_vduse.state.records import UnreadableRecord
from csi_vduse.state.snapshots import (
    ID_PREFIX,
    SnapshotRecord,
    SnapshotStore,
    check_snapshot_id,
    rbd_snapshot_id_for,
    rbd_snapshot_of,
    snapshot_id_for,
)
from csi_vduse.state.staging import StagingStore
from csi_vduse.state.volumes import InvalidId, VolumeRecord, VolumeStore, rbd_image_of

log = logging.getLogger(__name__)
Quiesce = Callable[[str], AbstractContextManager[None]]


def refuse_staged(staging: StagingStore) -> Quiesce:
    """For a controller without the node service: it cannot quiesce a data plane another
    process runs, so it copies only volumes that no node of its own serves."""

    @contextlib.contextmanager
    def quiesce(volume_id: str) -> Iterator[None]:
        if staging.exists(volume_id) or (DEVICE_DIR / volume_id).exists():
            raise FailedPrecondition(
                f"volume {volume_id} is staged; only the plugin serving it can copy it"
            )
        yield

    return quiesce


def snapshot_id_or_raise(snapshot_id: str) -> bool:
    try:
        return check_snapshot_id(snapshot_id)
    except InvalidId as e:
        raise InvalidArgument(str(e)) from None


class Snapshots:
    def __init__(
        self, data_dir: Path, volumes: VolumeStore, locks: VolumeLocks, space: threading.Lock,
        quiesce: Quiesce,
    ) -> None:  # fmt: skip
        self.data_dir = data_dir
        self.store = SnapshotStore(data_dir)
        self.volumes = volumes
        self.locks = locks
        self.space = space
        self.quiesce = quiesce

    def create(
        self, name: str, source_volume_id: str, secrets: dict[str, str] | None = None
    ) -> SnapshotRecord:
        check_name(name)
        if not source_volume_id:
            raise InvalidArgument("source_volume_id is required")
        if rbd_image_of(source_volume_id) is not None:
            return self._cut_rbd(name, source_volume_id, secrets or {})
        snapshot_id = snapshot_id_for(name)
        with self.locks.hold(snapshot_id):
            existing = self._get(snapshot_id)
            if existing is not None:
                if existing.source_volume_id != source_volume_id:
                    raise AlreadyExists(
                        f"snapshot {name} exists of volume {existing.source_volume_id}, "
                        f"not of {source_volume_id}"
                    )
                return existing
            with self.locks.hold(source_volume_id):
                volume = existing_volume(self.volumes, source_volume_id)
                return self._cut(snapshot_id, name, volume)

    def _cut_rbd(self, name: str, source_volume_id: str, secrets: dict[str, str]) -> SnapshotRecord:
        """An rbd snapshot in the pool, and a copy of its record here for ListSnapshots."""
        pool, _ = rbd_image_of(source_volume_id) or ("", "")
        with self.locks.hold(rbd_snapshot_id_for(name, pool)):
            record = rbd_snapshots.cut(name, source_volume_id, secrets)
            self.store.ensure()
            self.store.put(record)
            return record

    def _cut(self, snapshot_id: str, name: str, volume: VolumeRecord) -> SnapshotRecord:
        source = self.volumes.image(volume.volume_id)
        image = self.store.image(snapshot_id)
        self.store.ensure()
        image.unlink(missing_ok=True)  # a cut that crashed before its record
        with exclusive(self.space):
            try:
                held = os.stat(source).st_blocks * 512
            except FileNotFoundError:
                raise FailedPrecondition(f"volume {volume.volume_id} has no image") from None
            ensure_space(self.data_dir, self.volumes.root, held)
            size = os.stat(source).st_size
            how = copy_image(
                source, image, size, reflink=volume.params.provisioning != "thick",
                hold=self.quiesce(volume.volume_id),
            )  # fmt: skip
            size = os.stat(image).st_size
        record = SnapshotRecord(
            snapshot_id=snapshot_id, name=name, source_volume_id=volume.volume_id, size=size,
            formatted=volume.formatted, fs_type=volume.fs_type,
        )  # fmt: skip
        self.store.put(record)
        log.info("%s: snapshot %s of %d bytes cut (%s)", volume.volume_id, snapshot_id, size, how)
        return record

    def _get(self, snapshot_id: str) -> SnapshotRecord | None:
        try:
            return self.store.get(snapshot_id)
        except UnreadableRecord as e:
            raise FailedPrecondition(str(e)) from None

    def get(self, snapshot_id: str) -> SnapshotRecord:
        """NotFound for an id that is not one of ours, even a malformed one: a content
        source names a snapshot that may have been anybody's."""
        try:
            record = self._get(snapshot_id) if check_snapshot_id(snapshot_id) else None
        except InvalidId:
            record = None
        if record is None:
            raise NotFound(f"snapshot {snapshot_id} does not exist")
        return record

    def delete(self, snapshot_id: str, secrets: dict[str, str] | None = None) -> None:
        if not snapshot_id:
            raise InvalidArgument("snapshot_id is required")
        if not snapshot_id_or_raise(snapshot_id):
            return
        with self.locks.hold(snapshot_id):
            if rbd_snapshot_of(snapshot_id) is not None:
                rbd_snapshots.remove(snapshot_id, secrets or {})
            self.store.delete(snapshot_id)

    def remove_orphans(self) -> None:
        """Images without a record: cuts or deletes that a crash interrupted, never
        answered as made. Run at start-up, before any CreateSnapshot."""
        if not self.store.root.is_dir():
            return
        for image in self.store.root.glob(f"{ID_PREFIX}*.img"):
            if not (image.with_suffix(".json")).exists():
                log.warning("%s: removing a snapshot image without a record", image.stem)
                image.unlink(missing_ok=True)

    def scan(self) -> list[SnapshotRecord]:
        records, unreadable = self.store.scan()
        for snapshot_id, reason in unreadable.items():
            log.error("%s: snapshot record unreadable: %s", snapshot_id, reason)
        return records
