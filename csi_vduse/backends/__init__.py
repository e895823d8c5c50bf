"""Where a volume's bytes live: each backend in its own folder fills the interface of
api.py and is named once, in registry.py. Every backend hands the data plane a C ops
table (base.py)."""

from csi_vduse.backends.base import Backend, BackendError

__all__ = ["Backend", "BackendError"]
