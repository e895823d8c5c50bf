"""What the lifecycle asks of a backend, without knowing which it has: one `VolumeDriver`
per kind of backend (an ops table, as QEMU's BlockDriver), and the `Backend` it opens for
the data plane to serve (base.py). Drivers answer with the errors of csi_vduse.errors."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from csi_vduse.backends.base import Backend
from csi_vduse.dataplane.qos import QosLimits
from csi_vduse.lifecycle.locks import VolumeLocks
from csi_vduse.state.snapshots import SnapshotRecord, SnapshotStore
from csi_vduse.state.volumes import Source, VolumeParams, VolumeRecord, VolumeStore

Secrets = Mapping[str, str]  # a CSI call's secrets; a driver that needs none ignores them
# Holds a volume's data plane (if this process serves it) flushed and still for a copy.
Quiesce = Callable[[str], AbstractContextManager[None]]


@dataclass(frozen=True)
class DriverContext:
    """What a driver may touch in this process."""

    data_dir: Path
    state_dir: Path
    volumes: VolumeStore  # this node's records of volumes, of every kind
    snapshots: SnapshotStore
    locks: VolumeLocks
    space: threading.Lock  # one reservation of node-local space at a time
    quiesce: Quiesce


@dataclass(frozen=True)
class ProvisionRequest:
    name: str
    required: int
    limit: int
    params: VolumeParams
    qos: QosLimits
    source: Source | None
    secrets: Secrets


class VolumeDriver(ABC):
    kind: ClassVar[str]
    # node: a volume lives on one node (its topology); cluster: any node reaches it
    locality: ClassVar[Literal["node", "cluster"]]
    # StorageClass parameters of this backend alone (each a VolumeParams field)
    parameters: ClassVar[frozenset[str]] = frozenset()
    # whether ControllerModifyVolume reaches a volume of a cluster's controller
    mutable_qos: ClassVar[bool] = True

    def __init__(self, ctx: DriverContext) -> None:
        self.ctx = ctx

    def startup(self) -> None:
        """Before the first call: clears what a crash left half-made."""
        return None

    @classmethod
    def validate(cls, params: VolumeParams) -> str | None:
        """Why a StorageClass's parameters do not fit this backend, or None."""
        return None

    @abstractmethod
    def volume_id(self, name: str, params: VolumeParams) -> str: ...

    @abstractmethod
    def snapshot_id(self, name: str, source_volume_id: str) -> str: ...

    # the controller's side

    @abstractmethod
    def provision(self, request: ProvisionRequest) -> VolumeRecord:
        """The volume made (empty, or a copy of its source of this kind), or the one a
        previous call made if it fits the request; ALREADY_EXISTS if it does not. The
        caller holds the volume's lock and keeps the record."""

    @abstractmethod
    def grow(
        self, volume_id: str, required: int, limit: int, secrets: Secrets,
        known: VolumeRecord | None,
    ) -> tuple[VolumeRecord, bool]:  # fmt: skip
        """The record (`known`, the local one, if any) and whether the volume grew."""

    @abstractmethod
    def delete(self, volume_id: str, secrets: Secrets) -> None:
        """Removes the volume's data (gone already: done); FAILED_PRECONDITION while a
        node serves it or snapshots depend on it. The caller removes the record."""

    @abstractmethod
    def snapshot_create(
        self, snapshot_id: str, name: str, source_volume_id: str, secrets: Secrets
    ) -> SnapshotRecord:
        """As provision, for a snapshot of a volume of this kind."""

    @abstractmethod
    def snapshot_delete(self, snapshot_id: str, secrets: Secrets) -> None: ...

    def available(self) -> int | None:
        """The bytes this node could provision now; None when its volumes live elsewhere
        (this node cannot know)."""
        return None

    def missing(self, record: VolumeRecord) -> bool:
        """Whether the volume's data is known to be gone (looked up without a secret)."""
        return False

    def held_bytes(self, volume_id: str) -> int:
        """What the volume's data takes, for a volume whose record cannot be read."""
        return 0

    # the node's side

    def prepare_stage(self, volume_id: str, secrets: Secrets) -> None:
        """Before a stage is checked: brings the volume's record to this node."""
        return None

    def keep_access(self, volume_id: str, secrets: Secrets) -> None:
        """As a stage begins: keeps what a restarted plugin needs to open the volume again
        (until `forget`)."""
        return None

    @abstractmethod
    def open(self, record: VolumeRecord, readonly: bool) -> Backend:
        """The volume opened for its data plane, as its one writer unless `readonly`."""

    def record_changed(self, backend: Backend, record: VolumeRecord) -> None:
        """A served volume's record changed (formatted): kept where other nodes read it."""
        return None

    def forget(self, volume_id: str) -> None:
        """The volume is no longer staged here: drops what `keep_access` kept."""
        return None
