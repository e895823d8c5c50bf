"""Boot the lab guest, run one shell command inside as root, return its exit code and output.

Usage: python -m tests.lab.runner [--timeout S] [--memory MiB] [--kernel KIND] -- COMMAND...
"""

from __future__ import annotations

import argparse
import compileall
import ctypes
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests import apt
from tests.lab.kernel import (
    KINDS,
    REPO,
    LabKernel,
    cache_dir,
    ensure_backports_source,
    guest_kernel,
    lab_kernel,
    os_release,
)

GUEST_INIT = Path(__file__).resolve().parent / "guest-init.sh"
GUEST_PACKAGES = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-storage-daemon": "qemu-system-common",
    "mkfs.ext4": "e2fsprogs",
    "mkfs.xfs": "xfsprogs",
    "fio": "fio",
    "vdpa": "iproute2",
    "blkid": "util-linux",
    "modprobe": "kmod",
}
# QEMU 10 (bookworm-backports) runs the e2e suite faster than bookworm's 7.2 under TCG.
QEMU_MAJOR = 10
QEMU_PACKAGES = [
    "qemu-system-x86", "qemu-system-common", "qemu-system-data", "qemu-utils", "qemu-block-extra",
]  # fmt: skip
VOLATILE_ROOTS = ("/tmp", "/run")
ROOT_SHARE_OPTS = "security_model=none,readonly=on,multidevs=remap"


@dataclass(frozen=True)
class Disk:
    """A raw disk image the guest sees as disk_path(1), disk_path(2), ... in order. One not
    `writable` is attached with QEMU's snapshot=on: the guest may write, the file stays."""

    image: Path
    writable: bool = False


def disk_path(number: int) -> str:
    """In the guest, the `number`th of run()'s disks (from 1)."""
    return f"/dev/lab-disk{number}"


@dataclass
class LabResult:
    returncode: int
    output: str
    console: str


def ensure_host_tools() -> None:
    """Install the Debian packages the lab and the tests inside it need, if missing, and on
    Debian QEMU 10 from backports unless CSI_VDUSE_LAB_QEMU is set: to `system` (keep the
    installed QEMU) or to the path of a qemu-system-x86_64 to run instead."""
    missing = sorted({pkg for tool, pkg in GUEST_PACKAGES.items() if not _which(tool)})
    keep = bool(os.environ.get("CSI_VDUSE_LAB_QEMU")) or os_release().get("ID") != "debian"
    qemu = [] if keep or _qemu_major() >= QEMU_MAJOR else QEMU_PACKAGES
    if not missing and not qemu:
        return
    suite = ensure_backports_source() if qemu else ""
    missing = [m for m in missing if m not in qemu]
    print(f"lab: installing {' '.join(missing + qemu)}", flush=True)
    if missing:
        apt.install(missing)
    if qemu:  # all of them from one suite: QEMU aborts on modules of another build
        apt.install(qemu, suite=suite)


def compile_bytecode() -> None:
    """The guest's root is read-only, so Python there cannot keep what it compiles, and every
    process compiling the project's modules again under emulation costs seconds: compiled
    here, where a run that changed nothing costs a few stat calls."""
    for package in ("csi_vduse", "tests", "bench"):
        compileall.compile_dir(REPO / package, quiet=1)


def _qemu_major() -> int:
    qemu = _which("qemu-system-x86_64")
    out = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout if qemu else ""
    found = re.search(r"version (\d+)\.", out)
    return int(found.group(1)) if found else 0


def _which(tool: str) -> str | None:
    return shutil.which(tool, path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")


def _keep_paths(paths: list[str]) -> list[str]:
    """Host paths under the guest's tmpfs mounts that must stay visible inside."""
    keep = []
    for p in paths:
        real = os.path.realpath(p)
        if any(real == r or real.startswith(r + "/") for r in VOLATILE_ROOTS):
            keep.append(real)
    return sorted(set(keep))


def guest_deadline(timeout: float) -> int:
    """When the guest stops its command itself, saying what was still running (guest-init.sh):
    early enough to say it and power off before the runner's own timeout kills QEMU."""
    return int(max(timeout - 150, timeout * 0.8))


def _env_script(cwd: str, extra_env: dict[str, str], lab: LabKernel, deadline: int) -> str:
    python_dir = str(Path(sys.executable).parent)
    path = f"{python_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    keep = _keep_paths([str(REPO), cwd, sys.prefix, sys.base_prefix, python_dir])
    env = {
        "PATH": path,
        "HOME": "/root",
        "TMPDIR": "/tmp",
        "LAB_CWD": cwd,
        "LAB_KEEP": " ".join(keep),
        "LAB_SCRATCH": "/run/scratch",
        "LAB_MODULES": str(lab.modules or ""),
        "LAB_LOAD_MODULES": " ".join(lab.load),
        "CSI_VDUSE_IN_LAB": "1",
        "CSI_VDUSE_GUEST_KERNEL": str(guest_kernel()),  # the VM tests' nested guest
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "LAB_DEADLINE": str(deadline),
        **extra_env,
    }
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())


def run(
    command: str,
    *,
    timeout: float = 1800,
    memory_mib: int = 4096,
    scratch_gib: int = 16,
    scratch_cache: str = "unsafe",
    cwd: str | None = None,
    extra_env: dict[str, str] | None = None,
    stream: bool = True,
    kernel: str | None = None,
    disks: Sequence[Disk] = (),
) -> LabResult:
    """Run `command` (a shell command line) in a fresh lab guest booting the kernel of kind
    `kernel` (see tests.lab.kernel.lab_kernel). `scratch_cache` is QEMU's cache mode of the
    scratch disk: "none" keeps the host's page cache out of the guest's reads. The scratch
    disk is SCSI target 0, `disks` follow it (in the guest at disk_path(1), ...)."""
    ensure_host_tools()
    compile_bytecode()
    lab = lab_kernel(kernel)
    choice = os.environ.get("CSI_VDUSE_LAB_QEMU", "")
    qemu = choice if "/" in choice else _which("qemu-system-x86_64")
    if qemu is None:
        raise RuntimeError("qemu-system-x86_64 is missing after install")
    workroot = cache_dir() / "runs"
    workroot.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workroot) as tmp:
        work = Path(tmp)
        share = work / "share"
        share.mkdir()
        names = " ".join(disk_path(i) for i in range(1, len(disks) + 1))
        extra = {**(extra_env or {}), "LAB_DISKS": names}
        env = _env_script(cwd or os.getcwd(), extra, lab, guest_deadline(timeout))
        (share / "env.sh").write_text(env)
        (share / "command.sh").write_text(command + "\n")
        output = share / "output.log"
        output.touch()
        console = work / "console.log"
        scratch = work / "scratch.img"
        with open(scratch, "wb") as f:
            f.truncate(scratch_gib << 30)
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,nodiscard", str(scratch)],
            check=True,
        )
        accel = os.environ.get("CSI_VDUSE_LAB_ACCEL", "tcg,thread=multi")
        cmdline = (
            "console=ttyS0 loglevel=4 panic=-1 root=rootfs rootfstype=9p "
            "rootflags=trans=virtio,version=9p2000.L,msize=262144,cache=loose ro "
            f"init={GUEST_INIT}"
        )
        argv = [
            qemu, "-machine", "q35", "-accel", accel, "-cpu", "max",
            "-smp", str(os.environ.get("CSI_VDUSE_LAB_CPUS", "2")), "-m", str(memory_mib),
            "-display", "none", "-monitor", "none", "-no-reboot", "-nic", "none",
            "-serial", f"file:{console}",
            "-kernel", str(lab.image), "-append", cmdline,
            *(["-initrd", str(lab.initrd)] if lab.initrd else []),
            "-virtfs", f"local,path=/,mount_tag=rootfs,{ROOT_SHARE_OPTS}",
            "-virtfs", f"local,path={share},mount_tag=labshare,security_model=none",
            "-device", "virtio-scsi-pci,id=scsi0",
            "-drive", f"if=none,id=scratch,file={scratch},format=raw,cache={scratch_cache},"
                         "discard=unmap",
            "-device", "scsi-hd,drive=scratch,bus=scsi0.0,scsi-id=0",
        ]  # fmt: skip
        for i, disk in enumerate(disks, 1):
            mode = "cache=writeback" if disk.writable else "cache=unsafe,snapshot=on"
            argv += [
                "-drive", f"if=none,id=disk{i},file={disk.image},format=raw,{mode}",
                "-device", f"scsi-hd,drive=disk{i},bus=scsi0.0,scsi-id={i}",
            ]  # fmt: skip
        qemu_log = work / "qemu.log"
        with open(qemu_log, "wb") as qemu_out_file:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=qemu_out_file, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        printed = 0
        timed_out = False
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                time.sleep(0.5)
                if stream:
                    printed = _stream_new(output, printed)
        finally:  # a timeout, Ctrl-C or SIGTERM of the runner never leaves the VM behind
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        qemu_out = qemu_log.read_text(errors="replace")
        if stream:
            _stream_new(output, printed)
        text = output.read_text(errors="replace")
        console_text = console.read_text(errors="replace") if console.exists() else ""
        rc_file = share / "rc"
        said = ""
        if timed_out:
            rc = 124
            said = f"\nlab: timed out after {timeout:.0f}s\n"
        elif rc_file.exists() and rc_file.read_text().strip():
            rc = int(rc_file.read_text().strip())
        else:
            rc = 125
            said = "\nlab: the guest ended without an exit code\n"
        if rc >= 124:
            tail = "\n".join(console_text.splitlines()[-40:])
            said += f"lab: qemu said:\n{qemu_out}\nlab: console tail:\n{tail}\n"
            if stream:
                print(said, flush=True)
        return LabResult(rc, text + said, console_text)


def exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so run()'s cleanup kills the VM."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def _die_with_parent() -> None:
    """In the QEMU child: the kernel kills it when the runner dies, even by SIGKILL."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _stream_new(path: Path, printed: int) -> int:
    with open(path, "rb") as f:
        f.seek(printed)
        chunk = f.read()
    if chunk:
        sys.stdout.write(chunk.decode(errors="replace"))
        sys.stdout.flush()
    return printed + len(chunk)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.lab.runner", description=__doc__)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--memory", type=int, default=4096, help="guest memory in MiB")
    parser.add_argument(
        "--kernel",
        choices=KINDS,
        help="default: $CSI_VDUSE_LAB_KERNEL_KIND, else shared61 if built, else debian612",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    exit_on_sigterm()
    words = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not words:
        parser.error("give a command to run inside the lab")
    result = run(
        shlex.join(words), timeout=args.timeout, memory_mib=args.memory, kernel=args.kernel
    )
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
