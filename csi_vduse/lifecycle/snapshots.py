"""Controller-side snapshots, of a volume of any backend: its driver cuts them (a file
copy while the volume's data plane is quiesced and flushed, an rbd snapshot), this node
keeps their records for ListSnapshots."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

from csi_vduse.backends.api import DriverContext, Quiesce
from csi_vduse.backends.registry import Drivers
from csi_vduse.errors import FailedPrecondition, InvalidArgument, NotFound
from csi_vduse.kernel.vduse import DEVICE_DIR
from csi_vduse.lifecycle.locks import VolumeLocks
from csi_vduse.lifecycle.provisioning import check_name, volume_id_or_raise
from csi_vduse.state.records import UnreadableRecord
from csi_vduse.state.snapshots import (
    SnapshotRecord,
    SnapshotStore,
    check_snapshot_id,
    kind_of_snapshot,
)
from csi_vduse.state.staging import StagingStore
from csi_vduse.state.volumes import InvalidId, VolumeStore, kind_of_volume

log = logging.getLogger(__name__)


def drivers_for(data_dir: Path, state_dir: Path, locks: VolumeLocks, quiesce: Quiesce) -> Drivers:
    """The backends' drivers of a process whose volumes and snapshots live in `data_dir`."""
    return Drivers(
        DriverContext(
            data_dir=data_dir, state_dir=state_dir, volumes=VolumeStore(data_dir),
            snapshots=SnapshotStore(data_dir), locks=locks, space=threading.Lock(),
            quiesce=quiesce,
        )
    )  # fmt: skip


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
    def __init__(self, drivers: Drivers, locks: VolumeLocks) -> None:
        self.drivers = drivers
        self.store = drivers.ctx.snapshots
        self.locks = locks

    def create(
        self, name: str, source_volume_id: str, secrets: dict[str, str] | None = None
    ) -> SnapshotRecord:
        check_name(name)
        if not source_volume_id:
            raise InvalidArgument("source_volume_id is required")
        kind = kind_of_volume(source_volume_id) if volume_id_or_raise(source_volume_id) else None
        if kind is None:
            raise NotFound(f"volume {source_volume_id} does not exist")
        driver = self.drivers.kind(kind)
        snapshot_id = driver.snapshot_id(name, source_volume_id)
        with self.locks.hold(snapshot_id):
            record = driver.snapshot_create(snapshot_id, name, source_volume_id, secrets or {})
            self.store.ensure()
            self.store.put(record)
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
        kind = kind_of_snapshot(snapshot_id)
        assert kind is not None
        with self.locks.hold(snapshot_id):
            self.drivers.kind(kind).snapshot_delete(snapshot_id, secrets or {})
            self.store.delete(snapshot_id)

    def scan(self) -> list[SnapshotRecord]:
        records, unreadable = self.store.scan()
        for snapshot_id, reason in unreadable.items():
            log.error("%s: snapshot record unreadable: %s", snapshot_id, reason)
        return records
