"""Find the lab kernel, or build one from Debian's linux-source-6.1 and cache it."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FRAGMENT = HERE / "kernel.config"
SHARED_KERNEL = REPO.parent / "shared" / "lab" / "bzImage"
BUILD_DEPS = ["flex", "bison", "libelf-dev", "bc", "libssl-dev", "xz-utils", "make", "gcc"]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "csi-vduse" / "lab"


def cached_kernel_path() -> Path:
    digest = hashlib.sha256(FRAGMENT.read_bytes()).hexdigest()[:16]
    return cache_dir() / f"bzImage-6.1-{digest}"


def find_kernel(build: bool = True) -> Path:
    """The kernel to boot: $CSI_VDUSE_LAB_KERNEL, the shared one, or a cached build."""
    explicit = os.environ.get("CSI_VDUSE_LAB_KERNEL")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"CSI_VDUSE_LAB_KERNEL={explicit} is not a file")
        return path
    if SHARED_KERNEL.is_file():
        return SHARED_KERNEL
    cached = cached_kernel_path()
    if cached.is_file():
        return cached
    if not build:
        raise FileNotFoundError("no lab kernel found and building is disabled")
    return build_kernel(cached)


def _apt_install(packages: list[str]) -> None:
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "install", "-y", "-qq", *packages], check=True, env=env)


def build_kernel(target: Path) -> Path:
    """Build a bzImage with VDUSE built in (15-25 minutes on 2 cores)."""
    print(f"lab: building a VDUSE kernel into {target} (this takes a while)", flush=True)
    _apt_install(BUILD_DEPS)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        work = Path(tmp)
        subprocess.run(["apt-get", "download", "linux-source-6.1"], cwd=work, check=True)
        deb = next(work.glob("linux-source-6.1_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "pkg")], check=True)
        tarball = next((work / "pkg" / "usr" / "src").glob("linux-source-6.1.tar.*"))
        with tarfile.open(tarball) as tar:
            tar.extractall(work, filter="tar")
        src = work / "linux-source-6.1"
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["make", "x86_64_defconfig"], cwd=src, check=True)
        subprocess.run(["make", "kvm_guest.config"], cwd=src, check=True)
        subprocess.run(
            ["scripts/kconfig/merge_config.sh", "-m", ".config", str(FRAGMENT)], cwd=src, check=True
        )
        subprocess.run(["make", "olddefconfig"], cwd=src, check=True)
        subprocess.run(["make", f"-j{jobs}", "bzImage"], cwd=src, check=True)
        tmp_target = target.with_suffix(".partial")
        shutil.copyfile(src / "arch" / "x86" / "boot" / "bzImage", tmp_target)
        tmp_target.rename(target)
    return target
