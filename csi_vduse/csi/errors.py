"""Every exception of the driver's layers becomes a gRPC status here, and only here."""

from __future__ import annotations

import errno
import functools
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from pydantic import ValidationError

from csi_vduse import errors
from csi_vduse.backends import BackendError
from csi_vduse.lifecycle.attachment import AttachError, DeviceBusy
from csi_vduse.lifecycle.mounts import MountError
from csi_vduse.state.records import UnreadableRecord
from csi_vduse.state.volumes import InvalidId

log = logging.getLogger("csi_vduse.rpc")
Code = grpc.StatusCode

_CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (errors.InvalidArgument, Code.INVALID_ARGUMENT),
    (InvalidId, Code.INVALID_ARGUMENT),
    (ValidationError, Code.INVALID_ARGUMENT),
    (errors.NotFound, Code.NOT_FOUND),
    (errors.AlreadyExists, Code.ALREADY_EXISTS),
    (errors.FailedPrecondition, Code.FAILED_PRECONDITION),
    (DeviceBusy, Code.FAILED_PRECONDITION),
    (BackendError, Code.FAILED_PRECONDITION),
    (UnreadableRecord, Code.FAILED_PRECONDITION),
    (errors.OutOfRange, Code.OUT_OF_RANGE),
    (errors.ResourceExhausted, Code.RESOURCE_EXHAUSTED),
    (errors.Aborted, Code.ABORTED),
    (errors.Unavailable, Code.UNAVAILABLE),
    (AttachError, Code.UNAVAILABLE),
    (MountError, Code.INTERNAL),
]


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code, str(exc)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return Code.RESOURCE_EXHAUSTED, f"out of space: {exc}"
    return Code.INTERNAL, f"{type(exc).__name__}: {exc}"


F = TypeVar("F", bound=Callable[..., Any])


def rpc(fn: F) -> F:
    """Runs one CSI call: logs it and turns any exception into its gRPC status."""

    @functools.wraps(fn)
    def call(self: object, request: Any, context: grpc.ServicerContext) -> Any:
        start = time.monotonic()
        volume_id = getattr(request, "volume_id", "") or getattr(request, "name", "")
        try:
            response = fn(self, request, context)
        except Exception as exc:
            code, message = status_for(exc)
            level = logging.ERROR if code == Code.INTERNAL else logging.WARNING
            log.log(level, "%s failed", fn.__name__, exc_info=code == Code.INTERNAL,
                    extra={"rpc": fn.__name__, "volume": volume_id, "code": code.name,
                           "error": message})  # fmt: skip
            context.abort(code, message)
        log.info("%s ok", fn.__name__, extra={
            "rpc": fn.__name__, "volume": volume_id,
            "ms": round((time.monotonic() - start) * 1000, 1),
        })  # fmt: skip
        return response

    return call  # type: ignore[return-value]
