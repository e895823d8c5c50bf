"""One single-node Ceph (tests/ceph/cluster.py) for the whole session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydantic import SecretStr

from csi_vduse.backends import rbd
from tests.ceph.cluster import CephCluster, missing_binaries


@pytest.fixture(scope="session")
def ceph() -> Iterator[CephCluster]:
    assert not missing_binaries(), f"install Debian's ceph: {missing_binaries()}"
    assert rbd.available(), "this build has no librbd: install librbd-dev and rebuild"
    with CephCluster() as cluster:
        yield cluster


@pytest.fixture
def access(ceph: CephCluster) -> rbd.RbdAccess:
    return rbd.RbdAccess(
        monitors=ceph.monitors, user=ceph.user, key=SecretStr(ceph.key), pool=ceph.pool
    )
