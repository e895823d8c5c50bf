"""The lab's kernels.

shared61: a 6.1 bzImage with everything built in ($CSI_VDUSE_LAB_KERNEL, ../shared/lab/bzImage,
or one built once from Debian's linux-source-6.1). debian612: Debian's stock kernel from
bookworm-backports, unpacked (not installed) into the cache, with a small initramfs that loads
the modules of the 9p root; the guest binds its modules tree at /lib/modules.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests import apt

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FRAGMENT = HERE / "kernel.config"
GUEST_FRAGMENT = HERE / "guest-kernel.config"
SHARED_KERNEL = REPO.parent / "shared" / "lab" / "bzImage"
BUILD_DEPS = ["flex", "bison", "libelf-dev", "bc", "libssl-dev", "xz-utils", "lz4", "make", "gcc"]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "csi-vduse" / "lab"


def _cached_build(stem: str, fragment: Path) -> Path:
    """Where a kernel built from `fragment` is cached: keyed by the fragment's digest."""
    digest = hashlib.sha256(fragment.read_bytes()).hexdigest()[:16]
    return cache_dir() / f"{stem}-{digest}"


def cached_kernel_path() -> Path:
    return _cached_build("bzImage-6.1", FRAGMENT)


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


def build_kernel(target: Path) -> Path:
    """Build a bzImage with VDUSE built in (15-25 minutes on 2 cores)."""
    print(f"lab: building a VDUSE kernel into {target} (this takes a while)", flush=True)
    apt.install(BUILD_DEPS)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = _linux_source(Path(tmp))
        subprocess.run(["make", "x86_64_defconfig"], cwd=src, check=True)
        subprocess.run(["make", "kvm_guest.config"], cwd=src, check=True)
        _make_bzimage(src, FRAGMENT, target)
    return target


def guest_kernel_path() -> Path:
    return _cached_build("bzImage-guest-6.1", GUEST_FRAGMENT)


def guest_kernel() -> Path:
    """The nested VM tests' guest kernel: Linux 6.1's tinyconfig with just what the guest uses
    (PCI, virtio-blk, a serial console, an initramfs). A full kernel takes about 4 minutes to
    boot under TCG inside the TCG lab; this one a small fraction of that. Built once (a few
    minutes on 2 cores) and cached by its fragment's digest."""
    target = guest_kernel_path()
    if target.is_file():
        return target
    print(f"lab: building the nested guest's kernel into {target}", flush=True)
    apt.install(BUILD_DEPS)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = _linux_source(Path(tmp))
        subprocess.run(["make", "tinyconfig"], cwd=src, check=True, stdout=subprocess.DEVNULL)
        _make_bzimage(src, GUEST_FRAGMENT, target)
    return target


def _linux_source(work: Path) -> Path:
    """Debian's linux-source-6.1, unpacked under `work`."""
    apt.download("linux-source-6.1", work)
    deb = next(work.glob("linux-source-6.1_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "pkg")], check=True)
    tarball = next((work / "pkg" / "usr" / "src").glob("linux-source-6.1.tar.*"))
    with tarfile.open(tarball) as tar:
        tar.extractall(work, filter="tar")
    return work / "linux-source-6.1"


def _make_bzimage(src: Path, fragment: Path, target: Path) -> None:
    merge = ["scripts/kconfig/merge_config.sh", "-m", ".config", str(fragment)]
    subprocess.run(merge, cwd=src, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["make", "olddefconfig"], cwd=src, check=True, stdout=subprocess.DEVNULL)
    config = (src / ".config").read_text()
    wanted = [line for line in fragment.read_text().splitlines() if line.startswith("CONFIG_")]
    if missing := [line for line in wanted if line not in config.splitlines()]:
        raise RuntimeError(f"the kernel config lost {missing} (a dependency is missing)")
    jobs = str(os.cpu_count() or 2)
    subprocess.run(["make", f"-j{jobs}", "bzImage"], cwd=src, check=True, stdout=subprocess.DEVNULL)
    tmp_target = target.with_suffix(".partial")
    shutil.copyfile(src / "arch" / "x86" / "boot" / "bzImage", tmp_target)
    tmp_target.rename(target)


KINDS = ("shared61", "debian612")
INITRAMFS_INIT = HERE / "initramfs-init.sh"
# What the initramfs loads: the 9p root and the runner's scratch disk.
INITRAMFS_MODULES = ("9pnet_virtio", "9p", "virtio_scsi", "sd_mod")
# What the guest loads at boot: the tests' (udev would load virtio_blk for new devices; there
# is none) and container runtimes'.
GUEST_MODULES = (
    "ext4", "xfs", "loop", "virtio_blk", "vdpa", "vduse", "virtio_vdpa", "vhost_vdpa",
    "overlay", "veth", "bridge", "br_netfilter", "nf_conntrack", "iptable_filter", "iptable_nat",
    "nf_tables", "nft_compat", "nft_chain_nat",
)  # fmt: skip
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


@dataclass(frozen=True)
class LabKernel:
    kind: str
    image: Path
    initrd: Path | None = None
    modules: Path | None = None  # a lib/modules tree, bound at /lib/modules in the guest
    load: tuple[str, ...] = ()  # modules the guest loads at boot


def default_kind() -> str:
    """$CSI_VDUSE_LAB_KERNEL_KIND, else shared61 if that kernel needs no build, else debian612."""
    if kind := os.environ.get("CSI_VDUSE_LAB_KERNEL_KIND"):
        return kind
    explicit = os.environ.get("CSI_VDUSE_LAB_KERNEL")
    ready = explicit or SHARED_KERNEL.is_file() or cached_kernel_path().is_file()
    return "shared61" if ready else "debian612"


def lab_kernel(kind: str | None = None, build: bool = True) -> LabKernel:
    """The kernel of `kind` (by default default_kind())."""
    kind = kind or default_kind()
    if kind == "shared61":
        return LabKernel(kind, find_kernel(build))
    if kind == "debian612":
        tree = debian_tree()
        # xz in a TCG guest costs about a third of a module's load time: decompress here.
        _decompress(tree, [*INITRAMFS_MODULES, *GUEST_MODULES])
        # The guest's root is the host's: its /lib/modules must exist to be mounted over.
        Path("/lib/modules").mkdir(exist_ok=True)
        image = next((tree / "boot").glob("vmlinuz-*"))
        return LabKernel(kind, image, initramfs(tree), tree / "lib/modules", GUEST_MODULES)
    raise ValueError(f"unknown lab kernel {kind!r}: one of {', '.join(KINDS)}")


def os_release() -> dict[str, str]:
    text = Path("/etc/os-release").read_text()
    return dict(re.findall(r'^(\w+)="?([^"\n]*)"?$', text, re.M))


def ensure_backports_source() -> str:
    """The backports suite of this Debian release. Adds an apt source for it, on the mirror of
    the release's own source, under sources.list.d unless one already lists it."""
    release = os_release()
    if release.get("ID") != "debian":
        raise RuntimeError("Debian's backports need a Debian host")
    codename = release.get("VERSION_CODENAME") or "bookworm"
    suite = f"{codename}-backports"
    listed = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").iterdir())]
    texts = [p.read_text() for p in listed if p.is_file() and p.suffix in (".list", ".sources")]
    if any(re.search(rf"^[^#\n]*\s{suite}(\s|$)", text, re.M) for text in texts):
        return suite
    mirror, keyring = "", KEYRING
    for text in texts:
        for stanza in re.split(r"\n\s*\n", text):
            fields = dict(re.findall(r"^([\w-]+):[ \t]*(.*)$", stanza, re.M))
            if not mirror and codename in fields.get("Suites", "").split() and "URIs" in fields:
                mirror = fields["URIs"].split()[0]
                keyring = fields.get("Signed-By", "").strip() or KEYRING
        line = re.search(rf"^\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+{codename}\s", text, re.M)
        mirror = mirror or (line.group(1) if line else "")
    source = Path(f"/etc/apt/sources.list.d/csi-vduse-{suite}.sources")
    print(f"lab: adding the apt source {source}", flush=True)
    source.write_text(
        f"Types: deb\nURIs: {mirror or 'http://deb.debian.org/debian'}\nSuites: {suite}\n"
        f"Components: main\nSigned-By: {keyring if keyring.startswith('/') else KEYRING}\n"
    )
    return suite


def debian_tree() -> Path:
    """Debian's kernel package from backports, unpacked (not installed) once, with depmod run."""
    if done := list(cache_dir().glob("debian-*/.complete")):
        return max(done, key=lambda p: p.stat().st_mtime).parent
    suite = ensure_backports_source()
    apt.install(["kmod"])  # depmod here, modprobe in the guest
    print(f"lab: fetching Debian's kernel from {suite}", flush=True)
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        work = Path(tmp)
        apt.download("linux-image-amd64", work, suite=suite)
        meta = next(work.glob("linux-image-amd64_*.deb"))
        depends = subprocess.run(
            ["dpkg-deb", "-f", str(meta), "Depends"], check=True, capture_output=True, text=True
        ).stdout
        found = re.search(r"(linux-image-[^\s,]+) \(= ([^)\s]+)\)", depends)
        if found is None:
            raise RuntimeError(f"cannot find the kernel package in {depends!r}")
        package, version = found.groups()
        apt.download(f"{package}={version}", work)
        tree = work / "tree"
        deb = next(work.glob(f"{package}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True)
        subprocess.run(["depmod", "-b", str(tree), _release(tree)], check=True)
        target = cache_dir() / f"debian-{version}"
        shutil.rmtree(target, ignore_errors=True)
        tree.rename(target)
    (target / ".complete").write_text(f"{package} {version}\n")
    return target


def initramfs(tree: Path) -> Path:
    """A gzip'd newc cpio for the kernel in `tree`: a static busybox, /init, and the modules
    INITRAMFS_MODULES with what they need, numbered in load order."""
    recipe = INITRAMFS_INIT.read_bytes() + " ".join(INITRAMFS_MODULES).encode()
    target = tree / f"initramfs-{hashlib.sha256(recipe).hexdigest()[:16]}.cpio.gz"
    if target.is_file():
        return target
    entries = [(d, 0o040755, b"") for d in ("bin", "dev", "modules", "newroot", "proc")]
    entries += [("dev/console", 0o020600, b""), ("bin/busybox", 0o100755, _busybox())]
    entries += [("init", 0o100755, INITRAMFS_INIT.read_bytes())]
    for i, path in enumerate(_module_files(tree, INITRAMFS_MODULES)):
        name = path.name.partition(".ko")[0]
        entries.append((f"modules/{i:02d}-{name}.ko", 0o100644, path.read_bytes()))
    partial = target.with_suffix(f".{os.getpid()}")
    partial.write_bytes(gzip.compress(_cpio(entries), mtime=0))
    partial.rename(target)
    return target


def _module_files(tree: Path, names: list[str] | tuple[str, ...]) -> list[Path]:
    """The files of modules `names` and of those they need, in load order, as kmod sees them."""
    show = ["modprobe", "-a", "-D", "-d", str(tree), "-S", _release(tree), *names]
    out = subprocess.run(show, check=True, capture_output=True, text=True).stdout.splitlines()
    return [Path(p) for p in dict.fromkeys(ln.split()[1] for ln in out if ln.startswith("insmod"))]


def _decompress(tree: Path, names: list[str]) -> None:
    """Replace the .ko.xz files of modules `names` (and what they need) with plain .ko."""
    packed = [p for p in _module_files(tree, names) if p.suffix == ".xz"]
    for path in packed:
        plain = path.with_suffix("")
        partial = plain.with_suffix(f".{os.getpid()}")
        partial.write_bytes(lzma.decompress(path.read_bytes()))
        partial.rename(plain)
        path.unlink()
    if packed:
        subprocess.run(["depmod", "-b", str(tree), _release(tree)], check=True)


def _release(tree: Path) -> str:
    """The kernel release (uname -r) of the unpacked package `tree`."""
    (release,) = [d.name for d in (tree / "lib/modules").iterdir()]
    return release


def _busybox() -> bytes:
    path = cache_dir() / "busybox-static"
    if not path.is_file():
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            apt.download("busybox-static", Path(tmp))
            deb = next(Path(tmp).glob("busybox-static_*.deb"))
            subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
            os.replace(Path(tmp) / "bin" / "busybox", path)
    return path.read_bytes()


def _cpio(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc archive; the only device it holds is /dev/console (5, 1)."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], 1):
        rdev = (5, 1) if name == "dev/console" else (0, 0)
        raw = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, *rdev, len(raw), 0)
        out += b"070701" + "".join(f"{f:08x}" for f in fields).encode() + raw
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)
