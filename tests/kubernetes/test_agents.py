"""Before the chart: the cluster controller and two node agents (two node ids, each with its
own plugin and data dir) against this cluster's API server, driven over CSI."""

from __future__ import annotations

import os
from pathlib import Path

from tests.cluster.node import Node
from tests.kubernetes import agents


def test_0_the_controller_reaches_each_nodes_volumes_through_its_agent(cluster: Node) -> None:
    assert cluster.plane is not None
    agents.KUBECTL[:] = [str(cluster.bins["kubectl"])]
    root = Path(os.environ.get("LAB_SCRATCH", "/run/scratch")) / "agents"
    agents.exercise(cluster.plane.admin_kubeconfig, root)
