"""`csi-vduse serve` settings: each flag also comes from a CSI_VDUSE_* environment variable."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import AfterValidator, BeforeValidator, Field, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

COMPONENTS = ("identity", "controller", "node")
# sun_path holds 108 bytes with the terminating NUL
_MAX_SOCKET_PATH = 107
_DRIVER_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _endpoint(value: str) -> str:
    if not value.startswith("unix://"):
        raise ValueError("only unix:// endpoints are served, e.g. unix:///csi/csi.sock")
    path = value.removeprefix("unix://")
    if not path.startswith("/"):
        raise ValueError(f"the socket path {path!r} must be absolute (unix:///PATH)")
    return value


def _kubelet_endpoint(value: str) -> str:
    if value.startswith("unix://"):
        raise ValueError("give the socket's path without unix://, as the kubelet dials it")
    if value and not value.startswith("/"):
        raise ValueError(f"the socket path {value!r} must be absolute (the path on the host)")
    if len(value.encode()) > _MAX_SOCKET_PATH:
        raise ValueError(f"a Unix socket path has at most {_MAX_SOCKET_PATH} bytes")
    return value


def _empty_is_none(value: object) -> object:
    return None if value == "" else value


def _driver_name(value: str) -> str:
    if len(value) > 63 or not _DRIVER_NAME.match(value):
        raise ValueError("must be a domain name of at most 63 characters, e.g. vduse.csi.dev")
    return value


def _node_id(value: str) -> str:
    if not value or len(value.encode()) > 128 or not value.isprintable():
        raise ValueError("must be 1 to 128 printable bytes")
    return value


def _health_address(value: str) -> str:
    if value:
        from csi_vduse.health import parse_address

        parse_address(value)
    return value


def _components(value: object) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)  # type: ignore[call-overload]
    names = tuple(dict.fromkeys(str(i).strip() for i in items if str(i).strip()))
    unknown = [n for n in names if n not in COMPONENTS]
    if unknown or not names:
        raise ValueError(f"choose from {', '.join(COMPONENTS)} (got {value!r})")
    return names


LogLevel = Annotated[
    str, BeforeValidator(lambda v: str(v).lower()), Field(pattern="^(debug|info|warning|error)$")
]
LogFormat = Annotated[str, Field(pattern="^(json|text)$")]


class ServeConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CSI_VDUSE_", extra="forbid", frozen=True)

    endpoint: Annotated[str, AfterValidator(_endpoint)] = "unix:///csi/csi.sock"
    node_id: Annotated[str, AfterValidator(_node_id)]
    driver_name: Annotated[str, AfterValidator(_driver_name)] = "vduse.csi.dev"
    state_dir: Path = Path("/run/csi-vduse")
    data_dir: Path = Path("/var/lib/csi-vduse")
    components: Annotated[tuple[str, ...], NoDecode, BeforeValidator(_components)] = COMPONENTS
    max_volumes: Annotated[int, Field(ge=1, le=1024)] = 64
    # how often unserved devices are re-attached and conditions refreshed, in seconds
    reconcile_interval: Annotated[float, Field(ge=0.5, le=3600)] = 30.0
    # HOST:PORT of /livez, /readyz and /metrics; empty: not served
    health_address: Annotated[str, AfterValidator(_health_address)] = ""
    # the kubelet's plugins_registry dir, where the plugin registers itself; empty: it does not
    registration_dir: Annotated[Path | None, BeforeValidator(_empty_is_none)] = None
    # the CSI socket's path as the kubelet sees it on the host (told to the kubelet)
    kubelet_endpoint: Annotated[str, AfterValidator(_kubelet_endpoint)] = ""
    log_level: LogLevel = "info"
    log_format: LogFormat = "json"
    # node: the controller serves this node's data dir; cluster: every node's, through the
    # VduseVolume/VduseSnapshot objects their agents act on
    controller_scope: Literal["node", "cluster"] = "node"
    # the API server's kubeconfig (cluster scope); empty: the pod's in-cluster credentials
    kubeconfig: Annotated[Path | None, BeforeValidator(_empty_is_none)] = None
    # seconds the cluster controller waits for an agent before answering ABORTED (retry)
    agent_wait: Annotated[float, Field(ge=1, le=600)] = 30.0

    @model_validator(mode="after")
    def _registration_is_complete(self) -> Self:
        if self.registration_socket is None:
            return self
        if not self.kubelet_endpoint:
            raise ValueError(
                "--registration-dir needs --kubelet-endpoint: the CSI socket's path on the host"
            )
        if len(str(self.registration_socket).encode()) > _MAX_SOCKET_PATH:
            raise ValueError(
                f"the registration socket {self.registration_socket} is longer than "
                f"{_MAX_SOCKET_PATH} bytes; use a shorter --registration-dir"
            )
        return self

    @property
    def registration_socket(self) -> Path | None:
        """Where the kubelet's plugin watcher finds this driver (node-driver-registrar's name)."""
        if self.registration_dir is None:
            return None
        return self.registration_dir / f"{self.driver_name}-reg.sock"

    @property
    def socket_path(self) -> Path:
        return Path(self.endpoint.removeprefix("unix://"))

    @property
    def topology_key(self) -> str:
        return f"topology.{self.driver_name}/node"


class AgentConfig(BaseSettings):
    """`csi-vduse agent` settings (CSI_VDUSE_* environment variables too)."""

    model_config = SettingsConfigDict(env_prefix="CSI_VDUSE_", extra="ignore", frozen=True)

    endpoint: Annotated[str, AfterValidator(_endpoint)] = "unix:///csi/csi.sock"
    node_id: Annotated[str, AfterValidator(_node_id)]
    kubeconfig: Annotated[Path | None, BeforeValidator(_empty_is_none)] = None
    # seconds between full passes (failed actions retried, free space published)
    resync_interval: Annotated[int, Field(ge=5, le=3600)] = 30
    log_level: LogLevel = "info"
    log_format: LogFormat = "json"
