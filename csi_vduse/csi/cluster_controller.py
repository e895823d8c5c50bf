"""The Controller service of a cluster: one leader-elected instance for every node.

It never touches a node-local volume. Each call writes its intent into a VduseVolume or
VduseSnapshot (cluster/resources.py) and waits, a bounded time, for the agent of the
volume's node to report; a call that outlives the wait is ABORTED and the sidecar's retry
finds the same object. Nothing here reaches a node directly.

A volume of a backend any node reaches (RBD) belongs to no node: the controller has its
driver create, grow and remove it with the call's secret, and keeps a VduseVolume with an
empty node (no agent's) for ListVolumes and ControllerGetVolume, which bring no secret."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from google.protobuf import timestamp_pb2, wrappers_pb2

from csi_vduse.backends.api import ProvisionRequest, VolumeDriver
from csi_vduse.cluster.api import Object, Resources
from csi_vduse.cluster.resources import (
    NODES,
    SNAPSHOTS,
    VOLUMES,
    body,
    deleting,
    node_of,
    raise_reported,
    settled,
    status_of,
)
from csi_vduse.config import ServeConfig
from csi_vduse.csi import capabilities
from csi_vduse.csi.controller import (
    CAPABILITIES,
    RPC,
    check_snapshot_parameters,
    content_source,
    is_snapshot_id,
    is_volume_id,
    paginate,
    unservable,
    validation,
    volume_context,
)
from csi_vduse.csi.errors import rpc
from csi_vduse.csi.proto import csi_pb2 as pb
from csi_vduse.csi.proto import csi_pb2_grpc as rpc_pb
from csi_vduse.errors import Aborted, AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from csi_vduse.lifecycle.capacity import pick_capacity
from csi_vduse.lifecycle.locks import VolumeLocks
from csi_vduse.lifecycle.provisioning import (
    check_name,
    check_source,
    fit_reason,
    parse_parameters,
    parse_qos,
    volume_id_or_raise,
)
from csi_vduse.lifecycle.snapshots import drivers_for, refuse_staged
from csi_vduse.state.snapshots import SnapshotRecord, check_snapshot_id, kind_of_snapshot
from csi_vduse.state.staging import StagingStore
from csi_vduse.state.volumes import InvalidId, Source, VolumeRecord, kind_of_volume

POLL_SECONDS = 0.25
ANY_NODE = ""  # the node of a volume any node reaches: any node stages it, no agent owns it


def choose_node(
    requirements: Any, key: str, source_node: str | None, available: dict[str, int]
) -> str:
    """The node a new volume goes to: its source's, else the first preferred segment the
    requisite allows, else the allowed node with the most free space."""
    requisite = {t.segments[key] for t in requirements.requisite if key in t.segments}
    if source_node is not None:
        if requisite and source_node not in requisite:
            raise ResourceExhausted(
                f"the source lives on node {source_node}, which the requisite topology excludes"
            )
        return source_node
    for topology in requirements.preferred:
        node = topology.segments.get(key)
        if node and (not requisite or node in requisite):
            return str(node)
    candidates = requisite or set(available)
    if not candidates:
        raise ResourceExhausted("no node runs a csi-vduse agent yet")
    return str(max(sorted(candidates), key=lambda n: available.get(n, -1)))


class ClusterControllerService(rpc_pb.ControllerServicer):
    def __init__(self, config: ServeConfig, resources: Resources, wait: float = 30.0) -> None:
        self.config = config
        self.resources = resources
        self.wait_seconds = wait
        # for the backends any node reaches; a node-local volume is its agent's work
        self.drivers = drivers_for(
            config.data_dir, config.state_dir, VolumeLocks(),
            refuse_staged(StagingStore(config.state_dir)),
        )  # fmt: skip

    def _wait(self, plural: str, name: str, done: Callable[[Object | None], bool]) -> Object | None:
        deadline = time.monotonic() + self.wait_seconds
        while True:
            obj = self.resources.get(plural, name)
            if done(obj):
                return obj
            if time.monotonic() > deadline:
                where = f"node {node_of(obj)}" if obj else "its node"
                raise Aborted(f"{name} is still pending on {where}: its agent has not answered")
            time.sleep(POLL_SECONDS)

    def _settled(self, plural: str, name: str) -> Object:
        obj = self._wait(plural, name, lambda o: o is None or settled(o) or deleting(o))
        if obj is None or deleting(obj):
            raise Aborted(f"{name} is being deleted")
        return obj

    def _topology(self, node: str) -> pb.Topology:
        return pb.Topology(segments={self.config.topology_key: node})

    def _volume(self, obj: Object) -> pb.Volume:
        spec, status = obj["spec"], status_of(obj)
        volume = pb.Volume(
            volume_id=obj["metadata"]["name"],
            capacity_bytes=int(status.get("capacityBytes", 0)),
            volume_context=status.get("volumeContext") or {},
            accessible_topology=[self._topology(node)] if (node := node_of(obj)) else [],
        )  # fmt: skip
        source = spec.get("source")
        if source and source["kind"] == "snapshot":
            volume.content_source.snapshot.snapshot_id = source["id"]
        elif source:
            volume.content_source.volume.volume_id = source["id"]
        return volume

    @staticmethod
    def _condition(obj: Object) -> pb.VolumeCondition:
        condition = status_of(obj).get("condition") or {}
        return pb.VolumeCondition(
            abnormal=bool(condition.get("abnormal")), message=str(condition.get("message", ""))
        )

    def _snapshot(self, obj: Object) -> pb.Snapshot:
        status = status_of(obj)
        created = timestamp_pb2.Timestamp()
        created.FromNanoseconds(int(float(status.get("creationTime", 0)) * 1e9))
        return pb.Snapshot(
            snapshot_id=obj["metadata"]["name"], source_volume_id=obj["spec"]["sourceVolumeId"],
            size_bytes=int(status.get("sizeBytes", 0)), creation_time=created,
            ready_to_use=bool(status.get("readyToUse")),
        )  # fmt: skip

    def _existing(self, plural: str, name: str, what: str) -> Object:
        obj = self.resources.get(plural, name)
        if obj is None or not status_of(obj).get("ready"):
            raise NotFound(f"{what} {name} does not exist")
        return obj

    def _ready(self, plural: str, name: str) -> Object:
        """The object once created: a failed create is deleted and its error re-raised."""
        obj = self._settled(plural, name)
        status = status_of(obj)
        if not status.get("ready"):
            self.resources.delete(plural, name)
            raise_reported(status["code"], status.get("message", ""), node_of(obj))
        return obj

    def _source_node(self, source: Source) -> str:
        kind, source_id = source
        plural = SNAPSHOTS if kind == "snapshot" else VOLUMES
        obj = self.resources.get(plural, source_id) if _valid_id(kind, source_id) else None
        if obj is None or not status_of(obj).get("ready"):
            raise NotFound(f"{kind} {source_id} does not exist")
        if node_of(obj) == ANY_NODE:
            raise InvalidArgument(
                f"the {kind} {source_id} is reached from any node: it makes volumes of its "
                "own backend only"
            )
        return node_of(obj)

    def _cluster_driver(self, kind: str | None) -> VolumeDriver | None:
        """The driver of a backend any node reaches; None for one whose volumes live on a
        node (its agent does the work) or an id of no backend."""
        if kind is None:
            return None
        driver = self.drivers.kind(kind)
        return driver if driver.locality == "cluster" else None

    def _available(self) -> dict[str, int]:
        nodes, _ = self.resources.list(NODES)
        return {n["metadata"]["name"]: int(status_of(n).get("availableBytes", 0)) for n in nodes}

    @rpc
    def CreateVolume(self, request: Any, context: Any) -> pb.CreateVolumeResponse:
        check_name(request.name)
        accesses = capabilities.parse_all(request.volume_capabilities)
        params = parse_parameters(dict(request.parameters))
        qos = parse_qos(
            dict(request.mutable_parameters), parse_qos(dict(request.parameters), only_qos=False)
        )
        for access in accesses:
            if reason := fit_reason(params, access.block):
                raise InvalidArgument(reason)
        required, limit = request.capacity_range.required_bytes, request.capacity_range.limit_bytes
        source = content_source(request) if request.HasField("volume_content_source") else None
        driver = self.drivers.kind(params.backend)
        if source is not None:
            check_source(source, driver.kind)
        if driver.locality == "cluster":
            record = driver.provision(ProvisionRequest(
                request.name, required, limit, params, qos, source, dict(request.secrets)
            ))  # fmt: skip
            return pb.CreateVolumeResponse(volume=self._list_anywhere(record, request))
        if source is None:
            pick_capacity(required, limit)
        volume_id = driver.volume_id(request.name, params)
        obj = self.resources.get(VOLUMES, volume_id)
        if obj is None:
            source_node = self._source_node(source) if source else None
            node = choose_node(
                request.accessibility_requirements, self.config.topology_key, source_node,
                self._available(),
            )  # fmt: skip
            spec: dict[str, Any] = {
                "node": node, "name": request.name, "requiredBytes": required,
                "limitBytes": limit, "parameters": dict(request.parameters),
                "mutableParameters": dict(request.mutable_parameters),
            }  # fmt: skip
            if source:
                spec["source"] = {"kind": source[0], "id": source[1]}
            self.resources.create(VOLUMES, body("VduseVolume", volume_id, node, spec))
        obj = self._ready(VOLUMES, volume_id)
        spec = obj["spec"]
        capacity = int(status_of(obj).get("capacityBytes", 0))
        same_source = (spec.get("source") or None) == (
            {"kind": source[0], "id": source[1]} if source else None
        )
        fits = required <= capacity and (not limit or capacity <= limit)
        if not fits or parse_parameters(spec["parameters"]) != params or not same_source:
            raise AlreadyExists(
                f"volume {request.name} exists with {capacity} bytes, parameters "
                f"{spec['parameters']} and source {spec.get('source')}; the request asks for "
                "something else"
            )
        return pb.CreateVolumeResponse(volume=self._volume(obj))

    def _list_anywhere(self, record: VolumeRecord, request: Any) -> pb.Volume:
        """The object that lists a volume any node reaches, once its driver made it."""
        spec = {
            "node": ANY_NODE, "name": record.name,
            "requiredBytes": request.capacity_range.required_bytes,
            "limitBytes": request.capacity_range.limit_bytes,
            "parameters": dict(request.parameters),
            "mutableParameters": dict(request.mutable_parameters),
        }  # fmt: skip
        if record.source is not None:
            spec["source"] = {"kind": record.source[0], "id": record.source[1]}
        self.resources.create(VOLUMES, body("VduseVolume", record.volume_id, ANY_NODE, spec))
        return self._volume(self._report_anywhere(record))

    def _report_anywhere(self, record: VolumeRecord) -> Object:
        """The status an agent would write, written by the controller for a volume any
        node reaches."""
        obj = self.resources.get(VOLUMES, record.volume_id)
        if obj is None:
            raise Aborted(f"{record.volume_id} is being deleted")
        status = {
            "observedGeneration": obj["metadata"]["generation"], "ready": True, "code": "OK",
            "capacityBytes": record.capacity, "volumeContext": volume_context(record),
        }  # fmt: skip
        patched = self.resources.patch(VOLUMES, record.volume_id, {"status": status}, status=True)
        if patched is None:
            raise Aborted(f"{record.volume_id} is being deleted")
        return patched

    def _list_anywhere_snapshot(self, record: SnapshotRecord) -> Object:
        """The object that lists a snapshot any node reaches, with the status the
        controller writes."""
        spec = {"node": ANY_NODE, "name": record.name, "sourceVolumeId": record.source_volume_id}
        self.resources.create(SNAPSHOTS, body("VduseSnapshot", record.snapshot_id, ANY_NODE, spec))
        obj = self.resources.get(SNAPSHOTS, record.snapshot_id)
        if obj is None:
            raise Aborted(f"{record.snapshot_id} is being deleted")
        status = {
            "observedGeneration": obj["metadata"]["generation"], "ready": True, "code": "OK",
            "readyToUse": True, "sizeBytes": record.size, "creationTime": record.created_at,
        }  # fmt: skip
        patched = self.resources.patch(SNAPSHOTS, record.snapshot_id, {"status": status},
                                       status=True)  # fmt: skip
        if patched is None:
            raise Aborted(f"{record.snapshot_id} is being deleted")
        return patched

    @rpc
    def DeleteVolume(self, request: Any, context: Any) -> pb.DeleteVolumeResponse:
        if not volume_id_or_raise(request.volume_id):
            return pb.DeleteVolumeResponse()
        if (driver := self._cluster_driver(kind_of_volume(request.volume_id))) is not None:
            driver.delete(request.volume_id, dict(request.secrets))
            self.resources.delete(VOLUMES, request.volume_id)
        else:
            self._delete(VOLUMES, request.volume_id)
        return pb.DeleteVolumeResponse()

    def _delete(self, plural: str, name: str) -> None:
        if self.resources.get(plural, name) is None:
            return
        self.resources.delete(plural, name)

        def gone_or_failed(obj: Object | None) -> bool:
            return obj is None or (status_of(obj).get("deletion") or {}).get("code") not in (
                None, "OK",
            )  # fmt: skip

        obj = self._wait(plural, name, gone_or_failed)
        if obj is not None:
            failure = status_of(obj)["deletion"]
            raise_reported(failure["code"], failure.get("message", ""), node_of(obj))

    @rpc
    def ValidateVolumeCapabilities(
        self, request: Any, context: Any
    ) -> pb.ValidateVolumeCapabilitiesResponse:
        volume_id_or_raise(request.volume_id)
        obj = self._existing(VOLUMES, request.volume_id, "volume")
        return validation(parse_parameters(obj["spec"]["parameters"]), request)

    @rpc
    def ListVolumes(self, request: Any, context: Any) -> pb.ListVolumesResponse:
        objects, _ = self.resources.list(VOLUMES)
        ready = [o for o in objects if status_of(o).get("ready")]
        page, next_token = paginate(
            sorted(ready, key=_name), _name, request.starting_token, request.max_entries,
            is_volume_id,
        )  # fmt: skip
        entries = [
            pb.ListVolumesResponse.Entry(
                volume=self._volume(o),
                status=pb.ListVolumesResponse.VolumeStatus(volume_condition=self._condition(o)),
            )
            for o in page
        ]
        return pb.ListVolumesResponse(entries=entries, next_token=next_token)

    @rpc
    def ControllerGetVolume(self, request: Any, context: Any) -> pb.ControllerGetVolumeResponse:
        volume_id_or_raise(request.volume_id)
        obj = self._existing(VOLUMES, request.volume_id, "volume")
        status = pb.ControllerGetVolumeResponse.VolumeStatus(volume_condition=self._condition(obj))
        return pb.ControllerGetVolumeResponse(volume=self._volume(obj), status=status)

    @rpc
    def GetCapacity(self, request: Any, context: Any) -> pb.GetCapacityResponse:
        if unservable(request):
            return pb.GetCapacityResponse(available_capacity=0)
        available = self._available()
        node = request.accessible_topology.segments.get(self.config.topology_key)
        if request.accessible_topology.segments:
            free = available.get(node, 0) if node else 0
            total, largest = free, free
        else:
            total, largest = sum(available.values()), max(available.values(), default=0)
        return pb.GetCapacityResponse(
            available_capacity=total, maximum_volume_size=wrappers_pb2.Int64Value(value=largest)
        )

    @rpc
    def ControllerGetCapabilities(
        self, request: Any, context: Any
    ) -> pb.ControllerGetCapabilitiesResponse:
        return pb.ControllerGetCapabilitiesResponse(
            capabilities=[pb.ControllerServiceCapability(rpc=RPC(type=t)) for t in CAPABILITIES]
        )

    def _change(self, volume_id: str, spec: dict[str, Any]) -> Object:
        """Patch the volume's spec and wait for its agent's answer to that generation."""
        volume_id_or_raise(volume_id)
        self._existing(VOLUMES, volume_id, "volume")
        patched = self.resources.patch(VOLUMES, volume_id, {"spec": spec})
        if patched is None:
            raise NotFound(f"volume {volume_id} does not exist")
        generation = patched["metadata"]["generation"]

        def answered(obj: Object | None) -> bool:
            if obj is None or deleting(obj):
                return True
            return bool(settled(obj) and status_of(obj)["observedGeneration"] >= generation)

        obj = self._wait(VOLUMES, volume_id, answered)
        if obj is None or deleting(obj):
            raise NotFound(f"volume {volume_id} is being deleted")
        status = status_of(obj)
        raise_reported(status["code"], status.get("message", ""), node_of(obj))
        return obj

    @rpc
    def ControllerExpandVolume(
        self, request: Any, context: Any
    ) -> pb.ControllerExpandVolumeResponse:
        if request.HasField("volume_capability"):
            capabilities.parse(request.volume_capability)
        required, limit = request.capacity_range.required_bytes, request.capacity_range.limit_bytes
        pick_capacity(required, limit)
        volume_id_or_raise(request.volume_id)
        if (driver := self._cluster_driver(kind_of_volume(request.volume_id))) is not None:
            record, _ = driver.grow(request.volume_id, required, limit, dict(request.secrets),
                                    None)  # fmt: skip
            if self.resources.get(VOLUMES, request.volume_id) is not None:
                self._report_anywhere(record)
            return pb.ControllerExpandVolumeResponse(
                capacity_bytes=record.capacity, node_expansion_required=True
            )
        obj = self._change(
            request.volume_id, {"expansion": {"requiredBytes": required, "limitBytes": limit}}
        )
        return pb.ControllerExpandVolumeResponse(
            capacity_bytes=int(status_of(obj)["capacityBytes"]), node_expansion_required=True
        )

    @rpc
    def ControllerModifyVolume(
        self, request: Any, context: Any
    ) -> pb.ControllerModifyVolumeResponse:
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        mutable = dict(request.mutable_parameters)
        parse_qos(mutable)  # refused here, before anything is written
        driver = self._cluster_driver(kind_of_volume(request.volume_id))
        if driver is not None and not driver.mutable_qos:
            raise InvalidArgument(
                f"the QoS of a {driver.kind} volume is set at creation only, for now"
            )
        self._change(request.volume_id, {"mutableParameters": mutable})
        return pb.ControllerModifyVolumeResponse()

    @rpc
    def CreateSnapshot(self, request: Any, context: Any) -> pb.CreateSnapshotResponse:
        check_name(request.name)
        check_snapshot_parameters(request.parameters)
        if not request.source_volume_id:
            raise InvalidArgument("source_volume_id is required")
        volume_id_or_raise(request.source_volume_id)
        kind = kind_of_volume(request.source_volume_id)
        if (driver := self._cluster_driver(kind)) is not None:
            record = driver.snapshot_create(
                driver.snapshot_id(request.name, request.source_volume_id), request.name,
                request.source_volume_id, dict(request.secrets),
            )  # fmt: skip
            return pb.CreateSnapshotResponse(
                snapshot=self._snapshot(self._list_anywhere_snapshot(record))
            )
        if kind is None:
            raise NotFound(f"volume {request.source_volume_id} does not exist")
        snapshot_id = self.drivers.kind(kind).snapshot_id(request.name, request.source_volume_id)
        obj = self.resources.get(SNAPSHOTS, snapshot_id)
        if obj is None:
            node = self._source_node(("volume", request.source_volume_id))
            spec = {"node": node, "name": request.name, "sourceVolumeId": request.source_volume_id}
            self.resources.create(SNAPSHOTS, body("VduseSnapshot", snapshot_id, node, spec))
        obj = self._ready(SNAPSHOTS, snapshot_id)
        if obj["spec"]["sourceVolumeId"] != request.source_volume_id:
            raise AlreadyExists(
                f"snapshot {request.name} exists of volume {obj['spec']['sourceVolumeId']}"
            )
        return pb.CreateSnapshotResponse(snapshot=self._snapshot(obj))

    @rpc
    def DeleteSnapshot(self, request: Any, context: Any) -> pb.DeleteSnapshotResponse:
        if not request.snapshot_id:
            raise InvalidArgument("snapshot_id is required")
        if not _valid_id("snapshot", request.snapshot_id):
            return pb.DeleteSnapshotResponse()
        if (driver := self._cluster_driver(kind_of_snapshot(request.snapshot_id))) is not None:
            driver.snapshot_delete(request.snapshot_id, dict(request.secrets))
            self.resources.delete(SNAPSHOTS, request.snapshot_id)
        else:
            self._delete(SNAPSHOTS, request.snapshot_id)
        return pb.DeleteSnapshotResponse()

    @rpc
    def ListSnapshots(self, request: Any, context: Any) -> pb.ListSnapshotsResponse:
        objects, _ = self.resources.list(SNAPSHOTS)
        ready = sorted((o for o in objects if status_of(o).get("ready")), key=_name)
        if request.snapshot_id:
            ready = [o for o in ready if _name(o) == request.snapshot_id]
        if request.source_volume_id:
            ready = [o for o in ready if o["spec"]["sourceVolumeId"] == request.source_volume_id]
        page, next_token = paginate(
            ready, _name, request.starting_token, request.max_entries, is_snapshot_id
        )
        entries = [pb.ListSnapshotsResponse.Entry(snapshot=self._snapshot(o)) for o in page]
        return pb.ListSnapshotsResponse(entries=entries, next_token=next_token)


def _name(obj: Object) -> str:
    return str(obj["metadata"]["name"])


def _valid_id(kind: str, value: str) -> bool:
    try:
        return check_snapshot_id(value) if kind == "snapshot" else is_volume_id(value)
    except InvalidId:
        return False
