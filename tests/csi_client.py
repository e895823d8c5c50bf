"""A CSI client as kubelet and the sidecars use it: real gRPC over the Unix socket."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeAlias

import grpc

from csi_vduse.csi.proto import csi_pb2 as pb
from csi_vduse.csi.proto import csi_pb2_grpc as rpc_pb

Mode = pb.VolumeCapability.AccessMode
MiB = 1 << 20
ModeValue: TypeAlias = pb.VolumeCapability.AccessMode.Mode
# kubelet and the sidecars give every call a deadline; under software emulation ours is
# longer, and a call that hangs fails its test instead of the suite's time limit
CALL_TIMEOUT = 300.0
START_TIMEOUT = 120.0


class _Deadline(grpc.UnaryUnaryClientInterceptor):
    """Gives each call without a timeout CALL_TIMEOUT."""

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        if details.timeout is None:
            details = details._replace(timeout=CALL_TIMEOUT)
        return continuation(details, request)


def mount_cap(fs_type: str = "ext4", mode: ModeValue = Mode.SINGLE_NODE_WRITER,
              flags: tuple[str, ...] = ()) -> pb.VolumeCapability:  # fmt: skip
    return pb.VolumeCapability(
        mount=pb.VolumeCapability.MountVolume(fs_type=fs_type, mount_flags=list(flags)),
        access_mode=Mode(mode=mode),
    )


def block_cap(mode: ModeValue = Mode.SINGLE_NODE_WRITER) -> pb.VolumeCapability:
    return pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(), access_mode=Mode(mode=mode))


class Plugin:
    """`csi-vduse serve` in a child process, and stubs to call it."""

    def __init__(
        self, root: Path, node_id: str = "node-1", components: str = "", *args: str
    ) -> None:
        self.root = root
        self.socket = root / "csi.sock"
        self.node_id = node_id
        self.components = components
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "plugin.log"
        self.start()

    def start(self) -> None:
        env = dict(os.environ, CSI_VDUSE_NODE_ID=self.node_id)
        argv = [
            sys.executable, "-m", "csi_vduse", "serve", f"--endpoint=unix://{self.socket}",
            f"--state-dir={self.root / 'state'}", f"--data-dir={self.root / 'data'}",
            "--log-format=json",
        ]  # fmt: skip
        if self.components:
            argv.append(f"--components={self.components}")
        argv += self.args
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
        # Polled with connect(2), not through gRPC: a channel that found no server retries
        # only after its backoff, seconds later.
        deadline = time.monotonic() + START_TIMEOUT
        while not _listening(self.socket):  # a socket a killed process left is refused
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"plugin not serving {self.socket} after {START_TIMEOUT:.0f} s "
                    f"(exit code {self.proc.poll()}):\n{self.log.read_text()}"
                )
            time.sleep(0.05)
        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        calls = grpc.intercept_channel(self.channel, _Deadline())
        self.identity = rpc_pb.IdentityStub(calls)
        self.controller = rpc_pb.ControllerStub(calls)
        self.node = rpc_pb.NodeStub(calls)

    def stop(self, sig: int = 15) -> int:
        assert self.proc is not None
        self.channel.close()
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)


def _listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def code_of(call: Callable[[], Any]) -> grpc.StatusCode:
    """The status code a call ends with (OK when it succeeds)."""
    try:
        call()
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def error_of(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""
