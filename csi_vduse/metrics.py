"""Prometheus metrics of the node's volumes, read from the data plane's counters when
scraped: nothing runs per request."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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
        yield from (requests, moved, failed, stopped, abnormal)
