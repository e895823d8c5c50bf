"""Kubelet plugin registration served by `csi-vduse serve` itself (no node-driver-registrar):
real gRPC on the registration socket, called the way the kubelet's plugin watcher calls it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_vduse.csi.proto import csi_pb2 as csi_pb
from csi_vduse.csi.proto import csi_pb2_grpc as csi_rpc
from csi_vduse.csi.proto import pluginregistration_pb2 as pb
from csi_vduse.csi.proto import pluginregistration_pb2_grpc as rpc_pb
from tests.csi_client import Plugin, code_of
from tests.unit.http import get

DRIVER = "vduse.csi.dev"
KUBELET_ENDPOINT = f"/var/lib/kubelet/plugins/{DRIVER}/csi.sock"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def registry(tmp_path: Path) -> Path:
    return tmp_path / "plugins_registry"


def reg_socket(tmp_path: Path) -> Path:
    return registry(tmp_path) / f"{DRIVER}-reg.sock"


def start(tmp_path: Path, *extra: str) -> Plugin:
    return Plugin(tmp_path, "node-1", "identity,controller",
                  f"--registration-dir={registry(tmp_path)}",
                  f"--kubelet-endpoint={KUBELET_ENDPOINT}", *extra)  # fmt: skip


@contextmanager
def kubelet(path: Path) -> Iterator[rpc_pb.RegistrationStub]:
    """The kubelet's side of the registration socket."""
    with grpc.insecure_channel(f"unix://{path}") as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        yield rpc_pb.RegistrationStub(channel)


def serve(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`csi-vduse serve` expected to refuse to start."""
    argv = [sys.executable, "-m", "csi_vduse", "serve", f"--endpoint=unix://{tmp_path}/csi.sock",
            f"--state-dir={tmp_path / 'state'}", f"--data-dir={tmp_path / 'data'}",
            "--components=identity,controller", *args]  # fmt: skip
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CSI_VDUSE_")}
    full_env = {**clean, "CSI_VDUSE_NODE_ID": "node-1", **(env or {})}
    return subprocess.run(argv, env=full_env, capture_output=True, text=True, timeout=60)


def registration_logs(p: Plugin) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in p.log.read_text().splitlines() if line.startswith("{")]
    return [e for e in lines if e["logger"] == "csi_vduse.csi.registration"]


def test_kubelet_registers_the_driver_and_its_verdict_is_kept(tmp_path: Path) -> None:
    port = free_port()
    p = start(tmp_path, f"--health-address=127.0.0.1:{port}")
    path = reg_socket(tmp_path)
    try:
        with kubelet(path) as stub:
            info = stub.GetInfo(pb.InfoRequest(), timeout=1)  # the kubelet allows 1 s
            assert info.type == "CSIPlugin"
            assert info.name == DRIVER
            assert info.endpoint == KUBELET_ENDPOINT
            assert list(info.supported_versions) == ["1.0.0"]
            assert path.stat().st_mode & 0o777 == 0o600
            # the registration socket serves registration only
            with grpc.insecure_channel(f"unix://{path}") as channel:
                other = csi_rpc.IdentityStub(channel)
                call = lambda: other.GetPluginInfo(csi_pb.GetPluginInfoRequest())  # noqa: E731
                assert code_of(call) == grpc.StatusCode.UNIMPLEMENTED

            refusal = "validation failed for CSI Driver vduse.csi.dev: no NodeGetInfo"
            reply = stub.NotifyRegistrationStatus(
                pb.RegistrationStatus(plugin_registered=False, error=refusal)
            )
            assert reply == pb.RegistrationStatusResponse()
            code, body = get(f"http://127.0.0.1:{port}/readyz")
            assert code == 503 and refusal in body, body
            assert get(f"http://127.0.0.1:{port}/livez") == (200, "ok\n"), "a restart fixes nothing"

            stub.NotifyRegistrationStatus(pb.RegistrationStatus(plugin_registered=True))
            assert get(f"http://127.0.0.1:{port}/readyz") == (200, "ok\n")
        refused, registered = registration_logs(p)
        assert (refused["level"], refused["registered"], refused["error"]) == (
            "error", False, refusal
        )  # fmt: skip
        assert refusal in refused["msg"] and refused["kubelet_endpoint"] == KUBELET_ENDPOINT
        assert (registered["level"], registered["registered"]) == ("info", True)
        assert registered["msg"] == "registered with the kubelet"
        assert registered["driver"] == DRIVER
    finally:
        assert p.stop() == 0
    assert not path.exists(), "removed on stop: the kubelet deregisters the driver"


def test_a_stale_registration_socket_is_replaced(tmp_path: Path) -> None:
    """What a killed plugin leaves behind: a socket file nobody listens on."""
    path = reg_socket(tmp_path)
    path.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))
    old_inode = path.stat().st_ino
    p = start(tmp_path)
    try:
        with kubelet(path) as stub:
            assert stub.GetInfo(pb.InfoRequest(), timeout=1).name == DRIVER
        assert path.stat().st_ino != old_inode
    finally:
        assert p.stop() == 0


def test_a_live_registration_socket_is_not_taken_over(tmp_path: Path) -> None:
    path = reg_socket(tmp_path)
    path.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(path))
        live.listen()
        result = serve(tmp_path, f"--registration-dir={registry(tmp_path)}",
                       f"--kubelet-endpoint={KUBELET_ENDPOINT}")  # fmt: skip
        assert result.returncode == 1
        assert f"csi-vduse: error: another server is listening on {path}" in result.stderr
        assert path.exists()
    assert not (tmp_path / "csi.sock").exists(), "refused before anything is served"


def test_liveness_fails_when_the_registration_socket_is_gone(tmp_path: Path) -> None:
    """Without its socket the kubelet drops the driver; a restart registers it again."""
    port = free_port()
    p = start(tmp_path, f"--health-address=127.0.0.1:{port}")
    try:
        with kubelet(reg_socket(tmp_path)):
            pass
        assert get(f"http://127.0.0.1:{port}/livez") == (200, "ok\n")
        reg_socket(tmp_path).unlink()
        code, body = get(f"http://127.0.0.1:{port}/livez")
        assert code == 503 and "registration socket" in body, body
    finally:
        assert p.stop() == 0


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--registration-dir=REG"], {},
         "csi-vduse: error: --registration-dir needs --kubelet-endpoint"),
        ([], {"CSI_VDUSE_REGISTRATION_DIR": "REG"},
         "csi-vduse: error: --registration-dir needs --kubelet-endpoint"),
        (["--registration-dir=REG", "--kubelet-endpoint=plugins/csi.sock"], {},
         "csi-vduse: error: --kubelet-endpoint: the socket path 'plugins/csi.sock' must be "
         "absolute"),
        (["--registration-dir=REG", f"--kubelet-endpoint=unix://{KUBELET_ENDPOINT}"], {},
         "csi-vduse: error: --kubelet-endpoint: give the socket's path without unix://"),
        (["--registration-dir=REG/" + "d" * 100, f"--kubelet-endpoint={KUBELET_ENDPOINT}"], {},
         "is longer than 107 bytes; use a shorter --registration-dir"),
    ],
)  # fmt: skip
def test_bad_registration_settings_are_refused_in_one_line(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    reg = str(registry(tmp_path))
    result = serve(tmp_path, *(a.replace("REG", reg) for a in args),
                   env={k: v.replace("REG", reg) for k, v in env.items()})  # fmt: skip
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "csi.sock").exists() and not registry(tmp_path).exists()
