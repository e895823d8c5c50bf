"""A volume whose every request fails is abnormal within one interval; a success clears it."""

from __future__ import annotations

from csi_vduse.lifecycle.io_health import REQUEST_FIELDS, IoHealth


def stats(reads: int = 0, writes: int = 0, errors: int = 0) -> dict[str, int]:
    return {**dict.fromkeys(REQUEST_FIELDS, 0), "reads": reads, "writes": writes, "errors": errors}


def test_every_request_failing_turns_abnormal_and_one_success_clears_it() -> None:
    health = IoHealth()
    health.observe(stats(reads=10, writes=5), 5)
    assert health.failing is None
    health.observe(stats(reads=12, writes=8, errors=5), 5)  # all 5 new requests failed
    assert health.failing is not None and "5 I/O errors" in health.failing
    health.observe(stats(reads=12, writes=8, errors=5), 5)  # no requests: no news
    assert health.failing is not None
    health.observe(stats(reads=13, writes=9, errors=6), 5)  # one of two succeeded
    assert health.failing is None


def test_some_errors_among_successes_are_not_a_dead_backend() -> None:
    health = IoHealth()
    health.observe(stats(reads=100, errors=3), 5)
    assert health.failing is None
