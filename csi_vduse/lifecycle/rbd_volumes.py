"""RBD volumes: an image per volume in a Ceph pool, reached with the CSI secret of the call
(provisioner, controller-expand or node-stage). The volume's record lives in the image's
metadata, so whichever node stages it reads the same record; a node keeps a copy with its
own records, which is what ListVolumes and the node's calls read."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from pydantic import SecretStr, ValidationError

from csi_vduse.backends.base import BackendError
from csi_vduse.backends.rbd import ImageBusy, NoSuchImage, RbdAccess, RbdBackend, RbdCluster
from csi_vduse.dataplane.qos import QosLimits
from csi_vduse.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from csi_vduse.lifecycle.capacity import pick_capacity
from csi_vduse.state.volumes import VolumeParams, VolumeRecord, rbd_image_of, rbd_volume_id_for

log = logging.getLogger(__name__)
# The keys of the Secret, as ceph-csi names them (monitors: comma-separated addresses)
MONITORS, USER, KEY = "monitors", "userID", "userKey"
RECORD_KEY = "csi-vduse.record"


def access_from(secrets: dict[str, str], pool: str, which: str) -> RbdAccess:
    """The pool's access from a CSI secret; the error names missing keys, never values."""
    missing = [k for k in (MONITORS, USER, KEY) if not secrets.get(k)]
    if missing:
        raise InvalidArgument(
            f"an rbd volume needs the {which} secret with {', '.join(missing)} "
            f"(keys: {MONITORS}, {USER}, {KEY})"
        )
    try:
        return RbdAccess(
            monitors=secrets[MONITORS],
            user=secrets[USER],
            key=SecretStr(secrets[KEY]),
            pool=pool,
        )
    except ValidationError:
        raise InvalidArgument(
            f"the {which} secret's {USER} must be the cephx user without 'client.'"
        ) from None


def target(volume_id: str) -> tuple[str, str]:
    found = rbd_image_of(volume_id)
    assert found is not None, volume_id
    return found


@contextmanager
def connected(access: RbdAccess) -> Iterator[RbdCluster]:
    """A connection to the pool; one that cannot be made is UNAVAILABLE (retried)."""
    try:
        cluster = RbdCluster(access)
    except BackendError as e:
        raise Unavailable(str(e)) from None
    try:
        yield cluster
    finally:
        cluster.close()


def read_record(cluster: RbdCluster, image: str) -> VolumeRecord | None:
    """The record in the image's metadata; None for an image without one (a create that
    stopped half-way). NoSuchImage when there is no image."""
    raw = cluster.get_meta(image, RECORD_KEY)
    if raw is None:
        return None
    try:
        return VolumeRecord.model_validate_json(raw)
    except ValidationError as e:
        raise FailedPrecondition(
            f"rbd image {cluster.access.pool}/{image} holds a record this version cannot "
            f"read ({e.error_count()} errors)"
        ) from None


def create(record: VolumeRecord, access: RbdAccess) -> VolumeRecord:
    """Creates the volume's image with its record, or returns the record of the one a
    previous call made; ALREADY_EXISTS when that one differs."""
    _, image = target(record.volume_id)
    with connected(access) as cluster:
        try:
            existing = read_record(cluster, image)
        except NoSuchImage:
            existing = None
        else:
            if existing is None:  # created, never described, so never handed out
                cluster.remove(image)
        if existing is not None:
            if existing.capacity < record.capacity or existing.params != record.params:
                raise AlreadyExists(
                    f"volume {record.name} exists with {existing.capacity} bytes and "
                    f"{existing.params}; the request asks for something else"
                )
            return existing
        try:
            cluster.create(image, record.capacity)
            cluster.set_meta(image, RECORD_KEY, record.model_dump_json())
        except BackendError as e:
            raise Unavailable(str(e)) from None
        log.info("%s: created rbd image %s/%s", record.volume_id, access.pool, image)
        return record


def provision(
    name: str, required: int, limit: int, params: VolumeParams, qos: QosLimits,
    secrets: dict[str, str],
) -> VolumeRecord:  # fmt: skip
    """CreateVolume of an RBD volume, with the provisioner secret: the image made, or the
    one a previous call made when it fits."""
    assert params.pool is not None
    access = access_from(secrets, params.pool, "provisioner")
    record = VolumeRecord(
        volume_id=rbd_volume_id_for(name, params.pool), name=name,
        capacity=pick_capacity(required, limit), params=params, qos=qos, created_at=time.time(),
    )  # fmt: skip
    record = create(record, access)
    if limit and record.capacity > limit:
        raise AlreadyExists(f"volume {name} exists with {record.capacity} bytes")
    return record


def expand(
    volume_id: str, required: int, limit: int, secrets: dict[str, str],
    known: VolumeRecord | None = None,
) -> tuple[VolumeRecord, bool]:  # fmt: skip
    """ControllerExpandVolume of an RBD volume, with the controller-expand secret: the record
    (`known`, else the image's) and whether the image grew."""
    pool, _ = target(volume_id)
    access = access_from(secrets, pool, "controller-expand")
    record = known or fetch(volume_id, access)
    capacity = pick_capacity(required, limit, default=record.capacity)
    if capacity <= record.capacity:
        return record, False
    return grow(record, capacity, access), True


def delete(volume_id: str, access: RbdAccess) -> None:
    """Removes the image; FAILED_PRECONDITION while a client (a node serving it) has it
    open."""
    _, image = target(volume_id)
    with connected(access) as cluster:
        try:
            cluster.remove(image)
        except ImageBusy:
            raise FailedPrecondition(
                f"volume {volume_id} is open on a node (its image has watchers); unstage it "
                "before deleting"
            ) from None
        except BackendError as e:
            raise Unavailable(str(e)) from None


def fetch(volume_id: str, access: RbdAccess) -> VolumeRecord:
    _, image = target(volume_id)
    with connected(access) as cluster:
        try:
            record = read_record(cluster, image)
        except NoSuchImage:
            record = None
    if record is None:
        raise NotFound(f"volume {volume_id} does not exist (no rbd image {access.pool}/{image})")
    return record


def grow(record: VolumeRecord, capacity: int, access: RbdAccess) -> VolumeRecord:
    """Grows the image (librbd asks a node that holds it to do it) and records the size."""
    _, image = target(record.volume_id)
    with connected(access) as cluster:
        try:
            size = cluster.grow(image, capacity)
            current = read_record(cluster, image) or record
            current.capacity = max(current.capacity, size)
            cluster.set_meta(image, RECORD_KEY, current.model_dump_json())
        except NoSuchImage:
            raise NotFound(f"volume {record.volume_id} has no rbd image") from None
        except BackendError as e:
            raise Unavailable(str(e)) from None
    return current


def save_record(backend: RbdBackend, record: VolumeRecord) -> None:
    """Writes the record through the image a node serves (it holds the lock)."""
    backend.set_meta(RECORD_KEY, record.model_dump_json())
