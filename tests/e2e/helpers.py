from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from csi_vduse.kernel.vdpa import VdpaClient
from csi_vduse.lifecycle.mounts import MountEntry, mounts


class Export:
    """`csi-vduse export` running in the background, as a user would start it."""

    def __init__(self, file: Path, name: str, *args: str, timeout: float = 60) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "csi_vduse", "export", str(file), "--name", name, *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.stderr = ""
        line = self._first_line(timeout)
        if not line:
            self.proc.wait(timeout=30)
            self.stderr = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"export failed (rc={self.proc.returncode}): {self.stderr}")
        self.device = Path(line.strip())

    def _first_line(self, timeout: float) -> str:
        result: list[str] = []
        assert self.proc.stdout is not None
        reader = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()))  # type: ignore[union-attr]
        reader.start()
        reader.join(timeout)
        return result[0] if result else ""

    def stop(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=timeout)
        self.stderr = self.proc.stderr.read() if self.proc.stderr else ""
        return rc


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True)


def assert_gone(name: str) -> None:
    assert not Path(f"/dev/vduse/{name}").exists()
    assert VdpaClient().get(name) is None
    assert not Path(f"/sys/bus/vdpa/devices/{name}").exists()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def wait_for(cond: object, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(cond) and cond():
            return True
        time.sleep(0.05)
    return False


def allocated_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def mounts_under(root: Path) -> list[MountEntry]:
    return [m for m in mounts() if m.target.startswith(str(root))]
