"""The VDUSE lab: a QEMU guest booting a VDUSE-enabled kernel over the host's root."""
