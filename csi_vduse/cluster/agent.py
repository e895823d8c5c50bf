"""The node agent: acts on the VduseVolumes and VduseSnapshots of its node by calling the
node's own plugin (the Controller service on its CSI socket), and reports back in `status`.

It runs beside the plugin with the API token the privileged plugin does not get. Every
action it takes is idempotent in the plugin, so a crash anywhere is repaired by the next
pass; a finalizer keeps an object until the plugin has deleted what it stands for.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import grpc

from csi_vduse.cluster.api import Gone, Object, Resources
from csi_vduse.cluster.resources import (
    FINALIZER,
    GROUP,
    NODE_LABEL,
    NODES,
    OK,
    SNAPSHOTS,
    VERSION,
    VOLUMES,
    code_name,
    deleting,
    settled,
    status_of,
)
from csi_vduse.csi.proto import csi_pb2 as pb
from csi_vduse.csi.proto import csi_pb2_grpc as rpc_pb
from csi_vduse.errors import Unavailable

log = logging.getLogger(__name__)
CALL_TIMEOUT = 600.0  # a streamed copy of a large image takes its time


class Failed(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _any_writer() -> pb.VolumeCapability:
    """The capability the agent creates with: the controller checked the real ones."""
    mode = pb.VolumeCapability.AccessMode(mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER)
    return pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(), access_mode=mode)


class Agent:
    def __init__(
        self, node_id: str, resources: Resources, channel: grpc.Channel,
        resync_seconds: int = 30,
    ) -> None:  # fmt: skip
        self.node_id = node_id
        self.resources = resources
        self.plugin = rpc_pb.ControllerStub(channel)  # type: ignore[no-untyped-call]
        self.resync_seconds = resync_seconds
        self.selector = f"{NODE_LABEL}={node_id}"
        self.stopping = threading.Event()
        self.published: int | None = None
        self.lock = threading.Lock()  # one plugin call at a time keeps the space promise simple

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self.plugin, method)(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError as e:
            raise Failed(code_name(e.code()), str(e.details())) from None

    # volumes

    def reconcile_volume(self, obj: Object, resync: bool) -> bool:
        """Acts on what the volume's spec asks; on a resync, refreshes its condition too.
        True when it changed something on the node."""
        name = obj["metadata"]["name"]
        finalizers = obj["metadata"].get("finalizers") or []
        if deleting(obj):
            if FINALIZER in finalizers:
                self._delete(VOLUMES, obj, "DeleteVolume", pb.DeleteVolumeRequest(volume_id=name))
            return True
        spec, status = obj["spec"], status_of(obj)
        new: dict[str, Any] = {"observedGeneration": obj["metadata"]["generation"]}
        acted = False
        try:
            if settled(obj) and status.get("code") == OK:
                if not resync:
                    return False
                new.update(condition=self._condition(name))
            else:
                acted = True
                new.update(self._ensure_volume(name, spec, bool(status.get("ready"))))
                if FINALIZER not in finalizers and not self._add_finalizer(VOLUMES, obj):
                    # the controller gave up on this create: no one was handed the volume
                    self._call("DeleteVolume", pb.DeleteVolumeRequest(volume_id=name))
                    return True
                new.update(ready=True, code=OK, message="", condition=self._condition(name))
        except Failed as e:
            log.warning("%s: %s %s", name, e.code, e.message)
            new.update(code=e.code, message=e.message)
            if status.get("ready") and e.code in ("NOT_FOUND", "FAILED_PRECONDITION"):
                new.update(condition={"abnormal": True, "message": e.message})
        self._write_status(VOLUMES, obj, new)
        return acted

    def _ensure_volume(self, name: str, spec: dict[str, Any], created: bool) -> dict[str, Any]:
        """Creates the volume (once: a volume this node had and lost is reported, never
        made again empty), then applies what the spec asks of it."""
        request = pb.CreateVolumeRequest(
            name=spec["name"],
            capacity_range=pb.CapacityRange(
                required_bytes=int(spec.get("requiredBytes", 0)),
                limit_bytes=int(spec.get("limitBytes", 0)),
            ),
            volume_capabilities=[_any_writer()],
            parameters=spec.get("parameters") or {},
            mutable_parameters=spec.get("mutableParameters") or {},
        )
        source = spec.get("source")
        if source and source["kind"] == "snapshot":
            request.volume_content_source.snapshot.snapshot_id = source["id"]
        elif source:
            request.volume_content_source.volume.volume_id = source["id"]
        try:
            volume = self._call(
                "ControllerGetVolume", pb.ControllerGetVolumeRequest(volume_id=name)
            ).volume
        except Failed as e:
            if e.code != "NOT_FOUND":
                raise
            if created:
                raise Failed(
                    "FAILED_PRECONDITION", f"the volume is gone from node {self.node_id}'s "
                    "data dir (it was created there): not made again",
                ) from None  # fmt: skip
            volume = self._call("CreateVolume", request).volume
            if volume.volume_id != name:
                raise Failed(
                    "INTERNAL", f"the plugin named the volume {volume.volume_id}"
                ) from None
        capacity = volume.capacity_bytes
        expansion = spec.get("expansion")
        if expansion and int(expansion["requiredBytes"]) > capacity:
            expanded = self._call("ControllerExpandVolume", pb.ControllerExpandVolumeRequest(
                volume_id=name, capacity_range=pb.CapacityRange(
                    required_bytes=int(expansion["requiredBytes"]),
                    limit_bytes=int(expansion.get("limitBytes", 0)),
                ),
            ))  # fmt: skip
            capacity = expanded.capacity_bytes
        if spec.get("mutableParameters"):
            self._call("ControllerModifyVolume", pb.ControllerModifyVolumeRequest(
                volume_id=name, mutable_parameters=spec["mutableParameters"],
            ))  # fmt: skip
        return {"capacityBytes": capacity, "volumeContext": dict(volume.volume_context)}

    def _condition(self, name: str) -> dict[str, Any]:
        reply = self._call("ControllerGetVolume", pb.ControllerGetVolumeRequest(volume_id=name))
        condition = reply.status.volume_condition
        return {"abnormal": condition.abnormal, "message": condition.message}

    # snapshots

    def reconcile_snapshot(self, obj: Object, resync: bool) -> bool:
        name = obj["metadata"]["name"]
        finalizers = obj["metadata"].get("finalizers") or []
        if deleting(obj):
            if FINALIZER in finalizers:
                self._delete(SNAPSHOTS, obj, "DeleteSnapshot",
                             pb.DeleteSnapshotRequest(snapshot_id=name))  # fmt: skip
            return True
        if settled(obj) and status_of(obj).get("code") == OK:
            return False
        new: dict[str, Any] = {"observedGeneration": obj["metadata"]["generation"]}
        spec = obj["spec"]
        try:
            snapshot = self._call("CreateSnapshot", pb.CreateSnapshotRequest(
                name=spec["name"], source_volume_id=spec["sourceVolumeId"],
            )).snapshot  # fmt: skip
            if snapshot.snapshot_id != name:
                raise Failed("INTERNAL", f"the plugin named the snapshot {snapshot.snapshot_id}")
            if FINALIZER not in finalizers and not self._add_finalizer(SNAPSHOTS, obj):
                self._call("DeleteSnapshot", pb.DeleteSnapshotRequest(snapshot_id=name))
                return True
            new.update(
                ready=True, code=OK, message="", readyToUse=snapshot.ready_to_use,
                sizeBytes=snapshot.size_bytes,
                creationTime=snapshot.creation_time.ToNanoseconds() / 1e9,
            )  # fmt: skip
        except Failed as e:
            log.warning("%s: %s %s", name, e.code, e.message)
            new.update(code=e.code, message=e.message)
        self._write_status(SNAPSHOTS, obj, new)
        return True

    # shared

    def _delete(self, plural: str, obj: Object, method: str, request: Any) -> None:
        name = obj["metadata"]["name"]
        try:
            self._call(method, request)
        except Failed as e:
            if e.code != "NOT_FOUND":
                log.warning("%s: delete: %s %s", name, e.code, e.message)
                self._write_status(
                    plural, obj, {"deletion": {"code": e.code, "message": e.message}}
                )
                return
        finalizers = [f for f in obj["metadata"].get("finalizers") or [] if f != FINALIZER]
        self.resources.patch(plural, name, {
            "metadata": {"finalizers": finalizers or None,
                         "resourceVersion": obj["metadata"]["resourceVersion"]},
        })  # fmt: skip
        log.info("%s: deleted", name)

    def _add_finalizer(self, plural: str, obj: Object) -> bool:
        """False when the object is gone."""
        finalizers = [*(obj["metadata"].get("finalizers") or []), FINALIZER]
        return None is not self.resources.patch(
            plural, obj["metadata"]["name"], {"metadata": {"finalizers": finalizers}}
        )

    def _write_status(self, plural: str, obj: Object, new: dict[str, Any]) -> None:
        old = status_of(obj)
        if all(old.get(k) == v for k, v in new.items()):
            return
        self.resources.patch(plural, obj["metadata"]["name"], {"status": new}, status=True)

    def publish_capacity(self) -> None:
        """The node's free space, for GetCapacity (and so the scheduler), when it changed."""
        available = self._call("GetCapacity", pb.GetCapacityRequest()).available_capacity
        if available == self.published:
            return
        status = {"availableBytes": available}
        obj = {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "VduseNode",
            "metadata": {"name": self.node_id}, "status": status,
        }  # fmt: skip
        if self.resources.create(NODES, obj) is None:
            self.resources.patch(NODES, self.node_id, {"status": status})
        self.published = available

    # the loops

    def _loop(self, plural: str, reconcile: Callable[[Object, bool], bool]) -> None:
        """List (a full pass, failed objects retried), then watch until the resync is due."""
        while not self.stopping.is_set():
            try:
                objects, version = self.resources.list(plural, self.selector)
                for obj in objects:
                    self._guarded(reconcile, obj, True)
                self.published = None  # published again at each resync
                self._guarded(lambda _, __: self.publish_capacity(), {}, True)
                for kind, obj in self.resources.watch(
                    plural, self.selector, version, self.resync_seconds
                ):
                    if self.stopping.is_set():
                        return
                    if kind not in ("ADDED", "MODIFIED"):
                        continue
                    # The event's copy can be older than what this agent already wrote
                    # (its own finalizer patch, before the status): act on the object as
                    # it is now, or a volume lost since would look never created.
                    current = self.resources.get(plural, obj["metadata"]["name"])
                    if current is not None and self._guarded(reconcile, current, False):
                        self._guarded(lambda _, __: self.publish_capacity(), {}, False)
            except Gone:
                continue
            except Unavailable as e:
                log.warning("%s: %s; retrying", plural, e)
                self.stopping.wait(2)
            except Exception:
                log.exception("%s: the agent's pass failed; retrying", plural)
                self.stopping.wait(2)

    def _guarded(self, fn: Callable[[Object, bool], Any], obj: Object, resync: bool) -> bool:
        with self.lock:
            try:
                return bool(fn(obj, resync))
            except Failed as e:
                log.warning("%s: %s %s", obj.get("metadata", {}).get("name", self.node_id),
                            e.code, e.message)  # fmt: skip
                return False

    def run(self) -> None:
        threads = [
            threading.Thread(target=self._loop, args=(VOLUMES, self.reconcile_volume),
                             name="agent-volumes", daemon=True),
            threading.Thread(target=self._loop, args=(SNAPSHOTS, self.reconcile_snapshot),
                             name="agent-snapshots", daemon=True),
        ]  # fmt: skip
        for thread in threads:
            thread.start()
        log.info("agent for node %s watching %s", self.node_id, self.selector)
        self.stopping.wait()

    def stop(self) -> None:
        self.stopping.set()
