"""backend=rbd on the control path, without a cluster: parameters, ids, secrets, and the
secret a node keeps for a restarted plugin."""

from __future__ import annotations

import base64
import stat
import struct
from pathlib import Path

import pytest

from csi_vduse.backends.rbd.access_store import CephAccessStore
from csi_vduse.backends.rbd.pool import access_from
from csi_vduse.backends.rbd.pool import image_of as rbd_image_of
from csi_vduse.backends.rbd.pool import volume_id_for as rbd_volume_id_for
from csi_vduse.errors import InvalidArgument
from csi_vduse.lifecycle.provisioning import parse_parameters
from csi_vduse.state.records import UnreadableRecord
from csi_vduse.state.volumes import InvalidId, check_volume_id, serial_for, volume_id_for

# a cephx key's encoding: type (AES), created (seconds, nanoseconds), length, secret
KEY = base64.b64encode(struct.pack("<HIIH", 1, 1700000000, 0, 16) + bytes(range(16))).decode()
SECRET = {"monitors": "v2:127.0.0.1:3300", "userID": "csi", "userKey": KEY}


def test_an_rbd_class_needs_a_pool_and_takes_no_file_options() -> None:
    params = parse_parameters({"backend": "rbd", "pool": "kube", "queues": "2"})
    assert (params.backend, params.pool, params.queues) == ("rbd", "kube", 2)
    assert parse_parameters({}).backend == "file"
    for bad in (
        {"backend": "rbd"},
        {"backend": "rbd", "pool": "kube", "cache": "direct"},
        {"backend": "rbd", "pool": "kube", "provisioning": "thick"},
        {"backend": "rbd", "pool": "../etc"},
        {"backend": "nfs"},
        {"pool": "kube"},
    ):
        with pytest.raises(InvalidArgument):
            parse_parameters(bad)


def test_an_rbd_id_names_its_pool_and_image_and_nothing_else() -> None:
    vid = rbd_volume_id_for("pvc-1", "kube.ssd")
    assert check_volume_id(vid)
    pool, image = rbd_image_of(vid) or ("", "")
    assert pool == "kube.ssd" and image.startswith("csi-vduse-")
    assert rbd_volume_id_for("pvc-1", "kube.ssd") == vid != rbd_volume_id_for("pvc-1", "other")
    assert rbd_image_of(volume_id_for("pvc-1")) is None
    assert len(serial_for(vid)) == 20 and serial_for(vid) in vid
    assert not check_volume_id("vduse-rbd-abc-kube")  # harmless, but not one of ours
    assert rbd_image_of("vduse-rbd-abc-kube") is None
    with pytest.raises(InvalidId):
        check_volume_id(vid.replace("kube.ssd", "../../x"))


def test_a_secret_without_its_keys_is_refused_and_never_echoed() -> None:
    access = access_from(SECRET, "kube", "node-stage")
    assert access.user == "csi" and access.key.get_secret_value() == SECRET["userKey"]
    assert SECRET["userKey"] not in repr(access)
    with pytest.raises(InvalidArgument, match="node-stage secret with userKey"):
        access_from({**SECRET, "userKey": ""}, "kube", "node-stage")
    with pytest.raises(InvalidArgument, match=r"without 'client\.'") as e:
        access_from({**SECRET, "userID": "client.csi"}, "kube", "provisioner")
    assert SECRET["userKey"] not in str(e.value)


def test_the_kept_secret_is_readable_by_root_only_and_goes_at_unstage(tmp_path: Path) -> None:
    store = CephAccessStore(tmp_path)
    vid = rbd_volume_id_for("pvc-1", "kube")
    store.put(vid, access_from(SECRET, "kube", "node-stage"))
    kept = store.root / f"{vid}.json"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.root.stat().st_mode) == 0o700
    assert store.get(vid).key.get_secret_value() == SECRET["userKey"]
    store.delete(vid)
    with pytest.raises(UnreadableRecord, match="NodeStageVolume"):
        store.get(vid)


@pytest.mark.parametrize(
    "bad",
    [
        f"[client.csi]\n\tkey = {KEY}\n",  # a keyring pasted whole
        f"key = {KEY}",  # a keyring line
        KEY[:-4],  # cut short
        KEY.replace("A", "*"),  # not base64
        KEY + KEY,  # two keys
    ],
)
def test_a_malformed_key_is_refused_before_librados_and_never_echoed(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="userKey is not a cephx key") as e:
        access_from({**SECRET, "userKey": bad}, "kube", "node-stage")
    message = str(e.value)
    assert not any(part in message for part in (bad, KEY, KEY[:8], KEY[-8:]))
