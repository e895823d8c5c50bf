"""Kubelet plugin registration, served by the plugin itself (node-driver-registrar's job).

The kubelet's plugin watcher finds `<registration dir>/<driver>-reg.sock`, calls GetInfo,
validates the answer (and calls NodeGetInfo on the CSI endpoint), then reports its verdict
with NotifyRegistrationStatus. A refusal is logged and kept; the process goes on serving its
volumes: the kubelet retries by itself (with back-off) and whenever the socket is re-created.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import grpc

from csi_vduse.csi.proto import pluginregistration_pb2 as pb
from csi_vduse.csi.proto import pluginregistration_pb2_grpc as rpc_pb

log = logging.getLogger(__name__)

CSI_PLUGIN = "CSIPlugin"
SUPPORTED_VERSIONS = ("1.0.0",)


@dataclass(frozen=True)
class RegistrationStatus:
    """The kubelet's last verdict."""

    registered: bool
    error: str
    at: float


class RegistrationService(rpc_pb.RegistrationServicer):
    def __init__(self, driver_name: str, kubelet_endpoint: str) -> None:
        self.driver_name = driver_name
        self.kubelet_endpoint = kubelet_endpoint
        self.status: RegistrationStatus | None = None

    def GetInfo(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.PluginInfo:
        log.debug("the kubelet asked for the plugin info")
        return pb.PluginInfo(
            type=CSI_PLUGIN, name=self.driver_name, endpoint=self.kubelet_endpoint,
            supported_versions=SUPPORTED_VERSIONS,
        )  # fmt: skip

    def NotifyRegistrationStatus(
        self, request: pb.RegistrationStatus, context: grpc.ServicerContext
    ) -> pb.RegistrationStatusResponse:
        self.status = RegistrationStatus(request.plugin_registered, request.error, time.time())
        fields = {"driver": self.driver_name, "kubelet_endpoint": self.kubelet_endpoint,
                  "registered": request.plugin_registered}  # fmt: skip
        if request.plugin_registered:
            log.info("registered with the kubelet", extra=fields)
        else:
            log.error(
                "the kubelet refused to register the driver: %s; volumes already served go on, "
                "the kubelet retries by itself, and a restart of the plugin registers again",
                request.error or "(no reason given)", extra={**fields, "error": request.error},
            )  # fmt: skip
        return pb.RegistrationStatusResponse()

    def problems(self) -> list[str]:
        """For readiness: the kubelet's refusal, while it stands."""
        status = self.status
        if status is None or status.registered:
            return []
        return [f"the kubelet refused to register {self.driver_name}: {status.error}"]
