"""Backends fill one interface (backends/api.py): nothing above them asks which backend a
volume has, and a new backend needs its folder and one line in backends/registry.py."""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, ClassVar

import pytest

from csi_vduse.backends import registry
from csi_vduse.backends.api import ProvisionRequest, Secrets, VolumeDriver
from csi_vduse.backends.base import Backend
from csi_vduse.errors import InvalidArgument, NotFound
from csi_vduse.lifecycle.locks import VolumeLocks
from csi_vduse.lifecycle.provisioning import Provisioner, parse_parameters
from csi_vduse.lifecycle.snapshots import Snapshots, drivers_for
from csi_vduse.state.snapshots import SnapshotRecord, kind_of_snapshot, snapshot_id_for
from csi_vduse.state.staging import StagingStore
from csi_vduse.state.volumes import VolumeParams, VolumeRecord, kind_of_volume, volume_id_for

PACKAGE = Path(__file__).resolve().parents[2] / "csi_vduse"
# the command-line export of one image names its backends' options (rbd:POOL/IMAGE)
EXPORT = PACKAGE / "lifecycle" / "export.py"


def imported_modules(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def test_no_module_outside_a_backend_folder_imports_a_backend() -> None:
    folders = [f"csi_vduse.backends.{kind}" for kind in registry.kinds()]
    found = []
    for path in PACKAGE.rglob("*.py"):
        inside = path.relative_to(PACKAGE).parts
        if (inside[0] == "backends" and inside[1] in registry.kinds()) or path == EXPORT:
            continue
        for module in imported_modules(path):
            if any(module == f or module.startswith(f + ".") for f in folders):
                found.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert found == []


def test_every_registered_backend_has_its_driver() -> None:
    for kind in registry.kinds():
        driver = registry.driver_class(kind)
        assert issubclass(driver, VolumeDriver) and driver.kind == kind
        assert driver.locality in ("node", "cluster")


# A backend that is not in the package: its "folder" is this module, its line is KINDS's.


class MemoryBackend(Backend):
    def __init__(self, data: bytearray, readonly: bool) -> None:
        self.data, self.size, self.readonly = data, len(data), readonly

    def native_ops(self) -> tuple[Any, Any]:
        raise NotImplementedError("served by no data plane in this test")

    def flush(self) -> None:
        pass

    def grow(self, size: int) -> None:
        self.data.extend(bytes(size - len(self.data)))
        self.size = size

    def close(self) -> None:
        pass


class Driver(VolumeDriver):
    kind = "memory"
    locality = "cluster"
    images: ClassVar[dict[str, bytearray]] = {}

    def volume_id(self, name: str, params: VolumeParams) -> str:
        return volume_id_for(name, self.kind)

    def snapshot_id(self, name: str, source_volume_id: str) -> str:
        return snapshot_id_for(name, self.kind)

    def provision(self, request: ProvisionRequest) -> VolumeRecord:
        volume_id = self.volume_id(request.name, request.params)
        self.images.setdefault(volume_id, bytearray(request.required))
        return VolumeRecord(
            volume_id=volume_id, name=request.name, capacity=len(self.images[volume_id]),
            params=request.params, qos=request.qos, source=request.source,
        )  # fmt: skip

    def grow(
        self, volume_id: str, required: int, limit: int, secrets: Secrets,
        known: VolumeRecord | None,
    ) -> tuple[VolumeRecord, bool]:  # fmt: skip
        if known is None:
            raise NotFound(volume_id)
        image = self.images[volume_id]
        grown = required > len(image)
        image.extend(bytes(max(0, required - len(image))))
        known.capacity = len(image)
        return known, grown

    def delete(self, volume_id: str, secrets: Secrets) -> None:
        self.images.pop(volume_id, None)

    def snapshot_create(
        self, snapshot_id: str, name: str, source_volume_id: str, secrets: Secrets
    ) -> SnapshotRecord:
        self.images[snapshot_id] = bytearray(self.images[source_volume_id])
        return SnapshotRecord(
            snapshot_id=snapshot_id, name=name, source_volume_id=source_volume_id,
            size=len(self.images[snapshot_id]),
        )  # fmt: skip

    def snapshot_delete(self, snapshot_id: str, secrets: Secrets) -> None:
        self.images.pop(snapshot_id, None)

    def open(self, record: VolumeRecord, readonly: bool) -> Backend:
        return MemoryBackend(self.images[record.volume_id], readonly)


@contextmanager
def registered(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setitem(
        registry.KINDS, "memory", registry.Kind(__name__, id_tag="mem", located=False)
    )
    assert sys.modules[__name__].Driver is Driver
    yield
    Driver.images.clear()


def test_a_third_backend_needs_its_driver_and_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(InvalidArgument, match="backend"):
        parse_parameters({"backend": "memory"})
    with registered(monkeypatch):
        locks, staging = VolumeLocks(), StagingStore(tmp_path / "state")
        drivers = drivers_for(tmp_path / "data", tmp_path / "state", locks, lambda _: nullcontext())
        provisioner, snapshots = Provisioner(drivers, staging, locks), Snapshots(drivers, locks)
        record = provisioner.create("disk", 1 << 20, 0, {"backend": "memory"})
        assert kind_of_volume(record.volume_id) == "memory"
        assert record.volume_id.startswith("vduse-mem-")
        assert provisioner.store.get(record.volume_id) == record  # the node keeps the record
        snapshot = snapshots.create("snap", record.volume_id)
        assert kind_of_snapshot(snapshot.snapshot_id) == "memory"
        assert Driver.images[snapshot.snapshot_id] == Driver.images[record.volume_id]
        assert provisioner.expand(record.volume_id, 2 << 20, 0).capacity == 2 << 20
        backend = drivers.kind("memory").open(provisioner.get(record.volume_id), False)
        assert backend.size == 2 << 20
        with pytest.raises(InvalidArgument, match="backend memory"):
            provisioner.create("copy", 0, 0, {}, source=("snapshot", snapshot.snapshot_id))
        snapshots.delete(snapshot.snapshot_id)
        provisioner.delete(record.volume_id)
        assert Driver.images == {} and provisioner.store.get(record.volume_id) is None
