"""Pure control-path logic: sizes, names, options, the file backend, netlink framing,
and what the device offers."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest
from pydantic import ValidationError

from csi_vduse._native import lib
from csi_vduse.backends import BackendError
from csi_vduse.backends.file import FileBackend
from csi_vduse.cli import main
from csi_vduse.dataplane.blk_device import BlkParams, capacity_field, config_space, features
from csi_vduse.kernel.netlink import NetlinkError, attr_int, attr_str, pack_attr, parse_attrs, strz
from csi_vduse.lifecycle.export import ExportOptions, read_key
from csi_vduse.lifecycle.names import check_device_name
from csi_vduse.units import parse_size


@pytest.mark.parametrize(
    ("text", "value"),
    [("1G", 1 << 30), ("512MiB", 512 << 20), ("4k", 4096), ("1048576", 1 << 20), ("2 TB", 2 << 40)],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "1.5G", "-1G", "G", "12Q", "1e9"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


@pytest.mark.parametrize("name", ["", "a/b", "..", ".hidden", "a b", "x\0y", "n" * 256, "é"])
def test_bad_device_names(name: str) -> None:
    with pytest.raises(ValueError):
        check_device_name(name)


def test_longest_device_name_is_accepted() -> None:
    assert check_device_name("n" * 255) == "n" * 255


def test_export_options_validate_every_field(tmp_path: Path) -> None:
    base = {"file": tmp_path / "f", "name": "d", "size": "1G"}
    opts = ExportOptions.model_validate({**base, "queues": 4, "queue_size": 128})
    assert opts.size == 1 << 30
    for bad in (
        {"size": "0"}, {"queues": 0}, {"queues": 65}, {"queue_size": 96},
        {"queue_size": 2048}, {"name": "a/b"}, {"size": "huge"},
    ):  # fmt: skip
        with pytest.raises(ValidationError):
            ExportOptions.model_validate({**base, **bad})


def test_export_options_for_an_rbd_image(tmp_path: Path) -> None:
    key = tmp_path / "keyring"
    key.write_text("[mon.]\n\tkey = AQBmon==\n[client.csi]\n\tkey = AQBsecret==\n")
    ceph = {"ceph_monitors": "v2:127.0.0.1:3300", "ceph_user": "csi", "ceph_keyfile": key}
    opts = ExportOptions.model_validate({"file": "rbd:pool-1/img.a", "name": "d", **ceph})
    assert opts.rbd_image == ("pool-1", "img.a")
    assert read_key(key, "csi").get_secret_value() == "AQBsecret=="
    with pytest.raises(ValueError):
        read_key(key, "admin")
    bare = tmp_path / "bare"
    bare.write_text("AQBbare==\n")
    assert read_key(bare, "csi").get_secret_value() == "AQBbare=="
    for bad in (
        {"file": "rbd:pool"}, {"file": "rbd:/img"}, {"file": "rbd:p/i/j"},
        {"file": "rbd:p/i", "size": "1G"}, {"file": "rbd:p/i", "ceph_monitors": None},
        {"file": tmp_path / "f"},  # --ceph-* with a file
        {"ceph_user": "client.csi"},
    ):  # fmt: skip
        with pytest.raises(ValidationError):
            ExportOptions.model_validate({"file": "rbd:p/i", "name": "d", **ceph, **bad})


def test_file_backend_creates_sparse_and_never_truncates(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    with FileBackend.open(path, 1 << 30) as b:
        assert b.size == 1 << 30
        os.pwrite(b.fd, b"data", 4096)
    assert path.stat().st_size == 1 << 30
    assert path.stat().st_blocks * 512 <= 64 << 10
    with FileBackend.open(path) as b:
        assert b.size == 1 << 30
    with pytest.raises(BackendError, match="refusing to shrink"):
        FileBackend.open(path, 1 << 20)
    assert path.stat().st_size == 1 << 30
    with FileBackend.open(path, 2 << 30) as b:
        assert b.size == 2 << 30
    assert os.pread(os.open(path, os.O_RDONLY), 4, 4096) == b"data"


def test_file_backend_refuses_a_second_server(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    with FileBackend.open(path, 1 << 20), pytest.raises(BackendError, match="already served"):
        FileBackend.open(path)


@pytest.mark.parametrize(
    ("size", "readonly", "match"),
    [(None, False, "give --size"), (1 << 20, True, "read-only"), (1000, False, "multiple of 512")],
)
def test_file_backend_errors_create_nothing(
    tmp_path: Path, size: int | None, readonly: bool, match: str
) -> None:
    with pytest.raises(BackendError, match=match):
        FileBackend.open(tmp_path / "new.img", size, readonly)
    assert list(tmp_path.iterdir()) == []


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["export", str(tmp_path / "no" / "f"), "--name", "x", "--size", "1G"])
    err = capsys.readouterr().err
    assert rc != 0 and err.count("\n") == 1 and "does not exist" in err
    rc = main(["export", str(tmp_path / "f"), "--name", "x", "--size", "0"])
    err = capsys.readouterr().err
    assert rc != 0 and err.count("\n") == 1 and "--size" in err
    assert list(tmp_path.iterdir()) == []


def test_netlink_attributes_round_trip() -> None:
    raw = pack_attr(4, strz("dev0")) + pack_attr(7, struct.pack("<I", 3)) + pack_attr(9, b"")
    assert len(raw) % 4 == 0
    attrs = parse_attrs(raw)
    assert attr_str(attrs, 4) == "dev0"
    assert attr_int(attrs, 7) == 3
    assert attrs[9] == b""
    assert attr_int(attrs, 99) is None
    assert parse_attrs(raw[:-3] + b"\x01\x00") == {4: strz("dev0"), 7: struct.pack("<I", 3)}
    assert NetlinkError(errno.ENODEV, "x").errno == errno.ENODEV


def test_features_match_the_options() -> None:
    f = features(BlkParams(capacity=1 << 20))
    for bit in (
        lib.VIRTIO_F_VERSION_1, lib.VIRTIO_F_ACCESS_PLATFORM, lib.VIRTIO_RING_F_EVENT_IDX,
        lib.VIRTIO_RING_F_INDIRECT_DESC, lib.VIRTIO_BLK_F_FLUSH, lib.VIRTIO_BLK_F_DISCARD,
        lib.VIRTIO_BLK_F_WRITE_ZEROES, lib.VIRTIO_BLK_F_SEG_MAX, lib.VIRTIO_BLK_F_BLK_SIZE,
        lib.VIRTIO_BLK_F_TOPOLOGY, lib.VIRTIO_BLK_F_SIZE_MAX,
    ):  # fmt: skip
        assert f & (1 << bit)
    assert not f & (1 << lib.VIRTIO_BLK_F_MQ) and not f & (1 << lib.VIRTIO_BLK_F_RO)
    ro = features(BlkParams(capacity=1 << 20, queues=2, readonly=True))
    assert ro & (1 << lib.VIRTIO_BLK_F_MQ) and ro & (1 << lib.VIRTIO_BLK_F_RO)
    assert not ro & (1 << lib.VIRTIO_BLK_F_DISCARD)


def test_config_space_layout() -> None:
    cfg = config_space(BlkParams(capacity=1 << 30, queues=3, queue_size=128))
    (capacity, size_max, seg_max) = struct.unpack_from("<QII", cfg, 0)
    assert (capacity, seg_max) == ((1 << 30) // 512, 126)
    assert size_max > 0
    assert struct.unpack_from("<I", cfg, 20)[0] == 512  # blk_size
    assert struct.unpack_from("<H", cfg, 34)[0] == 3  # num_queues
    offset, data = capacity_field(2 << 30)
    assert offset == 0 and data == struct.pack("<Q", (2 << 30) // 512)


def test_data_plane_tuning_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from csi_vduse.dataplane.tuning import DataPlaneTuning

    assert DataPlaneTuning().parallel_min_bytes == 256 << 10
    monkeypatch.setenv("CSI_VDUSE_DP_EVENT_IDX", "false")
    monkeypatch.setenv("CSI_VDUSE_DP_POLL_US", "50")
    params = BlkParams(capacity=1 << 20)
    assert params.tuning.poll_us == 50
    assert not features(params) & (1 << lib.VIRTIO_RING_F_EVENT_IDX)
    monkeypatch.setenv("CSI_VDUSE_DP_POLL_US", "-1")
    with pytest.raises(ValidationError):
        DataPlaneTuning()
