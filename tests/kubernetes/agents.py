"""Two node agents and the cluster controller against a real API server, driven over CSI.

Each "node" is a plugin (its own data dir) and `csi-vduse agent` with its own node id; the
controller is `csi-vduse serve --controller-scope cluster`. Nothing here knows which node
holds what except through the API server, so a volume on node-b is reached only through
its agent. Used by test_agents.py inside the lab cluster, and runnable on a host:
`python -m tests.kubernetes.agents` starts a loopback control plane for it.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from csi_vduse.csi.proto import csi_pb2 as pb
from csi_vduse.state.volumes import volume_id_for
from tests.csi_client import MiB, Plugin, error_of, mount_cap

CRDS = Path(__file__).resolve().parents[2] / "charts" / "csi-vduse" / "crds"
KEY = "topology.vduse.csi.dev/node"


class Agent:
    def __init__(self, plugin: Plugin, kubeconfig: Path) -> None:
        self.plugin, self.kubeconfig = plugin, kubeconfig
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        argv = [
            sys.executable, "-m", "csi_vduse", "agent", f"--node-id={self.plugin.node_id}",
            f"--endpoint=unix://{self.plugin.socket}", f"--kubeconfig={self.kubeconfig}",
            "--resync-interval=5", "--log-format=text",
        ]  # fmt: skip
        with open(self.plugin.root / "agent.log", "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log)

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(timeout=30)


KUBECTL = ["kubectl"]


def kubectl(kubeconfig: Path, *args: str) -> str:
    return subprocess.run(
        [*KUBECTL, f"--kubeconfig={kubeconfig}", *args], check=True, capture_output=True,
        text=True, timeout=60,
    ).stdout  # fmt: skip


def at(node: str) -> pb.TopologyRequirement:
    segment = pb.Topology(segments={KEY: node})
    return pb.TopologyRequirement(requisite=[segment], preferred=[segment])


class Retrying:
    """A Controller stub that does what the sidecars do with ABORTED (the agent has not
    answered yet, which under software emulation takes a while): call again."""

    def __init__(self, stub: Any, seconds: float = 300) -> None:
        self.stub, self.seconds = stub, seconds

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.stub, name)

        def call(request: Any, **kwargs: Any) -> Any:
            deadline = time.monotonic() + self.seconds
            while True:
                try:
                    return method(request, **kwargs)
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.ABORTED or time.monotonic() > deadline:
                        raise
                    time.sleep(1)

        return call


def create(stub: Any, name: str, size: int, node: str | None = None,
           source: pb.VolumeContentSource | None = None) -> pb.Volume:  # fmt: skip
    request = pb.CreateVolumeRequest(
        name=name, capacity_range=pb.CapacityRange(required_bytes=size),
        volume_capabilities=[mount_cap()],
    )  # fmt: skip
    if node:
        request.accessibility_requirements.CopyFrom(at(node))
    if source is not None:
        request.volume_content_source.CopyFrom(source)
    volume: pb.Volume = stub.CreateVolume(request, timeout=120).volume
    return volume


def node_of(volume: pb.Volume) -> str:
    return str(volume.accessible_topology[0].segments[KEY])


def wait_for(what: str, cond: object, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def exercise(kubeconfig: Path, root: Path) -> None:
    kubectl(kubeconfig, "apply", "--server-side", "-f", str(CRDS))
    kubectl(kubeconfig, "wait", "--for=condition=Established", "--timeout=60s",
            "crd/vdusevolumes.vduse.csi.dev", "crd/vdusesnapshots.vduse.csi.dev",
            "crd/vdusenodes.vduse.csi.dev")  # fmt: skip
    started: list[Plugin] = []
    agents: dict[str, Agent] = {}
    nodes: dict[str, Plugin] = {}
    try:
        for name in ("node-a", "node-b"):
            (root / name).mkdir(parents=True, exist_ok=True)
            nodes[name] = Plugin(root / name, name, "identity,controller")
            started.append(nodes[name])
            agents[name] = Agent(nodes[name], kubeconfig)
        (root / "controller").mkdir(exist_ok=True)
        controller = Plugin(
            root / "controller", "controller", "identity,controller",
            "--controller-scope=cluster", f"--kubeconfig={kubeconfig}", "--agent-wait=5",
        )  # fmt: skip
        started.append(controller)
        check(controller, nodes, agents, kubeconfig)
    finally:
        for agent in agents.values():
            agent.stop()
        for plugin in started:
            plugin.stop()
        for path in sorted(root.glob("*/*.log")):
            print(f"--- {path}\n{path.read_text()[-6000:]}")
        forget(kubeconfig, list(nodes))


def forget(kubeconfig: Path, nodes: list[str]) -> None:
    """After a failed check, what its agents left: their objects go, finalizers and all, so
    that the next test starts from a clean API server."""
    selector = f"vduse.csi.dev/node in ({','.join(nodes)})"
    for name in kubectl(kubeconfig, "get", "vdusevolumes,vdusesnapshots", "-l", selector,
                        "-o", "name").split():  # fmt: skip
        with contextlib.suppress(subprocess.CalledProcessError):  # gone meanwhile
            kubectl(kubeconfig, "patch", name, "--type=merge", "-p",
                    '{"metadata":{"finalizers":null}}')  # fmt: skip
            kubectl(kubeconfig, "delete", "--ignore-not-found", "--wait=false", name)
    kubectl(kubeconfig, "delete", "--ignore-not-found", "vdusenodes", *nodes)


def check(
    controller: Plugin, nodes: dict[str, Plugin], agents: dict[str, Agent], kubeconfig: Path
) -> None:
    ctl = Retrying(controller.controller)
    capacity = ctl.GetCapacity
    wait_for("both agents' free space", lambda: all(
        capacity(pb.GetCapacityRequest(accessible_topology=pb.Topology(segments={KEY: n})))
        .available_capacity > 0 for n in nodes
    ))  # fmt: skip

    def image(node: str, volume_id: str, kind: str = "volumes") -> Path:
        return nodes[node].root / "data" / kind / f"{volume_id}.img"

    volume = create(ctl, "claim-on-b", 64 * MiB, "node-b")
    assert node_of(volume) == "node-b"
    assert image("node-b", volume.volume_id).stat().st_size == 64 * MiB
    assert not image("node-a", volume.volume_id).exists()
    assert create(ctl, "claim-on-b", 64 * MiB, "node-b").volume_id == volume.volume_id
    code, _ = error_of(lambda: create(ctl, "claim-on-b", 256 * MiB, "node-b"))
    assert code == grpc.StatusCode.ALREADY_EXISTS

    # expansion and ModifyVolume of a volume that lives on another node than the controller
    expanded = ctl.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
        volume_id=volume.volume_id, capacity_range=pb.CapacityRange(required_bytes=128 * MiB),
    ), timeout=60)  # fmt: skip
    assert expanded.capacity_bytes == 128 * MiB and expanded.node_expansion_required
    assert image("node-b", volume.volume_id).stat().st_size == 128 * MiB
    ctl.ControllerModifyVolume(
        pb.ControllerModifyVolumeRequest(
            volume_id=volume.volume_id, mutable_parameters={"writeIOPS": "100"}
        ),
        timeout=60,
    )
    record = nodes["node-b"].controller.ControllerGetVolume(
        pb.ControllerGetVolumeRequest(volume_id=volume.volume_id)).volume  # fmt: skip
    assert record.capacity_bytes == 128 * MiB
    code, _ = error_of(
        lambda: ctl.ControllerModifyVolume(
            pb.ControllerModifyVolumeRequest(
                volume_id=volume.volume_id, mutable_parameters={"queues": "4"}
            ),
            timeout=60,
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _ = error_of(lambda: ctl.ControllerExpandVolume(
        pb.ControllerExpandVolumeRequest(volume_id=volume.volume_id,
                                         capacity_range=pb.CapacityRange(required_bytes=1 << 55)),
        timeout=60))  # fmt: skip
    assert code == grpc.StatusCode.OUT_OF_RANGE

    # a snapshot stays on its volume's node, and so does what is restored from it
    snapshot = ctl.CreateSnapshot(
        pb.CreateSnapshotRequest(name="snap-on-b", source_volume_id=volume.volume_id), timeout=120
    ).snapshot
    assert snapshot.ready_to_use and snapshot.size_bytes == 128 * MiB
    assert image("node-b", snapshot.snapshot_id, "snapshots").exists()
    source = pb.VolumeContentSource(
        snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snapshot.snapshot_id)
    )
    code, _ = error_of(lambda: create(ctl, "restore", 128 * MiB, "node-a", source))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    restored = create(ctl, "restore", 128 * MiB, None, source)
    assert node_of(restored) == "node-b" and image("node-b", restored.volume_id).exists()
    listed = ctl.ListVolumes(pb.ListVolumesRequest(max_entries=1))
    rest = ctl.ListVolumes(pb.ListVolumesRequest(starting_token=listed.next_token))
    ids = {e.volume.volume_id for e in [*listed.entries, *rest.entries]}
    assert ids == {volume.volume_id, restored.volume_id}

    # a volume its node lost (a wiped data dir) is reported, never made again empty
    lost = create(ctl, "claim-lost", 32 * MiB, "node-b")
    for path in (nodes["node-b"].root / "data" / "volumes").glob(f"{lost.volume_id}.*"):
        path.unlink()

    def condition() -> pb.VolumeCondition:
        reply = ctl.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=lost.volume_id))
        found: pb.VolumeCondition = reply.status.volume_condition
        return found

    # first NOT_FOUND (its condition), then the refusal to make it again, a pass later
    wait_for("the lost volume reported, not made again", lambda: condition().abnormal
             and "not made again" in condition().message)  # fmt: skip
    assert not image("node-b", lost.volume_id).exists()
    ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=lost.volume_id))

    # a node whose agent is away: ABORTED (the sidecar retries), then done once it is back
    on_a = create(ctl, "claim-on-a", 32 * MiB, "node-a")
    assert node_of(on_a) == "node-a" and image("node-a", on_a.volume_id).exists()
    agents["node-a"].stop()
    code, _ = error_of(lambda: create(controller.controller, "while-a-is-away", 32 * MiB, "node-a"))
    assert code == grpc.StatusCode.ABORTED
    agents["node-a"].start()
    assert node_of(create(ctl, "while-a-is-away", 32 * MiB, "node-a")) == "node-a"

    # deletes go through each node's agent; the finalizers hold the objects until done
    for volume_id in (restored.volume_id, on_a.volume_id):
        ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id), timeout=60)
    ctl.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id), timeout=60)
    ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume.volume_id),
                                       timeout=60)  # fmt: skip
    assert not image("node-b", volume.volume_id).exists()
    assert not image("node-b", snapshot.snapshot_id, "snapshots").exists()
    left = kubectl(kubeconfig, "get", "vdusevolumes,vdusesnapshots", "-o", "name").split()
    assert left == [f"vdusevolume.vduse.csi.dev/{volume_id_for('while-a-is-away')}"]
    ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id_for("while-a-is-away")), timeout=60)
    assert not kubectl(kubeconfig, "get", "vdusevolumes,vdusesnapshots", "-o", "name").split()
    assert not list((nodes["node-a"].root / "data" / "volumes").glob("*.img"))


def main() -> int:
    from tests.cluster.build import ensure_components
    from tests.cluster.controlplane import ControlPlane

    binaries = ensure_components(["debian", "kubernetes"])
    with tempfile.TemporaryDirectory(prefix="csi-vduse-agents.") as tmp:
        plane = ControlPlane(Path(tmp) / "plane", binaries)
        plane.start()
        try:
            KUBECTL[:] = [str(binaries["kubectl"])]
            exercise(plane.admin_kubeconfig, Path(tmp) / "nodes")
        finally:
            plane.stop()
    print("agents: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
