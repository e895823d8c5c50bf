"""`csi-vduse export`: serve a file as a VDUSE block device in the foreground."""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from csi_vduse.backends import FileBackend
from csi_vduse.dataplane.blk_device import MAX_QUEUE_SIZE, MAX_QUEUES, MIN_QUEUE_SIZE, BlkParams
from csi_vduse.kernel import sysfs
from csi_vduse.lifecycle.attachment import Attachment, DeviceBusy
from csi_vduse.lifecycle.names import check_device_name
from csi_vduse.units import parse_size


def _power_of_two(n: int) -> int:
    if n & (n - 1):
        raise ValueError(f"{n} is not a power of two")
    return n


def _positive_size(n: int | None) -> int | None:
    if n is not None and n <= 0:
        raise ValueError("size must be greater than zero")
    return n


class ExportOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    file: Path
    name: Annotated[str, AfterValidator(check_device_name)]
    size: Annotated[
        int | None, BeforeValidator(lambda v: v if v is None else parse_size(v)),
        AfterValidator(_positive_size),
    ] = None  # fmt: skip
    queues: Annotated[int, Field(ge=1, le=MAX_QUEUES)] = 1
    queue_size: Annotated[
        int, Field(ge=MIN_QUEUE_SIZE, le=MAX_QUEUE_SIZE), AfterValidator(_power_of_two)
    ] = 256
    readonly: bool = False
    attach: Literal["virtio-vdpa", "vhost-vdpa"] = "virtio-vdpa"


def run_export(opts: ExportOptions) -> int:
    backend = FileBackend.open(opts.file, opts.size, opts.readonly)
    params = BlkParams(
        capacity=backend.size, queues=opts.queues, queue_size=opts.queue_size,
        readonly=opts.readonly, serial=opts.name,
    )  # fmt: skip
    attachment = Attachment(opts.name, backend, params, sysfs.ATTACH_DRIVERS[opts.attach])
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        path = attachment.start()
    except BaseException:
        backend.close()
        backend.discard_created()
        raise
    try:
        print(path, flush=True)
        _serve_until(stop, attachment, opts)
    finally:
        attachment.stop(force=True)
        backend.close()
    return 0


def _serve_until(stop: threading.Event, attachment: Attachment, opts: ExportOptions) -> None:
    """Serves until a signal; a vhost-vdpa device stays until its VMM closes it (removing
    it earlier would wait in the kernel for the VMM anyway, with nobody serving it)."""
    waiting = False
    while True:
        server = attachment.server
        if server is not None and server.broken:
            print(f"csi-vduse: device {opts.name} broke; stopping", file=sys.stderr)
            return
        if stop.is_set():
            if opts.attach != "vhost-vdpa":
                return
            try:
                attachment.stop()
                return
            except DeviceBusy as e:
                if not waiting:
                    print(f"csi-vduse: {e}; serving until it is closed", file=sys.stderr)
                waiting = True
            time.sleep(0.5)
        else:
            stop.wait(0.5)
