"""Reaching a Ceph pool with a CSI secret, and the volume record an image holds in its
metadata: what RBD volumes and RBD snapshots share."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from pydantic import SecretStr, ValidationError

from csi_vduse.backends.base import BackendError
from csi_vduse.backends.rbd import NoSuchImage, RbdAccess, RbdCluster
from csi_vduse.errors import FailedPrecondition, InvalidArgument, Unavailable
from csi_vduse.state.volumes import VolumeRecord, rbd_image_of

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


def record_if_any(cluster: RbdCluster, image: str) -> VolumeRecord | None:
    """The record; None also when there is no image."""
    try:
        return read_record(cluster, image)
    except NoSuchImage:
        return None
