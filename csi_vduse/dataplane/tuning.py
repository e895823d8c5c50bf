"""Data-plane knobs, from CSI_VDUSE_DP_* environment variables. The defaults are what
the benchmark measured best (README, Benchmark); the knobs exist to measure the levers."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class DataPlaneTuning(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CSI_VDUSE_DP_", frozen=True, extra="ignore")

    # runs of reads/writes in one batch moving this many bytes use a second thread; 0: never
    parallel_min_bytes: Annotated[int, Field(ge=0, le=1 << 30)] = 256 << 10
    # busy-poll the avail ring this long after a batch before sleeping on the kick; 0: never
    poll_us: Annotated[int, Field(ge=0, le=10_000)] = 50
    # offer VIRTIO_RING_F_EVENT_IDX (kick and interrupt suppression)
    event_idx: bool = True
    # "async": requests in flight on the backend's asynchronous path (io_uring for files)
    # and completed out of order, where the backend and the kernel allow; "sync": in order
    engine: Literal["async", "sync"] = "async"
    # requests in flight per queue on the asynchronous path (at most the ring's size)
    depth: Annotated[int, Field(ge=1, le=1024)] = 256
