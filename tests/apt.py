"""apt-get for the test harness, one call at a time across processes: the test command's stages
run side by side, and apt-get fails at once (it does not wait) when another holds its locks."""

from __future__ import annotations

import fcntl
import os
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

LOCK = Path("/tmp/csi-vduse-apt.lock")
APT = ["apt-get", "-qq", "-o", "APT::Sandbox::User=root"]
ENV = dict(os.environ, DEBIAN_FRONTEND="noninteractive")


@contextmanager
def exclusive() -> Iterator[None]:
    with LOCK.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def installed_version(package: str) -> str | None:
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f", "${db:Status-Status} ${Version}", package],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    status, _, version = proc.stdout.partition(" ")
    return version if proc.returncode == 0 and status == "installed" else None


def install(packages: Sequence[str], *, suite: str = "", recommends: bool = True) -> None:
    """Installs what of `packages` is missing (all of them from `suite` when given), after
    refreshing the package lists. Raises AptError with apt's output."""
    with exclusive():
        missing = [p for p in packages if suite or installed_version(p) is None]
        if not missing:
            return
        _run([*APT, "update"])
        options = ["-t", suite] if suite else []
        options += [] if recommends else ["--no-install-recommends"]
        _run([*APT, "install", "-y", *options, *missing])


def download(package: str, cwd: Path, *, suite: str = "") -> None:
    """`apt-get download` of `package` (NAME or NAME=VERSION) into `cwd`."""
    with exclusive():
        _run([*APT, *(["-t", suite] if suite else []), "download", package], cwd=cwd)


class AptError(RuntimeError):
    pass


def _run(argv: list[str], cwd: Path | None = None) -> None:
    proc = subprocess.run(argv, cwd=cwd, env=ENV, capture_output=True, text=True)
    if proc.returncode != 0:
        output = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}".strip()
        raise AptError(f"{' '.join(argv)} failed ({proc.returncode}):\n{output}")
