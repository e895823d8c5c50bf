"""The cluster controller's RBD volumes against a real single-node Ceph: the image is made,
grown and removed by the controller itself with the call's secret, and an object with no
node lists it. The objects live in a dict here (the real API server is in the cluster test,
tests/kubernetes/test_user_steps.py)."""

from __future__ import annotations

import copy
import json
from typing import Any

import grpc
import pytest

from csi_vduse.cluster.resources import NODE_LABEL, VOLUMES
from csi_vduse.config import ServeConfig
from csi_vduse.csi.cluster_controller import ClusterControllerService
from csi_vduse.csi.proto import csi_pb2 as pb
from csi_vduse.errors import DriverError
from csi_vduse.state.volumes import rbd_image_of
from tests.ceph.cluster import CephCluster

MiB = 1 << 20
Obj = dict[str, Any]


class Objects:
    """The part of cluster.api.Resources the controller uses, over a dict."""

    def __init__(self) -> None:
        self.items: dict[tuple[str, str], Obj] = {}

    def get(self, plural: str, name: str) -> Obj | None:
        found = self.items.get((plural, name))
        return copy.deepcopy(found) if found else None

    def create(self, plural: str, obj: Obj) -> Obj | None:
        key = (plural, obj["metadata"]["name"])
        if key in self.items:
            return None
        obj = copy.deepcopy(obj)
        obj["metadata"]["generation"] = 1
        self.items[key] = obj
        return copy.deepcopy(obj)

    def patch(self, plural: str, name: str, patch: Obj, status: bool = False) -> Obj | None:
        obj = self.items.get((plural, name))
        if obj is None:
            return None
        for key, value in patch.items():
            if key == "status" or not status:
                obj.setdefault(key, {}).update(value)
        return copy.deepcopy(obj)

    def delete(self, plural: str, name: str) -> None:
        self.items.pop((plural, name), None)

    def list(self, plural: str, label_selector: str = "") -> tuple[list[Obj], str]:
        return [copy.deepcopy(o) for (p, _), o in self.items.items() if p == plural], "1"


class Context:
    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise DriverError(f"{code.name}: {details}")


@pytest.fixture
def service() -> ClusterControllerService:
    return ClusterControllerService(ServeConfig(node_id="controller"), Objects(), wait=1)  # type: ignore[arg-type]


def code_of(call: Any) -> str:
    with pytest.raises(DriverError) as err:
        call()
    return str(err.value).split(":", 1)[0]


def create_request(ceph: CephCluster, secrets: dict[str, str]) -> Any:
    return pb.CreateVolumeRequest(
        name="pvc-cluster-rbd", capacity_range=pb.CapacityRange(required_bytes=16 * MiB),
        volume_capabilities=[pb.VolumeCapability(
            mount=pb.VolumeCapability.MountVolume(),
            access_mode=pb.VolumeCapability.AccessMode(mode="SINGLE_NODE_WRITER"))],
        parameters={"backend": "rbd", "pool": ceph.pool}, secrets=secrets,
    )  # fmt: skip


def test_an_rbd_volume_is_made_listed_grown_and_removed_by_the_controller(
    service: ClusterControllerService, ceph: CephCluster
) -> None:
    secrets = {"monitors": ceph.monitors, "userID": ceph.user, "userKey": ceph.key}
    ctx = Context()
    request = create_request(ceph, secrets)
    volume = service.CreateVolume(request, ctx).volume
    assert volume.capacity_bytes == 16 * MiB and not volume.accessible_topology
    assert service.CreateVolume(request, ctx).volume == volume  # idempotent
    pool, image = rbd_image_of(volume.volume_id) or ("", "")
    assert image in ceph.rbd("ls", pool).split()
    obj = service.resources.get(VOLUMES, volume.volume_id)
    assert obj is not None and obj["spec"]["node"] == ""
    assert obj["metadata"]["labels"] == {NODE_LABEL: ""}  # no agent's selector matches it

    listed = service.ListVolumes(pb.ListVolumesRequest(), ctx).entries
    assert [e.volume for e in listed] == [volume]
    got = service.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=volume.volume_id),
                                      ctx)  # fmt: skip
    assert got.volume == volume and not got.status.volume_condition.abnormal

    expand = pb.ControllerExpandVolumeRequest(
        volume_id=volume.volume_id, capacity_range=pb.CapacityRange(required_bytes=32 * MiB)
    )
    assert code_of(lambda: service.ControllerExpandVolume(expand, ctx)) == "INVALID_ARGUMENT"
    expand.secrets.update(secrets)
    grown = service.ControllerExpandVolume(expand, ctx)
    assert grown.capacity_bytes == 32 * MiB and grown.node_expansion_required
    assert json.loads(ceph.rbd("info", f"{pool}/{image}", "--format", "json"))["size"] == 32 * MiB
    listed = service.ListVolumes(pb.ListVolumesRequest(), ctx).entries
    assert [e.volume.capacity_bytes for e in listed] == [32 * MiB]

    snapshot = pb.CreateSnapshotRequest(name="snap", source_volume_id=volume.volume_id)
    assert code_of(lambda: service.CreateSnapshot(snapshot, ctx)) == "INVALID_ARGUMENT"
    modify = pb.ControllerModifyVolumeRequest(
        volume_id=volume.volume_id, mutable_parameters={"writeIOPS": "100"}
    )
    assert code_of(lambda: service.ControllerModifyVolume(modify, ctx)) == "INVALID_ARGUMENT"

    delete = pb.DeleteVolumeRequest(volume_id=volume.volume_id)
    assert code_of(lambda: service.DeleteVolume(delete, ctx)) == "INVALID_ARGUMENT"
    assert image in ceph.rbd("ls", pool).split()  # a refused call changed nothing
    delete.secrets.update(secrets)
    service.DeleteVolume(delete, ctx)
    assert image not in ceph.rbd("ls", pool).split()
    assert service.resources.get(VOLUMES, volume.volume_id) is None
    service.DeleteVolume(delete, ctx)  # idempotent
