"""A tiny nested guest for the VM tests: a tinyconfig 6.1 kernel (tests.lab.kernel.guest_kernel,
built by the lab runner on the host) and an initramfs whose only program is
tests/e2e/guest/init.c. QEMU 10 (from the lab) runs it under software emulation."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from tests.lab.kernel import guest_kernel_path

INIT_SOURCE = Path(__file__).resolve().parent / "guest" / "init.c"
GUEST_MEMORY_MIB = 128


def _cpio_entry(name: str, mode: int, data: bytes = b"") -> bytes:
    fields = [0, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    entry = header + name.encode() + b"\0"
    entry += b"\0" * (-len(entry) % 4) + data
    return entry + b"\0" * (-len(entry) % 4)


def build_initramfs(work: Path) -> Path:
    """Compile the guest's init statically and pack it as a newc cpio archive."""
    init = work / "guest-init"
    subprocess.run(
        ["gcc", "-static", "-O2", "-Wall", "-Werror", "-o", str(init), str(INIT_SOURCE)],
        check=True, capture_output=True,
    )  # fmt: skip
    archive = b"".join([
        _cpio_entry("dev", 0o40755), _cpio_entry("proc", 0o40755),
        _cpio_entry("init", 0o100755, init.read_bytes()), _cpio_entry("TRAILER!!!", 0),
    ])  # fmt: skip
    initramfs = work / "guest-initramfs.cpio"
    initramfs.write_bytes(archive)
    return initramfs


class NestedGuest:
    """One run of the guest: QEMU with `disk` (QEMU arguments that give it /dev/vda), the
    guest's memory a shared memfd as vhost-vdpa needs, its console in a file."""

    def __init__(self, work: Path, disk: list[str], append: str = "") -> None:
        self.console = work / f"guest-console-{time.monotonic_ns()}.log"
        self.console.touch()
        kernel = os.environ.get("CSI_VDUSE_GUEST_KERNEL") or str(guest_kernel_path())
        mem = f"{GUEST_MEMORY_MIB}M"
        argv = [
            "qemu-system-x86_64", "-machine", "q35,memory-backend=mem", "-accel", "tcg",
            "-bios", "qboot.rom",  # boots a -kernel in a fraction of SeaBIOS's time
            "-object", f"memory-backend-memfd,id=mem,size={mem},share=on", "-m", mem,
            "-display", "none", "-monitor", "none", "-nic", "none", "-nodefaults",
            "-serial", f"file:{self.console}",
            "-kernel", kernel, "-initrd", str(build_initramfs(work)),
            "-append", f"console=ttyS0 panic=-1 {append}".strip(), *disk,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip

    def lines(self) -> list[str]:
        """The guest's complete lines: the console file may end in the middle of one."""
        text = self.console.read_text(errors="replace")
        return [
            line.strip() for line in text.splitlines(keepends=True)
            if line.startswith("GUEST: ") and line.endswith("\n")
        ]  # fmt: skip

    def wait_for_line(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines():
                if line.startswith(f"GUEST: {prefix}"):
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        raise AssertionError(f"the guest never said {prefix!r}:\n{self.tail()}")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"the guest did not power off in {timeout} s:\n{self.tail()}"
            ) from None

    def tail(self) -> str:
        console = self.console.read_text(errors="replace")[-3000:]
        qemu = self.proc.stdout.read() if self.proc.poll() is not None and self.proc.stdout else ""
        return f"console:\n{console}\nqemu:\n{qemu}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            # SIGKILL waits for I/O the process has in the kernel: a disk that stopped
            # completing requests keeps QEMU here. Fail instead of hanging the suite.
            raise AssertionError(
                "QEMU outlived SIGKILL by 60 s: its disk's I/O never completed"
            ) from None
