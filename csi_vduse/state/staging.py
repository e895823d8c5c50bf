"""What is staged on this node, kept in the state dir so a restarted plugin knows."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from csi_vduse.state.atomic import remove_durably, write_atomic
from csi_vduse.state.volumes import check_volume_id


class StageRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    volume_id: str
    staging_path: str
    access_type: Literal["mount", "block"]
    access_mode: int
    fs_type: str = ""
    mount_flags: list[str] = []
    readonly: bool = False
    device: str = ""


class StagingStore:
    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "staged"

    def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, volume_id: str) -> Path:
        check_volume_id(volume_id)
        return self.root / f"{volume_id}.json"

    def get(self, volume_id: str) -> StageRecord | None:
        try:
            return StageRecord.model_validate_json(self._path(volume_id).read_bytes())
        except FileNotFoundError:
            return None

    def put(self, record: StageRecord) -> None:
        write_atomic(self._path(record.volume_id), record.model_dump_json().encode())

    def delete(self, volume_id: str) -> None:
        remove_durably(self._path(volume_id))

    def all(self) -> list[StageRecord]:
        if not self.root.is_dir():
            return []
        return [
            StageRecord.model_validate_json(p.read_bytes())
            for p in sorted(self.root.glob("*.json"))
            if not p.name.startswith(".")
        ]
