"""csi-sanity (kubernetes-csi/csi-test, the pinned release) against `csi-vduse serve` in the
VDUSE kernel: the CSI spec's own conformance suite, for Filesystem and Block volumes."""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.build import component_path
from tests.csi_client import Plugin
from tests.e2e.test_csi import device_count

pytestmark = pytest.mark.any_kernel  # the CSI spec's checks; the kernel's part runs in test_csi


@pytest.fixture
def plugin(workdir: Path) -> Iterator[Plugin]:
    p = Plugin(workdir)
    yield p
    p.stop()


@pytest.mark.parametrize("access_type", ["mount", "block"])
def test_csi_sanity_passes(plugin: Plugin, workdir: Path, access_type: str) -> None:
    report = workdir / "junit.xml"
    mutable = workdir / "mutable.yaml"  # a VolumeAttributesClass's parameters
    mutable.write_text('writeIOPS: "5000"\nreadBytesPerSecond: "512Mi"\n')
    result = subprocess.run(
        ["timeout", "1500", str(component_path("csi-sanity")),
         f"--csi.endpoint=unix://{plugin.socket}",
         f"--csi.stagingdir={workdir / 'sanity-staging'}",
         f"--csi.mountdir={workdir / 'sanity-target'}",
         f"--csi.testvolumeaccesstype={access_type}",
         f"--csi.testvolumesize={64 << 20}", f"--csi.testvolumeexpandsize={128 << 20}",
         f"--csi.testvolumemutableparameters={mutable}",
         f"--csi.junitfile={report}", "--ginkgo.no-color"],
        capture_output=True, text=True,
    )  # fmt: skip
    suites = ET.parse(report).getroot()
    cases = list(suites.iter("testcase"))
    failed = [c.get("name") for c in cases if c.find("failure") is not None]
    failed += [c.get("name") for c in cases if c.find("error") is not None]
    passed = [c for c in cases if c.find("skipped") is None and c.get("name") not in failed]
    print(f"csi-sanity {access_type}: {len(passed)} passed, {len(failed)} failed, "
          f"{len(cases) - len(passed) - len(failed)} skipped")  # fmt: skip
    assert not failed, f"{failed}\n{result.stdout[-6000:]}"
    assert result.returncode == 0, result.stdout[-3000:]
    assert len(passed) >= 70  # the snapshot and ModifyVolume groups run too
    assert device_count() == 0  # every volume it staged is gone
