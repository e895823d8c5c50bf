"""Benchmarks: csi-vduse against qemu-storage-daemon's vduse-blk export and a loop device."""
