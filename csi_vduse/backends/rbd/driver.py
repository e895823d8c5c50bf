"""The RBD backend's driver: a volume is an image in a Ceph pool (rbd/volumes.py), reached
with the CSI secret of each call; a node keeps the node-stage secret while the volume is
staged there (access_store.py), since a restarted plugin must open the image again."""

from __future__ import annotations

import contextlib

from csi_vduse.backends.api import DriverContext, ProvisionRequest, Secrets, VolumeDriver
from csi_vduse.backends.base import Backend
from csi_vduse.backends.rbd import snapshots, volumes
from csi_vduse.backends.rbd.access_store import CephAccessStore
from csi_vduse.backends.rbd.cluster import RbdBackend, RbdCluster
from csi_vduse.backends.rbd.pool import (
    access_from,
    snapshot_id_for,
    target,
    volume_id_for,
)
from csi_vduse.state.records import UnreadableRecord
from csi_vduse.state.snapshots import SnapshotRecord
from csi_vduse.state.volumes import VolumeParams, VolumeRecord


class Driver(VolumeDriver):
    kind = "rbd"
    locality = "cluster"
    parameters = frozenset({"pool"})
    mutable_qos = False  # set at creation only, for now

    def __init__(self, ctx: DriverContext) -> None:
        super().__init__(ctx)
        self.access = CephAccessStore(ctx.state_dir)

    @classmethod
    def validate(cls, params: VolumeParams) -> str | None:
        if params.pool is None:
            return "backend=rbd needs the parameter pool"
        if params.provisioning != "thin" or params.cache != "page":
            return "backend=rbd takes neither provisioning nor cache (librbd has its own cache)"
        return None

    def volume_id(self, name: str, params: VolumeParams) -> str:
        assert params.pool is not None
        return volume_id_for(name, params.pool)

    def snapshot_id(self, name: str, source_volume_id: str) -> str:
        pool, _ = target(source_volume_id)
        return snapshot_id_for(name, pool)

    def provision(self, request: ProvisionRequest) -> VolumeRecord:
        return volumes.provision(
            request.name, request.required, request.limit, request.params, request.qos,
            dict(request.secrets), request.source,
        )  # fmt: skip

    def grow(
        self, volume_id: str, required: int, limit: int, secrets: Secrets,
        known: VolumeRecord | None,
    ) -> tuple[VolumeRecord, bool]:  # fmt: skip
        return volumes.expand(volume_id, required, limit, dict(secrets), known)

    def delete(self, volume_id: str, secrets: Secrets) -> None:
        volumes.delete(volume_id, dict(secrets))

    def snapshot_create(
        self, snapshot_id: str, name: str, source_volume_id: str, secrets: Secrets
    ) -> SnapshotRecord:
        return snapshots.cut(name, source_volume_id, dict(secrets))

    def snapshot_delete(self, snapshot_id: str, secrets: Secrets) -> None:
        snapshots.remove(snapshot_id, dict(secrets))

    def prepare_stage(self, volume_id: str, secrets: Secrets) -> None:
        """The record from the image's metadata into this node's records. Where this node
        has a record already, its QoS (ControllerModifyVolume) stays."""
        pool, _ = target(volume_id)
        record = volumes.fetch(volume_id, access_from(dict(secrets), pool, "node-stage"))
        with contextlib.suppress(UnreadableRecord):
            if (local := self.ctx.volumes.get(volume_id)) is not None:
                record.qos = local.qos
        self.ctx.volumes.ensure()
        self.ctx.volumes.put(record)

    def keep_access(self, volume_id: str, secrets: Secrets) -> None:
        pool, _ = target(volume_id)
        self.access.put(volume_id, access_from(dict(secrets), pool, "node-stage"))

    def open(self, record: VolumeRecord, readonly: bool) -> Backend:
        _, image = target(record.volume_id)
        cluster = RbdCluster(self.access.get(record.volume_id))
        try:
            # A restarted plugin waits here for its own dead predecessor's lock to lapse.
            return RbdBackend.open(cluster, image, readonly, owns_cluster=True)
        except BaseException:
            cluster.close()
            raise

    def record_changed(self, backend: Backend, record: VolumeRecord) -> None:
        assert isinstance(backend, RbdBackend)
        volumes.save_record(backend, record)  # for every other node

    def forget(self, volume_id: str) -> None:
        self.access.delete(volume_id)
