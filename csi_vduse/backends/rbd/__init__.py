"""The RBD backend: a volume is an image in a Ceph pool that any node reaches."""

from csi_vduse.backends.rbd.cluster import (
    ImageBusy,
    ImageHasSnapshots,
    NoSuchImage,
    RbdAccess,
    RbdBackend,
    RbdCluster,
    RbdLockHeld,
    available,
)

__all__ = [
    "ImageBusy", "ImageHasSnapshots", "NoSuchImage", "RbdAccess", "RbdBackend", "RbdCluster",
    "RbdLockHeld", "available",
]  # fmt: skip
