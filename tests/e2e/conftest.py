"""The e2e suite drives the real kernel: it runs inside the lab, never on a host
without VDUSE (there it fails rather than skips)."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("CSI_VDUSE_IN_LAB") != "1" or not Path("/dev/vduse/control").exists():
        raise pytest.UsageError(
            "the e2e tests need a VDUSE kernel: run them through the lab, "
            "python -m tests.lab.runner -- python -m pytest tests/e2e"
        )


@pytest.fixture
def workdir() -> Iterator[Path]:
    base = Path(os.environ.get("LAB_SCRATCH", "/run/scratch"))
    path = base / f"t-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def name() -> str:
    return f"e2e-{uuid.uuid4().hex[:8]}"
