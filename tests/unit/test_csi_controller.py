"""Identity and Controller through real gRPC on a Unix socket; they need no VDUSE kernel."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_vduse.csi.proto import csi_pb2 as pb
from tests.csi_client import MiB, Mode, Plugin, block_cap, code_of, error_of, mount_cap

C = grpc.StatusCode
WRITER = Mode.SINGLE_NODE_WRITER


@pytest.fixture
def plugin(tmp_path: Path) -> Iterator[Plugin]:
    p = Plugin(tmp_path, components="identity,controller")
    yield p
    assert p.stop() == 0


def create(p: Plugin, name: str, size: int = 64 * MiB, **kw: object) -> pb.CreateVolumeResponse:
    req = pb.CreateVolumeRequest(
        name=name, capacity_range=pb.CapacityRange(required_bytes=size),
        volume_capabilities=[mount_cap()], **kw,  # type: ignore[arg-type]
    )  # fmt: skip
    response: pb.CreateVolumeResponse = p.controller.CreateVolume(req)
    return response


def test_identity(plugin: Plugin) -> None:
    info = plugin.identity.GetPluginInfo(pb.GetPluginInfoRequest())
    assert info.name == "vduse.csi.dev" and info.vendor_version
    caps = plugin.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest()).capabilities
    services = {c.service.type for c in caps if c.HasField("service")}
    assert services == {
        pb.PluginCapability.Service.CONTROLLER_SERVICE,
        pb.PluginCapability.Service.VOLUME_ACCESSIBILITY_CONSTRAINTS,
    }
    expansion = [c.volume_expansion.type for c in caps if c.HasField("volume_expansion")]
    assert expansion == [pb.PluginCapability.VolumeExpansion.ONLINE]
    assert plugin.identity.Probe(pb.ProbeRequest()).ready.value is True


def test_socket_is_private(plugin: Plugin) -> None:
    assert plugin.socket.stat().st_mode & 0o777 == 0o600


def test_create_is_idempotent_by_name_and_pinned_to_the_node(plugin: Plugin) -> None:
    first = create(plugin, "pvc-a", 10 * MiB + 1)
    again = create(plugin, "pvc-a", 10 * MiB + 1)
    assert first == again
    vol = first.volume
    assert vol.capacity_bytes == 11 * MiB  # rounded up to the MiB
    assert [dict(t.segments) for t in vol.accessible_topology] == [
        {"topology.vduse.csi.dev/node": "node-1"}
    ]
    image = plugin.root / "data" / "volumes" / f"{vol.volume_id}.img"
    assert image.stat().st_size == 11 * MiB and image.stat().st_blocks == 0
    assert code_of(lambda: create(plugin, "pvc-a", 100 * MiB)) == C.ALREADY_EXISTS


def test_capacity_range_semantics(plugin: Plugin) -> None:
    def size(required: int, limit: int) -> int:
        return int(plugin.controller.CreateVolume(pb.CreateVolumeRequest(
            name=f"pvc-{required}-{limit}", volume_capabilities=[block_cap()],
            capacity_range=pb.CapacityRange(required_bytes=required, limit_bytes=limit),
        )).volume.capacity_bytes)  # fmt: skip

    assert size(0, 0) == 1 << 30
    assert size(0, 5 * MiB) == 5 * MiB
    assert size(3 * MiB, 0) == 3 * MiB
    assert code_of(lambda: size(5 * MiB, 4 * MiB)) == C.INVALID_ARGUMENT
    assert code_of(lambda: size(MiB + 1, MiB + 100)) == C.OUT_OF_RANGE


@pytest.mark.parametrize(
    ("request_fields", "code"),
    [
        ({"name": ""}, C.INVALID_ARGUMENT),
        ({"name": "x" * 129}, C.INVALID_ARGUMENT),
        ({"name": "a/b"}, C.INVALID_ARGUMENT),
        ({"volume_capabilities": []}, C.INVALID_ARGUMENT),
        ({"volume_capabilities": [mount_cap("btrfs")]}, C.INVALID_ARGUMENT),
        ({"volume_capabilities": [mount_cap(mode=Mode.MULTI_NODE_MULTI_WRITER)]},
         C.INVALID_ARGUMENT),
        ({"volume_capabilities": [pb.VolumeCapability(access_mode=Mode(mode=WRITER))]},
         C.INVALID_ARGUMENT),
        ({"parameters": {"colour": "blue"}}, C.INVALID_ARGUMENT),
        ({"parameters": {"queues": "0"}}, C.INVALID_ARGUMENT),
        ({"parameters": {"queueSize": "100"}}, C.INVALID_ARGUMENT),
        ({"parameters": {"attach": "vhost"}}, C.INVALID_ARGUMENT),
        ({"parameters": {"attach": "vhost-vdpa"}, "volume_capabilities": [block_cap()]},
         C.INVALID_ARGUMENT),
        ({"capacity_range": pb.CapacityRange(required_bytes=1 << 49)}, C.RESOURCE_EXHAUSTED),
        ({"capacity_range": pb.CapacityRange(required_bytes=1 << 60)}, C.OUT_OF_RANGE),
        ({"volume_content_source": pb.VolumeContentSource(
            snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id="s"))},
         C.NOT_FOUND),
        ({"volume_content_source": pb.VolumeContentSource(
            snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id="../x"))},
         C.NOT_FOUND),
        ({"volume_content_source": pb.VolumeContentSource(
            volume=pb.VolumeContentSource.VolumeSource(volume_id="vduse-" + "0" * 40))},
         C.NOT_FOUND),
        ({"volume_content_source": pb.VolumeContentSource(
            volume=pb.VolumeContentSource.VolumeSource(volume_id=""))},
         C.INVALID_ARGUMENT),
        ({"mutable_parameters": {"queues": "2"}}, C.INVALID_ARGUMENT),
        ({"mutable_parameters": {"readIOPS": "-5"}}, C.INVALID_ARGUMENT),
        ({"parameters": {"writeBytesPerSecond": "fast"}}, C.INVALID_ARGUMENT),
        ({"accessibility_requirements": pb.TopologyRequirement(requisite=[
            pb.Topology(segments={"topology.vduse.csi.dev/node": "node-2"})])},
         C.RESOURCE_EXHAUSTED),
    ],
)  # fmt: skip
def test_bad_create_requests_create_nothing(
    plugin: Plugin, request_fields: dict[str, object], code: grpc.StatusCode
) -> None:
    fields: dict[str, object] = {
        "name": "pvc-bad", "volume_capabilities": [mount_cap()],
        "capacity_range": pb.CapacityRange(required_bytes=MiB), **request_fields,
    }  # fmt: skip
    request = pb.CreateVolumeRequest(**fields)  # type: ignore[arg-type]
    got, message = error_of(lambda: plugin.controller.CreateVolume(request))
    assert got == code and message
    volumes = plugin.root / "data" / "volumes"
    assert not volumes.exists() or os.listdir(volumes) == []


@pytest.mark.parametrize("volume_id", ["../../etc", "a/b", "x\0y", "..", "v" * 129])
def test_hostile_volume_ids_are_invalid_arguments(plugin: Plugin, volume_id: str) -> None:
    calls = [
        lambda: plugin.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id)),
        lambda: plugin.controller.ControllerGetVolume(
            pb.ControllerGetVolumeRequest(volume_id=volume_id)),
        lambda: plugin.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
            volume_id=volume_id, capacity_range=pb.CapacityRange(required_bytes=MiB))),
    ]  # fmt: skip
    for call in calls:
        assert code_of(call) == C.INVALID_ARGUMENT


def test_delete_is_idempotent(plugin: Plugin) -> None:
    vol = create(plugin, "pvc-del").volume
    image = plugin.root / "data" / "volumes" / f"{vol.volume_id}.img"
    assert image.exists()
    for _ in range(2):
        plugin.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert not image.exists()
    plugin.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id="not-one-of-ours"))
    assert code_of(lambda: plugin.controller.DeleteVolume(pb.DeleteVolumeRequest())) == (
        C.INVALID_ARGUMENT
    )


def test_delete_refuses_a_staged_volume(plugin: Plugin) -> None:
    vol = create(plugin, "pvc-staged").volume
    staged = plugin.root / "state" / "staged"
    staged.mkdir(parents=True)
    record = {"volume_id": vol.volume_id, "staging_path": "/x", "access_type": "mount",
              "access_mode": 1}  # fmt: skip
    (staged / f"{vol.volume_id}.json").write_text(json.dumps(record))
    code, message = error_of(
        lambda: plugin.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    )
    assert code == C.FAILED_PRECONDITION and "unstage" in message


def test_list_volumes_pages(plugin: Plugin) -> None:
    ids = sorted(create(plugin, f"pvc-{i}").volume.volume_id for i in range(5))
    seen, token = [], ""
    while True:
        page = plugin.controller.ListVolumes(
            pb.ListVolumesRequest(max_entries=2, starting_token=token)
        )
        assert len(page.entries) <= 2
        seen += [e.volume.volume_id for e in page.entries]
        token = page.next_token
        if not token:
            break
    assert seen == ids
    bad = pb.ListVolumesRequest(starting_token="bogus")
    assert code_of(lambda: plugin.controller.ListVolumes(bad)) == C.ABORTED


def test_list_tokens_survive_volumes_that_come_and_go(plugin: Plugin) -> None:
    ids = sorted(create(plugin, f"pvc-{i}").volume.volume_id for i in range(4))
    first = plugin.controller.ListVolumes(pb.ListVolumesRequest(max_entries=2))
    assert [e.volume.volume_id for e in first.entries] == ids[:2]
    # the last volume of the page goes, and one that sorts before the token comes
    plugin.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=ids[1]))
    added = ""
    for i in range(100):
        vid = create(plugin, f"pvc-new-{i}").volume.volume_id
        if vid < ids[1]:
            added = vid
            break
        plugin.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))
    assert added
    rest = plugin.controller.ListVolumes(pb.ListVolumesRequest(starting_token=first.next_token))
    assert [e.volume.volume_id for e in rest.entries] == ids[2:]  # nothing skipped or repeated
    assert not rest.next_token


def test_validate_answers_unknown_parameters_as_not_confirmed(plugin: Plugin) -> None:
    vol = create(plugin, "pvc-params").volume
    answer = plugin.controller.ValidateVolumeCapabilities(pb.ValidateVolumeCapabilitiesRequest(
        volume_id=vol.volume_id, volume_capabilities=[mount_cap()],
        parameters={"colour": "blue"},
    ))  # fmt: skip
    assert not answer.HasField("confirmed") and "colour" in answer.message


def image_of(p: Plugin, volume_id: str) -> Path:
    return p.root / "data" / "volumes" / f"{volume_id}.img"


def snapshot(p: Plugin, name: str, volume_id: str) -> pb.Snapshot:
    req = pb.CreateSnapshotRequest(name=name, source_volume_id=volume_id)
    made: pb.Snapshot = p.controller.CreateSnapshot(req).snapshot
    return made


def test_snapshot_restore_and_clone_copy_the_data(plugin: Plugin) -> None:
    vol = create(plugin, "pvc-src", 8 * MiB).volume
    with open(image_of(plugin, vol.volume_id), "r+b") as f:
        f.seek(3 * MiB)
        f.write(b"before the snapshot")
    snap = snapshot(plugin, "snap-1", vol.volume_id)
    assert snap.ready_to_use and snap.size_bytes == 8 * MiB
    assert snap.source_volume_id == vol.volume_id and snap.creation_time.seconds > 0
    assert snapshot(plugin, "snap-1", vol.volume_id) == snap  # idempotent
    with open(image_of(plugin, vol.volume_id), "r+b") as f:
        f.seek(3 * MiB)
        f.write(b"after  the snapshot")

    source = pb.VolumeContentSource(
        snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id)
    )
    restored = create(plugin, "pvc-restored", 16 * MiB, volume_content_source=source).volume
    assert restored.content_source.snapshot.snapshot_id == snap.snapshot_id
    assert restored.capacity_bytes == 16 * MiB
    data = image_of(plugin, restored.volume_id).read_bytes()
    assert len(data) == 16 * MiB and data[3 * MiB : 3 * MiB + 19] == b"before the snapshot"
    assert image_of(plugin, restored.volume_id).stat().st_blocks < 1024  # still sparse

    clone_source = pb.VolumeContentSource(
        volume=pb.VolumeContentSource.VolumeSource(volume_id=vol.volume_id)
    )
    clone = create(plugin, "pvc-clone", 8 * MiB, volume_content_source=clone_source).volume
    data = image_of(plugin, clone.volume_id).read_bytes()
    assert data[3 * MiB : 3 * MiB + 19] == b"after  the snapshot"
    # too small for its source: OUT_OF_RANGE, and nothing is made
    code = code_of(lambda: create(plugin, "pvc-small", 4 * MiB, volume_content_source=source))
    assert code == C.OUT_OF_RANGE
    # the same name with another source is another volume
    code = code_of(lambda: create(plugin, "pvc-clone", 8 * MiB, volume_content_source=source))
    assert code == C.ALREADY_EXISTS
    # deleting the source leaves its snapshot usable
    plugin.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    again = create(plugin, "pvc-restored-2", 8 * MiB, volume_content_source=source).volume
    assert image_of(plugin, again.volume_id).read_bytes()[3 * MiB : 3 * MiB + 6] == b"before"
    names = sorted(p.name for p in (plugin.root / "data" / "volumes").iterdir())
    assert not [n for n in names if n.startswith(".")]


def test_snapshot_errors_and_listing(plugin: Plugin) -> None:
    a = create(plugin, "pvc-a", MiB).volume
    b = create(plugin, "pvc-b", MiB).volume
    snaps = [snapshot(plugin, f"s-{i}", (a, b)[i % 2].volume_id) for i in range(5)]
    assert code_of(lambda: snapshot(plugin, "s-0", b.volume_id)) == C.ALREADY_EXISTS
    assert code_of(lambda: snapshot(plugin, "s-x", "vduse-" + "1" * 40)) == C.NOT_FOUND
    assert code_of(lambda: snapshot(plugin, "", a.volume_id)) == C.INVALID_ARGUMENT
    assert code_of(lambda: snapshot(plugin, "s-y", "")) == C.INVALID_ARGUMENT
    assert code_of(lambda: snapshot(plugin, "s-z", "../etc")) == C.INVALID_ARGUMENT
    list_ = plugin.controller.ListSnapshots
    ids = sorted(s.snapshot_id for s in snaps)
    seen, token = [], ""
    while True:
        page = list_(pb.ListSnapshotsRequest(max_entries=2, starting_token=token))
        seen += [e.snapshot.snapshot_id for e in page.entries]
        if not (token := page.next_token):
            break
    assert seen == ids
    of_b = list_(pb.ListSnapshotsRequest(source_volume_id=b.volume_id))
    assert sorted(e.snapshot.snapshot_id for e in of_b.entries) == sorted(
        s.snapshot_id for s in snaps[1::2]
    )
    one = list_(pb.ListSnapshotsRequest(snapshot_id=snaps[2].snapshot_id))
    assert [e.snapshot for e in one.entries] == [snaps[2]]
    assert not list_(pb.ListSnapshotsRequest(snapshot_id="none")).entries
    bad = pb.ListSnapshotsRequest(starting_token="bogus")
    assert code_of(lambda: list_(bad)) == C.ABORTED
    delete = plugin.controller.DeleteSnapshot
    delete(pb.DeleteSnapshotRequest(snapshot_id=snaps[0].snapshot_id))
    delete(pb.DeleteSnapshotRequest(snapshot_id=snaps[0].snapshot_id))  # idempotent
    delete(pb.DeleteSnapshotRequest(snapshot_id="not-ours"))
    assert code_of(lambda: delete(pb.DeleteSnapshotRequest())) == C.INVALID_ARGUMENT
    assert code_of(lambda: delete(pb.DeleteSnapshotRequest(snapshot_id="a/b"))) == (
        C.INVALID_ARGUMENT
    )
    assert len(list_(pb.ListSnapshotsRequest()).entries) == 4
    leftovers = list((plugin.root / "data" / "snapshots").glob(f"{snaps[0].snapshot_id}*"))
    assert not leftovers


def test_modify_volume_sets_persisted_qos(plugin: Plugin) -> None:
    vol = create(plugin, "pvc-qos", MiB, parameters={"writeIOPS": "500"},
                 mutable_parameters={"readBytesPerSecond": "10Mi"}).volume  # fmt: skip
    record_path = plugin.root / "data" / "volumes" / f"{vol.volume_id}.json"
    qos = json.loads(record_path.read_text())["qos"]
    assert (qos["write_iops"], qos["read_bps"]) == (500, 10 * MiB)
    modify = plugin.controller.ControllerModifyVolume
    change = {"writeIOPS": "0", "readIOPS": "200"}
    modify(pb.ControllerModifyVolumeRequest(volume_id=vol.volume_id, mutable_parameters=change))
    qos = json.loads(record_path.read_text())["qos"]
    assert (qos["write_iops"], qos["read_iops"], qos["read_bps"]) == (0, 200, 10 * MiB)
    before = record_path.read_bytes()
    for bad in ({"XXX_FakeKey": "1"}, {"queues": "2"}, {"readIOPS": "many"},
                {"burstMilliseconds": "0"}):  # fmt: skip
        req = pb.ControllerModifyVolumeRequest(volume_id=vol.volume_id, mutable_parameters=bad)
        assert code_of(lambda r=req: modify(r)) == C.INVALID_ARGUMENT  # type: ignore[misc]
    assert record_path.read_bytes() == before  # a refused change changes nothing
    missing = pb.ControllerModifyVolumeRequest(volume_id="vduse-" + "2" * 40)
    assert code_of(lambda: modify(missing)) == C.NOT_FOUND
    assert code_of(lambda: modify(pb.ControllerModifyVolumeRequest())) == C.INVALID_ARGUMENT


def test_get_volume_condition_and_validate(plugin: Plugin) -> None:
    vol = create(plugin, "pvc-get").volume
    got = plugin.controller.ControllerGetVolume(
        pb.ControllerGetVolumeRequest(volume_id=vol.volume_id)
    )
    assert got.volume.volume_id == vol.volume_id
    assert not got.status.volume_condition.abnormal
    (plugin.root / "data" / "volumes" / f"{vol.volume_id}.img").unlink()
    got = plugin.controller.ControllerGetVolume(
        pb.ControllerGetVolumeRequest(volume_id=vol.volume_id)
    )
    assert got.status.volume_condition.abnormal
    ok = plugin.controller.ValidateVolumeCapabilities(pb.ValidateVolumeCapabilitiesRequest(
        volume_id=vol.volume_id, volume_capabilities=[block_cap(), mount_cap("xfs")]))  # fmt: skip
    assert ok.HasField("confirmed")
    many_readers = mount_cap(mode=Mode.MULTI_NODE_READER_ONLY)
    no = plugin.controller.ValidateVolumeCapabilities(pb.ValidateVolumeCapabilitiesRequest(
        volume_id=vol.volume_id, volume_capabilities=[many_readers]))  # fmt: skip
    assert not no.HasField("confirmed") and no.message
    missing = pb.ValidateVolumeCapabilitiesRequest(
        volume_id="vduse-" + "0" * 40, volume_capabilities=[block_cap()]
    )
    assert code_of(lambda: plugin.controller.ValidateVolumeCapabilities(missing)) == C.NOT_FOUND


def test_a_vhost_vdpa_volume_is_a_filesystem_volume(plugin: Plugin) -> None:
    vol = plugin.controller.CreateVolume(pb.CreateVolumeRequest(
        name="pvc-vm", volume_capabilities=[mount_cap()], parameters={"attach": "vhost-vdpa"},
        capacity_range=pb.CapacityRange(required_bytes=MiB),
    )).volume  # fmt: skip
    record = json.loads((plugin.root / "data" / "volumes" / f"{vol.volume_id}.json").read_text())
    assert record["params"]["attach"] == "vhost-vdpa"
    validate = plugin.controller.ValidateVolumeCapabilities
    ok = validate(pb.ValidateVolumeCapabilitiesRequest(
        volume_id=vol.volume_id, volume_capabilities=[mount_cap()]))  # fmt: skip
    assert ok.HasField("confirmed")
    no = validate(pb.ValidateVolumeCapabilitiesRequest(
        volume_id=vol.volume_id, volume_capabilities=[block_cap()]))  # fmt: skip
    assert not no.HasField("confirmed") and "volumeMode Filesystem" in no.message


def test_capacity_and_expand(plugin: Plugin) -> None:
    cap = plugin.controller.GetCapacity(pb.GetCapacityRequest(volume_capabilities=[block_cap()]))
    assert cap.available_capacity > 0
    other = pb.GetCapacityRequest(
        accessible_topology=pb.Topology(segments={"topology.vduse.csi.dev/node": "node-9"})
    )
    assert plugin.controller.GetCapacity(other).available_capacity == 0
    vol = create(plugin, "pvc-grow", 8 * MiB).volume
    grow = pb.CapacityRange(required_bytes=16 * MiB)
    resp = plugin.controller.ControllerExpandVolume(
        pb.ControllerExpandVolumeRequest(volume_id=vol.volume_id, capacity_range=grow)
    )
    assert resp.capacity_bytes == 16 * MiB and resp.node_expansion_required
    image = plugin.root / "data" / "volumes" / f"{vol.volume_id}.img"
    assert image.stat().st_size == 16 * MiB
    caps = plugin.controller.ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest())
    assert len(caps.capabilities) == 11
    unservable = pb.GetCapacityRequest(
        volume_capabilities=[mount_cap(mode=Mode.MULTI_NODE_MULTI_WRITER)]
    )
    assert plugin.controller.GetCapacity(unservable).available_capacity == 0
    vm_block = pb.GetCapacityRequest(
        volume_capabilities=[block_cap()], parameters={"attach": "vhost-vdpa"}
    )
    assert plugin.controller.GetCapacity(vm_block).available_capacity == 0


def test_serve_rejects_bad_settings(tmp_path: Path) -> None:
    from csi_vduse.cli import main

    assert main(["serve", "--node-id", "n", "--endpoint", "tcp://1.2.3.4:5"]) == 2
    assert main(["serve", "--node-id", "n", "--components", "node,bogus"]) == 2
    assert main(["serve", "--node-id", "", "--endpoint", f"unix://{tmp_path}/s"]) == 2
    assert not (tmp_path / "s").exists()


def test_a_live_socket_is_not_replaced(plugin: Plugin, tmp_path: Path) -> None:
    from csi_vduse.csi.server import EndpointInUse, prepare_socket

    with pytest.raises(EndpointInUse):
        prepare_socket(plugin.socket)
    not_a_socket = tmp_path / "file"
    not_a_socket.write_text("x")
    with pytest.raises(EndpointInUse):
        prepare_socket(not_a_socket)
    assert not_a_socket.read_text() == "x"


def test_settings_come_from_the_environment_and_flags_win(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from csi_vduse.config import ServeConfig

    monkeypatch.setenv("CSI_VDUSE_NODE_ID", "env-node")
    monkeypatch.setenv("CSI_VDUSE_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("CSI_VDUSE_COMPONENTS", "node, identity")
    monkeypatch.setenv("CSI_VDUSE_MAX_VOLUMES", "7")
    config = ServeConfig()  # type: ignore[call-arg]
    assert (config.node_id, config.log_level, config.components, config.max_volumes) == (
        "env-node", "debug", ("node", "identity"), 7,
    )  # fmt: skip
    assert ServeConfig(node_id="flag-node").node_id == "flag-node"
    monkeypatch.setenv("CSI_VDUSE_LOG_LEVEL", "loud")
    with pytest.raises(ValueError, match="log_level"):
        ServeConfig()  # type: ignore[call-arg]
