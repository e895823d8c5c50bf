"""The Controller service: node-local sparse images, one controller per node."""

from __future__ import annotations

from typing import Any

from google.protobuf import wrappers_pb2

from csi_vduse.config import ServeConfig
from csi_vduse.csi import capabilities
from csi_vduse.csi.errors import rpc
from csi_vduse.csi.proto import csi_pb2 as pb
from csi_vduse.csi.proto import csi_pb2_grpc as rpc_pb
from csi_vduse.errors import Aborted, InvalidArgument, ResourceExhausted
from csi_vduse.lifecycle.node import NodeVolumes
from csi_vduse.lifecycle.provisioning import Provisioner, fit_reason, parse_parameters
from csi_vduse.state.records import UnreadableRecord
from csi_vduse.state.volumes import VolumeRecord

RPC = pb.ControllerServiceCapability.RPC
CAPABILITIES = (
    RPC.CREATE_DELETE_VOLUME, RPC.LIST_VOLUMES, RPC.GET_CAPACITY, RPC.EXPAND_VOLUME,
    RPC.GET_VOLUME, RPC.VOLUME_CONDITION, RPC.SINGLE_NODE_MULTI_WRITER,
)  # fmt: skip
MAX_LIST_ENTRIES = 1000


class ControllerService(rpc_pb.ControllerServicer):
    def __init__(
        self, config: ServeConfig, provisioner: Provisioner, node: NodeVolumes | None
    ) -> None:
        self.config = config
        self.provisioner = provisioner
        self.node = node

    def _topology(self) -> pb.Topology:
        return pb.Topology(segments={self.config.topology_key: self.config.node_id})

    def _on_this_node(self, topologies: Any) -> bool:
        key, node = self.config.topology_key, self.config.node_id
        return any(t.segments.get(key) == node for t in topologies)

    def _volume(self, record: VolumeRecord) -> pb.Volume:
        return pb.Volume(
            volume_id=record.volume_id, capacity_bytes=record.capacity,
            volume_context={"queues": str(record.params.queues),
                            "queueSize": str(record.params.queue_size),
                            "provisioning": record.params.provisioning},
            accessible_topology=[self._topology()],
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
        if request.HasField("volume_content_source"):
            raise InvalidArgument(
                "creating a volume from a snapshot or another volume is not supported yet"
            )
        if request.HasField("accessibility_requirements"):
            req = request.accessibility_requirements
            if req.requisite and not self._on_this_node(req.requisite):
                raise ResourceExhausted(
                    f"this controller provisions on node {self.config.node_id} only, "
                    "which the requisite topology excludes"
                )
        record = self.provisioner.create(
            request.name, request.capacity_range.required_bytes,
            request.capacity_range.limit_bytes, dict(request.parameters),
        )  # fmt: skip
        return pb.CreateVolumeResponse(volume=self._volume(record))

    @rpc
    def DeleteVolume(self, request: Any, context: Any) -> pb.DeleteVolumeResponse:
        self.provisioner.delete(request.volume_id)
        return pb.DeleteVolumeResponse()

    @rpc
    def ValidateVolumeCapabilities(
        self, request: Any, context: Any
    ) -> pb.ValidateVolumeCapabilitiesResponse:
        record = self.provisioner.get(request.volume_id)
        if not request.volume_capabilities:
            raise InvalidArgument("volume_capabilities is required")
        if request.parameters and parse_parameters(dict(request.parameters)) != record.params:
            return pb.ValidateVolumeCapabilitiesResponse(
                message="the parameters differ from the volume's"
            )
        for cap in request.volume_capabilities:
            reason = capabilities.unsupported(cap) or fit_reason(
                record.params, cap.WhichOneof("access_type") == "block"
            )
            if reason:
                return pb.ValidateVolumeCapabilitiesResponse(message=reason)
        confirmed = pb.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=request.volume_context,
            volume_capabilities=request.volume_capabilities,
            parameters=request.parameters,
        )
        return pb.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)

    @rpc
    def ListVolumes(self, request: Any, context: Any) -> pb.ListVolumesResponse:
        if request.max_entries < 0:
            raise InvalidArgument("max_entries may not be negative")
        records, unreadable = self.provisioner.scan()
        volumes = [(self._volume(r), self._condition(r)) for r in records]
        volumes += [self._unreadable(vid, why) for vid, why in unreadable.items()]
        volumes.sort(key=lambda v: v[0].volume_id)
        start = 0
        if request.starting_token:
            if not request.starting_token.isdigit() or int(request.starting_token) > len(volumes):
                raise Aborted(f"starting_token {request.starting_token!r} is not valid any more")
            start = int(request.starting_token)
        count = request.max_entries or MAX_LIST_ENTRIES
        page = volumes[start : start + count]
        end = start + len(page)
        entries = [
            pb.ListVolumesResponse.Entry(
                volume=volume,
                status=pb.ListVolumesResponse.VolumeStatus(volume_condition=condition),
            )
            for volume, condition in page
        ]
        return pb.ListVolumesResponse(
            entries=entries, next_token=str(end) if end < len(volumes) else ""
        )

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
        if request.parameters:
            parse_parameters(dict(request.parameters))
        for cap in request.volume_capabilities:
            capabilities.parse(cap)
        topology = request.accessible_topology
        if topology.segments and not self._on_this_node([topology]):
            return pb.GetCapacityResponse(available_capacity=0)
        available = self.provisioner.available()
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
            request.capacity_range.limit_bytes,
        )  # fmt: skip
        return pb.ControllerExpandVolumeResponse(
            capacity_bytes=record.capacity, node_expansion_required=True
        )
