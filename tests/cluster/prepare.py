"""What the cluster tests need on the host before the lab boots (its root is read-only
there): every component built and every image archived, both cached under ~/.cache.

The guest learns where the images are from $CSI_VDUSE_CLUSTER_IMAGES (JSON, name -> archive)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.cluster.build import ensure_components
from tests.cluster.images import ensure_images

IMAGES_ENV = "CSI_VDUSE_CLUSTER_IMAGES"


def prepare() -> dict[str, str]:
    """Builds what is missing; the environment the guest's tests need."""
    ensure_components()
    images = {name: str(path) for name, path in ensure_images().items()}
    return {IMAGES_ENV: json.dumps(images)}


def lab_images() -> dict[str, Path]:
    """In the guest: the image archives prepare() made."""
    raw = os.environ.get(IMAGES_ENV)
    if not raw:
        raise RuntimeError(f"${IMAGES_ENV} is not set: run the tests through tests.cluster.prepare")
    return {name: Path(path) for name, path in json.loads(raw).items()}
