"""RBD snapshots: an rbd snapshot of the volume's image, named after the CSI snapshot, with
its record in the pool's metadata (DeleteSnapshot is given only the id and the snapshotter
secret). librbd takes it through the node that holds the image, so it holds every write
that node completed. A volume made from one is a format-2 clone of it (rbd_volumes)."""

from __future__ import annotations

import logging
import time

from csi_vduse.backends.base import BackendError
from csi_vduse.backends.rbd.cluster import NoSuchImage, RbdCluster
from csi_vduse.backends.rbd.pool import (
    access_from,
    connected,
    image_of,
    parse_record,
    record_if_any,
    snapshot_id_for,
    snapshot_of,
    target,
)
from csi_vduse.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from csi_vduse.state.snapshots import SnapshotRecord

log = logging.getLogger(__name__)
RECORD_PREFIX = "csi-vduse.snapshot."


def _key(snapshot_id: str) -> str:
    return RECORD_PREFIX + snapshot_id


def read(cluster: RbdCluster, snapshot_id: str) -> SnapshotRecord | None:
    raw = cluster.get_pool_meta(_key(snapshot_id))
    if raw is None:
        return None
    where = f"pool {cluster.access.pool} holds a record of snapshot {snapshot_id}"
    return parse_record(SnapshotRecord, raw, where)


def cut(name: str, source_volume_id: str, secrets: dict[str, str]) -> SnapshotRecord:
    """CreateSnapshot of an RBD volume, with the snapshotter secret: the snapshot taken,
    or the one a previous call took."""
    pool, image = target(source_volume_id)
    snapshot_id = snapshot_id_for(name, pool)
    _, snap = snapshot_of(snapshot_id) or ("", "")
    with connected(access_from(secrets, pool, "snapshotter")) as cluster:
        existing = read(cluster, snapshot_id)
        if existing is not None:
            if existing.source_volume_id != source_volume_id:
                raise AlreadyExists(
                    f"snapshot {name} exists of volume {existing.source_volume_id}, not of "
                    f"{source_volume_id}"
                )
            return existing
        volume = record_if_any(cluster, image)
        if volume is None:
            raise NotFound(f"volume {source_volume_id} does not exist")
        try:
            size = cluster.snap_create(image, snap)
            record = SnapshotRecord(
                snapshot_id=snapshot_id, name=name, source_volume_id=source_volume_id,
                size=size, created_at=time.time(), formatted=volume.formatted,
                fs_type=volume.fs_type,
            )  # fmt: skip
            cluster.set_pool_meta(_key(snapshot_id), record.model_dump_json())
        except NoSuchImage:
            raise NotFound(f"volume {source_volume_id} does not exist") from None
        except BackendError as e:
            raise Unavailable(str(e)) from None
    log.info("%s: snapshot %s taken (%d bytes)", source_volume_id, snapshot_id, size)
    return record


def remove(snapshot_id: str, secrets: dict[str, str]) -> None:
    """DeleteSnapshot: the rbd snapshot, then its record. A snapshot that volumes were made
    from stays in its image's trash namespace until the last of them is deleted."""
    found = snapshot_of(snapshot_id)
    assert found is not None, snapshot_id
    pool, snap = found
    with connected(access_from(secrets, pool, "snapshotter")) as cluster:
        record = read(cluster, snapshot_id)
        if record is None:
            return
        _, image = target(record.source_volume_id)
        try:
            cluster.snap_remove(image, snap)
        except NoSuchImage:
            pass
        except BackendError as e:
            raise Unavailable(str(e)) from None
        cluster.remove_pool_meta(_key(snapshot_id))
    log.info("%s: snapshot %s removed", record.source_volume_id, snapshot_id)


def fetch(snapshot_id: str, cluster: RbdCluster) -> SnapshotRecord:
    record = read(cluster, snapshot_id)
    if record is None:
        raise NotFound(f"snapshot {snapshot_id} does not exist")
    return record


def check_source(kind: str, source_id: str, pool: str) -> None:
    """A source an rbd volume can be made from: an rbd snapshot or volume of its pool."""
    found = snapshot_of(source_id) if kind == "snapshot" else image_of(source_id)
    if found is None:
        raise InvalidArgument(f"an rbd volume is made only from an rbd {kind}, not {source_id}")
    if found[0] != pool:
        raise InvalidArgument(
            f"the {kind} {source_id} is in pool {found[0]}; an rbd volume is made from one "
            f"in its own pool ({pool})"
        )
