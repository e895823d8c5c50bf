#!/bin/sh
# PID 1 of the lab guest. The root file system is the host's, read-only over 9p;
# everything writable is tmpfs or the scratch disk. Parameters come from the share.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH

mount -t proc proc /proc
mount -t sysfs sysfs /sys
# cgroup v2 and a shared / (as systemd leaves them) for container runtimes and kubelet
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount --make-rshared /
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/lab /run/keep
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 labshare /run/lab
. /run/lab/env.sh

# A modular kernel (Debian's) comes with LAB_MODULES, its unpacked lib/modules tree seen
# through the 9p root: bind it at /lib/modules and load LAB_LOAD_MODULES, what the tests
# and container runtimes use (modprobe passes over built-in ones).
if [ -n "$LAB_MODULES" ]; then
    mount --bind "$LAB_MODULES" /lib/modules
    modprobe -a $LAB_LOAD_MODULES || echo "lab: cannot load all of: $LAB_LOAD_MODULES" >&2
fi

# Paths under /tmp that must stay visible (a checkout or venv living there)
# are bind-mounted back after /tmp becomes a tmpfs.
i=0
for p in $LAB_KEEP; do
    mkdir -p /run/keep/$i && mount --bind "$p" /run/keep/$i
    i=$((i + 1))
done
mount -t tmpfs -o mode=1777 tmpfs /tmp
i=0
for p in $LAB_KEEP; do
    mkdir -p "$p" && mount --bind /run/keep/$i "$p"
    i=$((i + 1))
done

ip link set lo up 2>/dev/null
mkdir -p /run/scratch
i=0
while [ ! -b /dev/sda ] && [ $i -lt 50 ]; do  # a scsi scan after loading its modules
    sleep 0.1
    i=$((i + 1))
done
if [ -b /dev/sda ]; then
    mount -o discard /dev/sda /run/scratch
fi

cd "$LAB_CWD" || cd /
/bin/sh /run/lab/command.sh > /run/lab/output.log 2>&1 < /dev/null
echo $? > /run/lab/rc
sync
umount /run/scratch 2>/dev/null
umount /run/lab 2>/dev/null
echo o > /proc/sysrq-trigger
sleep 30
