"""Controller-side volume lifecycle on a node, for volumes of any backend: StorageClass
parameters, names and ids, and the volume's lock around its driver's work; this node keeps
the records (ListVolumes, ControllerGetVolume)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from pydantic import ValidationError

from csi_vduse.backends.api import ProvisionRequest, VolumeDriver
from csi_vduse.backends.registry import Drivers, driver_class, kinds
from csi_vduse.dataplane.blk_device import check_queues
from csi_vduse.dataplane.qos import QosLimits
from csi_vduse.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from csi_vduse.kernel.vduse import DEVICE_DIR
from csi_vduse.lifecycle.locks import VolumeLocks
from csi_vduse.state.records import UnreadableRecord
from csi_vduse.state.snapshots import kind_of_snapshot
from csi_vduse.state.staging import StagingStore
from csi_vduse.state.volumes import (
    POOL_NAME,
    InvalidId,
    Source,
    VolumeParams,
    VolumeRecord,
    VolumeStore,
    check_volume_id,
    kind_of_volume,
)
from csi_vduse.units import parse_size

log = logging.getLogger(__name__)
MAX_NAME_BYTES = 128
K8S_PARAM_PREFIX = "csi.storage.k8s.io/"
# StorageClass or VolumeAttributesClass parameter -> QosLimits field
QOS_PARAMS = {
    "readIOPS": "read_iops", "writeIOPS": "write_iops",
    "readBytesPerSecond": "read_bps", "writeBytesPerSecond": "write_bps",
    "burstMilliseconds": "burst_ms",
}  # fmt: skip


# StorageClass parameters that take one of a few words (the VolumeParams field of that name)
CHOICE_PARAMS = {
    "provisioning": ("thin", "thick"), "attach": ("virtio-vdpa", "vhost-vdpa"),
    "cache": ("page", "direct"),
}  # fmt: skip


def backend_params() -> list[str]:
    """The parameters of one backend alone (VolumeDriver.parameters), such as a pool."""
    return sorted({key for kind in kinds() for key in driver_class(kind).parameters})


def parse_parameters(params: dict[str, str]) -> VolumeParams:
    """StorageClass parameters: `queues`, `queueSize`, `provisioning`, `attach`, `cache`,
    `backend` and the backend's own (`pool`); the CO's own keys are ignored."""
    values: dict[str, object] = {}
    own = backend_params()
    for key, raw in params.items():
        if key.startswith(K8S_PARAM_PREFIX) or key in QOS_PARAMS:
            continue
        if (choices := CHOICE_PARAMS.get(key, kinds() if key == "backend" else None)) is not None:
            if raw not in choices:
                raise InvalidArgument(f"parameter {key}={raw!r} must be {' or '.join(choices)}")
            values[key] = raw
            continue
        if key in own:
            if not POOL_NAME.match(raw):
                raise InvalidArgument(f"parameter {key}={raw!r} is not a valid name")
            values[key] = raw
            continue
        field = {"queues": "queues", "queueSize": "queue_size"}.get(key)
        if field is None:
            raise InvalidArgument(
                f"unknown parameter {key!r} (known: queues, queueSize, provisioning, attach, "
                f"cache, backend, {', '.join(own)}, {', '.join(QOS_PARAMS)})"
            )
        try:
            values[field] = int(raw)
        except ValueError:
            raise InvalidArgument(f"parameter {key}={raw!r} is not an integer") from None
    result = VolumeParams.model_validate(values)
    driver = driver_class(result.backend)
    for key in sorted(set(own) & values.keys() - driver.parameters):
        raise InvalidArgument(f"parameter {key} is not one of backend={result.backend}'s")
    if reason := driver.validate(result):
        raise InvalidArgument(reason)
    try:
        check_queues(result.queues, result.queue_size)
    except ValueError as e:
        raise InvalidArgument(f"parameters queues/queueSize: {e}") from None
    return result


def parse_qos(
    params: dict[str, str], base: QosLimits | None = None, only_qos: bool = True
) -> QosLimits:
    """QoS limits from `params` on top of `base`: a key not given keeps its value, 0 lifts
    a limit. Byte rates take binary units (100Mi). With `only_qos` any other key is refused
    (mutable parameters); without, other keys are left to parse_parameters."""
    values = (base or QosLimits()).model_dump()
    for key, raw in params.items():
        field = QOS_PARAMS.get(key)
        if field is None:
            if only_qos:
                raise InvalidArgument(
                    f"parameter {key!r} cannot be changed (mutable: {', '.join(QOS_PARAMS)})"
                )
            continue
        try:
            value = parse_size(raw) if field.endswith("_bps") else int(raw)
        except ValueError:
            raise InvalidArgument(f"parameter {key}={raw!r} is not a whole number") from None
        values[field] = value
    try:
        return QosLimits.model_validate(values)
    except ValidationError as e:
        names = {field: key for key, field in QOS_PARAMS.items()}
        problems = "; ".join(
            f"{names.get(str(err['loc'][0]), err['loc'][0])}: {err['msg']}" for err in e.errors()
        )
        raise InvalidArgument(f"QoS parameters: {problems}") from None


def fit_reason(params: VolumeParams, block: bool) -> str | None:
    """Why a volume with `params` cannot be used as a block (or mount) volume, or None."""
    if block and params.attach == "vhost-vdpa":
        return (
            "a vhost-vdpa volume is a character device for a VMM; the kubelet publishes only "
            "block devices as Block volumes: request it with volumeMode Filesystem"
        )
    return None


def check_name(name: str) -> None:
    if not name:
        raise InvalidArgument("name is required")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise InvalidArgument(f"name is longer than {MAX_NAME_BYTES} bytes")
    if "\0" in name or "/" in name or not name.isprintable():
        raise InvalidArgument("name may not hold '/', NUL or control characters")


def volume_id_or_raise(volume_id: str) -> bool:
    try:
        return check_volume_id(volume_id)
    except InvalidId as e:
        raise InvalidArgument(str(e)) from None


def existing_volume(store: VolumeStore, volume_id: str, what: str = "volume") -> VolumeRecord:
    """The record of one of our volumes: INVALID_ARGUMENT for a malformed id, NOT_FOUND
    for none, FAILED_PRECONDITION for one that cannot be read."""
    try:
        record = store.get(volume_id) if volume_id_or_raise(volume_id) else None
    except UnreadableRecord as e:
        raise FailedPrecondition(str(e)) from None
    if record is None:
        raise NotFound(f"{what} {volume_id} does not exist")
    return record


class Provisioner:
    def __init__(
        self, drivers: Drivers, staging: StagingStore, locks: VolumeLocks,
        set_qos: Callable[[str, QosLimits], bool] | None = None,
    ) -> None:  # fmt: skip
        self.drivers = drivers
        self.store = drivers.ctx.volumes
        self.staging = staging
        self.locks = locks
        self.set_qos = set_qos

    def driver_for(self, volume_id: str) -> VolumeDriver:
        kind = kind_of_volume(volume_id)
        assert kind is not None, volume_id
        return self.drivers.kind(kind)

    def create(
        self, name: str, required: int, limit: int, params: dict[str, str],
        mutable: dict[str, str] | None = None, source: Source | None = None,
        secrets: dict[str, str] | None = None,
    ) -> VolumeRecord:  # fmt: skip
        """A new volume, empty or (`source`) holding a copy of a snapshot or a volume of
        its backend."""
        check_name(name)
        volume_params = parse_parameters(params)
        qos = parse_qos(mutable or {}, parse_qos(params, only_qos=False))
        driver = self.drivers.kind(volume_params.backend)
        if source is not None:
            check_source(source, driver.kind)
        volume_id = driver.volume_id(name, volume_params)
        request = ProvisionRequest(name, required, limit, volume_params, qos, source, secrets or {})
        with self.locks.hold(volume_id):
            record = driver.provision(request)
            self.store.ensure()
            self.store.put(record)
            return record

    def modify(self, volume_id: str, mutable: dict[str, str]) -> VolumeRecord:
        """New QoS limits, persisted first, then applied to the running data plane."""
        with self.locks.hold(volume_id):
            record = existing_volume(self.store, volume_id)
            qos = parse_qos(mutable, record.qos)
            if qos != record.qos:
                record.qos = qos
                self.store.put(record)
            if self.set_qos is not None and self.set_qos(volume_id, qos):
                log.info("%s: QoS now %s", volume_id, qos)
            return record

    def is_staged(self, volume_id: str) -> bool:
        return self.staging.exists(volume_id) or (DEVICE_DIR / volume_id).exists()

    def delete(self, volume_id: str, secrets: dict[str, str] | None = None) -> None:
        if not volume_id_or_raise(volume_id):
            return
        with self.locks.hold(volume_id):
            if self.is_staged(volume_id):
                raise FailedPrecondition(
                    f"volume {volume_id} is staged on this node; unstage it before deleting"
                )
            self.driver_for(volume_id).delete(volume_id, secrets or {})
            self.store.delete(volume_id)

    def _get(self, volume_id: str) -> VolumeRecord | None:
        try:
            return self.store.get(volume_id)
        except UnreadableRecord as e:
            raise FailedPrecondition(str(e)) from None

    def get(self, volume_id: str) -> VolumeRecord:
        """The volume's record; UnreadableRecord when it exists but cannot be used."""
        record = self.store.get(volume_id) if volume_id_or_raise(volume_id) else None
        if record is None:
            raise NotFound(f"volume {volume_id} does not exist")
        return record

    def expand(
        self, volume_id: str, required: int, limit: int, secrets: dict[str, str] | None = None
    ) -> VolumeRecord:
        if not volume_id_or_raise(volume_id):
            raise NotFound(f"volume {volume_id} does not exist")
        with self.locks.hold(volume_id):
            driver = self.driver_for(volume_id)
            record, grown = driver.grow(volume_id, required, limit, secrets or {},
                                        self._get(volume_id))  # fmt: skip
            if grown:
                self.store.put(record)
            return record

    def scan(self) -> tuple[list[VolumeRecord], dict[str, str]]:
        return self.store.scan()

    def image_missing(self, record: VolumeRecord) -> bool:
        """Whether the volume's data is known to be gone (an RBD image is not looked up:
        that needs the secret the call does not bring)."""
        return self.driver_for(record.volume_id).missing(record)

    def image_size(self, volume_id: str) -> int:
        return self.driver_for(volume_id).held_bytes(volume_id)


def check_source(source: Source, kind: str) -> None:
    """A volume is made only from a snapshot or a volume of its own backend."""
    what, source_id = source
    found = kind_of_snapshot(source_id) if what == "snapshot" else kind_of_volume(source_id)
    if found is not None and found != kind:
        raise InvalidArgument(
            f"the {what} {source_id} is of backend {found}: it makes {found} volumes only"
        )
