"""What a user does with csi-vduse on a real cluster, step by step, each step checked: Helm
install, the examples' claims in pods, growth, a plugin restart under fio --verify, cleanup,
upgrade and uninstall. A real API server, kubelet, containerd, the chart's sidecars and the
helm CLI, in the VDUSE lab."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config
from kubernetes.stream import stream

from tests.cluster.images import image_reference
from tests.cluster.node import NODE_NAME, Node

REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "kube-system"
RELEASE = "csi-vduse"
DRIVER = "vduse.csi.dev"
EXAMPLE_IMAGE = "busybox:1.36.1"  # the examples name Docker Hub's; the lab has none


class Cluster:
    """The admin's view: the API client, kubectl, helm, and the images the lab imported."""

    def __init__(self, node: Node) -> None:
        assert node.plane is not None
        self.node = node
        self.kubeconfig = node.plane.admin_kubeconfig
        config.load_kube_config(str(self.kubeconfig))  # type: ignore[no-untyped-call]
        # Any: the client's models make every field optional; a missing one is a failure here
        self.core: Any = client.CoreV1Api()
        self.apps: Any = client.AppsV1Api()
        self.storage: Any = client.StorageV1Api()
        self.images: dict[str, str] = {}

    def helm(self, *args: str) -> str:
        result = subprocess.run(
            [str(self.node.bins["helm"]), f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result.stdout

    def apply(self, manifest: str) -> None:
        subprocess.run(
            [str(self.node.bins["kubectl"]), f"--kubeconfig={self.kubeconfig}", "apply", "-f", "-"],
            input=manifest, text=True, check=True, capture_output=True,
        )  # fmt: skip

    def example(self, name: str) -> str:
        """An example manifest as an air-gapped user applies it: the image swapped for the
        one the cluster has."""
        return (REPO / "examples" / name).read_text().replace(EXAMPLE_IMAGE, self.images["busybox"])

    def exec(self, pod: str, command: str) -> str:
        out: str = stream(
            self.core.connect_get_namespaced_pod_exec, pod, "default",
            command=["sh", "-c", command], stderr=True, stdin=False, stdout=True, tty=False,
        )  # fmt: skip
        return out

    def pod_phase(self, name: str, namespace: str = "default") -> str:
        return str(self.core.read_namespaced_pod(name, namespace).status.phase)

    def plugin_pods(self) -> list[Any]:
        return list(self.core.list_namespaced_pod(
            NAMESPACE, label_selector="app.kubernetes.io/component=node").items)  # fmt: skip


def wait(what: str, cond: Callable[[], object], timeout: float = 600) -> Any:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = cond()
            if last:
                return last
        except client.ApiException as e:
            last = f"{e.status} {e.reason}"
        time.sleep(2)
    raise AssertionError(f"timed out waiting for {what} (last: {last})")


def ready(pod: Any) -> bool:
    conditions = pod.status.conditions or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


@pytest.fixture(scope="module")
def k8s(cluster: Node) -> Cluster:
    c = Cluster(cluster)
    c.images = {name: image_reference(archive) for name, archive in cluster.images.items()}
    return c


def chart_values(k8s: Cluster, **extra: Any) -> list[str]:
    def image(name: str) -> dict[str, str]:
        repository, tag = k8s.images[name].rsplit(":", 1)
        return {"repository": repository, "tag": tag, "pullPolicy": "Never"}

    values = {
        "kubeletDir": str(k8s.node.kubelet_dir),
        "dataDir": str(k8s.node.workdir / "csi-vduse-data"),
        "images": {"plugin": image("csi-vduse"), "provisioner": image("csi-provisioner"),
                   "resizer": image("csi-resizer")},
        "logLevel": "debug",
        **extra,
    }  # fmt: skip
    path = k8s.node.workdir / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return ["-f", str(path)]


def test_1_helm_install(k8s: Cluster) -> None:
    k8s.helm("install", RELEASE, str(REPO / "charts" / "csi-vduse"), "--namespace", NAMESPACE,
             *chart_values(k8s))  # fmt: skip
    wait("the plugin pod to be Ready", lambda: [p for p in k8s.plugin_pods() if ready(p)])
    csinode = wait("the driver on the CSINode", lambda: [
        d for d in k8s.storage.read_csi_node(NODE_NAME).spec.drivers or [] if d.name == DRIVER
    ])  # fmt: skip
    assert csinode[0].node_id == NODE_NAME
    capacities = wait("CSIStorageCapacity objects", lambda: [
        c for c in k8s.storage.list_namespaced_csi_storage_capacity(NAMESPACE).items
        if c.storage_class_name in ("csi-vduse", "csi-vduse-block") and c.capacity
    ])  # fmt: skip
    assert {c.storage_class_name for c in capacities} == {"csi-vduse", "csi-vduse-block"}


def test_2_filesystem_claim_keeps_its_data_across_pods(k8s: Cluster) -> None:
    k8s.apply(k8s.example("pvc-filesystem.yaml"))
    wait("the claim to bind", lambda: k8s.core.read_namespaced_persistent_volume_claim(
        "vduse-fs", "default").status.phase == "Bound")  # fmt: skip
    wait("the writer to run", lambda: k8s.pod_phase("vduse-fs-writer") == "Running")

    def written() -> list[str]:
        lines = [line for line in k8s.exec("vduse-fs-writer", "cat /data/log").splitlines() if line]
        return lines if len(lines) >= 2 else []

    lines = wait("two lines written", written)
    k8s.core.delete_namespaced_pod("vduse-fs-writer", "default")
    wait("the writer to go", lambda: "vduse-fs-writer" not in [
        p.metadata.name for p in k8s.core.list_namespaced_pod("default").items])  # fmt: skip
    k8s.apply(reader_pod(k8s, "vduse-fs-reader", "vduse-fs"))
    wait("the reader to run", lambda: k8s.pod_phase("vduse-fs-reader") == "Running")
    after = k8s.exec("vduse-fs-reader", "cat /data/log").splitlines()
    assert after[: len(lines)] == lines


def reader_pod(k8s: Cluster, name: str, claim: str) -> str:
    return yaml.safe_dump({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"containers": [{
            "name": "reader", "image": k8s.images["busybox"],
            "command": ["sh", "-c", "sleep 3600"],
            "volumeMounts": [{"name": "data", "mountPath": "/data"}],
        }], "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}]},
    })  # fmt: skip


def test_3_block_claim_reads_back_what_it_wrote(k8s: Cluster) -> None:
    k8s.apply(k8s.example("pvc-block.yaml"))
    wait("the block user to run", lambda: k8s.pod_phase("vduse-block-user") == "Running")
    out = k8s.exec("vduse-block-user", (
        "dd if=/dev/urandom of=/tmp/r bs=1M count=8 2>/dev/null && "
        "dd if=/tmp/r of=/dev/xvda bs=1M seek=4 conv=fsync 2>/dev/null && "
        "dd if=/dev/xvda bs=1M skip=4 count=8 iflag=direct 2>/dev/null | sha256sum; "
        "sha256sum /tmp/r"
    ))  # fmt: skip
    written, read = (line.split()[0] for line in out.splitlines()[-2:])
    assert written == read


def test_4_a_filesystem_grows_while_its_pod_runs(k8s: Cluster) -> None:
    def size() -> int:
        return int(k8s.exec("vduse-fs-reader", "df -k /data | tail -1").split()[1])

    before = size()
    k8s.core.patch_namespaced_persistent_volume_claim(
        "vduse-fs", "default", {"spec": {"resources": {"requests": {"storage": "2Gi"}}}}
    )
    wait("df to show the new size", lambda: size() > 1.8 * before)


def test_5_the_plugin_restarts_under_fio_verify(k8s: Cluster) -> None:
    k8s.apply(fio_pod(k8s))
    wait("fio to run", lambda: k8s.pod_phase("vduse-fio") == "Running")
    time.sleep(10)
    [old] = k8s.plugin_pods()
    k8s.core.delete_namespaced_pod(old.metadata.name, NAMESPACE)  # OnDelete: a new one comes
    wait("a new plugin pod to be Ready", lambda: [
        p for p in k8s.plugin_pods() if p.metadata.uid != old.metadata.uid and ready(p)
    ])  # fmt: skip
    phase = wait("fio to finish", lambda: k8s.pod_phase("vduse-fio") in ("Succeeded", "Failed")
                 and k8s.pod_phase("vduse-fio"), timeout=1200)  # fmt: skip
    log = k8s.core.read_namespaced_pod_log("vduse-fio", "default")
    report = json.loads(log[log.index("{") :])
    assert phase == "Succeeded" and all(job["error"] == 0 for job in report["jobs"]), log[-3000:]


def fio_pod(k8s: Cluster) -> str:
    claim = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "vduse-fio"},
             "spec": {"storageClassName": "csi-vduse-block", "volumeMode": "Block",
                      "accessModes": ["ReadWriteOnce"],
                      "resources": {"requests": {"storage": "256Mi"}}}}  # fmt: skip
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "vduse-fio"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "fio",
                    "image": k8s.images["fio"],
                    "command": [
                        "fio",
                        "--name=verify",
                        "--filename=/dev/xvda",
                        "--direct=1",
                        "--ioengine=libaio",
                        "--rw=randwrite",
                        "--bs=4k",
                        "--iodepth=16",
                        "--size=192M",
                        "--verify=crc32c",
                        "--verify_fatal=1",
                        "--output-format=json",
                    ],
                    "volumeDevices": [{"name": "disk", "devicePath": "/dev/xvda"}],
                }
            ],
            "volumes": [{"name": "disk", "persistentVolumeClaim": {"claimName": "vduse-fio"}}],
        },
    }
    return yaml.safe_dump_all([claim, pod])  # fmt: skip


def test_6_upgrade_to_changed_values(k8s: Cluster) -> None:
    k8s.helm("upgrade", RELEASE, str(REPO / "charts" / "csi-vduse"), "--namespace", NAMESPACE,
             *chart_values(k8s, maxVolumesPerNode=16, logLevel="info"))  # fmt: skip
    daemonset = k8s.apps.read_namespaced_daemon_set(f"{RELEASE}-node", NAMESPACE)
    args = daemonset.spec.template.spec.containers[0].args
    assert "--max-volumes=16" in args
    [old] = k8s.plugin_pods()
    k8s.core.delete_namespaced_pod(old.metadata.name, NAMESPACE)  # OnDelete: the user rolls it
    wait("the upgraded plugin pod to be Ready", lambda: [
        p for p in k8s.plugin_pods() if p.metadata.uid != old.metadata.uid and ready(p)
    ])  # fmt: skip
    info = wait("the kubelet to see the new limit", lambda: [
        d for d in k8s.storage.read_csi_node(NODE_NAME).spec.drivers or []
        if d.name == DRIVER and d.allocatable and d.allocatable.count == 16
    ])  # fmt: skip
    assert info


def test_7_deleting_claims_removes_volumes_and_uninstall_leaves_nothing(k8s: Cluster) -> None:
    for pod in ("vduse-fs-reader", "vduse-block-user", "vduse-fio"):
        k8s.core.delete_namespaced_pod(pod, "default")
    for claim in ("vduse-fs", "vduse-block", "vduse-fio"):
        k8s.core.delete_namespaced_persistent_volume_claim(claim, "default")
    wait("every volume to be deleted", lambda: not k8s.core.list_persistent_volume().items)
    images = k8s.node.workdir / "csi-vduse-data" / "volumes"
    wait("every image to be gone", lambda: not list(images.glob("*.img")))
    k8s.helm("uninstall", RELEASE, "--namespace", NAMESPACE, "--cascade=foreground", "--wait")

    # foreground cascade: helm returns once the DaemonSet's pods are gone, not merely doomed
    left = [
        *(f"pod/{p.metadata.name}" for p in k8s.plugin_pods()),
        *(f"csidriver/{d.metadata.name}" for d in k8s.storage.list_csi_driver().items
          if d.metadata.name == DRIVER),
        *(f"storageclass/{s.metadata.name}" for s in k8s.storage.list_storage_class().items
          if s.provisioner == DRIVER),
        *(f"csistoragecapacity/{c.metadata.name}"
          for c in k8s.storage.list_namespaced_csi_storage_capacity(NAMESPACE).items),
    ]  # fmt: skip
    assert not left
