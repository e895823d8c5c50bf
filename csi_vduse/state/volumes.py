"""Volumes on this node: `<data dir>/volumes/<id>.img` and its record `<id>.json`.

The record is what says whether the volume was ever formatted: a volume is formatted
only when it holds no signature *and* its record says it never was. That flag only ever
goes from False to True, whoever writes the record."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict

from csi_vduse.backends.registry import kinds
from csi_vduse.dataplane.qos import QosLimits
from csi_vduse.state import ids
from csi_vduse.state.atomic import fsync_dir, remove_durably, write_atomic
from csi_vduse.state.records import Record, load, scan

ID_PREFIX = ids.VOLUME_PREFIX
POOL_NAME = ids.LOCATION
InvalidId = ids.InvalidId


VOLUME_IDS = ids.IdSpace(ID_PREFIX, "volume_id")
volume_id_for = VOLUME_IDS.make
parse_volume_id = VOLUME_IDS.parse
kind_of_volume = VOLUME_IDS.kind_of
check_volume_id = VOLUME_IDS.check


def serial_for(volume_id: str) -> str:
    """The virtio-blk serial (20 bytes at most): the end of the id's hash."""
    parsed = ids.parse(ID_PREFIX, volume_id)
    return (parsed.hash if parsed else volume_id)[-20:]


def _known_kind(kind: str) -> str:
    if kind not in kinds():
        raise ValueError(f"backend {kind!r} is not one of {', '.join(kinds())}")
    return kind


class VolumeParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    queues: int = 1
    queue_size: int = 256
    provisioning: Literal["thin", "thick"] = "thin"
    # virtio-vdpa: a host block device; vhost-vdpa: a character device for a VMM.
    attach: Literal["virtio-vdpa", "vhost-vdpa"] = "virtio-vdpa"
    # page: through the node's page cache; direct: O_DIRECT where the file system allows
    cache: Literal["page", "direct"] = "page"
    # the backend (backends/registry.py) and, for one that needs it, the pool
    backend: Annotated[str, AfterValidator(_known_kind)] = "file"
    pool: str | None = None


Source = tuple[Literal["snapshot", "volume"], str]


class VolumeRecord(Record):
    volume_id: str
    name: str
    capacity: int
    params: VolumeParams = VolumeParams()
    created_at: float = 0.0
    formatted: bool = False
    fs_type: str | None = None
    qos: QosLimits = QosLimits()
    # what the volume was made from: ("snapshot" | "volume", id)
    source: Source | None = None


class VolumeStore:
    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / "volumes"

    def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def image(self, volume_id: str) -> Path:
        return self.root / f"{volume_id}.img"

    def _record_path(self, volume_id: str) -> Path:
        return self.root / f"{volume_id}.json"

    def get(self, volume_id: str) -> VolumeRecord | None:
        """Raises UnreadableRecord for a record that exists but cannot be used."""
        if not check_volume_id(volume_id):
            return None
        return load(VolumeRecord, self._record_path(volume_id))

    def put(self, record: VolumeRecord) -> None:
        """Writes the record; never clears `formatted` and never replaces a record this
        version cannot read."""
        current = self.get(record.volume_id)
        if current is not None and current.formatted and not record.formatted:
            record.formatted, record.fs_type = True, current.fs_type
        if not record.created_at:
            record.created_at = time.time()
        write_atomic(self._record_path(record.volume_id), record.model_dump_json().encode())

    def delete(self, volume_id: str) -> None:
        """Image first, record last: a crash in between leaves a record that a retried
        DeleteVolume finishes."""
        remove_durably(self.image(volume_id))
        remove_durably(self._record_path(volume_id))

    def scan(self) -> tuple[list[VolumeRecord], dict[str, str]]:
        """Every record, and the ids of those that cannot be read with the reason."""
        return scan(self.root, ID_PREFIX, self.get)

    def sync(self) -> None:
        fsync_dir(self.root)
