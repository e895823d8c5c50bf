"""The generated CSI modules against the CSI v1.12 wire contract: package, services, methods,
field numbers and types, oneofs and enum numbers that kubelet and the sidecars depend on."""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from csi_vduse.csi.proto import csi_pb2, csi_pb2_grpc

FILE = csi_pb2.DESCRIPTOR

_SCALARS = {
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_INT32: "int32",
    FieldDescriptor.TYPE_INT64: "int64",
}


def message(name: str) -> Descriptor:
    """A message by its dotted name inside csi.v1, e.g. "VolumeCapability.AccessMode"."""
    outer, *inner = name.split(".")
    desc = FILE.message_types_by_name[outer]
    for part in inner:
        desc = desc.nested_types_by_name[part]
    return desc


def type_of(field: FieldDescriptor) -> str:
    """A protobuf-syntax spelling of a field's type: "string", "repeated csi.v1.Topology",
    "map<string, string>", "csi.v1.VolumeUsage.Unit"."""
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key, value = (type_of(f) for f in field.message_type.fields)
        return f"map<{key}, {value}>"
    if field.message_type is not None:
        name = field.message_type.full_name
    elif field.enum_type is not None:
        name = field.enum_type.full_name
    else:
        name = _SCALARS[field.type]
    return f"repeated {name}" if field.is_repeated else name


def layout(name: str) -> dict[str, tuple[int, str]]:
    """Every field of a message: name -> (number, type)."""
    return {f.name: (f.number, type_of(f)) for f in message(name).fields}


def enum_values(enum: EnumDescriptor) -> dict[str, int]:
    return {v.name: v.number for v in enum.values}


SSMAP = "map<string, string>"


def test_package_and_services() -> None:
    assert FILE.package == "csi.v1"
    assert set(FILE.services_by_name) >= {"Identity", "Controller", "Node"}
    for name in ("Identity", "Controller", "Node", "GroupController", "SnapshotMetadata"):
        assert FILE.services_by_name[name].full_name == f"csi.v1.{name}"


SERVICE_METHODS = {
    "Identity": ["GetPluginInfo", "GetPluginCapabilities", "Probe"],
    "Controller": [
        "CreateVolume",
        "DeleteVolume",
        "ControllerPublishVolume",
        "ControllerUnpublishVolume",
        "ValidateVolumeCapabilities",
        "ListVolumes",
        "GetCapacity",
        "ControllerGetCapabilities",
        "CreateSnapshot",
        "DeleteSnapshot",
        "ListSnapshots",
        "GetSnapshot",
        "ControllerExpandVolume",
        "ControllerGetVolume",
        "ControllerModifyVolume",
    ],
    "Node": [
        "NodeStageVolume",
        "NodeUnstageVolume",
        "NodePublishVolume",
        "NodeUnpublishVolume",
        "NodeGetVolumeStats",
        "NodeExpandVolume",
        "NodeGetCapabilities",
        "NodeGetInfo",
    ],
    "GroupController": [
        "GroupControllerGetCapabilities",
        "CreateVolumeGroupSnapshot",
        "DeleteVolumeGroupSnapshot",
        "GetVolumeGroupSnapshot",
    ],
}


@pytest.mark.parametrize(("service", "methods"), sorted(SERVICE_METHODS.items()))
def test_service_methods(service: str, methods: list[str]) -> None:
    desc = FILE.services_by_name[service]
    assert [m.name for m in desc.methods] == methods
    for m in desc.methods:
        assert m.input_type.full_name == f"csi.v1.{m.name}Request"
        assert m.output_type.full_name == f"csi.v1.{m.name}Response"
        assert not m.client_streaming
        assert not m.server_streaming


def test_snapshot_metadata_methods_stream_responses() -> None:
    desc = FILE.services_by_name["SnapshotMetadata"]
    assert [(m.name, m.client_streaming, m.server_streaming) for m in desc.methods] == [
        ("GetMetadataAllocated", False, True),
        ("GetMetadataDelta", False, True),
    ]


def test_grpc_module_has_servicers_and_stubs() -> None:
    for service in ("Identity", "Controller", "Node", "GroupController", "SnapshotMetadata"):
        assert hasattr(csi_pb2_grpc, f"{service}Servicer")
        assert hasattr(csi_pb2_grpc, f"{service}Stub")
        assert hasattr(csi_pb2_grpc, f"add_{service}Servicer_to_server")


MESSAGE_LAYOUTS: dict[str, dict[str, tuple[int, str]]] = {
    "GetPluginInfoResponse": {
        "name": (1, "string"),
        "vendor_version": (2, "string"),
        "manifest": (3, SSMAP),
    },
    "GetPluginCapabilitiesResponse": {
        "capabilities": (1, "repeated csi.v1.PluginCapability"),
    },
    "PluginCapability": {
        "service": (1, "csi.v1.PluginCapability.Service"),
        "volume_expansion": (2, "csi.v1.PluginCapability.VolumeExpansion"),
    },
    "ProbeResponse": {"ready": (1, "google.protobuf.BoolValue")},
    "CreateVolumeRequest": {
        "name": (1, "string"),
        "capacity_range": (2, "csi.v1.CapacityRange"),
        "volume_capabilities": (3, "repeated csi.v1.VolumeCapability"),
        "parameters": (4, SSMAP),
        "secrets": (5, SSMAP),
        "volume_content_source": (6, "csi.v1.VolumeContentSource"),
        "accessibility_requirements": (7, "csi.v1.TopologyRequirement"),
        "mutable_parameters": (8, SSMAP),
    },
    "CreateVolumeResponse": {"volume": (1, "csi.v1.Volume")},
    "CapacityRange": {"required_bytes": (1, "int64"), "limit_bytes": (2, "int64")},
    "Volume": {
        "capacity_bytes": (1, "int64"),
        "volume_id": (2, "string"),
        "volume_context": (3, SSMAP),
        "content_source": (4, "csi.v1.VolumeContentSource"),
        "accessible_topology": (5, "repeated csi.v1.Topology"),
    },
    "Topology": {"segments": (1, SSMAP)},
    "VolumeCapability": {
        "block": (1, "csi.v1.VolumeCapability.BlockVolume"),
        "mount": (2, "csi.v1.VolumeCapability.MountVolume"),
        "access_mode": (3, "csi.v1.VolumeCapability.AccessMode"),
    },
    "VolumeCapability.BlockVolume": {},
    "VolumeCapability.MountVolume": {
        "fs_type": (1, "string"),
        "mount_flags": (2, "repeated string"),
        "volume_mount_group": (3, "string"),
    },
    "VolumeCapability.AccessMode": {"mode": (1, "csi.v1.VolumeCapability.AccessMode.Mode")},
    "DeleteVolumeRequest": {"volume_id": (1, "string"), "secrets": (2, SSMAP)},
    "ControllerPublishVolumeRequest": {
        "volume_id": (1, "string"),
        "node_id": (2, "string"),
        "volume_capability": (3, "csi.v1.VolumeCapability"),
        "readonly": (4, "bool"),
        "secrets": (5, SSMAP),
        "volume_context": (6, SSMAP),
    },
    "ControllerPublishVolumeResponse": {"publish_context": (1, SSMAP)},
    "GetCapacityResponse": {
        "available_capacity": (1, "int64"),
        "maximum_volume_size": (2, "google.protobuf.Int64Value"),
        "minimum_volume_size": (3, "google.protobuf.Int64Value"),
    },
    "ControllerExpandVolumeResponse": {
        "capacity_bytes": (1, "int64"),
        "node_expansion_required": (2, "bool"),
    },
    "NodeStageVolumeRequest": {
        "volume_id": (1, "string"),
        "publish_context": (2, SSMAP),
        "staging_target_path": (3, "string"),
        "volume_capability": (4, "csi.v1.VolumeCapability"),
        "secrets": (5, SSMAP),
        "volume_context": (6, SSMAP),
    },
    "NodeUnstageVolumeRequest": {
        "volume_id": (1, "string"),
        "staging_target_path": (2, "string"),
    },
    "NodePublishVolumeRequest": {
        "volume_id": (1, "string"),
        "publish_context": (2, SSMAP),
        "staging_target_path": (3, "string"),
        "target_path": (4, "string"),
        "volume_capability": (5, "csi.v1.VolumeCapability"),
        "readonly": (6, "bool"),
        "secrets": (7, SSMAP),
        "volume_context": (8, SSMAP),
    },
    "NodeUnpublishVolumeRequest": {"volume_id": (1, "string"), "target_path": (2, "string")},
    "NodeGetVolumeStatsRequest": {
        "volume_id": (1, "string"),
        "volume_path": (2, "string"),
        "staging_target_path": (3, "string"),
    },
    "NodeGetVolumeStatsResponse": {
        "usage": (1, "repeated csi.v1.VolumeUsage"),
        "volume_condition": (2, "csi.v1.VolumeCondition"),
    },
    "VolumeUsage": {
        "available": (1, "int64"),
        "total": (2, "int64"),
        "used": (3, "int64"),
        "unit": (4, "csi.v1.VolumeUsage.Unit"),
    },
    "VolumeCondition": {"abnormal": (1, "bool"), "message": (2, "string")},
    "NodeGetInfoResponse": {
        "node_id": (1, "string"),
        "max_volumes_per_node": (2, "int64"),
        "accessible_topology": (3, "csi.v1.Topology"),
    },
    "NodeExpandVolumeRequest": {
        "volume_id": (1, "string"),
        "volume_path": (2, "string"),
        "capacity_range": (3, "csi.v1.CapacityRange"),
        "staging_target_path": (4, "string"),
        "volume_capability": (5, "csi.v1.VolumeCapability"),
        "secrets": (6, SSMAP),
    },
    "NodeExpandVolumeResponse": {"capacity_bytes": (1, "int64")},
    "NodeGetCapabilitiesResponse": {
        "capabilities": (1, "repeated csi.v1.NodeServiceCapability"),
    },
    "NodeServiceCapability": {"rpc": (1, "csi.v1.NodeServiceCapability.RPC")},
    "NodeServiceCapability.RPC": {"type": (1, "csi.v1.NodeServiceCapability.RPC.Type")},
    "ControllerServiceCapability": {"rpc": (1, "csi.v1.ControllerServiceCapability.RPC")},
    "Snapshot": {
        "size_bytes": (1, "int64"),
        "snapshot_id": (2, "string"),
        "source_volume_id": (3, "string"),
        "creation_time": (4, "google.protobuf.Timestamp"),
        "ready_to_use": (5, "bool"),
        "group_snapshot_id": (6, "string"),
    },
    "ListVolumesRequest": {"max_entries": (1, "int32"), "starting_token": (2, "string")},
}


@pytest.mark.parametrize(("name", "expected"), sorted(MESSAGE_LAYOUTS.items()))
def test_message_layout(name: str, expected: dict[str, tuple[int, str]]) -> None:
    assert layout(name) == expected


@pytest.mark.parametrize(
    ("name", "oneof", "members"),
    [
        ("VolumeCapability", "access_type", ["block", "mount"]),
        ("VolumeContentSource", "type", ["snapshot", "volume"]),
        ("PluginCapability", "type", ["service", "volume_expansion"]),
        ("ControllerServiceCapability", "type", ["rpc"]),
        ("NodeServiceCapability", "type", ["rpc"]),
    ],
)
def test_oneofs(name: str, oneof: str, members: list[str]) -> None:
    desc = message(name)
    assert list(desc.oneofs_by_name) == [oneof]
    assert [f.name for f in desc.oneofs_by_name[oneof].fields] == members


def test_access_mode_values() -> None:
    mode = message("VolumeCapability.AccessMode").enum_types_by_name["Mode"]
    assert enum_values(mode) == {
        "UNKNOWN": 0,
        "SINGLE_NODE_WRITER": 1,
        "SINGLE_NODE_READER_ONLY": 2,
        "MULTI_NODE_READER_ONLY": 3,
        "MULTI_NODE_SINGLE_WRITER": 4,
        "MULTI_NODE_MULTI_WRITER": 5,
        "SINGLE_NODE_SINGLE_WRITER": 6,
        "SINGLE_NODE_MULTI_WRITER": 7,
    }


def test_plugin_capability_values() -> None:
    service = message("PluginCapability.Service").enum_types_by_name["Type"]
    assert enum_values(service) == {
        "UNKNOWN": 0,
        "CONTROLLER_SERVICE": 1,
        "VOLUME_ACCESSIBILITY_CONSTRAINTS": 2,
        "GROUP_CONTROLLER_SERVICE": 3,
        "SNAPSHOT_METADATA_SERVICE": 4,
    }
    expansion = message("PluginCapability.VolumeExpansion").enum_types_by_name["Type"]
    assert enum_values(expansion) == {"UNKNOWN": 0, "ONLINE": 1, "OFFLINE": 2}


def test_controller_capability_values() -> None:
    rpc = message("ControllerServiceCapability.RPC").enum_types_by_name["Type"]
    assert enum_values(rpc) == {
        "UNKNOWN": 0,
        "CREATE_DELETE_VOLUME": 1,
        "PUBLISH_UNPUBLISH_VOLUME": 2,
        "LIST_VOLUMES": 3,
        "GET_CAPACITY": 4,
        "CREATE_DELETE_SNAPSHOT": 5,
        "LIST_SNAPSHOTS": 6,
        "CLONE_VOLUME": 7,
        "PUBLISH_READONLY": 8,
        "EXPAND_VOLUME": 9,
        "LIST_VOLUMES_PUBLISHED_NODES": 10,
        "VOLUME_CONDITION": 11,
        "GET_VOLUME": 12,
        "SINGLE_NODE_MULTI_WRITER": 13,
        "MODIFY_VOLUME": 14,
        "GET_SNAPSHOT": 15,
    }


def test_node_capability_values() -> None:
    rpc = message("NodeServiceCapability.RPC").enum_types_by_name["Type"]
    assert enum_values(rpc) == {
        "UNKNOWN": 0,
        "STAGE_UNSTAGE_VOLUME": 1,
        "GET_VOLUME_STATS": 2,
        "EXPAND_VOLUME": 3,
        "VOLUME_CONDITION": 4,
        "SINGLE_NODE_MULTI_WRITER": 5,
        "VOLUME_MOUNT_GROUP": 6,
    }


def test_volume_usage_unit_values() -> None:
    unit = message("VolumeUsage").enum_types_by_name["Unit"]
    assert enum_values(unit) == {"UNKNOWN": 0, "BYTES": 1, "INODES": 2}


def test_wire_bytes_of_node_get_info() -> None:
    reply = csi_pb2.NodeGetInfoResponse(node_id="n1", max_volumes_per_node=3)
    reply.accessible_topology.segments["zone"] = "z"
    # field 1 (len) "n1", field 2 (varint) 3, field 3 (len) Topology{field 1: {"zone": "z"}}
    assert reply.SerializeToString(deterministic=True) == (
        b"\x0a\x02n1" + b"\x10\x03" + b"\x1a\x0b" + b"\x0a\x09" + b"\x0a\x04zone\x12\x01z"
    )


def test_wire_round_trip_of_block_capability() -> None:
    cap = csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(),
        access_mode=csi_pb2.VolumeCapability.AccessMode(
            mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_SINGLE_WRITER
        ),
    )
    wire = cap.SerializeToString()
    # field 1 (block, empty message) then field 3 (access_mode{mode: 6})
    assert wire == b"\x0a\x00" + b"\x1a\x02\x08\x06"
    back = csi_pb2.VolumeCapability.FromString(wire)
    assert back.WhichOneof("access_type") == "block"
    assert back.access_mode.mode == 6
