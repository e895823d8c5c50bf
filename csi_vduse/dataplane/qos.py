"""Per-volume QoS limits, enforced by the C data plane's token buckets (qos.c)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_BURST_MS = 1000
MAX_IOPS = 10**9
MAX_BPS = 1 << 50  # 1 PiB/s: beyond any device, within the C side's uint64


class QosLimits(BaseModel):
    """Requests and bytes per second by direction; 0 means unlimited. An idle volume may
    run ahead of its limits by `burst_ms` worth of them."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    read_iops: int = Field(default=0, ge=0, le=MAX_IOPS)
    write_iops: int = Field(default=0, ge=0, le=MAX_IOPS)
    read_bps: int = Field(default=0, ge=0, le=MAX_BPS)
    write_bps: int = Field(default=0, ge=0, le=MAX_BPS)
    burst_ms: int = Field(default=DEFAULT_BURST_MS, ge=1, le=60_000)

    @property
    def unlimited(self) -> bool:
        return not (self.read_iops or self.write_iops or self.read_bps or self.write_bps)

    def native(self) -> list[int]:
        """In enum dp_qos_kind order."""
        return [self.read_iops, self.write_iops, self.read_bps, self.write_bps]
