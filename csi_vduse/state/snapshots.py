"""Snapshots on this node: `<data dir>/snapshots/<id>.img`, a point-in-time copy of a
volume's image, and its record `<id>.json`. The image is complete before the record is
written: a record means a snapshot that is ready to use."""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

from csi_vduse.state.atomic import remove_durably, write_atomic
from csi_vduse.state.records import Record, load, scan
from csi_vduse.state.volumes import InvalidId, check_volume_id

ID_PREFIX = "vduse-snap-"
_ID = re.compile(r"^vduse-snap-[0-9a-f]{40}$")
# An RBD snapshot's id names its pool, since DeleteSnapshot is given nothing else.
RBD_ID_PREFIX = ID_PREFIX + "rbd-"
_RBD_ID = re.compile(r"^vduse-snap-rbd-([0-9a-f]{40})-([A-Za-z0-9][A-Za-z0-9._-]{0,63})$")


def _name_hash(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:40]


def snapshot_id_for(name: str) -> str:
    return ID_PREFIX + _name_hash(name)


def rbd_snapshot_id_for(name: str, pool: str) -> str:
    return f"{RBD_ID_PREFIX}{_name_hash(name)}-{pool}"


def rbd_snapshot_of(snapshot_id: str) -> tuple[str, str] | None:
    """(pool, name of the rbd snapshot) of an RBD snapshot's id; None for any other id."""
    found = _RBD_ID.match(snapshot_id)
    return (found[2], f"csi-vduse-snap-{found[1]}") if found else None


def check_snapshot_id(snapshot_id: str) -> bool:
    """True for one of our ids, False for a harmless id that cannot be ours; InvalidId for
    one that is empty, too long or could name another path."""
    try:
        check_volume_id(snapshot_id)  # the same rules of form
    except InvalidId as e:
        raise InvalidId(str(e).replace("volume_id", "snapshot_id")) from None
    return bool(_ID.match(snapshot_id) or _RBD_ID.match(snapshot_id))


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
