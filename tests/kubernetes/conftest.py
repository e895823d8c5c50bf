"""The Kubernetes suite runs inside the lab on a kernel that can run containers (Debian's
6.12): one real cluster for the whole session, torn down at its end. Each test is a step a
user takes, in file order, and records how long it took."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.cluster.node import Node
from tests.cluster.prepare import lab_images

TIMINGS: dict[str, float] = {}
STEP_TIMEOUT = 1200  # seconds a step may take (pytest-timeout) before it fails with the logs
RUNNING: list[Node] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "extended: a step the test command leaves to scripts/test-cluster (what a change "
        "rarely breaks and costs minutes: the controller and two agents before the chart, "
        "csi-sanity through them, a snapshot under write load, RBD through the chart)",
    )
    if (
        os.environ.get("CSI_VDUSE_IN_LAB") != "1"
        or not Path("/sys/fs/cgroup/cgroup.controllers").exists()
    ):
        raise pytest.UsageError(
            "the Kubernetes tests need the lab with a container-capable kernel: "
            "python -m tests.lab.runner --kernel debian612 -- python -m pytest tests/kubernetes"
        )


@pytest.fixture(scope="session")
def cluster(pytestconfig: pytest.Config) -> Iterator[Node]:
    images = lab_images()
    images.pop("python-base")  # the plugin image's base, nothing runs it
    node = Node(Path(os.environ.get("LAB_SCRATCH", "/run/scratch")) / "cluster", images)
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    saying = threading.Lock()  # the image import thread says things too

    def say(message: str) -> None:  # as it happens, past the capture: a stall shows where
        with saying, capture.global_and_fixture_disabled():
            print(f"cluster: {message}", flush=True)

    try:
        try:
            TIMINGS.update(node.start(progress=say))
        except BaseException:
            say(f"start failed; the logs end:\n{node.log_tails()}")
            raise
        RUNNING.append(node)
        yield node
    finally:
        RUNNING.clear()
        node.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(STEP_TIMEOUT))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed step's report ends with the last lines of every component's log and of the
    pods' (the plugin's among them)."""
    report = yield
    if report.when == "call" and report.failed and RUNNING:
        report.sections.append(("cluster logs, last lines", RUNNING[0].log_tails(lines=20)))
    return report


@pytest.fixture(autouse=True)
def timed(request: pytest.FixtureRequest) -> Iterator[None]:
    started = time.monotonic()
    yield
    TIMINGS[request.node.name] = time.monotonic() - started


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    terminalreporter.write_sep("-", "seconds per step under software emulation")
    for name, seconds in TIMINGS.items():
        terminalreporter.write_line(f"{seconds:8.1f}  {name}")
