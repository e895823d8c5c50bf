"""Volume and snapshot ids: `vduse-[<tag>-]<hash>[-<location>]`, and the same after
`vduse-snap-`. The hash is of the CO's name (CreateVolume is idempotent by name across
crashes); the tag names the backend (none: the file backend); the location is what the
backend needs to find the volume when a call brings nothing but the id (RBD: its pool)."""

from __future__ import annotations

import hashlib
import re
from typing import NamedTuple

from csi_vduse.backends.registry import KINDS, kind_of_tag

VOLUME_PREFIX = "vduse-"
SNAPSHOT_PREFIX = "vduse-snap-"
LOCATION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_REST = re.compile(
    r"^(?:(?P<tag>[a-z][a-z0-9]{0,15})-)?(?P<hash>[0-9a-f]{40})"
    r"(?:-(?P<location>[A-Za-z0-9][A-Za-z0-9._-]{0,63}))?$"
)
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MAX_ID_BYTES = 128


class InvalidId(ValueError):
    pass


class ParsedId(NamedTuple):
    kind: str
    hash: str
    location: str


def name_hash(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:40]


def make(prefix: str, kind: str, name: str, location: str = "") -> str:
    return compose(prefix, kind, name_hash(name), location)


def compose(prefix: str, kind: str, hash: str, location: str = "") -> str:
    found = KINDS[kind]
    assert bool(location) == found.located and (not location or LOCATION.match(location))
    tag = f"{found.id_tag}-" if found.id_tag else ""
    return f"{prefix}{tag}{hash}" + (f"-{location}" if location else "")


def parse(prefix: str, value: str) -> ParsedId | None:
    """The kind, hash and location of one of our ids; None for any other string."""
    if not value.startswith(prefix):
        return None
    found = _REST.match(value.removeprefix(prefix))
    if found is None:
        return None
    kind = kind_of_tag(found["tag"] or "", found["location"] is not None)
    return ParsedId(kind, found["hash"], found["location"] or "") if kind else None


def check_form(value: str, what: str) -> None:
    """Raises InvalidId for an id that is empty, too long, or could name another path."""
    if not value:
        raise InvalidId(f"{what} is required")
    if len(value.encode()) > MAX_ID_BYTES:
        raise InvalidId(f"{what} is longer than {MAX_ID_BYTES} bytes")
    if not _SAFE.match(value):
        raise InvalidId(f"{what} {value!r} holds characters other than [A-Za-z0-9._-]")


class IdSpace:
    """The ids after one prefix (volumes, snapshots): made, parsed and checked alike."""

    def __init__(self, prefix: str, what: str) -> None:
        self.prefix, self.what = prefix, what

    def make(self, name: str, kind: str = "file", location: str = "") -> str:
        """Deterministic, so that a create is idempotent by name across crashes."""
        return make(self.prefix, kind, name, location)

    def parse(self, value: str) -> ParsedId | None:
        return parse(self.prefix, value)

    def kind_of(self, value: str) -> str | None:
        """The backend of one of our ids; None for any other id."""
        parsed = parse(self.prefix, value)
        return parsed.kind if parsed else None

    def check(self, value: str) -> bool:
        """True for one of our ids; False for a harmless id that cannot be ours.
        Raises InvalidId for an id that is empty, too long, or could name another path."""
        check_form(value, self.what)
        return parse(self.prefix, value) is not None
