"""A loopback-only Kubernetes control plane: etcd, kube-apiserver, controller-manager, scheduler.

Certificates (openssl) and kubeconfigs go into a working directory given by the caller.
``python -m tests.cluster.controlplane`` is the smoke test: start, wait for /readyz, run
``kubectl get --raw /readyz`` and ``kubectl get ns``, stop.
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from tests.cluster.build import ensure_components

HOST = "127.0.0.1"
SERVICE_CIDR = "10.96.0.0/12"
SERVICE_IP = "10.96.0.1"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
API_SANS = (
    f"IP:{HOST},IP:{SERVICE_IP},DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
    "DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
)
LOOPBACK_SANS = f"IP:{HOST},DNS:localhost"
SERVER_EKU = "serverAuth"
CLIENT_EKU = "clientAuth"


class ControlPlaneError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def openssl(*args: str) -> None:
    proc = subprocess.run(["openssl", *args], capture_output=True)
    if proc.returncode != 0:
        raise ControlPlaneError(f"openssl {args[0]} failed: {proc.stderr.decode()[-2000:]}")


@dataclass(frozen=True)
class Pki:
    """File layout of the certificates in ``<workdir>/pki``."""

    dir: Path

    def crt(self, name: str) -> Path:
        return self.dir / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.dir / f"{name}.key"

    @property
    def ca(self) -> Path:
        return self.crt("ca")

    @property
    def sa_key(self) -> Path:
        return self.dir / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.dir / "sa.pub"


def make_ca(pki: Pki) -> None:
    openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-sha256",
        "-days",
        "3650",
        "-subj",
        "/CN=csi-vduse-test-ca",
        "-keyout",
        str(pki.key("ca")),
        "-out",
        str(pki.ca),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
    )


def make_cert(pki: Pki, name: str, subject: str, usage: str, sans: str | None = None) -> None:
    ext = pki.dir / f"{name}.ext"
    lines = [
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature",
        f"extendedKeyUsage={usage}",
    ]
    if sans:
        lines.append(f"subjectAltName={sans}")
    ext.write_text("\n".join(lines) + "\n")
    csr = pki.dir / f"{name}.csr"
    openssl(
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        subject,
        "-keyout",
        str(pki.key(name)),
        "-out",
        str(csr),
    )
    openssl(
        "x509",
        "-req",
        "-sha256",
        "-days",
        "3650",
        "-in",
        str(csr),
        "-CA",
        str(pki.ca),
        "-CAkey",
        str(pki.key("ca")),
        "-CAcreateserial",
        "-extfile",
        str(ext),
        "-out",
        str(pki.crt(name)),
    )
    csr.unlink()
    ext.unlink()


CLIENTS = {
    "admin": "/O=system:masters/CN=kubernetes-admin",
    "controller-manager": "/CN=system:kube-controller-manager",
    "scheduler": "/CN=system:kube-scheduler",
    "apiserver-kubelet-client": "/O=kubeadm:cluster-admins/CN=kube-apiserver-kubelet-client",
    "apiserver-etcd-client": "/CN=kube-apiserver-etcd-client",
    "front-proxy-client": "/CN=front-proxy-client",
}


def make_pki(pki: Pki) -> None:
    pki.dir.mkdir(parents=True, exist_ok=True)
    if pki.sa_pub.exists() and all(pki.crt(name).exists() for name in CLIENTS):
        return
    make_ca(pki)
    make_cert(pki, "apiserver", "/CN=kube-apiserver", SERVER_EKU, API_SANS)
    make_cert(pki, "etcd-server", "/CN=etcd", f"{SERVER_EKU},{CLIENT_EKU}", LOOPBACK_SANS)
    make_cert(pki, "loopback-serving", "/CN=localhost", SERVER_EKU, LOOPBACK_SANS)
    for name, subject in CLIENTS.items():
        make_cert(pki, name, subject, CLIENT_EKU)
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out",
            str(pki.sa_key))  # fmt: skip
    openssl("pkey", "-in", str(pki.sa_key), "-pubout", "-out", str(pki.sa_pub))


def write_kubeconfig(path: Path, server: str, pki: Pki, client: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "test", "cluster": {"server": server, "certificate-authority": str(pki.ca)}}
        ],
        "users": [
            {
                "name": client,
                "user": {
                    "client-certificate": str(pki.crt(client)),
                    "client-key": str(pki.key(client)),
                },
            }
        ],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": client}}],
        "current-context": "test",
    }
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


@dataclass
class Ports:
    etcd_client: int = field(default_factory=free_port)
    etcd_peer: int = field(default_factory=free_port)
    apiserver: int = field(default_factory=free_port)
    controller_manager: int = field(default_factory=free_port)
    scheduler: int = field(default_factory=free_port)


@dataclass
class ControlPlane:
    workdir: Path
    binaries: dict[str, Path]
    ports: Ports = field(default_factory=Ports)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def pki(self) -> Pki:
        return Pki(self.workdir / "pki")

    @property
    def server(self) -> str:
        return f"https://{HOST}:{self.ports.apiserver}"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    def kubeconfig(self, client: str) -> Path:
        return self.workdir / f"{client}.kubeconfig"

    def prepare(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        make_pki(self.pki)
        for client in ("admin", "controller-manager", "scheduler"):
            write_kubeconfig(self.kubeconfig(client), self.server, self.pki, client)

    def etcd_args(self) -> list[str]:
        p, url = self.pki, f"https://{HOST}:{self.ports.etcd_client}"
        peer = f"http://{HOST}:{self.ports.etcd_peer}"
        return [
            str(self.binaries["etcd"]),
            "--name=default",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={url}",
            f"--advertise-client-urls={url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}",
            f"--cert-file={p.crt('etcd-server')}",
            f"--key-file={p.key('etcd-server')}",
            f"--trusted-ca-file={p.ca}",
            "--client-cert-auth=true",
        ]

    def apiserver_args(self) -> list[str]:
        p = self.pki
        return [
            str(self.binaries["kube-apiserver"]),
            f"--bind-address={HOST}",
            f"--advertise-address={HOST}",
            f"--secure-port={self.ports.apiserver}",
            f"--etcd-servers=https://{HOST}:{self.ports.etcd_client}",
            f"--etcd-cafile={p.ca}",
            f"--etcd-certfile={p.crt('apiserver-etcd-client')}",
            f"--etcd-keyfile={p.key('apiserver-etcd-client')}",
            f"--tls-cert-file={p.crt('apiserver')}",
            f"--tls-private-key-file={p.key('apiserver')}",
            f"--client-ca-file={p.ca}",
            f"--kubelet-client-certificate={p.crt('apiserver-kubelet-client')}",
            f"--kubelet-client-key={p.key('apiserver-kubelet-client')}",
            "--kubelet-preferred-address-types=InternalIP",  # no DNS resolves node names here
            f"--service-account-issuer={SA_ISSUER}",
            f"--service-account-key-file={p.sa_pub}",
            f"--service-account-signing-key-file={p.sa_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            f"--requestheader-client-ca-file={p.ca}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={p.crt('front-proxy-client')}",
            f"--proxy-client-key-file={p.key('front-proxy-client')}",
            "--allow-privileged=true",
            "--endpoint-reconciler-type=none",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
        ]

    def component_args(self, client: str, port: int) -> list[str]:
        p, kubeconfig = self.pki, self.kubeconfig(client)
        return [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            f"--bind-address={HOST}",
            f"--secure-port={port}",
            f"--tls-cert-file={p.crt('loopback-serving')}",
            f"--tls-private-key-file={p.key('loopback-serving')}",
            "--leader-elect=false",
        ]

    def controller_manager_args(self) -> list[str]:
        p = self.pki
        return [
            str(self.binaries["kube-controller-manager"]),
            *self.component_args("controller-manager", self.ports.controller_manager),
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={p.sa_key}",
            f"--root-ca-file={p.ca}",
            f"--cluster-signing-cert-file={p.ca}",
            f"--cluster-signing-key-file={p.key('ca')}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
        ]

    def scheduler_args(self) -> list[str]:
        return [
            str(self.binaries["kube-scheduler"]),
            *self.component_args("scheduler", self.ports.scheduler),
        ]

    def spawn(self, name: str, args: list[str]) -> None:
        log = (self.workdir / "logs" / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.ca))
        context.load_cert_chain(self.pki.crt("admin"), self.pki.key("admin"))
        return context

    def get(self, url: str, timeout: float = 2.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=timeout, context=self.ssl_context()) as rsp:
                return rsp.status, rsp.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()
        except (OSError, ssl.SSLError) as error:
            return 0, str(error)

    def check_alive(self) -> None:
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                log = (self.workdir / "logs" / f"{name}.log").read_text(errors="replace")
                raise ControlPlaneError(
                    f"{name} exited with {proc.returncode}; log tail:\n{log[-3000:]}"
                )

    def wait_ok(self, url: str, deadline: float) -> None:
        last = ""
        while time.monotonic() < deadline:
            self.check_alive()
            status, body = self.get(url)
            if status == 200:
                return
            last = f"{status} {body[-1500:]}"
            time.sleep(0.2)
        raise ControlPlaneError(f"{url} not ready in time; last answer: {last}")

    def start(self, timeout: float = 120.0) -> float:
        """Start the four processes and return the seconds until all were healthy."""
        self.prepare()
        started = time.monotonic()
        deadline = started + timeout
        self.spawn("etcd", self.etcd_args())
        self.start_apiserver(deadline)
        self.spawn("kube-controller-manager", self.controller_manager_args())
        self.spawn("kube-scheduler", self.scheduler_args())
        self.wait_ok(f"https://{HOST}:{self.ports.controller_manager}/healthz", deadline)
        self.wait_ok(f"https://{HOST}:{self.ports.scheduler}/healthz", deadline)
        return time.monotonic() - started

    def start_apiserver(self, deadline: float, attempts: int = 3) -> None:
        """Under software emulation on a busy machine a post-start hook of the API server can
        miss its own time limit ("unable to perform initial IP and Port allocation check")
        and the server exits before it is ready: start it again, as its supervisor would.
        Once ready, its exit is a failure like any other."""
        for attempt in range(1, attempts + 1):
            self.spawn("kube-apiserver", self.apiserver_args())
            try:
                self.wait_ok(f"{self.server}/readyz", deadline)
                return
            except ControlPlaneError as error:
                if self.processes["kube-apiserver"].poll() is None or attempt == attempts:
                    raise
                print(f"cluster: kube-apiserver exited while starting, again: {error}"[:2000])

    def stop(self, grace: float = 15.0) -> None:
        for name in reversed(list(self.processes)):
            proc = self.processes.pop(name)
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def kubectl(self, *args: str) -> str:
        proc = subprocess.run(
            [str(self.binaries["kubectl"]), f"--kubeconfig={self.admin_kubeconfig}", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0:
            raise ControlPlaneError(f"kubectl {' '.join(args)}: {proc.stderr}")
        return proc.stdout

    def __enter__(self) -> ControlPlane:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def smoke(workdir: Path) -> float:
    binaries = ensure_components(["debian", "kubernetes"])
    plane = ControlPlane(workdir, binaries)
    try:
        seconds = plane.start()
        print(f"control plane ready in {seconds:.1f} s ({plane.server})")
        print("$ kubectl get --raw /readyz\n" + plane.kubectl("get", "--raw", "/readyz"))
        print("$ kubectl get ns\n" + plane.kubectl("get", "ns"))
    finally:
        plane.stop()
    return seconds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.cluster.controlplane", description=__doc__
    )
    parser.add_argument("--workdir", type=Path, help="keep certificates, data and logs here")
    args = parser.parse_args(argv)
    if args.workdir:
        smoke(args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="csi-vduse-controlplane.") as tmp:
            smoke(Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
