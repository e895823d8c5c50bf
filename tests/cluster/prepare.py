"""What the cluster tests need on the host before the lab boots (its root is read-only
there): every component built and every image archived, both cached under ~/.cache.

The guest learns where the images are from $CSI_VDUSE_CLUSTER_IMAGES (JSON, name -> archive).
`python -m tests.cluster.prepare` makes them and says where they are."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from tests.cluster.build import BuildError, ensure_components, read_versions
from tests.cluster.images import ensure_images, module_dir

IMAGES_ENV = "CSI_VDUSE_CLUSTER_IMAGES"
SNAPSHOT_CRDS_ENV = "CSI_VDUSE_SNAPSHOT_CRDS"
SNAPSHOT_CLIENT = "github.com/kubernetes-csi/external-snapshotter/client/v8"


def prepare() -> dict[str, str]:
    """Builds what is missing; the environment the guest's tests need."""
    ensure_components()
    images = {name: str(path) for name, path in ensure_images().items()}
    version = read_versions()["EXTERNAL_SNAPSHOTTER_VERSION"]
    crds = module_dir(SNAPSHOT_CLIENT, version) / "config" / "crd"
    return {IMAGES_ENV: json.dumps(images), SNAPSHOT_CRDS_ENV: str(crds)}


def snapshot_crds() -> list[Path]:
    """In the guest: the VolumeSnapshot API's CRDs (not the group snapshots')."""
    crds = Path(os.environ[SNAPSHOT_CRDS_ENV])
    return sorted(crds.glob("snapshot.storage.k8s.io_*.yaml"))


def lab_images() -> dict[str, Path]:
    """In the guest: the image archives prepare() made."""
    raw = os.environ.get(IMAGES_ENV)
    if not raw:
        raise RuntimeError(f"${IMAGES_ENV} is not set: run the tests through tests.cluster.prepare")
    return {name: Path(path) for name, path in json.loads(raw).items()}


def main() -> int:
    started = time.monotonic()
    try:
        env = prepare()
    except BuildError as error:
        print(f"cluster: FAILED: {error}", flush=True)
        return 1
    for name, path in json.loads(env[IMAGES_ENV]).items():
        print(f"cluster: image {name}: {path}")
    print(f"cluster: components and images ready in {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
