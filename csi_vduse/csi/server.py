"""`csi-vduse serve`: the CSI services on a Unix socket."""

from __future__ import annotations

import logging
import os
import signal
import socket
import stat
import threading
from concurrent import futures
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry

from csi_vduse.backends.registry import Drivers
from csi_vduse.config import ServeConfig
from csi_vduse.csi.controller import ControllerService
from csi_vduse.csi.identity import IdentityService, host_problems
from csi_vduse.csi.node import NodeService
from csi_vduse.csi.proto import csi_pb2 as pb
from csi_vduse.csi.proto import csi_pb2_grpc as rpc_pb
from csi_vduse.csi.proto import pluginregistration_pb2 as reg_pb
from csi_vduse.csi.proto import pluginregistration_pb2_grpc as reg_rpc_pb
from csi_vduse.csi.registration import RegistrationService
from csi_vduse.csi.slots import WORKERS
from csi_vduse.health import HealthServer
from csi_vduse.lifecycle.locks import VolumeLocks
from csi_vduse.lifecycle.node import NodeVolumes
from csi_vduse.lifecycle.provisioning import Provisioner
from csi_vduse.lifecycle.snapshots import Snapshots, drivers_for, refuse_staged
from csi_vduse.metrics import VolumeCollector
from csi_vduse.state.staging import StagingStore

log = logging.getLogger(__name__)


class EndpointInUse(RuntimeError):
    pass


def prepare_socket(path: Path) -> None:
    """Removes a stale socket; refuses to touch a live one or anything that is not a socket."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise EndpointInUse(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise EndpointInUse(f"another server is listening on {path}")


def listen(server: grpc.Server, path: Path) -> None:
    """Starts `server` on a fresh socket at `path` that only root can open."""
    prepare_socket(path)
    old = os.umask(0o177)
    try:
        server.add_insecure_port(f"unix://{path}")
        server.start()
    finally:
        os.umask(old)
    os.chmod(path, 0o600)


class Driver:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.locks = VolumeLocks()
        self.node: NodeVolumes | None = None
        self.drivers: Drivers | None = None  # the controller's, started before it serves
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=WORKERS))
        self._stop = threading.Event()
        self._reconciler: threading.Thread | None = None
        self.health: HealthServer | None = None
        # the kubelet's side: its own server, so the registration socket serves nothing else
        self.registration: RegistrationService | None = None
        self.registration_server: grpc.Server | None = None
        if config.registration_socket is not None:
            self.registration = RegistrationService(config.driver_name, config.kubelet_endpoint)
            self.registration_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
            reg_rpc_pb.add_RegistrationServicer_to_server(
                self.registration, self.registration_server
            )
        rpc_pb.add_IdentityServicer_to_server(IdentityService(config), self.server)
        if "node" in config.components:
            self.node = NodeVolumes(config.data_dir, config.state_dir, self.locks,
                                    config.max_volumes)  # fmt: skip
            rpc_pb.add_NodeServicer_to_server(NodeService(config, self.node), self.server)
        if "controller" in config.components and config.controller_scope == "cluster":
            from csi_vduse.cluster.api import Resources, connect
            from csi_vduse.csi.cluster_controller import ClusterControllerService

            resources = Resources(connect(config.kubeconfig))
            cluster = ClusterControllerService(config, resources, config.agent_wait)
            rpc_pb.add_ControllerServicer_to_server(cluster, self.server)
        elif "controller" in config.components:
            staging = StagingStore(config.state_dir)
            drivers = self.node.drivers if self.node else drivers_for(
                config.data_dir, config.state_dir, self.locks, refuse_staged(staging)
            )  # fmt: skip
            snapshots = Snapshots(drivers, self.locks)
            provisioner = Provisioner(
                drivers, staging, self.locks, self.node.set_qos if self.node else None
            )
            self.drivers = drivers
            service = ControllerService(config, provisioner, snapshots, self.node)
            rpc_pb.add_ControllerServicer_to_server(service, self.server)

    def start(self) -> None:
        log.info("starting")
        if self.config.registration_socket is not None:  # refused before anything is served
            prepare_socket(self.config.registration_socket)
        if self.config.controller_scope == "node" or "node" in self.config.components:
            for d in (self.config.state_dir, self.config.data_dir):
                d.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.drivers is not None:
            self.drivers.startup()
        for problem in host_problems(self.config):
            log.warning("this host cannot serve VDUSE volumes yet: %s", problem)
        if self.node is not None:
            self.node.reconcile()  # starts the re-attaches; calls on their volumes wait for them
        path = self.config.socket_path
        listen(self.server, path)
        if self.registration_server is not None:
            self._register()
        if self.config.health_address:
            registry = CollectorRegistry()
            if self.node is not None:
                registry.register(VolumeCollector(self.node))
            self.health = HealthServer(
                self.config.health_address, self.liveness_problems, self.readiness_problems,
                registry,
            )  # fmt: skip
            self.health.start()
        if self.node is not None:  # after the sockets: a re-attach never delays them
            self._reconciler = threading.Thread(
                target=self._reconcile_loop, name="reconciler", daemon=True
            )
            self._reconciler.start()
        log.info("serving CSI on %s", path, extra={
            "driver": self.config.driver_name, "node": self.config.node_id,
            "components": ",".join(self.config.components),
        })  # fmt: skip

    def _register(self) -> None:
        """Opens the registration socket once the CSI socket answers: the kubelet calls
        NodeGetInfo on the CSI endpoint as soon as it accepts the registration."""
        socket_path = self.config.registration_socket
        assert self.registration_server is not None and socket_path is not None
        if "node" not in self.config.components:
            log.warning("registering with the kubelet without the node service: the kubelet "
                        "will refuse the driver (its NodeGetInfo fails)")  # fmt: skip
        listen(self.registration_server, socket_path)
        log.info("serving kubelet plugin registration on %s", socket_path, extra={
            "driver": self.config.driver_name, "kubelet_endpoint": self.config.kubelet_endpoint,
        })  # fmt: skip

    def _reconcile_loop(self) -> None:
        assert self.node is not None
        while not self._stop.wait(self.config.reconcile_interval):
            try:
                self.node.reconcile()
            except Exception:
                log.exception("reconcile pass failed")

    def liveness_problems(self) -> list[str]:
        """What a restart of this process would fix: the CSI socket does not answer, or
        a thread that serves volumes died."""
        problems = []
        try:
            with grpc.insecure_channel(f"unix://{self.config.socket_path}") as channel:
                rpc_pb.IdentityStub(channel).GetPluginInfo(pb.GetPluginInfoRequest(), timeout=5)
        except grpc.RpcError as e:
            problems.append(f"the CSI socket does not answer: {e.code().name}")
        socket_path = self.config.registration_socket
        if socket_path is not None:  # the kubelet finds the driver only through it
            try:
                with grpc.insecure_channel(f"unix://{socket_path}") as channel:
                    reg_rpc_pb.RegistrationStub(channel).GetInfo(reg_pb.InfoRequest(), timeout=5)
            except grpc.RpcError as e:
                problems.append(f"the registration socket {socket_path} does not answer: "
                                f"{e.code().name}")  # fmt: skip
        if self._reconciler is not None and not self._reconciler.is_alive():
            problems.append("the reconciler thread stopped")
        if self.node is not None:
            problems += self.node.dead_threads()
        return problems

    def readiness_problems(self) -> list[str]:
        refused = self.registration.problems() if self.registration is not None else []
        return host_problems(self.config) + refused

    def stop(self) -> None:
        """Stops answering; staged volumes stay (their kernel devices outlive us)."""
        self._stop.set()
        socket_path = self.config.registration_socket
        if self.registration_server is not None and socket_path is not None:
            # first, so the kubelet deregisters the driver before its CSI socket goes
            self.registration_server.stop(grace=1).wait()
            socket_path.unlink(missing_ok=True)
        if self.health is not None:
            self.health.stop()
        self.server.stop(grace=5).wait()
        if self._reconciler is not None:
            self._reconciler.join()
        if self.node is not None:
            self.node.shutdown()
        self.config.socket_path.unlink(missing_ok=True)


def serve(config: ServeConfig) -> int:
    driver = Driver(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    driver.start()
    while not stop.wait(1.0):
        pass
    log.info("stopping: volumes stay staged")
    driver.stop()
    return 0
