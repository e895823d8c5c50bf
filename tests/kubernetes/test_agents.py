"""Before the chart: the cluster controller and node agents against this cluster's API
server, driven over CSI: two agents (two node ids, each with its own plugin and data dir),
then csi-sanity through the cluster controller to a node that serves VDUSE volumes."""

from __future__ import annotations

import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.cluster.build import component_path
from tests.cluster.node import Node
from tests.csi_client import Plugin
from tests.kubernetes import agents

SCRATCH = Path(os.environ.get("LAB_SCRATCH", "/run/scratch"))


@pytest.mark.extended
def test_0_the_controller_reaches_each_nodes_volumes_through_its_agent(cluster: Node) -> None:
    assert cluster.plane is not None
    agents.KUBECTL[:] = [str(cluster.bins["kubectl"])]
    agents.exercise(cluster.plane.admin_kubeconfig, SCRATCH / "agents")


@pytest.mark.extended
def test_0b_csi_sanity_through_the_cluster_controller(cluster: Node) -> None:
    """Controller calls to the cluster controller, node calls to the node's plugin: every
    volume csi-sanity stages went there through a VduseVolume and the node's agent."""
    assert cluster.plane is not None
    kubeconfig = cluster.plane.admin_kubeconfig
    root = SCRATCH / "sanity"
    (root / "node").mkdir(parents=True, exist_ok=True)
    (root / "controller").mkdir(exist_ok=True)
    node = Plugin(root / "node", "sanity-node")
    agent = agents.Agent(node, kubeconfig)
    controller = Plugin(
        root / "controller", "controller", "identity,controller", "--controller-scope=cluster",
        f"--kubeconfig={kubeconfig}",
    )  # fmt: skip
    try:
        report, mutable = root / "junit.xml", root / "mutable.yaml"
        mutable.write_text('writeIOPS: "5000"\nreadBytesPerSecond: "512Mi"\n')
        result = subprocess.run(
            ["timeout", "1500", str(component_path("csi-sanity")),
             f"--csi.endpoint=unix://{node.socket}",
             f"--csi.controllerendpoint=unix://{controller.socket}",
             f"--csi.stagingdir={root / 'staging'}", f"--csi.mountdir={root / 'target'}",
             "--csi.testvolumeaccesstype=mount",
             f"--csi.testvolumesize={64 << 20}", f"--csi.testvolumeexpandsize={128 << 20}",
             f"--csi.testvolumemutableparameters={mutable}",
             f"--csi.junitfile={report}", "--ginkgo.no-color"],
            capture_output=True, text=True,
        )  # fmt: skip
        cases = list(ET.parse(report).getroot().iter("testcase"))
        failed = [c.get("name") for c in cases
                  if c.find("failure") is not None or c.find("error") is not None]  # fmt: skip
        passed = [c for c in cases if c.find("skipped") is None and c.get("name") not in failed]
        skipped = len(cases) - len(passed) - len(failed)
        print(f"csi-sanity through the cluster controller: {len(passed)} passed, "
              f"{len(failed)} failed, {skipped} skipped")  # fmt: skip
        assert not failed, f"{failed}\n{result.stdout[-6000:]}"
        assert result.returncode == 0, result.stdout[-3000:]
        assert len(passed) >= 70  # the snapshot and ModifyVolume groups run too
        left = agents.kubectl(kubeconfig, "get", "vdusevolumes,vdusesnapshots", "-o", "name")
        assert not left.split(), left
    finally:
        agent.stop()
        node.stop()
        controller.stop()
        for log in (root / "node" / "agent.log", root / "controller" / "plugin.log"):
            print(f"--- {log}\n{log.read_text()[-4000:]}")
        agents.forget(kubeconfig, ["sanity-node"])
