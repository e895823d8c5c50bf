"""The Controller service: node-local sparse images, one controller per node."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from google.protobuf import timestamp_pb2, wrappers_pb2

from csi_vduse.config import ServeConfig
from csi_vduse.csi import capabilities
from csi_vduse.csi.errors import rpc
from csi_vduse.csi.proto import csi_pb2 as pb
from csi_vduse.csi.proto import csi_pb2_grpc as rpc_pb
from csi_vduse.errors import Aborted, InvalidArgument, ResourceExhausted
from csi_vduse.lifecycle.capacity import MAX_CAPACITY
from csi_vduse.lifecycle.node import NodeVolumes
from csi_vduse.lifecycle.provisioning import (
    K8S_PARAM_PREFIX,
    Provisioner,
    fit_reason,
    parse_parameters,
)
from csi_vduse.lifecycle.snapshots import Snapshots
from csi_vduse.state.records import UnreadableRecord
from csi_vduse.state.snapshots import SnapshotRecord, check_snapshot_id
from csi_vduse.state.volumes import (
    InvalidId,
    Source,
    VolumeParams,
    VolumeRecord,
    check_volume_id,
)

RPC = pb.ControllerServiceCapability.RPC
CAPABILITIES = (
    RPC.CREATE_DELETE_VOLUME, RPC.LIST_VOLUMES, RPC.GET_CAPACITY, RPC.EXPAND_VOLUME,
    RPC.GET_VOLUME, RPC.VOLUME_CONDITION, RPC.SINGLE_NODE_MULTI_WRITER,
    RPC.CREATE_DELETE_SNAPSHOT, RPC.LIST_SNAPSHOTS, RPC.CLONE_VOLUME, RPC.MODIFY_VOLUME,
)  # fmt: skip
MAX_LIST_ENTRIES = 1000


class ControllerService(rpc_pb.ControllerServicer):
    def __init__(
        self, config: ServeConfig, provisioner: Provisioner, snapshots: Snapshots,
        node: NodeVolumes | None,
    ) -> None:  # fmt: skip
        self.config = config
        self.provisioner = provisioner
        self.snapshots = snapshots
        self.node = node

    def _topology(self) -> pb.Topology:
        return pb.Topology(segments={self.config.topology_key: self.config.node_id})

    def _on_this_node(self, topologies: Any) -> bool:
        key, node = self.config.topology_key, self.config.node_id
        return any(t.segments.get(key) == node for t in topologies)

    def _anywhere(self, params: VolumeParams) -> bool:
        """A volume any node reaches, not one of this node's."""
        return self.provisioner.drivers.kind(params.backend).locality == "cluster"

    def _volume(self, record: VolumeRecord) -> pb.Volume:
        volume = pb.Volume(
            volume_id=record.volume_id, capacity_bytes=record.capacity,
            volume_context=volume_context(record),
            accessible_topology=[] if self._anywhere(record.params) else [self._topology()],
        )  # fmt: skip
        if record.source is not None:
            kind, source_id = record.source
            if kind == "snapshot":
                volume.content_source.snapshot.snapshot_id = source_id
            else:
                volume.content_source.volume.volume_id = source_id
        return volume

    @staticmethod
    def _snapshot(record: SnapshotRecord) -> pb.Snapshot:
        created = timestamp_pb2.Timestamp()
        created.FromNanoseconds(int(record.created_at * 1e9))
        return pb.Snapshot(
            snapshot_id=record.snapshot_id, source_volume_id=record.source_volume_id,
            size_bytes=record.size, creation_time=created, ready_to_use=True,
        )  # fmt: skip

    def _unreadable(self, volume_id: str, reason: str) -> tuple[pb.Volume, pb.VolumeCondition]:
        """A volume whose record cannot be read: reported, never hidden."""
        volume = pb.Volume(
            volume_id=volume_id, capacity_bytes=self.provisioner.image_size(volume_id),
            accessible_topology=[self._topology()],
        )  # fmt: skip
        return volume, pb.VolumeCondition(abnormal=True, message=f"record unreadable: {reason}")

    def _condition(self, record: VolumeRecord) -> pb.VolumeCondition:
        """The node's view first (what NodeGetVolumeStats says too), then the image's."""
        if self.node is not None:
            abnormal, message = self.node.condition(record.volume_id)
            if abnormal:
                return pb.VolumeCondition(abnormal=True, message=message)
        if self.provisioner.image_missing(record):
            return pb.VolumeCondition(abnormal=True, message="the volume's image is missing")
        if self.node is not None:
            return pb.VolumeCondition(abnormal=False, message=message)
        return pb.VolumeCondition(abnormal=False, message="image present")

    @rpc
    def CreateVolume(self, request: Any, context: Any) -> pb.CreateVolumeResponse:
        accesses = capabilities.parse_all(request.volume_capabilities)
        params = parse_parameters(dict(request.parameters))
        for access in accesses:
            if reason := fit_reason(params, access.block):
                raise InvalidArgument(reason)
        source = content_source(request) if request.HasField("volume_content_source") else None
        if request.HasField("accessibility_requirements") and not self._anywhere(params):
            req = request.accessibility_requirements
            if req.requisite and not self._on_this_node(req.requisite):
                raise ResourceExhausted(
                    f"this controller provisions on node {self.config.node_id} only, "
                    "which the requisite topology excludes"
                )
        record = self.provisioner.create(
            request.name, request.capacity_range.required_bytes,
            request.capacity_range.limit_bytes, dict(request.parameters),
            dict(request.mutable_parameters), source, dict(request.secrets),
        )  # fmt: skip
        return pb.CreateVolumeResponse(volume=self._volume(record))

    @rpc
    def DeleteVolume(self, request: Any, context: Any) -> pb.DeleteVolumeResponse:
        self.provisioner.delete(request.volume_id, dict(request.secrets))
        return pb.DeleteVolumeResponse()

    @rpc
    def ValidateVolumeCapabilities(
        self, request: Any, context: Any
    ) -> pb.ValidateVolumeCapabilitiesResponse:
        return validation(self.provisioner.get(request.volume_id).params, request)

    @rpc
    def ListVolumes(self, request: Any, context: Any) -> pb.ListVolumesResponse:
        records, unreadable = self.provisioner.scan()
        volumes = [(self._volume(r), self._condition(r)) for r in records]
        volumes += [self._unreadable(vid, why) for vid, why in unreadable.items()]
        page, next_token = paginate(
            sorted(volumes, key=lambda v: v[0].volume_id), lambda v: v[0].volume_id,
            request.starting_token, request.max_entries, is_volume_id,
        )  # fmt: skip
        entries = [
            pb.ListVolumesResponse.Entry(
                volume=volume,
                status=pb.ListVolumesResponse.VolumeStatus(volume_condition=condition),
            )
            for volume, condition in page
        ]
        return pb.ListVolumesResponse(entries=entries, next_token=next_token)

    @rpc
    def ControllerGetVolume(self, request: Any, context: Any) -> pb.ControllerGetVolumeResponse:
        try:
            record = self.provisioner.get(request.volume_id)
        except UnreadableRecord as e:
            volume, condition = self._unreadable(request.volume_id, e.reason)
        else:
            volume, condition = self._volume(record), self._condition(record)
        status = pb.ControllerGetVolumeResponse.VolumeStatus(volume_condition=condition)
        return pb.ControllerGetVolumeResponse(volume=volume, status=status)

    @rpc
    def GetCapacity(self, request: Any, context: Any) -> pb.GetCapacityResponse:
        if unservable(request):
            return pb.GetCapacityResponse(available_capacity=0)
        topology = request.accessible_topology
        if topology.segments and not self._on_this_node([topology]):
            return pb.GetCapacityResponse(available_capacity=0)
        params = parse_parameters(dict(request.parameters))
        available = self.provisioner.drivers.kind(params.backend).available()
        if available is None:  # not this node's to say: the largest volume it serves
            available = MAX_CAPACITY
        return pb.GetCapacityResponse(
            available_capacity=available,
            maximum_volume_size=wrappers_pb2.Int64Value(value=available),
        )

    @rpc
    def ControllerGetCapabilities(
        self, request: Any, context: Any
    ) -> pb.ControllerGetCapabilitiesResponse:
        return pb.ControllerGetCapabilitiesResponse(
            capabilities=[pb.ControllerServiceCapability(rpc=RPC(type=t)) for t in CAPABILITIES]
        )

    @rpc
    def ControllerExpandVolume(
        self, request: Any, context: Any
    ) -> pb.ControllerExpandVolumeResponse:
        if request.HasField("volume_capability"):
            capabilities.parse(request.volume_capability)
        record = self.provisioner.expand(
            request.volume_id, request.capacity_range.required_bytes,
            request.capacity_range.limit_bytes, dict(request.secrets),
        )  # fmt: skip
        return pb.ControllerExpandVolumeResponse(
            capacity_bytes=record.capacity, node_expansion_required=True
        )

    @rpc
    def ControllerModifyVolume(
        self, request: Any, context: Any
    ) -> pb.ControllerModifyVolumeResponse:
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        self.provisioner.modify(request.volume_id, dict(request.mutable_parameters))
        return pb.ControllerModifyVolumeResponse()

    @rpc
    def CreateSnapshot(self, request: Any, context: Any) -> pb.CreateSnapshotResponse:
        check_snapshot_parameters(request.parameters)
        record = self.snapshots.create(
            request.name, request.source_volume_id, dict(request.secrets)
        )
        return pb.CreateSnapshotResponse(snapshot=self._snapshot(record))

    @rpc
    def DeleteSnapshot(self, request: Any, context: Any) -> pb.DeleteSnapshotResponse:
        self.snapshots.delete(request.snapshot_id, dict(request.secrets))
        return pb.DeleteSnapshotResponse()

    @rpc
    def ListSnapshots(self, request: Any, context: Any) -> pb.ListSnapshotsResponse:
        records = self.snapshots.scan()
        if request.snapshot_id:
            records = [r for r in records if r.snapshot_id == request.snapshot_id]
        if request.source_volume_id:
            records = [r for r in records if r.source_volume_id == request.source_volume_id]
        page, next_token = paginate(
            records, lambda r: r.snapshot_id, request.starting_token, request.max_entries,
            is_snapshot_id,
        )  # fmt: skip
        entries = [pb.ListSnapshotsResponse.Entry(snapshot=self._snapshot(r)) for r in page]
        return pb.ListSnapshotsResponse(entries=entries, next_token=next_token)


def validation(own: VolumeParams, request: Any) -> pb.ValidateVolumeCapabilitiesResponse:
    """ValidateVolumeCapabilities of a volume with parameters `own`: unknown or different
    parameters and unservable capabilities are "not confirmed", with the reason."""
    if not request.volume_capabilities:
        raise InvalidArgument("volume_capabilities is required")
    if request.parameters:
        try:
            differ = parse_parameters(dict(request.parameters)) != own
        except InvalidArgument as e:
            return pb.ValidateVolumeCapabilitiesResponse(message=str(e))
        if differ:
            return pb.ValidateVolumeCapabilitiesResponse(
                message="the parameters differ from the volume's"
            )
    for cap in request.volume_capabilities:
        reason = capabilities.unsupported(cap) or fit_reason(
            own, cap.WhichOneof("access_type") == "block"
        )
        if reason:
            return pb.ValidateVolumeCapabilitiesResponse(message=reason)
    confirmed = pb.ValidateVolumeCapabilitiesResponse.Confirmed(
        volume_context=request.volume_context,
        volume_capabilities=request.volume_capabilities,
        parameters=request.parameters,
    )
    return pb.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)


def volume_context(record: VolumeRecord) -> dict[str, str]:
    return {
        "queues": str(record.params.queues), "queueSize": str(record.params.queue_size),
        "provisioning": record.params.provisioning,
    }  # fmt: skip


def unservable(request: Any) -> bool:
    """A GetCapacity for a class or capability this driver cannot serve (capacity 0)."""
    params = parse_parameters(dict(request.parameters))
    for cap in request.volume_capabilities:
        block = cap.WhichOneof("access_type") == "block"
        if capabilities.unsupported(cap) or fit_reason(params, block):
            return True
    return False


def check_snapshot_parameters(parameters: Any) -> None:
    unknown = [k for k in parameters if not k.startswith(K8S_PARAM_PREFIX)]
    if unknown:
        raise InvalidArgument(f"snapshots take no parameters (got {', '.join(unknown)})")


def content_source(request: Any) -> Source:
    source = request.volume_content_source
    kind = source.WhichOneof("type")
    if kind == "snapshot" and source.snapshot.snapshot_id:
        return ("snapshot", source.snapshot.snapshot_id)
    if kind == "volume" and source.volume.volume_id:
        return ("volume", source.volume.volume_id)
    raise InvalidArgument("volume_content_source needs a snapshot_id or a volume_id")


def is_volume_id(token: str) -> bool:
    try:
        return check_volume_id(token)
    except InvalidId:
        return False


def is_snapshot_id(token: str) -> bool:
    try:
        return check_snapshot_id(token)
    except InvalidId:
        return False


T = TypeVar("T")


def paginate(
    items: list[T], key: Callable[[T], str], token: str, max_entries: int,
    valid_token: Callable[[str], bool],
) -> tuple[list[T], str]:  # fmt: skip
    """One page of `items` (sorted by `key`) after `token`, the key of the last entry of
    the page before: entries that come or go between pages shift no other entry."""
    if max_entries < 0:
        raise InvalidArgument("max_entries may not be negative")
    if token and not valid_token(token):
        raise Aborted(f"starting_token {token!r} is not one this plugin handed out")
    rest = [item for item in items if key(item) > token] if token else items
    count = max_entries or MAX_LIST_ENTRIES
    page = rest[:count]
    return page, key(page[-1]) if len(rest) > count else ""
