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
# The disks by SCSI target (the scratch disk is target 0, the runner's Disks 1, 2, ...): sd
# names follow the order the scan found them in, which is not the targets' order, so the
# runner's disks get fixed names, /dev/lab-disk1 and on.
disk_of_target() {
    for block in /sys/bus/scsi/devices/*:0:"$1":0/block/*; do
        [ -e "$block" ] && echo "/dev/${block##*/}" && return 0
    done
    return 1
}
i=0
target=0
for name in scratch $LAB_DISKS; do
    disk=""
    while ! disk=$(disk_of_target $target) && [ $i -lt 100 ]; do  # the scan is asynchronous
        sleep 0.1
        i=$((i + 1))
    done
    if [ -z "$disk" ]; then
        echo "lab: no disk at SCSI target $target (for $name)"
    elif [ $target -eq 0 ]; then
        mount -o discard "$disk" /run/scratch
    else
        ln -sf "$disk" "$name"
    fi
    target=$((target + 1))
done

# What a command still running at its deadline was doing: every process and what it waits on
# in the kernel, the kernel's last lines, and the ends of the logs written in the last 30
# minutes (the plugin's, the cluster's components'). Then the command is stopped.
overrun() {
    echo "lab: still running at the deadline of ${LAB_DEADLINE} s; the processes (not the kernel's):"
    ps -N --ppid 2 -p 2 -o pid,ppid,etimes,stat,wchan:28,args --sort=start_time | cut -c1-300
    echo "lab: the kernel's last lines:"
    dmesg | tail -n 40
    find /run /tmp -path /run/lab -prune -o -type f -name '*.log' -mmin -30 \
            -printf '%T@ %p\n' 2>/dev/null | sort -rn | head -n 30 | cut -d' ' -f2- |
        while read -r log; do
            echo "lab: the last lines of $log:"
            tail -n 30 "$log" | cut -c1-400
        done
}

cd "$LAB_CWD" || cd /
# A session of its own, so that the deadline stops every process the command started.
setsid /bin/sh /run/lab/command.sh >> /run/lab/output.log 2>&1 < /dev/null &
command=$!
if [ -n "$LAB_DEADLINE" ]; then
    (
        sleep "$LAB_DEADLINE"
        kill -0 "$command" 2>/dev/null || exit 0
        touch /run/lab/overrun
        overrun >> /run/lab/output.log 2>&1
        /usr/bin/kill -s TERM -- "-$command"
        sleep 20
        /usr/bin/kill -s KILL -- "-$command" 2>/dev/null
    ) &
fi
wait "$command"
rc=$?
[ -e /run/lab/overrun ] && rc=124
echo $rc > /run/lab/rc
sync
umount /run/scratch 2>/dev/null
umount /run/lab 2>/dev/null
echo o > /proc/sysrq-trigger
sleep 30
