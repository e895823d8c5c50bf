#!/bin/busybox sh
# /init of the Debian kernel's initramfs: load the modules of the 9p root and the scratch
# disk, mount the host's root read-only as the 6.1 kernel does itself, and hand over to the
# lab's init (init= on the command line).
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
for m in /modules/*.ko; do
    insmod "$m" || echo "initramfs: cannot load $m"
done
tag=rootfs flags=trans=virtio init=/sbin/init
for arg in $(cat /proc/cmdline); do
    case $arg in
        root=*) tag=${arg#root=} ;;
        rootflags=*) flags=${arg#rootflags=} ;;
        init=*) init=${arg#init=} ;;
    esac
done
umount /proc
mount -t 9p -o "ro,$flags" "$tag" /newroot || exit 1
exec switch_root /newroot "$init"
