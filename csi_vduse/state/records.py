"""Versioned JSON records, read tolerantly: fields a newer version added are ignored, a
record this version cannot read is reported by its own id and never overwritten."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

RECORD_VERSION = 1


class UnreadableRecord(Exception):
    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"record {path} cannot be used: {reason}")
        self.path = path
        self.reason = reason


class Record(BaseModel):
    model_config = ConfigDict(extra="ignore")

    version: int = RECORD_VERSION


R = TypeVar("R", bound=Record)


def load(kind: type[R], path: Path) -> R | None:
    """The record at `path`, None when there is none; UnreadableRecord when it is corrupt
    or written by a newer version."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        record = kind.model_validate_json(raw)
    except ValidationError as e:
        raise UnreadableRecord(path, f"not a valid record ({e.error_count()} errors)") from None
    if record.version > RECORD_VERSION:
        raise UnreadableRecord(
            path, f"written by a newer csi-vduse (record version {record.version})"
        )
    return record
