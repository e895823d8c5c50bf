"""A real single-node Kubernetes inside the lab guest: the control plane of controlplane.py,
containerd with runc and the CNI bridge, and a kubelet, everything on 127.0.0.1.

The guest's root is the host's, read-only: every writable path is under a work dir on the
scratch disk or in /run. There is no kube-proxy: one DNAT rule sends the `kubernetes`
service address to the loopback API server, which is all the cluster's pods (the plugin's
sidecars, in the host network) need of services."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tests.cluster.build import component_path
from tests.cluster.controlplane import (
    CLIENT_EKU,
    HOST,
    SERVICE_CIDR,
    SERVICE_IP,
    ControlPlane,
    ControlPlaneError,
    free_port,
    make_cert,
    write_kubeconfig,
)
from tests.cluster.images import image_reference

NODE_NAME = "lab-node"
POD_CIDR = "10.244.0.0/24"
NODE_LINK = "lab0"
NODE_IP = "10.200.0.1"  # on NODE_LINK; nothing listens there, see _route_kubernetes_service
CONTAINERD_SOCKET = Path("/run/containerd/containerd.sock")
# A block device holding containerd's root with the images imported (tests.cluster.image_cache)
IMAGE_CACHE_ENV = "CSI_VDUSE_IMAGE_CACHE"
CGROUP_ROOT = Path("/sys/fs/cgroup")
KUBELET_DIR = Path("/var/lib/kubelet")


def _prepare_host(workdir: Path) -> None:
    """What an installed host has and the lab guest lacks: a host name (the API server names
    its identity lease after it; the guest's is "(none)"), and a writable /var/lib and
    /var/log (on the read-only root of the guest): kubelet, containerd and the CNI plugins
    keep state at fixed paths there whatever their configuration says (device plugin
    checkpoints, /var/lib/cni, /var/log/containers)."""
    socket.sethostname(NODE_NAME)
    for path in (Path("/var/lib"), Path("/var/log")):
        if not os.access(path, os.W_OK):
            writable = workdir / "host" / path.name
            writable.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "--bind", str(writable), str(path)], check=True)


def _delegate_cgroup_controllers() -> None:
    """Enable the root cgroup's controllers for its children, as systemd does on a host:
    runc puts each container's limits in a child cgroup."""
    available = (CGROUP_ROOT / "cgroup.controllers").read_text().split()
    (CGROUP_ROOT / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in available))


def binaries() -> dict[str, Path]:
    """Every binary the cluster runs, built on the host beforehand (the guest's root is
    read-only): `python -m tests.cluster.build`."""
    names = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kubectl",
             "containerd", "containerd-shim-runc-v2", "ctr", "runc", "helm")  # fmt: skip
    found = {name: component_path(name) for name in names}
    found["etcd"] = Path("/usr/bin/etcd")
    return found


@dataclass
class Node:
    workdir: Path
    images: dict[str, Path]  # name -> OCI archive (tests.cluster.images), imported at start
    bins: dict[str, Path] = field(default_factory=binaries)
    plane: ControlPlane | None = None
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    kubelet_port: int = field(default_factory=free_port)
    kubelet_healthz_port: int = field(default_factory=free_port)
    imported: Future[float] | None = None

    @property
    def kubelet_dir(self) -> Path:
        """kubelet's default root: a few of its paths ignore --root-dir (the device plugin
        checkpoints, pod-resources), and the chart's default kubeletDir then fits as is."""
        return KUBELET_DIR

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    @property
    def pod_logs(self) -> Path:
        return self.workdir / "pod-logs"

    @property
    def containerd_root(self) -> Path:
        return self.workdir / "containerd"

    def start(
        self, timeout: float = 600, progress: Callable[[str], None] = print
    ) -> dict[str, float]:
        """Brings the cluster up; returns the seconds each stage took. containerd imports the
        images while the control plane and the kubelet start and the first steps run (they
        start no pod): wait_for_images() waits for the import. `progress` hears of each stage
        as it ends, so that a start that stalls shows where."""
        timings: dict[str, float] = {}
        self.logs.mkdir(parents=True, exist_ok=True)
        _delegate_cgroup_controllers()
        _prepare_host(self.workdir)
        started = time.monotonic()
        deadline = started + timeout
        if cache := os.environ.get(IMAGE_CACHE_ENV):  # tests.cluster.image_cache
            self.containerd_root.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", cache, str(self.containerd_root)], check=True)
        self.start_containerd(deadline)
        progress(f"containerd up in {time.monotonic() - started:.0f} s")
        self.imported = ThreadPoolExecutor(1).submit(self._import_images, deadline, progress)
        self.plane = ControlPlane(self.workdir / "control-plane", self.bins)
        timings["control plane"] = self.plane.start(timeout=timeout)
        progress(f"control plane up in {timings['control plane']:.0f} s")
        self._route_kubernetes_service()
        mark = time.monotonic()
        self._start_kubelet()
        self.wait_node_ready(time.monotonic() + timeout)
        timings["kubelet and node ready"] = time.monotonic() - mark
        timings["cluster"] = time.monotonic() - started
        progress(f"node Ready after {timings['cluster']:.0f} s")
        return timings

    def wait_for_images(self, timeout: float = 600) -> float:
        """Waits for the images start() imports; the seconds the import took."""
        assert self.imported is not None, "start() first"
        try:
            return self.imported.result(timeout)
        except TimeoutError:
            raise ControlPlaneError(f"the images were not imported in {timeout:.0f} s") from None

    def _import_images(self, deadline: float, progress: Callable[[str], None]) -> float:
        started = time.monotonic()
        present = set(self.ctr("images", "list", "--quiet").split())
        for name, archive in self.images.items():
            if image_reference(archive) in present:
                continue
            mark = time.monotonic()
            self.import_image(archive, timeout=max(deadline - mark, 1))
            progress(f"image {name} imported in {time.monotonic() - mark:.0f} s")
        return time.monotonic() - started

    def log_tails(self, lines: int = 25) -> str:
        """The last lines of every component's log (the plane's and the node's) and of every
        container's: what a failed start or step shows."""
        logs = sorted(self.logs.glob("*.log"))
        if self.plane is not None:
            logs += sorted((self.plane.workdir / "logs").glob("*.log"))
        logs += sorted(self.pod_logs.glob("*/*/*.log"))
        parts = []
        for log in logs:
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            name = log.relative_to(self.workdir)
            parts.append(f"--- {name}\n" + "\n".join(line[:400] for line in tail))
        return "\n".join(parts)

    def stop(self) -> None:
        for name in reversed(list(self.processes)):
            proc = self.processes.pop(name)
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.plane is not None:
            self.plane.stop()

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        with (self.logs / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, env=env,
            )  # fmt: skip

    def install_snapshot_addon(self, crds: list[Path]) -> None:
        """What a cluster admin installs before snapshots work: the VolumeSnapshot CRDs and
        snapshot-controller, as its defaults have it."""
        assert self.plane is not None
        for crd in crds:
            self.kubectl("apply", "-f", str(crd))
        names = [f"crd/{c.stem.split('_', 1)[1]}.snapshot.storage.k8s.io" for c in crds]
        self.kubectl("wait", "--for=condition=established", "--timeout=120s", *names)
        kubeconfig = self.plane.admin_kubeconfig
        self._spawn("snapshot-controller", [
            str(component_path("snapshot-controller")), f"--kubeconfig={kubeconfig}",
            "--leader-election=false", "--v=2",
        ])  # fmt: skip

    def check_alive(self) -> None:
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                lines = (self.logs / f"{name}.log").read_text(errors="replace").splitlines()
                # klog's error and fatal lines say why; the last lines say where it was
                errors = [line[:600] for line in lines if line[:1] in "EF"][-15:]
                tail = [line[:600] for line in lines[-10:]]
                raise ControlPlaneError(
                    f"{name} exited with {proc.returncode}:\n" + "\n".join([*errors, "...", *tail])
                )
        if self.plane is not None:
            self.plane.check_alive()

    def _route_kubernetes_service(self) -> None:
        """kubelet refuses a loopback node IP, and the cluster's clients dial the node's IP
        (the API server, for logs and exec) and the `kubernetes` service IP (the sidecars).
        Both are routed to a dummy interface of this guest (it has no network device) and
        DNAT'd to the loopback, where everything listens."""
        assert self.plane is not None
        for cmd in (
            ["ip", "link", "add", NODE_LINK, "type", "dummy"],
            ["ip", "addr", "add", f"{NODE_IP}/32", "dev", NODE_LINK],
            ["ip", "link", "set", NODE_LINK, "up"],
            ["ip", "route", "add", SERVICE_CIDR, "dev", NODE_LINK, "src", NODE_IP],
        ):
            subprocess.run(cmd, check=True, capture_output=True)
        for address, port, target in (
            (SERVICE_IP, 443, self.plane.ports.apiserver),
            (NODE_IP, self.kubelet_port, self.kubelet_port),
        ):
            subprocess.run(
                ["iptables", "-t", "nat", "-A", "OUTPUT", "-d", address, "-p", "tcp",
                 "--dport", str(port), "-j", "DNAT", "--to-destination", f"{HOST}:{target}"],
                check=True, capture_output=True,
            )  # fmt: skip

    # containerd

    def _containerd_config(self) -> Path:
        cni = self.workdir / "cni"
        (cni / "net.d").mkdir(parents=True, exist_ok=True)
        (cni / "net.d" / "10-lab.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "lab",
            "plugins": [
                {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]],
                          "dataDir": str(cni / "ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }, indent=2))  # fmt: skip
        runtime = "plugins.'io.containerd.cri.v1.runtime'"
        config = self.workdir / "containerd.toml"
        config.write_text(f"""version = 3
root = '{self.containerd_root}'
state = '/run/containerd'
[grpc]
  address = '{CONTAINERD_SOCKET}'
[{runtime}.containerd]
  default_runtime_name = 'runc'
[{runtime}.containerd.runtimes.runc]
  runtime_type = 'io.containerd.runc.v2'
[{runtime}.containerd.runtimes.runc.options]
  BinaryName = '{self.bins["runc"]}'
  SystemdCgroup = false
[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = '{image_reference(self.images["pause"])}'
[{runtime}.cni]
  bin_dirs = ['/usr/lib/cni']
  conf_dir = '{cni / "net.d"}'
""")
        return config

    def start_containerd(self, deadline: float) -> None:
        config = self._containerd_config()
        env = dict(os.environ, PATH=f"{self.bins['containerd'].parent}:{os.environ['PATH']}")
        self._spawn("containerd", [str(self.bins["containerd"]), f"--config={config}"], env)
        while not CONTAINERD_SOCKET.exists():
            self.check_alive()
            if time.monotonic() > deadline:
                raise ControlPlaneError("containerd did not open its socket")
            time.sleep(0.2)

    def ctr(self, *args: str, timeout: float = 300) -> str:
        result = subprocess.run(
            [str(self.bins["ctr"]), f"--address={CONTAINERD_SOCKET}", "--namespace=k8s.io",
             *args], capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if result.returncode != 0:
            raise ControlPlaneError(f"ctr {' '.join(args)}: {result.stderr[-2000:]}")
        return result.stdout

    def import_image(self, archive: Path, timeout: float = 300) -> None:
        self.ctr("images", "import", "--all-platforms", str(archive), timeout=timeout)

    # kubelet

    def _kubelet_config(self) -> Path:
        assert self.plane is not None
        pki = self.plane.pki
        name = f"kubelet-{NODE_NAME}"
        if not pki.crt(name).exists():
            make_cert(pki, name, f"/O=system:nodes/CN=system:node:{NODE_NAME}", CLIENT_EKU)
        write_kubeconfig(self.workdir / "kubelet.kubeconfig", self.plane.server, pki, name)
        resolv = self.workdir / "resolv.conf"
        resolv.write_text("nameserver 127.0.0.1\n")
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": HOST,
            "port": self.kubelet_port,
            "readOnlyPort": 0,
            "healthzBindAddress": HOST,
            "healthzPort": self.kubelet_healthz_port,
            "authentication": {
                "x509": {"clientCAFile": str(pki.ca)},
                "webhook": {"enabled": False},
                "anonymous": {"enabled": False},
            },
            "authorization": {"mode": "AlwaysAllow"},
            "cgroupDriver": "cgroupfs",
            "cgroupsPerQOS": False,
            "enforceNodeAllocatable": [],
            "containerRuntimeEndpoint": f"unix://{CONTAINERD_SOCKET}",
            "failSwapOn": False,
            "podLogsDir": str(self.pod_logs),
            "resolvConf": str(resolv),
            "podCIDR": POD_CIDR,
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%",
                             "imagefs.available": "1%"},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False,
            "registerNode": True,
        }  # fmt: skip
        path = self.workdir / "kubelet.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def _start_kubelet(self) -> None:
        config = self._kubelet_config()
        KUBELET_DIR.mkdir(exist_ok=True)
        self._spawn("kubelet", [
            str(self.bins["kubelet"]), f"--config={config}",
            f"--kubeconfig={self.workdir / 'kubelet.kubeconfig'}",
            f"--root-dir={self.kubelet_dir}", f"--cert-dir={self.workdir / 'kubelet-pki'}",
            f"--hostname-override={NODE_NAME}", f"--node-ip={NODE_IP}", "--v=1",
        ])  # fmt: skip

    def kubectl(self, *args: str, timeout: float = 120) -> str:
        assert self.plane is not None
        result = subprocess.run(
            [str(self.bins["kubectl"]), f"--kubeconfig={self.plane.admin_kubeconfig}", *args],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if result.returncode != 0:
            raise ControlPlaneError(f"kubectl {' '.join(args)}: {result.stderr[-2000:]}")
        return result.stdout

    def wait_node_ready(self, deadline: float) -> None:
        last = ""
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                node = json.loads(self.kubectl("get", "node", NODE_NAME, "-o", "json"))
                ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
                if ready and ready[0]["status"] == "True":
                    return
                last = ready[0]["message"] if ready else "no Ready condition"
            except ControlPlaneError as e:
                last = str(e)
            time.sleep(1)
        raise ControlPlaneError(f"node {NODE_NAME} not Ready in time: {last}")
