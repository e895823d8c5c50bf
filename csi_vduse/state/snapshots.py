"""Snapshots on this node: `<data dir>/snapshots/<id>.img`, a point-in-time copy of a
volume's image, and its record `<id>.json`. The image is complete before the record is
written: a record means a snapshot that is ready to use."""

from __future__ import annotations

import time
from pathlib import Path

from csi_vduse.state import ids
from csi_vduse.state.atomic import remove_durably, write_atomic
from csi_vduse.state.records import Record, load, scan

ID_PREFIX = ids.SNAPSHOT_PREFIX


SNAPSHOT_IDS = ids.IdSpace(ID_PREFIX, "snapshot_id")
snapshot_id_for = SNAPSHOT_IDS.make
parse_snapshot_id = SNAPSHOT_IDS.parse
kind_of_snapshot = SNAPSHOT_IDS.kind_of
check_snapshot_id = SNAPSHOT_IDS.check


class SnapshotRecord(Record):
    snapshot_id: str
    name: str
    source_volume_id: str
    size: int
    created_at: float = 0.0
    # the source's file system, carried to the volumes made from it (never formatted again)
    formatted: bool = False
    fs_type: str | None = None


class SnapshotStore:
    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / "snapshots"

    def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def image(self, snapshot_id: str) -> Path:
        return self.root / f"{snapshot_id}.img"

    def _record_path(self, snapshot_id: str) -> Path:
        return self.root / f"{snapshot_id}.json"

    def get(self, snapshot_id: str) -> SnapshotRecord | None:
        if not check_snapshot_id(snapshot_id):
            return None
        return load(SnapshotRecord, self._record_path(snapshot_id))

    def put(self, record: SnapshotRecord) -> None:
        if not record.created_at:
            record.created_at = time.time()
        write_atomic(self._record_path(record.snapshot_id), record.model_dump_json().encode())

    def delete(self, snapshot_id: str) -> None:
        """Record first: a crash in between leaves an image without a record, which is a
        snapshot never answered as made and is removed when the name is used again."""
        remove_durably(self._record_path(snapshot_id))
        remove_durably(self.image(snapshot_id))

    def scan(self) -> tuple[list[SnapshotRecord], dict[str, str]]:
        """Every record, and the ids of those that cannot be read with the reason."""
        return scan(self.root, ID_PREFIX, self.get)
