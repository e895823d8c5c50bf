"""`csi-vduse serve` settings: each flag also comes from a CSI_VDUSE_* environment variable."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, Field
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

COMPONENTS = ("identity", "controller", "node")
_DRIVER_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _endpoint(value: str) -> str:
    if not value.startswith("unix://"):
        raise ValueError("only unix:// endpoints are served, e.g. unix:///csi/csi.sock")
    path = value.removeprefix("unix://")
    if not path.startswith("/"):
        raise ValueError(f"the socket path {path!r} must be absolute (unix:///PATH)")
    return value


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
    log_level: Annotated[
        str,
        BeforeValidator(lambda v: str(v).lower()),
        Field(pattern="^(debug|info|warning|error)$"),
    ] = "info"
    log_format: Annotated[str, Field(pattern="^(json|text)$")] = "json"

    @property
    def socket_path(self) -> Path:
        return Path(self.endpoint.removeprefix("unix://"))

    @property
    def topology_key(self) -> str:
        return f"topology.{self.driver_name}/node"
