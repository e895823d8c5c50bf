"""An image in a Ceph pool, through librbd (rbd.c). The data plane reaches it from C with
librbd's asynchronous API; the control path here connects, creates, opens and resizes.
The key comes from a CSI secret and is never logged or shown in a repr."""

from __future__ import annotations

import binascii
import errno
import os
import time
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, SecretStr

from csi_vduse._native import ffi, lib
from csi_vduse.backends.base import SECTOR, Backend, BackendError

ERROR_BYTES = 256
# A process that died holding an image's exclusive lock keeps it until its watch on the
# image times out (30 s by default); librbd then breaks the lock and blocklists it.
LOCK_WAIT_S = 45.0
LOCK_HELD = (errno.EROFS, errno.EBUSY, errno.EAGAIN)


class RbdLockHeld(BackendError):
    """Another client writes the image."""


def available() -> bool:
    """Whether this build has librbd in it."""
    return bool(lib.dp_rbd_built())


def _bare_user(user: str) -> str:
    if not user or user.startswith("client."):
        raise ValueError(f"{user!r}: give the cephx user without 'client.'")
    return user


def check_key(key: SecretStr) -> SecretStr:
    """A cephx key as `ceph auth get-key` prints it: base64 of a key's encoding (type,
    creation time, length, secret). Checked before librados sees it, since librados prints
    a key it cannot decode; the error never holds any part of it."""
    try:
        raw = binascii.a2b_base64(key.get_secret_value().encode(), strict_mode=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raw = b""
    header = 2 + 8 + 2  # type, created (seconds, nanoseconds), secret's length
    if len(raw) <= header or int.from_bytes(raw[10:12], "little") != len(raw) - header:
        raise ValueError(
            "the key is not a cephx key: give the base64 key alone, as `ceph auth get-key` "
            "prints it, not a keyring line"
        )
    return key


class RbdAccess(BaseModel):
    """Where the pool is and who may use it: the monitors, a cephx user (without
    "client.") and its key, as a CSI secret holds them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    monitors: str
    user: Annotated[str, AfterValidator(_bare_user)]
    key: Annotated[SecretStr, AfterValidator(check_key)]
    pool: str


class RbdCluster:
    """A connection to one pool."""

    def __init__(self, access: RbdAccess) -> None:
        if not available():
            raise BackendError("this build of csi-vduse has no librbd (install librbd-dev)")
        self.access = access
        self.open_images = 0
        self._native = ffi.new("struct dp_rbd_cluster *")
        err = ffi.new("char[]", ERROR_BYTES)
        r = lib.dp_rbd_connect(
            self._native, access.monitors.encode(), access.user.encode(),
            access.key.get_secret_value().encode(), access.pool.encode(), err, ERROR_BYTES,
        )  # fmt: skip
        if r < 0:
            raise BackendError(f"ceph pool {access.pool}: {ffi.string(err).decode()}")

    def create(self, image: str, size: int) -> None:
        _check_size(size)
        r = lib.dp_rbd_create(self._native, image.encode(), size)
        if r < 0:
            raise BackendError(f"creating rbd image {self.access.pool}/{image}: "
                               f"{os.strerror(-r)}")  # fmt: skip

    def remove(self, image: str) -> bool:
        """Removes the image; False if there was none."""
        r = lib.dp_rbd_remove(self._native, image.encode())
        if r == -errno.ENOENT:
            return False
        if r == -errno.EBUSY:
            raise ImageBusy(f"rbd image {self.access.pool}/{image} is open (it has watchers)")
        if r == -errno.ENOTEMPTY:
            raise ImageHasSnapshots(f"rbd image {self.access.pool}/{image} has snapshots")
        if r < 0:
            raise BackendError(f"removing rbd image {self.access.pool}/{image}: "
                               f"{os.strerror(-r)}")  # fmt: skip
        return True

    def grow(self, image: str, size: int) -> int:
        """Grows the image to `size` (never shrinks it) and returns its size, even while a
        node holds its lock (librbd asks the owner to resize it)."""
        _check_size(size)
        now = ffi.new("uint64_t *", size)
        r = lib.dp_rbd_grow(self._native, image.encode(), now)
        if r < 0:
            raise BackendError(f"resizing rbd image {self.access.pool}/{image}: "
                               f"{os.strerror(-r)}")  # fmt: skip
        return int(now[0])

    def get_meta(self, image: str, key: str) -> str | None:
        """The image's metadata `key`; None when unset; NoSuchImage when there is no image."""
        return _get_meta(lambda *a: lib.dp_rbd_meta(self._native, image.encode(), *a), key,
                         f"{self.access.pool}/{image}")  # fmt: skip

    def set_meta(self, image: str, key: str, value: str) -> None:
        r = lib.dp_rbd_meta(self._native, image.encode(), key.encode(), value.encode(),
                            ffi.NULL, ffi.NULL)  # fmt: skip
        if r < 0:
            raise _meta_error(r, f"{self.access.pool}/{image}")

    def snap_create(self, image: str, snap: str) -> int:
        """Takes snapshot `snap` of the image (one of that name is kept) and returns the
        image's size at it."""
        size = ffi.new("uint64_t *")
        r = lib.dp_rbd_snap_create(self._native, image.encode(), snap.encode(), size)
        if r < 0:
            raise self._error(r, f"snapshotting rbd image {self.access.pool}/{image}")
        return int(size[0])

    def snap_remove(self, image: str, snap: str) -> None:
        """Removes the snapshot, if there is one (one clones still need goes to the image's
        trash namespace until they are gone)."""
        r = lib.dp_rbd_snap_remove(self._native, image.encode(), snap.encode())
        if r < 0:
            raise self._error(r, f"removing snapshot {snap} of rbd image "
                                 f"{self.access.pool}/{image}")  # fmt: skip

    def snap_names(self, image: str) -> list[str]:
        size = 4096
        while True:
            out, outlen = ffi.new("char[]", size), ffi.new("size_t *", size)
            r = lib.dp_rbd_snap_names(self._native, image.encode(), out, outlen)
            if r == -errno.ERANGE and outlen[0] > size:
                size = int(outlen[0])
                continue
            if r < 0:
                raise self._error(r, f"listing the snapshots of rbd image "
                                     f"{self.access.pool}/{image}")  # fmt: skip
            raw = bytes(ffi.buffer(out, outlen[0]))
            return [name.decode() for name in raw.split(b"\0") if name]

    def clone(self, parent: str, snap: str, child: str) -> None:
        r = lib.dp_rbd_clone(self._native, parent.encode(), snap.encode(), child.encode())
        if r < 0:
            raise self._error(r, f"cloning rbd image {self.access.pool}/{parent}@{snap} "
                                 f"into {child}")  # fmt: skip

    def parent(self, image: str | None = None, image_id: str | None = None,
               prefix: str = "") -> tuple[str, bool] | None:  # fmt: skip
        """(id, named with `prefix`) of the parent of the image named `image` or with id
        `image_id`; None when it has no parent (or is gone)."""
        out = ffi.new("char[]", ERROR_BYTES)
        ours = ffi.new("bool *")
        r = lib.dp_rbd_parent(
            self._native, image.encode() if image else ffi.NULL,
            image_id.encode() if image_id else ffi.NULL, prefix.encode(), out, ERROR_BYTES,
            ours,
        )  # fmt: skip
        if r == -errno.ENOENT:
            return None
        if r < 0:
            raise self._error(r, f"reading the parent of rbd image {image or image_id}")
        return ffi.string(out).decode(), bool(ours[0])

    def trash_move(self, image: str) -> str:
        """Moves the image to the pool's trash; returns its id, which names it there."""
        out = ffi.new("char[]", ERROR_BYTES)
        r = lib.dp_rbd_trash_move(self._native, image.encode(), out, ERROR_BYTES)
        if r < 0:
            raise self._error(r, f"moving rbd image {self.access.pool}/{image} to the trash")
        return str(ffi.string(out).decode())

    def trash_remove(self, image_id: str) -> bool:
        """Removes the image from the trash; False while it still has snapshots (or
        watchers) and is left there, or when it is not in the trash."""
        r = lib.dp_rbd_trash_remove(self._native, image_id.encode())
        if r in (-errno.ENOTEMPTY, -errno.EBUSY, -errno.ENOENT):
            return False
        if r < 0:
            raise self._error(r, f"removing image {image_id} from the trash of pool "
                                 f"{self.access.pool}")  # fmt: skip
        return True

    def get_pool_meta(self, key: str) -> str | None:
        return _get_meta(lambda *a: lib.dp_rbd_pool_meta(self._native, *a), key,
                         f"pool {self.access.pool}")  # fmt: skip

    def set_pool_meta(self, key: str, value: str) -> None:
        r = lib.dp_rbd_pool_meta(self._native, key.encode(), value.encode(), ffi.NULL, ffi.NULL)
        if r < 0:
            raise self._error(r, f"pool {self.access.pool} metadata")

    def remove_pool_meta(self, key: str) -> None:
        r = lib.dp_rbd_pool_meta(self._native, key.encode(), ffi.NULL, ffi.NULL, ffi.NULL)
        if r < 0 and r != -errno.ENOENT:
            raise self._error(r, f"pool {self.access.pool} metadata")

    @staticmethod
    def _error(r: int, what: str) -> BackendError:
        if r == -errno.ENOENT:
            return NoSuchImage(f"{what}: no such image")
        if r == -errno.EBUSY:
            return ImageBusy(f"{what}: {os.strerror(-r)}")
        return BackendError(f"{what}: {os.strerror(-r)}")

    def native(self) -> Any:
        return self._native

    def close(self) -> None:
        if self.open_images:
            raise BackendError(f"{self.open_images} rbd image(s) still open on this connection")
        if self._native is not None:
            lib.dp_rbd_disconnect(self._native)
            self._native = None

    def __enter__(self) -> RbdCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RbdBackend(Backend):
    def __init__(
        self, cluster: RbdCluster, image: str, native: Any, readonly: bool, owns_cluster: bool
    ) -> None:
        self.cluster = cluster
        self.image = image
        self._native = native
        self.size = int(native.size)
        self.readonly = readonly
        self._owns_cluster = owns_cluster

    @classmethod
    def open(
        cls, cluster: RbdCluster, image: str, readonly: bool = False, owns_cluster: bool = False,
        lock_wait: float = LOCK_WAIT_S,
    ) -> RbdBackend:  # fmt: skip
        """Opens the image; a writer holds its exclusive lock until close, so a second
        writer (another node) fails here with RbdLockHeld, after waiting up to `lock_wait`
        seconds for a dead owner's lock to lapse. With `owns_cluster`, close disconnects
        too."""
        native = ffi.new("struct dp_rbd *")
        err = ffi.new("char[]", ERROR_BYTES)
        deadline = time.monotonic() + lock_wait
        while True:
            r = lib.dp_rbd_open(
                cluster.native(), native, image.encode(), readonly, err, ERROR_BYTES
            )
            if r >= 0:
                break
            message = f"rbd image {cluster.access.pool}/{image}: {ffi.string(err).decode()}"
            if -r not in LOCK_HELD:
                raise BackendError(message)
            if time.monotonic() >= deadline:
                raise RbdLockHeld(message)
            time.sleep(1.0)
        cluster.open_images += 1
        return cls(cluster, image, native, readonly, owns_cluster)

    @property
    def async_unavailable(self) -> str | None:
        return None

    def native_ops(self) -> tuple[Any, Any]:
        return ffi.addressof(lib.dp_rbd_ops), self._native

    def flush(self) -> None:
        if self._native is None:
            raise BackendError(f"rbd image {self.image} is closed")
        r = lib.dp_rbd_ops.flush(self._native)
        if r < 0:
            raise BackendError(f"flushing rbd image {self.image}: {os.strerror(-r)}")

    def grow(self, size: int) -> None:
        _check_size(size)
        if size < self.size:
            raise BackendError(f"refusing to shrink rbd image {self.image} from {self.size} "
                               f"to {size}")  # fmt: skip
        r = lib.dp_rbd_resize(self._native, size)
        if r < 0:
            raise BackendError(f"resizing rbd image {self.image}: {os.strerror(-r)}")
        self.size = size

    def get_meta(self, key: str) -> str | None:
        return _get_meta(lambda *a: lib.dp_rbd_image_meta(self._native, *a), key, self.image)

    def set_meta(self, key: str, value: str) -> None:
        """Sets metadata through this open image (a writer holds the lock: nobody else
        could set it now)."""
        r = lib.dp_rbd_image_meta(self._native, key.encode(), value.encode(), ffi.NULL,
                                  ffi.NULL)  # fmt: skip
        if r < 0:
            raise _meta_error(r, self.image)

    def close(self) -> None:
        if self._native is not None:
            lib.dp_rbd_close(self._native)
            self._native = None
            self.cluster.open_images -= 1
        if self._owns_cluster:
            self.cluster.close()


def _check_size(size: int) -> None:
    if size <= 0 or size % SECTOR:
        raise BackendError(f"size {size} is not a positive multiple of {SECTOR} bytes")


class NoSuchImage(BackendError):
    pass


class ImageBusy(BackendError):
    """A client has the image open."""


class ImageHasSnapshots(BackendError):
    """The image has snapshots (perhaps only trashed ones that clones need)."""


def _meta_error(r: int, where: str) -> BackendError:
    if r == -errno.ENOENT:
        return NoSuchImage(f"rbd image {where} does not exist")
    return BackendError(f"rbd image {where} metadata: {os.strerror(-r)}")


def _get_meta(call: Callable[[Any, Any, Any, Any], int], key: str, where: str) -> str | None:
    """call(key, value, out, outlen) as dp_rbd_meta takes them, with a buffer that grows
    until the value fits."""
    size = 4096
    while True:
        out, outlen = ffi.new("char[]", size), ffi.new("size_t *", size)
        r = call(key.encode(), ffi.NULL, out, outlen)
        if r == -errno.ERANGE and outlen[0] > size:
            size = int(outlen[0])
            continue
        if r == -errno.ENODATA:
            return None
        if r < 0:
            raise _meta_error(r, where)
        return str(ffi.string(out, outlen[0]).decode())
