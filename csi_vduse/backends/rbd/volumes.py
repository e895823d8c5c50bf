"""RBD volumes: an image per volume in a Ceph pool, reached with the CSI secret of the call
(provisioner, controller-expand or node-stage). The volume's record lives in the image's
metadata, so whichever node stages it reads the same record; a node keeps a copy with its
own records, which is what ListVolumes and the node's calls read.

A volume made from a snapshot is a format-2 clone of that rbd snapshot; one made from a
volume is a clone of a snapshot taken for it and removed at once (it stays in the image's
trash namespace while the clone needs it). An image that clones still need when its volume
is deleted goes to the pool's trash, and is removed with the last of them."""

from __future__ import annotations

import logging
import time

from csi_vduse.backends.base import BackendError
from csi_vduse.backends.rbd import snapshots as rbd_snapshots
from csi_vduse.backends.rbd.cluster import (
    ImageBusy,
    ImageHasSnapshots,
    NoSuchImage,
    RbdAccess,
    RbdBackend,
    RbdCluster,
)
from csi_vduse.backends.rbd.pool import (
    IMAGE_PREFIX,
    RECORD_KEY,
    access_from,
    connected,
    read_record,
    record_if_any,
    snapshot_id_of,
    snapshot_of,
    target,
    volume_id_for,
)
from csi_vduse.dataplane.qos import QosLimits
from csi_vduse.errors import AlreadyExists, FailedPrecondition, NotFound, OutOfRange, Unavailable
from csi_vduse.lifecycle.capacity import pick_capacity
from csi_vduse.state.volumes import Source, VolumeParams, VolumeRecord

log = logging.getLogger(__name__)
CLONE_SNAP_PREFIX = "csi-vduse-clone-"  # the snapshot a clone of a volume is made from


def create(
    record: VolumeRecord, access: RbdAccess, required: int = 0, limit: int = 0
) -> VolumeRecord:
    """Creates the volume's image (empty, or a clone of record.source, sized from
    `required` and `limit`) with its record, or returns the record of the one a previous
    call made; ALREADY_EXISTS when that one differs."""
    _, image = target(record.volume_id)
    with connected(access) as cluster:
        try:
            existing = read_record(cluster, image)
        except NoSuchImage:
            existing = None
        else:
            if existing is None:  # created, never described, so never handed out
                _remove(cluster, image)
        if existing is not None:
            if (
                existing.capacity < max(record.capacity, required)
                or existing.params != record.params
                or existing.source != record.source
            ):
                raise AlreadyExists(
                    f"volume {record.name} exists with {existing.capacity} bytes, "
                    f"{existing.params} and source {existing.source}; the request asks for "
                    "something else"
                )
            return existing
        try:
            if record.source is None:
                cluster.create(image, record.capacity)
            else:
                _clone(cluster, record, image, required, limit)
            cluster.set_meta(image, RECORD_KEY, record.model_dump_json())
        except NoSuchImage as e:
            raise NotFound(str(e)) from None
        except BackendError as e:
            raise Unavailable(str(e)) from None
        log.info("%s: created rbd image %s/%s", record.volume_id, access.pool, image)
        return record


def _clone(cluster: RbdCluster, record: VolumeRecord, image: str, required: int,
           limit: int) -> None:  # fmt: skip
    """The image as a clone of the record's source, grown to the capacity asked for."""
    assert record.source is not None
    kind, source_id = record.source
    if kind == "snapshot":
        snapshot = rbd_snapshots.fetch(source_id, cluster)
        _, parent = target(snapshot.source_volume_id)
        _, snap = snapshot_of(source_id) or ("", "")
        size, formatted, fs_type = snapshot.size, snapshot.formatted, snapshot.fs_type
    else:
        _, parent = target(source_id)
        volume = read_record(cluster, parent)
        if volume is None:
            raise NotFound(f"source volume {source_id} does not exist")
        snap = CLONE_SNAP_PREFIX + image.removeprefix(IMAGE_PREFIX)
        size = cluster.snap_create(parent, snap)
        formatted, fs_type = volume.formatted, volume.fs_type
    record.capacity = pick_capacity(required, limit, default=size)
    if record.capacity < size:
        raise OutOfRange(f"the {kind} {source_id} holds {size} bytes, more than the "
                         f"{record.capacity} asked for")  # fmt: skip
    record.formatted, record.fs_type = formatted, fs_type
    cluster.clone(parent, snap, image)
    if record.capacity > size:
        cluster.grow(image, record.capacity)
    if kind == "volume":
        cluster.snap_remove(parent, snap)  # to the trash namespace: the clone needs it


def provision(
    name: str, required: int, limit: int, params: VolumeParams, qos: QosLimits,
    secrets: dict[str, str], source: Source | None = None,
) -> VolumeRecord:  # fmt: skip
    """CreateVolume of an RBD volume, with the provisioner secret: the image made (from
    `source`, an rbd snapshot or volume of the same pool), or the one a previous call made
    when it fits."""
    assert params.pool is not None
    if source is not None:
        rbd_snapshots.check_source(*source, params.pool)
    access = access_from(secrets, params.pool, "provisioner")
    record = VolumeRecord(
        volume_id=volume_id_for(name, params.pool), name=name,
        capacity=0 if source else pick_capacity(required, limit), params=params, qos=qos,
        created_at=time.time(), source=source,
    )  # fmt: skip
    record = create(record, access, required, limit)
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


def delete(volume_id: str, secrets: dict[str, str]) -> None:
    """DeleteVolume, with the provisioner secret: removes the image, or moves it to the
    pool's trash while clones need it. FAILED_PRECONDITION while a client (a node serving
    it) has it open, or while it has CSI snapshots (they are not independent of it)."""
    pool, image = target(volume_id)
    with connected(access_from(secrets, pool, "provisioner")) as cluster:
        try:
            _delete(cluster, volume_id, image)
        except ImageBusy:
            raise FailedPrecondition(
                f"volume {volume_id} is open on a node (its image has watchers); unstage it "
                "before deleting"
            ) from None
        except BackendError as e:
            raise Unavailable(str(e)) from None


def _delete(cluster: RbdCluster, volume_id: str, image: str) -> None:
    try:
        names = cluster.snap_names(image)
    except NoSuchImage:
        return
    kept = []
    for snap in names:
        snapshot_id = snapshot_id_of(snap, cluster.access.pool)
        if snapshot_id and rbd_snapshots.read(cluster, snapshot_id):
            kept.append(snapshot_id)
        elif snap.startswith(IMAGE_PREFIX):  # a clone's, or a cut never answered
            cluster.snap_remove(image, snap)
    if kept:
        raise FailedPrecondition(
            f"volume {volume_id} has snapshots ({', '.join(sorted(kept))}); delete them first"
        )
    _remove(cluster, image)


def _remove(cluster: RbdCluster, image: str) -> None:
    """Removes the image, or moves it to the trash while clones need one of its (trashed)
    snapshots; then removes the trashed ancestors that no clone needs any more.

    Two deletions may race (a volume and its last clone): each tries to empty the trash
    after its own step, whatever it saw before, so that one of them finds the image
    without snapshots and in the trash."""
    parent = cluster.parent(image, prefix=IMAGE_PREFIX)
    try:
        cluster.remove(image)
    except ImageHasSnapshots:
        if names := cluster.snap_names(image):
            raise FailedPrecondition(
                f"rbd image {cluster.access.pool}/{image} has snapshots csi-vduse did not "
                f"take ({', '.join(names)})"
            ) from None
        image_id = cluster.trash_move(image)
        if not cluster.trash_remove(image_id):
            log.info("rbd image %s/%s moved to the trash: clones still need it",
                     cluster.access.pool, image)  # fmt: skip
            return
    while parent is not None and parent[1]:
        image_id = parent[0]
        parent = cluster.parent(image_id=image_id, prefix=IMAGE_PREFIX)
        if not cluster.trash_remove(image_id):  # in use, still needed, or not in the trash
            return
        log.info("rbd image %s removed from the trash of pool %s: no clone needs it",
                 image_id, cluster.access.pool)  # fmt: skip


def fetch(volume_id: str, access: RbdAccess) -> VolumeRecord:
    _, image = target(volume_id)
    with connected(access) as cluster:
        record = record_if_any(cluster, image)
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
