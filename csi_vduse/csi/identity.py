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
        """Ready when this host can serve VDUSE volumes (the external-provisioner waits
        for it). Process liveness is /livez of the health endpoint, not this."""
        ready = not host_problems(self.config)
        return pb.ProbeResponse(ready=wrappers_pb2.BoolValue(value=ready))


def host_problems(config: ServeConfig) -> list[str]:
    """Why this host cannot serve VDUSE volumes, with the fix; empty when it can."""
    if "node" not in config.components:
        return []
    return [
        f"{c.name}: {c.detail} (fix: {c.fix})"
        for c in run_checks()
        if c.name in READY_CHECKS and not c.ok
    ]
