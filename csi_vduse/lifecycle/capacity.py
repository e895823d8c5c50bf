"""CSI capacity ranges."""

from __future__ import annotations

from csi_vduse.errors import InvalidArgument, OutOfRange

MiB = 1 << 20
DEFAULT_CAPACITY = 1 << 30
ALIGNMENT = MiB
MAX_CAPACITY = 1 << 50


def pick_capacity(required: int, limit: int, default: int = DEFAULT_CAPACITY) -> int:
    """The smallest aligned size >= required that stays <= limit (0 means unset)."""
    if required < 0 or limit < 0:
        raise InvalidArgument("capacity_range bytes may not be negative")
    if limit and required > limit:
        raise InvalidArgument(f"required_bytes {required} exceeds limit_bytes {limit}")
    size = required or (min(default, limit) if limit else default)
    size = -(-size // ALIGNMENT) * ALIGNMENT
    if limit and size > limit:
        raise OutOfRange(
            f"no size that is a multiple of {ALIGNMENT} bytes fits in [{required}, {limit}]"
        )
    if size > MAX_CAPACITY:
        raise OutOfRange(f"{size} bytes is larger than the {MAX_CAPACITY} this driver serves")
    return size
