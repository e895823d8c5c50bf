"""Where a volume's bytes live. Every backend hands the data plane a C ops table."""

from csi_vduse.backends.base import Backend, BackendError
from csi_vduse.backends.file import FileBackend

__all__ = ["Backend", "BackendError", "FileBackend"]
