"""`csi-vduse export`: serve a file or an RBD image as a VDUSE block device in the
foreground."""

from __future__ import annotations

import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    model_validator,
)

from csi_vduse.backends import Backend
from csi_vduse.backends import rbd as rbd_backend
from csi_vduse.backends.file import FileBackend
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


RBD_PREFIX = "rbd:"
RBD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


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
    cache: Literal["page", "direct"] = "page"
    ceph_monitors: str | None = None
    ceph_user: str | None = None
    ceph_keyfile: Path | None = None

    @property
    def rbd_image(self) -> tuple[str, str] | None:
        """(pool, image) when the backing is rbd:POOL/IMAGE."""
        text = str(self.file)
        if not text.startswith(RBD_PREFIX):
            return None
        pool, _, image = text.removeprefix(RBD_PREFIX).partition("/")
        return pool, image

    @model_validator(mode="after")
    def _rbd_options(self) -> ExportOptions:
        ceph = (self.ceph_monitors, self.ceph_user, self.ceph_keyfile)
        target = self.rbd_image
        if target is None:
            if any(v is not None for v in ceph):
                raise ValueError("--ceph-* options are for an rbd:POOL/IMAGE backing only")
            return self
        if self.cache != "page":
            raise ValueError("--cache is for a file backing (librbd keeps its own cache)")
        if not all(RBD_NAME.fullmatch(part) for part in target):
            raise ValueError(f"{self.file} is not rbd:POOL/IMAGE")
        if self.ceph_monitors is None or self.ceph_keyfile is None:
            raise ValueError("an rbd backing needs --ceph-monitors and --ceph-keyfile")
        if self.size is not None:
            raise ValueError("an rbd image is not created here: create it with `rbd create`")
        if self.ceph_user is not None and (
            self.ceph_user.startswith("client.") or not RBD_NAME.fullmatch(self.ceph_user)
        ):
            raise ValueError(f"--ceph-user {self.ceph_user!r}: the user without 'client.'")
        return self


def read_key(path: Path, user: str | None = None) -> SecretStr:
    """A bare key, or from a keyring file the key of `[client.USER]` (of the first
    section without a user)."""
    text = path.read_text()
    section: str | None = None
    keys: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
            continue
        name, sep, value = line.partition("=")
        if sep and name.strip() == "key" and section is not None:
            keys.setdefault(section, value.strip())
    if not keys:
        return SecretStr(text.strip())
    if user is None:
        return SecretStr(next(iter(keys.values())))
    if f"client.{user}" not in keys:
        raise ValueError(f"{path} holds no key for client.{user}")
    return SecretStr(keys[f"client.{user}"])


def open_backend(opts: ExportOptions) -> Backend:
    target = opts.rbd_image
    if target is None:
        return FileBackend.open(opts.file, opts.size, opts.readonly, direct=opts.cache == "direct")
    assert opts.ceph_monitors is not None and opts.ceph_keyfile is not None
    access = rbd_backend.RbdAccess(
        monitors=opts.ceph_monitors, user=opts.ceph_user or "admin",
        key=read_key(opts.ceph_keyfile, opts.ceph_user or "admin"), pool=target[0],
    )  # fmt: skip
    cluster = rbd_backend.RbdCluster(access)
    try:
        return rbd_backend.RbdBackend.open(cluster, target[1], opts.readonly, owns_cluster=True)
    except BaseException:
        cluster.close()
        raise


def run_export(opts: ExportOptions) -> int:
    backend = open_backend(opts)
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
