"""Reaching a Ceph pool with a CSI secret, and the volume record an image holds in its
metadata: what RBD volumes and RBD snapshots share."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

from pydantic import BaseModel, SecretStr, ValidationError

from csi_vduse.backends.base import BackendError
from csi_vduse.backends.rbd.cluster import NoSuchImage, RbdAccess, RbdCluster
from csi_vduse.errors import FailedPrecondition, InvalidArgument, Unavailable
from csi_vduse.state import ids
from csi_vduse.state.snapshots import parse_snapshot_id
from csi_vduse.state.volumes import VolumeRecord, parse_volume_id

# The keys of the Secret, as ceph-csi names them (monitors: comma-separated addresses)
MONITORS, USER, KEY = "monitors", "userID", "userKey"
RECORD_KEY = "csi-vduse.record"
KIND = "rbd"
R = TypeVar("R", bound=BaseModel)
IMAGE_PREFIX = "csi-vduse-"
USER_SNAP_PREFIX = "csi-vduse-snap-"  # a CSI snapshot's rbd snapshot


def volume_id_for(name: str, pool: str) -> str:
    """An RBD volume's id names its pool: DeleteVolume is given nothing else."""
    return ids.make(ids.VOLUME_PREFIX, KIND, name, pool)


def snapshot_id_for(name: str, pool: str) -> str:
    return ids.make(ids.SNAPSHOT_PREFIX, KIND, name, pool)


def image_of(volume_id: str) -> tuple[str, str] | None:
    """(pool, image) of an RBD volume's id; None for any other id."""
    parsed = parse_volume_id(volume_id)
    if parsed is None or parsed.kind != KIND:
        return None
    return parsed.location, IMAGE_PREFIX + parsed.hash


def snapshot_of(snapshot_id: str) -> tuple[str, str] | None:
    """(pool, name of the rbd snapshot) of an RBD snapshot's id; None for any other id."""
    parsed = parse_snapshot_id(snapshot_id)
    if parsed is None or parsed.kind != KIND:
        return None
    return parsed.location, USER_SNAP_PREFIX + parsed.hash


def snapshot_id_of(snap: str, pool: str) -> str | None:
    """The CSI snapshot whose rbd snapshot is `snap`; None for another snapshot."""
    if not snap.startswith(USER_SNAP_PREFIX):
        return None
    return ids.compose(ids.SNAPSHOT_PREFIX, KIND, snap.removeprefix(USER_SNAP_PREFIX), pool)


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
    except ValidationError as e:
        fields = {str(err["loc"][0]) for err in e.errors()}
        if "key" in fields:
            raise InvalidArgument(
                f"the {which} secret's {KEY} is not a cephx key: give the base64 key alone, "
                "as `ceph auth get-key` prints it, not a keyring line"
            ) from None
        raise InvalidArgument(
            f"the {which} secret's {USER} must be the cephx user without 'client.'"
        ) from None


def target(volume_id: str) -> tuple[str, str]:
    found = image_of(volume_id)
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
    return parse_record(
        VolumeRecord, raw, f"rbd image {cluster.access.pool}/{image} holds a record"
    )


def parse_record(model: type[R], raw: str, where: str) -> R:
    """A record kept in Ceph metadata; FAILED_PRECONDITION naming `where` if this version
    cannot read it."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise FailedPrecondition(
            f"{where} this version cannot read ({e.error_count()} errors)"
        ) from None


def record_if_any(cluster: RbdCluster, image: str) -> VolumeRecord | None:
    """The record; None also when there is no image."""
    try:
        return read_record(cluster, image)
    except NoSuchImage:
        return None
