"""The custom resources the cluster controller writes and the node agents reconcile.

A VduseVolume or VduseSnapshot is named by its CSI id and labelled with its node. The
controller writes `spec`; only the agent of `spec.node` writes `status`, with the gRPC code
of what it last did for `status.observedGeneration` (an RBD volume's object has an empty
node: no agent's, so the controller writes it). A VduseNode holds a node's free space.
"""

from __future__ import annotations

from typing import Any

import grpc

from csi_vduse import errors

GROUP = "vduse.csi.dev"
VERSION = "v1alpha1"
NODE_LABEL = f"{GROUP}/node"
FINALIZER = f"{GROUP}/agent"
VOLUMES = "vdusevolumes"
SNAPSHOTS = "vdusesnapshots"
NODES = "vdusenodes"
OK = "OK"

_ERRORS: dict[str, type[errors.DriverError]] = {
    "INVALID_ARGUMENT": errors.InvalidArgument,
    "NOT_FOUND": errors.NotFound,
    "ALREADY_EXISTS": errors.AlreadyExists,
    "FAILED_PRECONDITION": errors.FailedPrecondition,
    "OUT_OF_RANGE": errors.OutOfRange,
    "RESOURCE_EXHAUSTED": errors.ResourceExhausted,
    "ABORTED": errors.Aborted,
    "UNAVAILABLE": errors.Unavailable,
}


class AgentError(errors.DriverError):
    """A failure the agent reported with a code outside the driver's own errors."""


def raise_reported(code: str, message: str, where: str) -> None:
    """Re-raise, with its own code, a failure an agent reported in a status."""
    if code == OK:
        return
    kind = _ERRORS.get(code)
    if kind is None:
        raise AgentError(f"{code}: {message} (node {where})")
    raise kind(f"{message} (node {where})")


def code_name(code: grpc.StatusCode) -> str:
    return str(code.name)


def body(kind: str, name: str, node: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": kind,
        "metadata": {"name": name, "labels": {NODE_LABEL: node}},
        "spec": spec,
    }


def node_of(obj: dict[str, Any]) -> str:
    return str(obj["spec"]["node"])


def status_of(obj: dict[str, Any]) -> dict[str, Any]:
    status = obj.get("status") or {}
    return dict(status)


def settled(obj: dict[str, Any]) -> bool:
    """The agent has answered the object's current spec."""
    status = status_of(obj)
    return bool(status.get("code")) and status.get("observedGeneration") == obj["metadata"].get(
        "generation"
    )


def deleting(obj: dict[str, Any]) -> bool:
    return bool(obj["metadata"].get("deletionTimestamp"))
