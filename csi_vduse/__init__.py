"""csi-vduse: a CSI driver serving volumes as VDUSE virtio-blk devices."""

__version__ = "0.1.0"
