"""Prometheus metrics of the node's volumes, read from the data plane's counters when
scraped: nothing runs per request."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from csi_vduse.dataplane.server import LATENCY_BOUNDS
from csi_vduse.lifecycle.node import NodeVolumes

REQUESTS = {
    "reads": "read", "writes": "write", "flushes": "flush", "discards": "discard",
    "write_zeroes": "write_zeroes", "get_ids": "get_id",
}  # fmt: skip
FAILURES = {
    "errors": "io_error",
    "unsupported": "unsupported",
    "bad_chains": "malformed",
    "faults": "guest_memory_fault",
    "poisoned": "crashed_before",
    "enospc": "out_of_space",
}


class VolumeCollector(Collector):
    def __init__(self, node: NodeVolumes) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "csi_vduse_requests", "virtio-blk requests completed", labels=["volume", "type"]
        )
        moved = CounterMetricFamily(
            "csi_vduse_bytes", "Bytes read and written by the guest", labels=["volume", "op"]
        )
        failed = CounterMetricFamily(
            "csi_vduse_request_failures", "Requests that failed, by why",
            labels=["volume", "reason"],
        )  # fmt: skip
        stopped = GaugeMetricFamily(
            "csi_vduse_queues_stopped", "Queues stopped for a failure they cannot report",
            labels=["volume"],
        )  # fmt: skip
        abnormal = GaugeMetricFamily(
            "csi_vduse_volume_abnormal", "1 when the volume's condition is abnormal",
            labels=["volume"],
        )  # fmt: skip
        latency = HistogramMetricFamily(
            "csi_vduse_request_seconds",
            "Service time of the volume's requests, from taken off the ring to completed",
            labels=["volume"],
        )  # fmt: skip
        in_flight = GaugeMetricFamily(
            "csi_vduse_requests_in_flight", "Requests being served now", labels=["volume"]
        )
        throttled = CounterMetricFamily(
            "csi_vduse_qos_throttled_seconds",
            "Time the volume's queues waited for their QoS limits", labels=["volume"],
        )  # fmt: skip
        volumes = set(self.node.attached) | set(self.node.problems)
        for volume_id in sorted(volumes):
            is_abnormal, _ = self.node.condition(volume_id)
            abnormal.add_metric([volume_id], int(is_abnormal))
            attached = self.node.attached.get(volume_id)
            server = attached.attachment.server if attached else None
            if server is None:
                continue
            stats = server.stats()
            for field, kind in REQUESTS.items():
                requests.add_metric([volume_id, kind], stats[field])
            moved.add_metric([volume_id, "read"], stats["read_bytes"])
            moved.add_metric([volume_id, "write"], stats["written_bytes"])
            for field, reason in FAILURES.items():
                failed.add_metric([volume_id, reason], stats[field])
            stopped.add_metric([volume_id], server.broken_queues())
            throttled.add_metric([volume_id], stats["throttled_us"] / 1e6)
            counts, seconds = server.latency()
            cumulative = list(itertools.accumulate(counts))
            buckets = [(f"{b:g}", c) for b, c in zip(LATENCY_BOUNDS, cumulative, strict=False)]
            latency.add_metric([volume_id], [*buckets, ("+Inf", cumulative[-1])], sum_value=seconds)
            in_flight.add_metric([volume_id], server.in_flight())
        yield from (requests, moved, failed, stopped, abnormal, throttled, latency, in_flight)
