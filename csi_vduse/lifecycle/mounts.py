"""Mounts, file systems and openers of block devices, through the util-linux tools."""

from __future__ import annotations

import os
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_FS = ("ext4", "xfs")
DEFAULT_FS = "ext4"
# Never forced (-F, -f): on anything that looks like data the tools refuse as well.
MKFS = {
    "ext4": ["mkfs.ext4", "-q", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1"],
    "xfs": ["mkfs.xfs", "-q", "-K"],
}
LOOP_SYSFS = Path("/sys/block")


class MountError(RuntimeError):
    pass


@dataclass(frozen=True)
class MountEntry:
    major_minor: str
    root: str
    target: str
    options: str
    fs_type: str
    source: str


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape") if "\\" in field else field


def mounts() -> list[MountEntry]:
    entries = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            entries.append(MountEntry(
                fields[2], _unescape(fields[3]), _unescape(fields[4]), fields[5],
                tail[0], _unescape(tail[1]) if len(tail) > 1 else "",
            ))  # fmt: skip
    return entries


def mount_at(target: Path) -> MountEntry | None:
    real = os.path.realpath(target)
    found = None
    for entry in mounts():
        if entry.target == real:
            found = entry  # the last one is on top
    return found


def device_number(device: Path) -> str:
    st = os.stat(device)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise MountError(
            f"{' '.join(argv[:2])} failed: {detail[-1] if detail else result.returncode}"
        )
    return result


@dataclass(frozen=True)
class Signature:
    """What blkid found on a device: a file system, a partition table, RAID, LVM..."""

    usage: str  # filesystem, partition table, raid, crypto, other
    type: str

    @property
    def mountable(self) -> bool:
        return self.usage == "filesystem" and self.type in SUPPORTED_FS


def _check_readable(device: Path) -> None:
    """blkid also says "nothing found" when it could not look: make sure it could."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.pread(fd, 1 << 20, 0)
        finally:
            os.close(fd)
    except OSError as e:
        raise MountError(f"cannot read {device} to look for data on it: {e}") from None


def probe(device: Path) -> Signature | None:
    """The signature on `device`, or None when blkid finds none at all. Any other outcome
    (an unreadable device, several signatures) is an error or data, never "empty":
    formatting on a guess loses data."""
    result = subprocess.run(
        ["blkid", "-p", "-o", "export", str(device)],
        capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if result.returncode == 2:
        _check_readable(device)
        return None
    if result.returncode == 8:
        return Signature("ambivalent", "several signatures")
    if result.returncode != 0:
        reason = result.stderr.strip() or f"exit {result.returncode}"
        raise MountError(f"blkid could not read {device}: {reason}")
    tags = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    if tags.get("TYPE"):
        return Signature(tags.get("USAGE", "other"), tags["TYPE"])
    if tags.get("PTTYPE"):
        return Signature("partition table", tags["PTTYPE"])
    return Signature("other", ", ".join(f"{k}={v}" for k, v in tags.items()) or "unknown")


def mkfs(device: Path, fs_type: str) -> None:
    _run([*MKFS[fs_type], str(device)])


def mount(source: Path, target: Path, fs_type: str | None, options: list[str]) -> None:
    argv = ["mount"]
    if fs_type:
        argv += ["-t", fs_type]
    if options:
        argv += ["-o", ",".join(options)]
    _run([*argv, str(source), str(target)])


def readonly_view(device: Path) -> Path:
    """A read-only loop device over `device`: a bind mount cannot make a device node
    read-only (MNT_READONLY does not apply to device special files), the loop can."""
    argv = ["losetup", "--find", "--show", "--read-only", str(device)]
    try:
        result = _run([*argv[:-1], "--direct-io=on", argv[-1]])
    except MountError:
        result = _run(argv)
    return Path(result.stdout.strip())


def loop_backing(loop_name: str) -> str | None:
    try:
        return (LOOP_SYSFS / loop_name / "loop" / "backing_file").read_text().strip()
    except OSError:
        return None


def loops_over(device: Path) -> list[str]:
    real = os.path.realpath(device)
    return sorted(p.name for p in LOOP_SYSFS.glob("loop*") if loop_backing(p.name) == real)


def detach_loop(loop_name: str) -> None:
    _run(["losetup", "--detach", f"/dev/{loop_name}"])


def bind_mount(source: Path, target: Path, readonly: bool) -> None:
    _run(["mount", "--bind", str(source), str(target)])
    if readonly:
        _run(["mount", "-o", "remount,bind,ro", str(target)])


def umount(target: Path) -> None:
    _run(["umount", str(target)])


def grow_fs(device: Path, mountpoint: Path, fs_type: str) -> None:
    if fs_type == "xfs":
        _run(["xfs_growfs", str(mountpoint)])
    else:
        _run(["resize2fs", str(device)])


def openers(device: Path) -> list[str]:
    """Processes holding `device` open, by whatever path (a node in a container's volume
    names the same device). Needs the host PID namespace to see them all."""
    want = os.stat(device)
    kind = stat.S_IFMT(want.st_mode)
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                try:  # sockets, pipes and anonymous inodes have no path: never a device
                    st = os.stat(fd) if os.readlink(fd).startswith("/") else None
                except OSError:
                    continue
                if st is None:
                    continue
                if st.st_rdev == want.st_rdev and stat.S_IFMT(st.st_mode) == kind:
                    comm = (proc / "comm").read_text().strip()
                    found.append(f"{comm} (pid {proc.name})")
                    break
        except OSError:
            continue
    return found


def users(device: Path, ignore_targets: frozenset[str] = frozenset()) -> list[str]:
    """Why `device` must not go away: mounts (other than `ignore_targets`), the device node
    bind-mounted somewhere (a published block volume), holders, openers."""
    reasons: list[str] = []
    if not device.exists():
        return reasons
    number = device_number(device)
    for entry in mounts():
        if entry.target in ignore_targets:
            continue
        if entry.major_minor == number:
            reasons.append(f"mounted at {entry.target}")
        elif entry.fs_type == "devtmpfs" and entry.root == f"/{device.name}":
            reasons.append(f"bind-mounted at {entry.target}")
    holders = Path("/sys/class/block") / device.name / "holders"
    reasons += [f"held by {h.name}" for h in holders.glob("*")]
    reasons += [f"backs /dev/{loop}" for loop in loops_over(device)]
    reasons += [f"open by {who}" for who in openers(device)]
    return reasons
