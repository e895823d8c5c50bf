from __future__ import annotations

from typing import Any

from google.protobuf import wrappers_pb2

from csi_vduse import __version__
from csi_vduse.config import ServeConfig
from csi_vduse.csi.errors import rpc
from csi_vduse.csi.proto import csi_pb2 as pb
from csi_vduse.csi.proto import csi_pb2_grpc as rpc_pb
from csi_vduse.doctor import run_checks

Service = pb.PluginCapability.Service
Expansion = pb.PluginCapability.VolumeExpansion
READY_CHECKS = ("VDUSE control device", "vduse vdpa management device", "virtio_vdpa driver")


class IdentityService(rpc_pb.IdentityServicer):
    def __init__(self, config: ServeConfig) -> None:
        self.config = config

    @rpc
    def GetPluginInfo(self, request: Any, context: Any) -> pb.GetPluginInfoResponse:
        return pb.GetPluginInfoResponse(
            name=self.config.driver_name, vendor_version=__version__,
            manifest={"url": "https://github.com/csi-vduse/csi-vduse"},
        )  # fmt: skip

    @rpc
    def GetPluginCapabilities(self, request: Any, context: Any) -> pb.GetPluginCapabilitiesResponse:
        caps = [
            pb.PluginCapability(service=Service(type=t))
            for t in (Service.CONTROLLER_SERVICE, Service.VOLUME_ACCESSIBILITY_CONSTRAINTS)
        ]
        caps.append(pb.PluginCapability(volume_expansion=Expansion(type=Expansion.ONLINE)))
        return pb.GetPluginCapabilitiesResponse(capabilities=caps)

    @rpc
    def Probe(self, request: Any, context: Any) -> pb.ProbeResponse:
        ready = True
        if "node" in self.config.components:
            checks = {c.name: c.ok for c in run_checks()}
            ready = all(checks.get(name, False) for name in READY_CHECKS)
        return pb.ProbeResponse(ready=wrappers_pb2.BoolValue(value=ready))
