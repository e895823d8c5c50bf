"""Sizes as people write them: 1G, 512MiB, 1073741824."""

from __future__ import annotations

import re

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE = re.compile(r"^\s*(\d+)\s*(?:([kmgtp])i?)?b?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Binary units (K = 1024); `Ki` (Kubernetes), `KiB` and `KB` mean the same."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size (examples: 1G, 512MiB, 1048576)")
    return int(m.group(1)) * _UNITS[(m.group(2) or "").lower()]
