"""The agent's decisions with the API server and the plugin faked (their real behaviour is
tests/kubernetes/agents.py): what it does with a lost volume, a create the controller gave
up on, and a delete the node refuses."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from csi_vduse.cluster.agent import Agent
from csi_vduse.cluster.resources import FINALIZER
from csi_vduse.csi.proto import csi_pb2 as pb


class RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class FakePlugin:
    """The node plugin's Controller service: a dict of volumes, and a log of calls."""

    def __init__(self) -> None:
        self.volumes: dict[str, int] = {}
        self.calls: list[str] = []
        self.refuse_delete = False

    def ControllerGetVolume(self, request: Any, timeout: float) -> Any:
        self.calls.append("ControllerGetVolume")
        if request.volume_id not in self.volumes:
            raise RpcError(grpc.StatusCode.NOT_FOUND, "no such volume")
        volume = pb.Volume(
            volume_id=request.volume_id, capacity_bytes=self.volumes[request.volume_id]
        )
        return pb.ControllerGetVolumeResponse(volume=volume)

    def CreateVolume(self, request: Any, timeout: float) -> Any:
        self.calls.append("CreateVolume")
        self.volumes["vol-1"] = request.capacity_range.required_bytes
        return pb.CreateVolumeResponse(
            volume=pb.Volume(volume_id="vol-1", capacity_bytes=self.volumes["vol-1"])
        )

    def DeleteVolume(self, request: Any, timeout: float) -> Any:
        self.calls.append("DeleteVolume")
        if self.refuse_delete:
            raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, "staged on this node")
        self.volumes.pop(request.volume_id, None)
        return pb.DeleteVolumeResponse()


class FakeResources:
    def __init__(self) -> None:
        self.patches: list[tuple[str, dict[str, Any], bool]] = []
        self.gone: set[str] = set()

    def patch(self, plural: str, name: str, patch: dict[str, Any], status: bool = False) -> Any:
        if name in self.gone:
            return None
        self.patches.append((name, patch, status))
        return {"metadata": {"name": name}}


def volume(status: dict[str, Any] | None = None, **metadata: Any) -> dict[str, Any]:
    meta = {"name": "vol-1", "generation": 1, "resourceVersion": "7", **metadata}
    spec = {"node": "n1", "name": "claim", "requiredBytes": 1 << 20, "parameters": {}}
    return {"metadata": meta, "spec": spec, "status": status or {}}


Setup = tuple[Agent, FakePlugin, FakeResources]


@pytest.fixture
def setup() -> Setup:
    plugin, resources = FakePlugin(), FakeResources()
    with grpc.insecure_channel("unix:///nonexistent") as channel:
        agent = Agent("n1", resources, channel)  # type: ignore[arg-type]
    agent.plugin = plugin  # type: ignore[assignment]
    return agent, plugin, resources


def test_a_new_volume_is_created_then_finalized_then_reported(setup: Setup) -> None:
    agent, plugin, resources = setup
    agent.reconcile_volume(volume(), resync=False)
    assert plugin.calls[:2] == ["ControllerGetVolume", "CreateVolume"]
    (name, finalizer, is_status), (_, status, status_too) = resources.patches[:2]
    assert name == "vol-1" and not is_status
    assert finalizer["metadata"]["finalizers"] == [FINALIZER]
    assert status_too and status["status"]["ready"] is True and status["status"]["code"] == "OK"


def test_a_volume_its_node_lost_is_reported_never_made_again(setup: Setup) -> None:
    agent, plugin, resources = setup
    lost = volume({"ready": True, "code": "NOT_FOUND", "observedGeneration": 1},
                  finalizers=[FINALIZER])  # fmt: skip
    agent.reconcile_volume(lost, resync=True)
    assert "CreateVolume" not in plugin.calls
    (_, patch, _) = resources.patches[-1]
    assert patch["status"]["code"] == "FAILED_PRECONDITION"
    assert patch["status"]["condition"]["abnormal"] is True


def test_a_create_the_controller_gave_up_on_is_undone(setup: Setup) -> None:
    agent, plugin, resources = setup
    resources.gone.add("vol-1")
    agent.reconcile_volume(volume(), resync=False)
    assert plugin.calls[-1] == "DeleteVolume"
    assert plugin.volumes == {}


def test_a_refused_delete_keeps_the_finalizer_and_says_why(setup: Setup) -> None:
    agent, plugin, resources = setup
    plugin.volumes["vol-1"] = 1 << 20
    plugin.refuse_delete = True
    doomed = volume({"ready": True, "code": "OK", "observedGeneration": 1},
                    finalizers=[FINALIZER], deletionTimestamp="2026-11-30T00:00:00Z")  # fmt: skip
    agent.reconcile_volume(doomed, resync=False)
    ((_, patch, is_status),) = resources.patches
    assert is_status and patch["status"]["deletion"]["code"] == "FAILED_PRECONDITION"
    assert plugin.volumes, "nothing deleted"
    plugin.refuse_delete = False
    agent.reconcile_volume(doomed, resync=True)
    (_, patch, is_status) = resources.patches[-1]
    assert not is_status and patch["metadata"]["finalizers"] is None
    assert patch["metadata"]["resourceVersion"] == "7", "only the version it acted on"
    assert not plugin.volumes
