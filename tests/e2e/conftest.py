"""The e2e suite drives the real kernel: it runs inside the lab, never on a host
without VDUSE (there it fails rather than skips)."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.csi_client import Plugin
from tests.e2e.helpers import mounts_under, run


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("CSI_VDUSE_IN_LAB") != "1" or not Path("/dev/vduse/control").exists():
        raise pytest.UsageError(
            "the e2e tests need a VDUSE kernel: run them through the lab, "
            "python -m tests.lab.runner -- python -m pytest tests/e2e"
        )
    config.addinivalue_line(
        "markers",
        "any_kernel: what it checks is decided above the kernel (argument and request checks, "
        "the CSI logic, a backend, QoS, snapshots): the test command runs it on one lab kernel "
        "only, `-m 'not any_kernel'` on the other",
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


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test's report ends with the plugin's log (its work dir goes with the test)
    and the kernel's last lines."""
    report = yield
    if report.when != "call" or not report.failed:
        return report
    args = getattr(item, "funcargs", {})
    plugin = args.get("plugin", args.get("shared_plugin"))
    if isinstance(plugin, Plugin):
        tail = plugin.log.read_text(errors="replace").splitlines()[-60:]
        report.sections.append(("plugin log, last lines", "\n".join(x[:500] for x in tail)))
    dmesg = subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout
    report.sections.append(("kernel log, last lines", "\n".join(dmesg.splitlines()[-30:])))
    return report


@pytest.fixture(scope="module")
def shared_plugin() -> Iterator[Plugin]:
    """One `csi-vduse serve` for the tests of a module that leave it as they found it (each
    starting its own costs seconds under emulation); it must leave no mount behind."""
    base = Path(os.environ.get("LAB_SCRATCH", "/run/scratch"))
    root = base / f"m-{uuid.uuid4().hex[:8]}"
    root.mkdir(parents=True)
    p = Plugin(root)
    yield p
    p.stop()
    leftovers = [m.target for m in mounts_under(root)]
    for target in reversed(leftovers):
        run("umount", "-l", target, check=False)
    shutil.rmtree(root, ignore_errors=True)
    assert not leftovers, f"mounts left behind: {leftovers}"


@pytest.fixture
def plugin(workdir: Path) -> Iterator[Plugin]:
    """`csi-vduse serve` for one test; the test fails if it leaves a mount under workdir."""
    p = Plugin(workdir)
    yield p
    p.stop()
    leftovers = [m.target for m in mounts_under(workdir)]
    for target in reversed(leftovers):
        run("umount", "-l", target, check=False)
    assert not leftovers, f"mounts left behind: {leftovers}"
