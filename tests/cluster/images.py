"""Build the OCI images the lab's Kubernetes runs, with no registry and no container daemon.

``ensure_images()`` builds what is missing into ``$XDG_CACHE_HOME/csi-vduse/images/`` (default
``~/.cache``) and returns the archive of every image by name; ``python -m tests.cluster.images``
builds them all and prints a table. An archive is an OCI image layout in a tar whose index names
the image's full reference (``io.containerd.image.name``: what a pod spec names), so
``ctr -n k8s.io images import FILE`` needs no ``--base-name``; ``image_reference(FILE)`` reads it
back. A file name carries a hash of what its image is made from: a changed input builds a new
archive, an unchanged one costs a few hashes. How each image is made: IMAGES.md.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tests.cluster.build import (
    NICE,
    BuildError,
    apt_install,
    download,
    ensure_components,
    installed_deb_version,
    locked,
    read_versions,
)

ROOT = Path(__file__).resolve().parents[2]
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}[platform.machine()]
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

BASE_REFERENCE = "localhost/csi-vduse/python-base:3.11-bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
DEBIAN_SOURCES = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
# Kept in the image (/etc/dpkg/dpkg.cfg.d/), so the Dockerfile's apt-get installs obey it too.
DPKG_OPTIONS = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
)
# Sidecar binary -> the tests.cluster.build component that builds it.
SIDECARS = {
    "csi-provisioner": "external-provisioner", "csi-resizer": "external-resizer",
    "csi-snapshotter": "external-snapshotter",
}  # fmt: skip
# The plugin build trusts what the host trusts (here: a TLS-intercepting egress proxy's CA).
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
NAME_ANNOTATION = "io.containerd.image.name"
TAG_ANNOTATION = "org.opencontainers.image.ref.name"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "csi-vduse" / "images"


def log(message: str) -> None:
    print(f"[images] {message}", file=sys.stderr, flush=True)


def run(cmd: Sequence[str | Path], cwd: Path | None = None) -> str:
    """Run a command and return its stdout; raise with the tail of its output if it fails."""
    args = [str(c) for c in cmd]
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        output = f"{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}".strip()
        raise BuildError(f"command failed ({proc.returncode}): {' '.join(args)}\n{output}")
    return proc.stdout


def need_debs(*packages: str) -> None:
    missing = [p for p in packages if installed_deb_version(p) is None]
    if missing:
        apt_install(missing)


def deb_upstream_version(package: str) -> str:
    version = installed_deb_version(package)
    if version is None:
        raise BuildError(f"{package} is not installed")
    return version.split(":", 1)[-1].rsplit("-", 1)[0]


def sha256_file(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# -- OCI image layouts and archives -----------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """A file of a layer: regular (from `source` or `content`), a directory, or a symlink."""

    path: str
    source: Path | None = None
    content: bytes | None = None
    symlink: str | None = None
    mode: int = 0o755


def write_layer(path: Path, entries: Iterable[Entry]) -> None:
    """A layer tar of `entries` and their parent directories; sorted, owned by root, mtime 0."""
    by_path = {e.path: e for e in entries}
    for name in list(by_path):
        parts = name.split("/")
        for n in range(1, len(parts)):
            by_path.setdefault("/".join(parts[:n]), Entry("/".join(parts[:n])))
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(by_path):
            entry = by_path[name]
            info = tarfile.TarInfo(name)
            info.mode = entry.mode
            data: IO[bytes] | None = None
            if entry.symlink is not None:
                info.type, info.linkname = tarfile.SYMTYPE, entry.symlink
            elif entry.source is not None:
                data = entry.source.open("rb")
                info.size = entry.source.stat().st_size
            elif entry.content is not None:
                data, info.size = io.BytesIO(entry.content), len(entry.content)
            else:
                info.type = tarfile.DIRTYPE
            tar.addfile(info, data)
            if data is not None:
                data.close()


def add_blob(layout: Path, media_type: str, data: bytes | Path) -> dict[str, Any]:
    """Store bytes, or move a file, into the layout's blobs; return its descriptor."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    if isinstance(data, Path):
        digest, size = sha256_file(data), data.stat().st_size
        data.rename(blobs / digest)
    else:
        digest, size = hashlib.sha256(data).hexdigest(), len(data)
        (blobs / digest).write_bytes(data)
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": size}


def write_index(layout: Path, manifest: dict[str, Any], reference: str) -> None:
    """index.json naming the one manifest by `reference`, the way `ctr images export` does."""
    tag = reference.rsplit(":", 1)[1]
    manifest = {
        **manifest,
        "platform": {"architecture": ARCH, "os": "linux"},
        "annotations": {NAME_ANNOTATION: reference, TAG_ANNOTATION: tag},
    }
    index = {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [manifest]}
    (layout / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}\n')


def write_image(
    layout: Path, reference: str, layers: Sequence[Path], config: dict[str, Any]
) -> None:
    """An OCI image of uncompressed `layers` (tar files, moved into the layout) and `config`."""
    descriptors = [add_blob(layout, MEDIA_LAYER, layer) for layer in layers]
    image_config = {
        "created": "1970-01-01T00:00:00Z",
        "architecture": ARCH,
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in descriptors]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": add_blob(layout, MEDIA_CONFIG, json.dumps(image_config).encode()),
        "layers": descriptors,
    }
    write_index(layout, add_blob(layout, MEDIA_MANIFEST, json.dumps(manifest).encode()), reference)


def pack(layout: Path, archive: Path) -> None:
    """Tar the layout (oci-layout and index.json first); atomic: a temp file renamed."""
    names = ["oci-layout", "index.json", "blobs", "blobs/sha256"]
    names += [f"blobs/sha256/{p.name}" for p in sorted((layout / "blobs" / "sha256").iterdir())]
    tmp = archive.with_name(f".{archive.name}.tmp")
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for name in names:
                info = tar.gettarinfo(layout / name, arcname=name)
                info.uid = info.gid = info.mtime = 0
                info.uname = info.gname = ""
                info.mode = 0o755 if info.isdir() else 0o644
                if info.isfile():
                    with (layout / name).open("rb") as handle:
                        tar.addfile(info, handle)
                else:
                    tar.addfile(info)
        tmp.rename(archive)
    finally:
        tmp.unlink(missing_ok=True)


def read_index(archive: Path) -> dict[str, Any]:
    with tarfile.open(archive) as tar:
        handle = tar.extractfile("index.json")
        if handle is None:
            raise BuildError(f"{archive}: no index.json")
        index: dict[str, Any] = json.load(handle)
    return index


def image_reference(archive: Path) -> str:
    """The full reference the archive's image is imported as (what a pod spec names)."""
    (manifest,) = read_index(archive)["manifests"]
    return str(manifest["annotations"][NAME_ANNOTATION])


# -- Recipes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    name: str
    reference: str
    inputs: dict[str, str]
    """What the image is made from: hashed into the archive's name."""
    build: Callable[[Path], None]
    """Writes the image's OCI layout into the (empty) directory given."""

    @property
    def key(self) -> str:
        # This file is an input too: a changed recipe makes a new image.
        made_of = {
            "recipe": sha256_file(Path(__file__)),
            "reference": self.reference,
            **self.inputs,
        }
        return hashlib.sha256(json.dumps(made_of, sort_keys=True).encode()).hexdigest()[:16]


def ensure(recipe: Recipe, cache: Path) -> Path:
    archive = cache / f"{recipe.name}-{recipe.key}.tar"
    if archive.is_file():
        return archive
    log(f"building {recipe.name} ({recipe.reference})")
    started = time.monotonic()
    layout = Path(tempfile.mkdtemp(prefix=f".{recipe.name}.", dir=cache))
    try:
        recipe.build(layout)
        pack(layout, archive)
    finally:
        shutil.rmtree(layout)
    stale = re.compile(rf"{re.escape(recipe.name)}-[0-9a-f]{{16}}\.tar")
    for old in cache.iterdir():
        if old != archive and stale.fullmatch(old.name):
            old.unlink()
    log(f"built {recipe.name} in {time.monotonic() - started:.1f} s: {archive}")
    return archive


def binary_recipe(name: str, reference: str, binary: Path) -> Recipe:
    """A static binary alone, as its entrypoint (how the CSI sidecars ship theirs)."""

    def build(layout: Path) -> None:
        layer = layout / "layer.tar"
        write_layer(layer, [Entry(name, source=binary), Entry("tmp", mode=0o1777)])
        write_image(layout, reference, [layer], {"Entrypoint": [f"/{name}"], "Env": [PATH_ENV]})

    return Recipe(name, reference, {"binary": sha256_file(binary)}, build)


def sidecar_recipes() -> list[Recipe]:
    versions = read_versions()
    binaries = ensure_components(sorted(set(SIDECARS.values())))
    recipes = []
    for binary, component in SIDECARS.items():
        version = versions[f"{component.upper().replace('-', '_')}_VERSION"]
        reference = f"localhost/sig-storage/{binary}:{version}"
        recipes.append(binary_recipe(binary, reference, binaries[binary]))
    return recipes


def module_dir(module: str, version: str) -> Path:
    return Path(download(module, version)["Dir"])


def pause_recipe() -> Recipe:
    """kubelet's sandbox image from Kubernetes' own pause.c, named as containerd's default."""
    need_debs("gcc", "libc6-dev")
    versions = read_versions()
    containerd = module_dir("github.com/containerd/containerd/v2", versions["CONTAINERD_VERSION"])
    config_go = (containerd / "internal/cri/config/config.go").read_text()
    match = re.search(r'DefaultSandboxImage\s*=\s*"([^"]+)"', config_go)
    if match is None:
        raise BuildError(f"no DefaultSandboxImage in {containerd}")
    reference = match[1]
    pause = module_dir("k8s.io/kubernetes", versions["KUBERNETES_VERSION"]) / "build/pause"
    tag = re.search(r"^TAG \?= (\S+)$", (pause / "Makefile").read_text(), re.M)
    if tag is None:
        raise BuildError(f"no TAG in {pause / 'Makefile'}")
    source = pause / "linux/pause.c"
    # The flags of build/pause/Makefile; VERSION is what `pause -v` prints.
    cflags = ["-Os", "-Wall", "-Werror", "-static", f"-DVERSION=v{tag[1]}"]
    gcc = run(["gcc", "--version"]).splitlines()[0]

    def build(layout: Path) -> None:
        binary = layout / "pause"
        run([*NICE, "gcc", *cflags, "-o", binary, source])
        run(["strip", binary])
        layer = layout / "layer.tar"
        write_layer(layer, [Entry("pause", source=binary)])
        binary.unlink()
        config = {"Entrypoint": ["/pause"], "User": "65535:65535", "Env": [PATH_ENV]}
        write_image(layout, reference, [layer], config)

    inputs = {"pause.c": sha256_file(source), "cflags": " ".join(cflags), "gcc": gcc}
    return Recipe("pause", reference, inputs, build)


def busybox_entries() -> list[Entry]:
    busybox = Path("/bin/busybox")
    applets = run([busybox, "--list-full"]).split()
    return [
        Entry("bin/busybox", source=busybox),
        *(Entry(a, symlink="/bin/busybox") for a in applets if "/" in a and a != "bin/busybox"),
        Entry("etc/passwd", content=b"root:x:0:0:root:/root:/bin/sh\n", mode=0o644),
        Entry("etc/group", content=b"root:x:0:\n", mode=0o644),
        Entry("root", mode=0o700),
        Entry("tmp", mode=0o1777),
    ]


def shared_libraries(binary: Path) -> list[Path]:
    """The libraries `binary` loads, at the paths the loader finds them (ldd's right column)."""
    paths = []
    for line in run(["ldd", binary]).splitlines():
        words = line.split()
        if "=>" in words and len(words) > 2 and words[2].startswith("/"):
            paths.append(Path(words[2]))
        elif words and words[0].startswith("/"):
            paths.append(Path(words[0]))
    return paths


def tool_recipes() -> list[Recipe]:
    """busybox (sh) and, on top of the same layer, fio with the shared libraries it needs."""
    need_debs("busybox-static", "fio")
    busybox = busybox_entries()
    fio = Path("/usr/bin/fio")
    libraries = shared_libraries(fio)
    fio_entries = [  # at ldd's paths, with the files' modes (the loader must be executable)
        Entry(str(p).lstrip("/"), source=p.resolve(), mode=p.resolve().stat().st_mode & 0o7777)
        for p in [fio, *libraries]
    ]
    busybox_reference = f"localhost/csi-vduse-test/busybox:{deb_upstream_version('busybox-static')}"
    fio_reference = f"localhost/csi-vduse-test/fio:{deb_upstream_version('fio')}"
    config = {"Env": [PATH_ENV], "Cmd": ["sh"]}
    busybox_inputs = {"busybox": sha256_file(Path("/bin/busybox"))}
    fio_inputs = {str(p): sha256_file(p) for p in [fio, *libraries]}

    def build_busybox(layout: Path) -> None:
        write_layer(layout / "busybox.tar", busybox)
        write_image(layout, busybox_reference, [layout / "busybox.tar"], config)

    def build_fio(layout: Path) -> None:
        write_layer(layout / "busybox.tar", busybox)
        write_layer(layout / "fio.tar", fio_entries)
        write_image(layout, fio_reference, [layout / "busybox.tar", layout / "fio.tar"], config)

    return [
        Recipe("busybox", busybox_reference, busybox_inputs, build_busybox),
        Recipe("fio", fio_reference, {**busybox_inputs, **fio_inputs}, build_fio),
    ]


def base_recipe() -> Recipe:
    """Debian bookworm minbase with Python 3.11 and its venv: the Dockerfile's BASE here."""
    need_debs("mmdebstrap")
    command = [
        "mmdebstrap",
        "--variant=minbase",
        # merged /usr through symlinks and usr-is-merged, not usrmerge (which pulls in perl)
        "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
        f"--include={','.join(BASE_PACKAGES)}",
        *(f"--dpkgopt={option}" for option in DPKG_OPTIONS),
        "bookworm",
    ]

    def build(layout: Path) -> None:
        rootfs = layout / "rootfs.tar"
        run([*NICE, *command, rootfs, *DEBIAN_SOURCES])
        layer = layout / "layer.tar"
        with (
            tarfile.open(rootfs) as src,
            tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as dst,
        ):
            for member in src:
                # No device nodes: the runtime mounts /dev, and an unprivileged unpack could not
                # create them.
                if member.name.startswith("./dev/"):
                    continue
                dst.addfile(member, src.extractfile(member) if member.isfile() else None)
        rootfs.unlink()
        config = {"Env": [PATH_ENV, "LANG=C.UTF-8"], "Cmd": ["python3"]}
        write_image(layout, BASE_REFERENCE, [layer], config)

    inputs = {"command": " ".join([*command, *DEBIAN_SOURCES])}
    return Recipe("python-base", BASE_REFERENCE, inputs, build)


def dockerignore_matcher() -> Callable[[str], bool]:
    """Whether .dockerignore leaves a path out of the build context (no `!` exceptions)."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [s.rstrip("/") for s in map(str.strip, lines) if s and not s.startswith("#")]
    regexes = []
    for pattern in patterns:
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regexes.append(re.compile(regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")))

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        return any(r.fullmatch(p) for r in regexes for p in prefixes)

    return ignored


def build_context_hash() -> str:
    """Hash of the Dockerfile, .dockerignore and every file of the build context."""
    listed = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], ROOT)
    ignored = dockerignore_matcher()
    files = sorted(
        p for p in set(listed.split("\0")) if p and not ignored(p) and (ROOT / p).is_file()
    )
    digest = hashlib.sha256()
    for path in ["Dockerfile", ".dockerignore", *files]:
        digest.update(f"{path}\0{sha256_file(ROOT / path)}\0".encode())
    return digest.hexdigest()


def project_version() -> str:
    match = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    if match is None:
        raise BuildError("no version in pyproject.toml")
    return match[1]


def plugin_recipe(base_archive: Path) -> Recipe:
    """The project's Dockerfile on the Debian base, built by buildah (chroot isolation, vfs)."""
    need_debs("buildah")
    version = project_version()
    reference = f"localhost/csi-vduse/csi-vduse:{version}-local"
    (base_manifest,) = read_index(base_archive)["manifests"]
    inputs = {"context": build_context_hash(), "base": base_manifest["digest"]}
    revision = "local-" + hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:12]

    def build(layout: Path) -> None:
        storage = Path(tempfile.mkdtemp(prefix=".buildah.", dir=layout.parent))
        buildah: list[str | Path] = [
            "buildah", "--root", storage / "root", "--runroot", storage / "run",
            "--storage-driver", "vfs",
        ]  # fmt: skip
        volumes = ["--volume", f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro"]
        try:
            base_id = run([*buildah, "pull", "--quiet", f"oci-archive:{base_archive}"]).split()[-1]
            run([*buildah, "tag", base_id, BASE_REFERENCE])
            run([
                *NICE, *buildah, "bud", "--isolation", "chroot", "--pull=never",
                "--build-arg", f"BASE={BASE_REFERENCE}", "--build-arg", f"VERSION={version}",
                "--build-arg", f"REVISION={revision}",
                *(volumes if HOST_CA_BUNDLE.is_file() else []),
                "--tag", reference, "--file", ROOT / "Dockerfile", ROOT,
            ])  # fmt: skip
            run([*buildah, "push", reference, f"oci:{layout}"])
        finally:
            # Best effort (an error here must not hide the build's); the storage goes anyway.
            subprocess.run(
                [str(c) for c in [*buildah, "rmi", "--all", "--force"]], capture_output=True
            )
            remove_storage(storage)
        (manifest,) = json.loads((layout / "index.json").read_text())["manifests"]
        if leftovers := build_leftovers(layout, manifest):
            raise BuildError(f"the plugin image keeps what its build left: {leftovers[:5]}")
        write_index(layout, manifest, reference)

    return Recipe("csi-vduse", reference, inputs, build)


# apt's downloads and caches, pip's: what an image must not ship (every node pulls it)
LEFTOVERS = re.compile(r"var/cache/apt/(archives/[^/]+\.deb|[^/]+\.bin)|var/lib/apt/lists/[^/]+_"
                       r"|root/\.cache/pip/.")  # fmt: skip


def build_leftovers(layout: Path, manifest: dict[str, Any]) -> list[str]:
    """The files in the image's layers (of `layout`) that LEFTOVERS names."""
    blob = layout / "blobs" / "sha256" / manifest["digest"].split(":", 1)[1]
    found = []
    for layer in json.loads(blob.read_text())["layers"]:
        path = layout / "blobs" / "sha256" / layer["digest"].split(":", 1)[1]
        with tarfile.open(path) as tar:  # plain or gzip, as tarfile finds
            found += [m.name for m in tar if LEFTOVERS.match(m.name.removeprefix("./"))]
    return found


def remove_storage(storage: Path) -> None:
    """rmtree buildah's storage, but never through a mount left behind (a bound /dev, say)."""
    mounts = Path("/proc/self/mountinfo").read_text().split("\n")
    if any(f" {storage}/" in line or f" {storage} " in line for line in mounts):
        raise BuildError(f"{storage} still has mounts: left in place")
    shutil.rmtree(storage, ignore_errors=False)


# -- Entry points -----------------------------------------------------------------------------


IMAGE_NAMES = ("pause", *SIDECARS, "busybox", "fio", "python-base", "csi-vduse")


def ensure_images(only: Iterable[str] | None = None) -> dict[str, Path]:
    """Build what is missing; the archive of every image (or of those in `only`) by name.

    The plugin image (``csi-vduse``) brings its base (``python-base``) along. Raises BuildError.
    """
    wanted = set(only or IMAGE_NAMES)
    if wanted - set(IMAGE_NAMES):
        raise BuildError(f"unknown images {sorted(wanted - set(IMAGE_NAMES))}")
    if "csi-vduse" in wanted:
        wanted.add("python-base")
    groups: list[tuple[set[str], Callable[[], list[Recipe]]]] = [
        ({"pause"}, lambda: [pause_recipe()]),
        (set(SIDECARS), sidecar_recipes),
        ({"busybox", "fio"}, tool_recipes),
        ({"python-base"}, lambda: [base_recipe()]),
    ]
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    archives: dict[str, Path] = {}
    with locked(cache / ".lock"):
        for names, recipes in groups:
            if wanted & names:
                for recipe in recipes():
                    if recipe.name in wanted:
                        archives[recipe.name] = ensure(recipe, cache)
        if "csi-vduse" in wanted:
            archives["csi-vduse"] = ensure(plugin_recipe(archives["python-base"]), cache)
    return archives


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster.images", description=__doc__)
    parser.add_argument("images", nargs="*", metavar="IMAGE", help=", ".join(IMAGE_NAMES))
    parser.add_argument("--json", action="store_true", help="print name, reference and path")
    args = parser.parse_args(argv)
    try:
        archives = ensure_images(args.images)
    except BuildError as error:
        log(f"FAILED: {error}")
        return 1
    rows = [(n, image_reference(p), p.stat().st_size, p) for n, p in archives.items()]
    if args.json:
        table = {n: {"reference": r, "archive": str(p), "bytes": s} for n, r, s, p in rows}
        print(json.dumps(table, indent=2))
        return 0
    width = max(len(r) for _, r, _, _ in rows)
    for name, reference, size, path in rows:
        print(f"{name:<16} {reference:<{width}} {size / 2**20:7.1f} MiB  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
