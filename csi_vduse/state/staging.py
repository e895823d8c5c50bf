"""What is staged on this node, kept in the state dir so a restarted plugin knows."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from csi_vduse.state.atomic import remove_durably, write_atomic
from csi_vduse.state.records import Record, UnreadableRecord, load
from csi_vduse.state.volumes import check_volume_id


class StageRecord(Record):
    volume_id: str
    staging_path: str
    access_type: Literal["mount", "block"]
    access_mode: int
    fs_type: str = ""
    mount_flags: list[str] = Field(default_factory=list)
    readonly: bool = False
    device: str = ""
    published: list[str] = Field(default_factory=list)  # target paths, for single-writer

    def same_stage(self, other: StageRecord) -> bool:
        ignore = {"device", "version", "published"}
        return self.model_dump(exclude=ignore) == other.model_dump(exclude=ignore)


class StagingStore:
    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "staged"

    def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, volume_id: str) -> Path:
        check_volume_id(volume_id)
        return self.root / f"{volume_id}.json"

    def get(self, volume_id: str) -> StageRecord | None:
        """Raises UnreadableRecord for a record that exists but cannot be used."""
        return load(StageRecord, self._path(volume_id))

    def exists(self, volume_id: str) -> bool:
        return self._path(volume_id).exists()

    def put(self, record: StageRecord) -> None:
        write_atomic(self._path(record.volume_id), record.model_dump_json().encode())

    def delete(self, volume_id: str) -> None:
        remove_durably(self._path(volume_id))

    def scan(self) -> tuple[list[StageRecord], dict[str, str]]:
        """Every record, and the ids of those that cannot be read with the reason."""
        records: list[StageRecord] = []
        unreadable: dict[str, str] = {}
        if not self.root.is_dir():
            return records, unreadable
        for path in sorted(self.root.glob("*.json")):
            if path.name.startswith("."):
                continue
            try:
                record = load(StageRecord, path)
            except UnreadableRecord as e:
                unreadable[path.stem] = e.reason
                continue
            if record is not None:
                records.append(record)
        return records, unreadable
