"""The file backend: a volume is an image file in the node's data dir."""

from csi_vduse.backends.file.image import FileBackend, uring_error

__all__ = ["FileBackend", "uring_error"]
