"""The Node service: volumes staged as VDUSE devices, published by bind mounts."""

from __future__ import annotations

from typing import Any

from csi_vduse.config import ServeConfig
from csi_vduse.csi import capabilities
from csi_vduse.csi.errors import rpc
from csi_vduse.csi.proto import csi_pb2 as pb
from csi_vduse.csi.proto import csi_pb2_grpc as rpc_pb
from csi_vduse.csi.slots import Slots
from csi_vduse.errors import InvalidArgument
from csi_vduse.lifecycle.node import NodeVolumes

RPC = pb.NodeServiceCapability.RPC
CAPABILITIES = (
    RPC.STAGE_UNSTAGE_VOLUME, RPC.GET_VOLUME_STATS, RPC.EXPAND_VOLUME, RPC.VOLUME_CONDITION,
    RPC.SINGLE_NODE_MULTI_WRITER,
)  # fmt: skip
Usage = pb.VolumeUsage


def _require(value: str, what: str) -> str:
    if not value:
        raise InvalidArgument(f"{what} is required")
    return value


class NodeService(rpc_pb.NodeServicer):
    def __init__(
        self, config: ServeConfig, volumes: NodeVolumes, slots: Slots | None = None
    ) -> None:
        self.config = config
        self.volumes = volumes
        self.slots = slots or Slots()

    @rpc
    def NodeStageVolume(self, request: Any, context: Any) -> pb.NodeStageVolumeResponse:
        _require(request.volume_id, "volume_id")
        access = capabilities.require_one(
            request.volume_capability, request.HasField("volume_capability")
        )
        with self.slots.hold("NodeStageVolume"):
            self.volumes.stage(
                request.volume_id, request.staging_target_path, access, dict(request.secrets)
            )
        return pb.NodeStageVolumeResponse()

    @rpc
    def NodeUnstageVolume(self, request: Any, context: Any) -> pb.NodeUnstageVolumeResponse:
        _require(request.volume_id, "volume_id")
        with self.slots.hold("NodeUnstageVolume"):
            self.volumes.unstage(request.volume_id, request.staging_target_path)
        return pb.NodeUnstageVolumeResponse()

    @rpc
    def NodePublishVolume(self, request: Any, context: Any) -> pb.NodePublishVolumeResponse:
        _require(request.volume_id, "volume_id")
        _require(request.staging_target_path, "staging_target_path")
        access = capabilities.require_one(
            request.volume_capability, request.HasField("volume_capability")
        )
        with self.slots.hold("NodePublishVolume"):
            self.volumes.publish(
                request.volume_id, request.staging_target_path, request.target_path, access,
                request.readonly,
            )  # fmt: skip
        return pb.NodePublishVolumeResponse()

    @rpc
    def NodeUnpublishVolume(self, request: Any, context: Any) -> pb.NodeUnpublishVolumeResponse:
        _require(request.volume_id, "volume_id")
        with self.slots.hold("NodeUnpublishVolume"):
            self.volumes.unpublish(request.volume_id, request.target_path)
        return pb.NodeUnpublishVolumeResponse()

    @rpc
    def NodeGetVolumeStats(self, request: Any, context: Any) -> pb.NodeGetVolumeStatsResponse:
        _require(request.volume_id, "volume_id")
        s = self.volumes.stats(request.volume_id, request.volume_path)
        usage = [Usage(unit=Usage.BYTES, total=s.total)]
        if s.available is not None:
            usage = [
                Usage(unit=Usage.BYTES, total=s.total, available=s.available, used=s.used),
                Usage(unit=Usage.INODES, total=s.inodes_total, available=s.inodes_free,
                      used=s.inodes_used),
            ]  # fmt: skip
        return pb.NodeGetVolumeStatsResponse(
            usage=usage, volume_condition=pb.VolumeCondition(abnormal=s.abnormal, message=s.message)
        )

    @rpc
    def NodeExpandVolume(self, request: Any, context: Any) -> pb.NodeExpandVolumeResponse:
        _require(request.volume_id, "volume_id")
        if request.HasField("volume_capability"):
            capabilities.parse(request.volume_capability)
        with self.slots.hold("NodeExpandVolume"):
            capacity = self.volumes.expand(
                request.volume_id, request.volume_path, request.capacity_range.required_bytes,
                request.capacity_range.limit_bytes,
            )  # fmt: skip
        return pb.NodeExpandVolumeResponse(capacity_bytes=capacity)

    @rpc
    def NodeGetCapabilities(self, request: Any, context: Any) -> pb.NodeGetCapabilitiesResponse:
        return pb.NodeGetCapabilitiesResponse(
            capabilities=[pb.NodeServiceCapability(rpc=RPC(type=t)) for t in CAPABILITIES]
        )

    @rpc
    def NodeGetInfo(self, request: Any, context: Any) -> pb.NodeGetInfoResponse:
        return pb.NodeGetInfoResponse(
            node_id=self.config.node_id, max_volumes_per_node=self.config.max_volumes,
            accessible_topology=pb.Topology(
                segments={self.config.topology_key: self.config.node_id}
            ),
        )  # fmt: skip
