"""Whether a served volume's requests fail, judged once per reconcile interval from its data
plane's counters: a window in which every request failed turns the volume abnormal, a
window with one success turns it normal again, a window without requests changes nothing."""

from __future__ import annotations

from dataclasses import dataclass

# the request counters of DataPlane stats; `errors` counts those that failed
REQUEST_FIELDS = ("reads", "writes", "flushes", "discards", "write_zeroes", "get_ids")


@dataclass
class IoHealth:
    requests: int = 0
    errors: int = 0
    failing: str | None = None  # why the volume is abnormal; None while requests succeed

    def observe(self, stats: dict[str, int], seconds: float) -> None:
        requests = sum(stats[name] for name in REQUEST_FIELDS)
        failed, tried = stats["errors"] - self.errors, requests - self.requests
        self.requests, self.errors = requests, stats["errors"]
        if tried <= 0:
            return
        if failed >= tried:
            self.failing = (
                f"every request of the last {seconds:.0f} s failed ({failed} I/O errors): the "
                "backend cannot serve the volume"
            )
        else:
            self.failing = None
