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

from csi_vduse.backends.rbd.pool import image_of as rbd_image_of
from csi_vduse.cluster.resources import NODE_LABEL, SNAPSHOTS, VOLUMES
from csi_vduse.config import ServeConfig
from csi_vduse.csi.cluster_controller import ClusterControllerService
from csi_vduse.csi.proto import csi_pb2 as pb
from csi_vduse.errors import DriverError
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


def test_an_rbd_snapshot_is_taken_listed_restored_and_removed_by_the_controller(
    service: ClusterControllerService, ceph: CephCluster
) -> None:
    secrets = {"monitors": ceph.monitors, "userID": ceph.user, "userKey": ceph.key}
    ctx = Context()
    source = service.CreateVolume(create_request(ceph, secrets), ctx).volume
    request = pb.CreateSnapshotRequest(name="snap-cluster", source_volume_id=source.volume_id)
    assert code_of(lambda: service.CreateSnapshot(request, ctx)) == "INVALID_ARGUMENT"
    assert (
        service.resources.get(SNAPSHOTS, "x") is None
        and not service.ListSnapshots(pb.ListSnapshotsRequest(), ctx).entries
    )  # a refused call changed nothing
    request.secrets.update(secrets)
    snapshot = service.CreateSnapshot(request, ctx).snapshot
    assert snapshot.ready_to_use and snapshot.size_bytes == 16 * MiB
    assert snapshot.source_volume_id == source.volume_id
    assert service.CreateSnapshot(request, ctx).snapshot == snapshot  # idempotent
    obj = service.resources.get(SNAPSHOTS, snapshot.snapshot_id)
    assert obj is not None and obj["spec"]["node"] == ""
    listed = service.ListSnapshots(pb.ListSnapshotsRequest(source_volume_id=source.volume_id), ctx)
    assert [e.snapshot for e in listed.entries] == [snapshot]

    restore = create_request(ceph, secrets)
    restore.name = "pvc-cluster-rbd-restored"
    restore.volume_content_source.snapshot.snapshot_id = snapshot.snapshot_id
    restored = service.CreateVolume(restore, ctx).volume
    assert restored.content_source.snapshot.snapshot_id == snapshot.snapshot_id
    assert restored.capacity_bytes == 16 * MiB and not restored.accessible_topology
    file_restore = create_request(ceph, secrets)
    file_restore.name = "pvc-file"
    file_restore.parameters.clear()
    file_restore.volume_content_source.snapshot.snapshot_id = snapshot.snapshot_id
    assert code_of(lambda: service.CreateVolume(file_restore, ctx)) == "INVALID_ARGUMENT"

    delete = pb.DeleteVolumeRequest(volume_id=source.volume_id, secrets=secrets)
    assert code_of(lambda: service.DeleteVolume(delete, ctx)) == "FAILED_PRECONDITION"
    remove = pb.DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id)
    assert code_of(lambda: service.DeleteSnapshot(remove, ctx)) == "INVALID_ARGUMENT"
    remove.secrets.update(secrets)
    service.DeleteSnapshot(remove, ctx)
    service.DeleteSnapshot(remove, ctx)  # idempotent
    assert not service.ListSnapshots(pb.ListSnapshotsRequest(), ctx).entries
    service.DeleteVolume(delete, ctx)  # to the trash: the restored volume needs it
    service.DeleteVolume(pb.DeleteVolumeRequest(volume_id=restored.volume_id, secrets=secrets),
                         ctx)  # fmt: skip
    assert ceph.rbd("ls", ceph.pool).split() == []
    assert json.loads(ceph.rbd("trash", "ls", ceph.pool, "--format", "json")) == []
