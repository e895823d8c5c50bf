"""`csi-vduse agent`: the node agent's process."""

from __future__ import annotations

import signal
import threading

import grpc

from csi_vduse.cluster.agent import Agent
from csi_vduse.cluster.api import Resources, connect
from csi_vduse.config import AgentConfig


def run_agent(config: AgentConfig) -> int:
    resources = Resources(connect(config.kubeconfig))
    with grpc.insecure_channel(config.endpoint) as channel:
        agent = Agent(config.node_id, resources, channel, config.resync_interval)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: agent.stop())
        thread = threading.Thread(target=agent.run, name="agent", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(1.0)
    return 0
