"""Versioned JSON records, read tolerantly: fields a newer version added are ignored, a
record this version cannot read is reported by its own id and never overwritten."""

from __future__ import annotations

from collections.abc import Callable
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


def scan(root: Path, prefix: str, get: Callable[[str], R | None]) -> tuple[list[R], dict[str, str]]:
    """Every record `<root>/<prefix>*.json` (read by id with `get`), and the ids of those
    that cannot be read with the reason."""
    records: list[R] = []
    unreadable: dict[str, str] = {}
    if not root.is_dir():
        return records, unreadable
    for path in sorted(root.glob(f"{prefix}*.json")):
        try:
            record = get(path.stem)
        except UnreadableRecord as e:
            unreadable[path.stem] = e.reason
            continue
        if record is not None:
            records.append(record)
    return records, unreadable
