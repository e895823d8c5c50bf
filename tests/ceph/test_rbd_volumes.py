"""RBD volumes through the controller's Provisioner against a real single-node Ceph: images
made, grown and removed with the call's secret, the record in the image's metadata."""

from __future__ import annotations

from pathlib import Path

import pytest

from csi_vduse.backends import rbd
from csi_vduse.backends.rbd import volumes as rbd_volumes
from csi_vduse.backends.rbd.pool import image_of as rbd_image_of
from csi_vduse.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from csi_vduse.lifecycle.locks import VolumeLocks
from csi_vduse.lifecycle.provisioning import Provisioner
from csi_vduse.lifecycle.snapshots import drivers_for, refuse_staged
from csi_vduse.state.staging import StagingStore
from tests.ceph.cluster import CephCluster

MiB = 1 << 20


@pytest.fixture
def secrets(ceph: CephCluster) -> dict[str, str]:
    return {"monitors": ceph.monitors, "userID": ceph.user, "userKey": ceph.key}


@pytest.fixture
def provisioner(tmp_path: Path) -> Provisioner:
    staging, locks = StagingStore(tmp_path / "state"), VolumeLocks()
    drivers = drivers_for(tmp_path / "data", tmp_path / "state", locks, refuse_staged(staging))
    return Provisioner(drivers, staging, locks)


def params(ceph: CephCluster, **more: str) -> dict[str, str]:
    return {"backend": "rbd", "pool": ceph.pool, **more}


def test_create_is_idempotent_and_keeps_the_record_in_the_image(
    provisioner: Provisioner, ceph: CephCluster, secrets: dict[str, str],
    access: rbd.RbdAccess,
) -> None:  # fmt: skip
    record = provisioner.create("pvc-a", 8 * MiB, 0, params(ceph, queues="2"), secrets=secrets)
    pool, image = rbd_image_of(record.volume_id) or ("", "")
    assert pool == ceph.pool and record.params.queues == 2
    assert str(8 * MiB) in ceph.rbd("info", f"{pool}/{image}", "--format", "json")
    assert (
        provisioner.create("pvc-a", 8 * MiB, 0, params(ceph, queues="2"), secrets=secrets) == record
    )
    with pytest.raises(AlreadyExists):
        provisioner.create("pvc-a", 64 * MiB, 0, params(ceph, queues="2"), secrets=secrets)
    with pytest.raises(AlreadyExists):
        provisioner.create("pvc-a", 8 * MiB, 0, params(ceph, queues="1"), secrets=secrets)
    # what another node reads: the image's own record
    assert rbd_volumes.fetch(record.volume_id, access) == record
    provisioner.delete(record.volume_id, secrets)
    assert image not in ceph.rbd("ls", pool)
    with pytest.raises(NotFound):
        rbd_volumes.fetch(record.volume_id, access)
    provisioner.delete(record.volume_id, secrets)  # idempotent


def test_a_missing_or_wrong_secret_changes_nothing(
    provisioner: Provisioner, ceph: CephCluster, secrets: dict[str, str]
) -> None:
    with pytest.raises(InvalidArgument, match="userKey") as e:
        provisioner.create("pvc-b", 8 * MiB, 0, params(ceph), secrets={"monitors": "x"})
    assert "x" not in str(e.value).replace("exists", "")  # no secret value in the error
    with pytest.raises(InvalidArgument, match="pool"):
        provisioner.create("pvc-b", 8 * MiB, 0, {"backend": "rbd"}, secrets=secrets)
    with pytest.raises(InvalidArgument):
        provisioner.create("pvc-b", 8 * MiB, 0, params(ceph, cache="direct"), secrets=secrets)
    assert ceph.rbd("ls", ceph.pool).strip() == ""
    assert not any(provisioner.store.root.glob("*.json"))


def test_a_volume_open_on_a_node_grows_and_cannot_be_deleted(
    provisioner: Provisioner, ceph: CephCluster, secrets: dict[str, str],
    access: rbd.RbdAccess,
) -> None:  # fmt: skip
    record = provisioner.create("pvc-c", 8 * MiB, 0, params(ceph), secrets=secrets)
    _, image = rbd_image_of(record.volume_id) or ("", "")
    with rbd.RbdCluster(access) as node:
        backend = rbd.RbdBackend.open(node, image)  # the node holds the exclusive lock
        try:
            grown = provisioner.expand(record.volume_id, 24 * MiB, 0, secrets)
            assert grown.capacity == 24 * MiB
            assert rbd_volumes.fetch(record.volume_id, access).capacity == 24 * MiB
            with pytest.raises(FailedPrecondition, match="unstage"):
                provisioner.delete(record.volume_id, secrets)
            assert image in ceph.rbd("ls", ceph.pool)
        finally:
            backend.close()
    provisioner.delete(record.volume_id, secrets)
    assert image not in ceph.rbd("ls", ceph.pool)


def test_a_create_that_stopped_before_its_record_starts_over(
    provisioner: Provisioner, ceph: CephCluster, secrets: dict[str, str],
    access: rbd.RbdAccess,
) -> None:  # fmt: skip
    volume_id = provisioner.create("pvc-d", 8 * MiB, 0, params(ceph), secrets=secrets).volume_id
    _, image = rbd_image_of(volume_id) or ("", "")
    provisioner.delete(volume_id, secrets)
    with rbd.RbdCluster(access) as cluster:
        cluster.create(image, 4 * MiB)  # an image without a record: never handed out
    record = provisioner.create("pvc-d", 16 * MiB, 0, params(ceph), secrets=secrets)
    assert record.capacity == 16 * MiB
    assert str(16 * MiB) in ceph.rbd("info", f"{ceph.pool}/{image}", "--format", "json")
    provisioner.delete(volume_id, secrets)


@pytest.mark.parametrize("form", ["keyring", "line", "cut"])
def test_a_malformed_key_never_reaches_a_log_or_an_error(
    provisioner: Provisioner, ceph: CephCluster, secrets: dict[str, str],
    capfd: pytest.CaptureFixture[str], form: str,
) -> None:  # fmt: skip
    key = secrets["userKey"]
    bad = {
        "keyring": f"[client.{ceph.user}]\n\tkey = {key}\n",
        "line": f"key = {key}",
        "cut": key[:-6],
    }[form]
    with pytest.raises(InvalidArgument, match="not a cephx key") as e:
        provisioner.create("pvc-k", 8 * MiB, 0, params(ceph), secrets={**secrets, "userKey": bad})
    out, err = capfd.readouterr()  # what this process and librados wrote to fds 1 and 2
    for text in (str(e.value), out, err):
        assert key[4:20] not in text and key[-12:] not in text
    assert ceph.rbd("ls", ceph.pool).strip() == ""
