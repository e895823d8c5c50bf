"""containerd's store with the cluster's images already imported, kept on the host as a disk
image and attached to the cluster's guest with QEMU's snapshot=on: the guest's containerd
starts with every image unpacked (importing them under emulation took about four minutes of
each run), and the file stays as it was made.

It holds every image but the plugin's, which is new with every change to the project and is
imported at each start; its base layer (python-base's) is in the cache, so only its own layer
is unpacked. The file is keyed by containerd's version and the manifest digest of each image
in it: a new image or containerd makes a new file, in one extra boot of the lab.

Host: disk_for(images) returns the file, made if missing.
Guest: python -m tests.cluster.image_cache DEVICE fills a blank disk with the images of
$CSI_VDUSE_CLUSTER_IMAGES.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

from tests.cluster.build import BuildError, locked, read_versions
from tests.cluster.images import cache_dir, read_index
from tests.cluster.node import IMAGE_CACHE_ENV, Node
from tests.cluster.prepare import IMAGES_ENV, lab_images
from tests.lab.runner import Disk, disk_path, run

NOT_CACHED = "csi-vduse"  # the plugin's image: the project itself
DISK_GIB = 8


def cached(images: dict[str, Path]) -> dict[str, Path]:
    return {name: archive for name, archive in images.items() if name != NOT_CACHED}


def key(images: dict[str, Path]) -> str:
    digest = hashlib.sha256(read_versions()["CONTAINERD_VERSION"].encode())
    for name in sorted(images):
        (manifest,) = read_index(images[name])["manifests"]
        digest.update(f"\0{name}={manifest['digest']}".encode())
    return digest.hexdigest()[:16]


def attached(env: dict[str, str]) -> tuple[dict[str, str], list[Disk]]:
    """The cluster suite's guest environment `env` (it names the image archives) and disks
    with the image cache attached, made first if missing."""
    images = {n: Path(p) for n, p in json.loads(env[IMAGES_ENV]).items()}
    return {**env, IMAGE_CACHE_ENV: disk_path(1)}, [Disk(disk_for(images, env))]


def disk_for(images: dict[str, Path], env: dict[str, str]) -> Path:
    """The cache of `images` (but the plugin's), made in a lab boot if missing."""
    wanted = cached(images)
    disk = cache_dir() / f"containerd-{key(wanted)}.img"
    if disk.is_file():
        return disk
    with locked(cache_dir() / ".containerd-cache.lock"):
        if disk.is_file():
            return disk
        _make(disk, env)
    for old in cache_dir().glob("containerd-*.img"):
        if old != disk:
            old.unlink()
    return disk


def _make(disk: Path, env: dict[str, str]) -> None:
    started = time.monotonic()
    print(f"cluster: importing the images into {disk.name} (once per set of images)", flush=True)
    partial = disk.with_suffix(".partial")
    with open(partial, "wb") as f:
        f.truncate(DISK_GIB << 30)
    mkfs = ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,nodiscard", str(partial)]
    subprocess.run(mkfs, check=True)
    result = run(
        f"python -m tests.cluster.image_cache {disk_path(1)}", timeout=1500, memory_mib=2048,
        extra_env=env, kernel="debian612", disks=[Disk(partial, writable=True)],
    )  # fmt: skip
    if result.returncode != 0:
        partial.unlink()
        raise BuildError(f"filling the image cache failed ({result.returncode})")
    partial.rename(disk)
    print(f"cluster: image cache made in {time.monotonic() - started:.0f} s", flush=True)


def fill(device: str) -> None:
    """In the guest: containerd on `device`, as the cluster's node runs it, imports the
    cached images; then it stops and the disk is unmounted."""
    node = Node(Path("/run/image-cache"), lab_images())
    root = node.containerd_root
    root.mkdir(parents=True)
    subprocess.run(["mount", device, str(root)], check=True)
    try:
        node.logs.mkdir(parents=True)
        node.start_containerd(time.monotonic() + 120)
        for name, archive in cached(node.images).items():
            mark = time.monotonic()
            node.import_image(archive, timeout=900)
            print(f"cluster: image {name} imported in {time.monotonic() - mark:.0f} s", flush=True)
    except BaseException:
        print(node.log_tails(), flush=True)
        raise
    finally:
        node.stop()
        subprocess.run(["umount", str(root)], check=True)


if __name__ == "__main__":
    fill(sys.argv[1])
