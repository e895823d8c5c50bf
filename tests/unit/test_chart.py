"""The Helm chart (charts/csi-vduse), the manifests rendered from it and the examples.

Rendered offline with helm-python (Helm's Go SDK, no helm binary, no cluster): the values
schema, `helm lint --strict`, the Kubernetes schemas of the oldest and the newest release the
chart claims, and the wiring between the plugin, its sidecars and the host. manifests/ is the
chart rendered with its default values; regenerate it with

    python -m tests.unit.test_chart --write
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import io
import json
import logging
import os
import re
import socket
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry

import csi_vduse
import csi_vduse.cluster.run
import csi_vduse.csi.server
from csi_vduse import cli
from csi_vduse.cluster import resources
from csi_vduse.config import AgentConfig, ServeConfig
from csi_vduse.health import HealthServer
from csi_vduse.lifecycle.provisioning import parse_parameters, parse_qos

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "csi-vduse"
MANIFEST = ROOT / "manifests" / "csi-vduse.yaml"
EXAMPLES = ROOT / "examples"
RELEASE = "csi-vduse"
NAMESPACE = "kube-system"
REGENERATE = "python -m tests.unit.test_chart --write"

Obj = dict[str, Any]

# Install order of the kinds the chart renders (the order of manifests/csi-vduse.yaml).
KIND_ORDER = (
    "CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role",
    "RoleBinding", "CSIDriver", "StorageClass", "Service", "DaemonSet", "Deployment",
    # Helm installs the kinds it does not know last
    "VolumeAttributesClass", "VolumeSnapshotClass", "PodMonitor",
)  # fmt: skip
# not in the Kubernetes schemas: the snapshot add-on's and the Prometheus Operator's
CRD_KINDS = {"VolumeSnapshotClass", "PodMonitor"}
VAC_SINCE = (1, 34)  # storage.k8s.io/v1 VolumeAttributesClass
NAMESPACED = {
    "ServiceAccount", "Role", "RoleBinding", "DaemonSet", "Deployment", "Service", "PodMonitor",
}  # fmt: skip
SIDECARS = ("csi-provisioner", "csi-resizer", "csi-snapshotter")

# Every option switched on or away from its default.
ALL_ON: Obj = {
    "nameOverride": "vduse",
    "driverName": "blk.vduse.example.com",
    "kubeletDir": "/var/snap/microk8s/common/var/lib/kubelet",
    "stateDir": "/run/vduse-state",
    "dataDir": "/srv/vduse/images",
    "logLevel": "debug",
    "logFormat": "text",
    "sidecarLogLevel": 5,
    "maxVolumesPerNode": 128,
    "defaultFsType": "xfs",
    "storageCapacity": True,
    "csiDriver": {"fsGroupPolicy": "ReadWriteOnceWithFSType"},
    "controller": {
        "replicas": 2,
        "agentWaitSeconds": 20,
        "healthPort": 19811,
        "hostNetwork": True,
        "priorityClassName": "",
        "nodeSelector": {"example.com/control": "true"},
        "tolerations": [{"key": "example.com/control", "operator": "Exists"}],
        "affinity": {"podAntiAffinity": {}},
    },
    "images": {
        "plugin": {
            "repository": "registry.example.com/storage/csi-vduse",
            "tag": "0.1.0-rc.1",
            "pullPolicy": "Always",
        },
        "provisioner": {
            "repository": "registry.example.com/sig-storage/csi-provisioner",
            "tag": "v5.3.0",
            "digest": "sha256:" + "a" * 64,
        },
    },
    "imagePullSecrets": [{"name": "regcred"}],
    "resizer": {"enabled": True},
    "snapshotter": {"enabled": True},
    "metrics": {
        "service": {"enabled": True},
        "podMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prom"}},
    },
    "volumeSnapshotClasses": [
        {"name": "vduse-snap", "isDefault": True, "deletionPolicy": "Retain"},
        {"name": "vduse-snap-delete"},
        {"name": "vduse-snap-rbd", "secret": {"name": "ceph", "namespace": "storage"}},
    ],
    "serviceAccount": {
        "create": True,
        "name": "vduse-node",
        "controllerName": "vduse-controller",
        "annotations": {"example.com/owner": "storage"},
    },
    "pluginHealthPort": 19810,
    "resources": {
        name: {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}}
        for name in ("plugin", "agent", "controller", "provisioner", "resizer", "snapshotter")
    },
    "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "10%"}},
    "priorityClassName": "system-cluster-critical",
    "nodeSelector": {"kubernetes.io/os": "linux", "example.com/vduse": "true"},
    "tolerations": [
        {"key": "example.com/storage", "operator": "Equal", "value": "only", "effect": "NoSchedule"}
    ],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "example.com/vduse", "operator": "Exists"}]}
                ]
            }
        }
    },
    "podAnnotations": {"example.com/scrape": "false"},
    "podLabels": {"example.com/team": "storage"},
    "storageClasses": [
        {
            "name": "vduse-xfs",
            "isDefault": True,
            "fsType": "xfs",
            "reclaimPolicy": "Retain",
            "allowVolumeExpansion": False,
            "mountOptions": ["noatime", "discard"],
            "labels": {"example.com/tier": "local"},
            "annotations": {"example.com/note": "node-local"},
            "parameters": {"queues": 4, "queueSize": 1024, "writeIOPS": 5000},
        },
        {
            "name": "vduse-raw",
            "parameters": {
                "queues": 64,
                "queueSize": 4,
                "provisioning": "thick",
                "attach": "vhost-vdpa",
                "readBytesPerSecond": "200Mi",
                "burstMilliseconds": "250",
            },
        },
        {
            "name": "vduse-rbd",
            "parameters": {"backend": "rbd", "pool": "volumes", "queues": 2},
            "secret": {"name": "ceph-csi", "namespace": "ceph"},
        },
    ],
    "volumeAttributesClasses": [
        {"name": "vduse-gold", "parameters": {"readIOPS": 20000, "writeBytesPerSecond": "1Gi"}},
        {"name": "vduse-unlimited", "parameters": {"readIOPS": 0, "writeIOPS": "0"}},
    ],
}

# Every optional part switched off.
ALL_OFF: Obj = {
    "storageCapacity": False,
    "resizer": {"enabled": False},
    "serviceAccount": {
        "create": False,
        "name": "existing-account",
        "controllerName": "existing-controller",
    },
    "priorityClassName": "",
    "nodeSelector": {},
    "tolerations": [],
    "resources": {name: {} for name in ("plugin", "agent", "controller", "provisioner")},
    "storageClasses": [],
}

VALUE_SETS: dict[str, Obj | None] = {"defaults": None, "all-on": ALL_ON, "all-off": ALL_OFF}


# --- rendering ----------------------------------------------------------------------------


@functools.cache
def _rendered(values_json: str) -> dict[str, str]:
    values = json.loads(values_json)
    with helm.Chart.load(CHART) as chart:
        return chart.render(values, name=RELEASE, namespace=NAMESPACE)


def render(values: Obj | None) -> dict[str, str]:
    """Template path -> rendered text (cached; the values go in as JSON, the cache key)."""
    return _rendered(json.dumps(values, sort_keys=True))


def documents(values: Obj | None) -> list[tuple[str, str, Obj]]:
    """(template path, document text, object) for every object, in install order."""
    docs = []
    for path, text in render(values).items():
        if not path.endswith(".yaml"):
            continue
        for part in re.split(r"^---[ \t]*$", text, flags=re.MULTILINE):
            body = part.strip("\n")
            obj = yaml.safe_load(body)
            if obj is not None:
                docs.append((path, body, obj))
    for _, _, obj in docs:
        assert obj["kind"] in KIND_ORDER, f"add {obj['kind']} to KIND_ORDER"
    return sorted(docs, key=lambda d: (KIND_ORDER.index(d[2]["kind"]), d[2]["metadata"]["name"]))


def objects(values: Obj | None) -> list[Obj]:
    return [obj for _, _, obj in documents(values)]


def manifest_text() -> str:
    """manifests/csi-vduse.yaml: the default render, one document per object."""
    header = (
        "# csi-vduse: charts/csi-vduse rendered with its default values (release csi-vduse,\n"
        f"# namespace {NAMESPACE}). Generated, do not edit: change the chart, then run\n"
        f"#   {REGENERATE}\n"
        "# Install: kubectl apply -f manifests/csi-vduse.yaml\n"
    )
    parts = [f"---\n# Source: {path}\n{body}\n" for path, body, _ in documents(None)]
    crds = [f"---\n# Source: {p.relative_to(CHART.parent)}\n{text.strip()}\n"
            for p, text in crd_documents()]  # fmt: skip
    return header + "".join(crds) + "".join(parts)


def crd_documents() -> list[tuple[Path, str]]:
    """The chart's crds/ (Helm installs them and never renders or deletes them)."""
    docs = []
    for path in sorted((CHART / "crds").glob("*.yaml")):
        for part in re.split(r"^---[ \t]*$", path.read_text(), flags=re.MULTILINE):
            if yaml.safe_load(part) is not None:
                docs.append((path, part))
    return docs


def merged(values: Obj | None) -> Obj:
    with helm.Chart.load(CHART) as chart:
        return chart.merge_values(values)


def one(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objs if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def of_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def pod_spec(objs: list[Obj], kind: str = "DaemonSet") -> Obj:
    spec: Obj = one(objs, kind)["spec"]["template"]["spec"]
    return spec


def containers(objs: list[Obj], kind: str = "DaemonSet") -> dict[str, Obj]:
    return {c["name"]: c for c in pod_spec(objs, kind)["containers"]}


def controller(objs: list[Obj]) -> dict[str, Obj]:
    return containers(objs, "Deployment")


def flag(args: list[str], name: str) -> str:
    """The value of --name=VALUE in args (exactly one)."""
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")]
    assert len(values) == 1, f"{name}= appears {len(values)} times in {args}"
    return values[0]


def host_mount(spec: Obj, container: Obj, path: str) -> tuple[str, Obj]:
    """The host path that `path` inside `container` is, and the volumeMount that makes it so
    (the deepest mount holding the path; it must come from a hostPath volume)."""
    volumes = {v["name"]: v for v in spec["volumes"]}
    best: tuple[str, Obj] | None = None
    for mount in container.get("volumeMounts", []):
        at = mount["mountPath"].rstrip("/") or "/"
        inside = path == at or path.startswith(at.rstrip("/") + "/")
        if inside and (best is None or len(at) > len(best[0])):
            best = (at, mount)
    assert best is not None, f"{path} is not on any volume of container {container['name']}"
    at, mount = best
    volume = volumes[mount["name"]]
    assert "hostPath" in volume, f"volume {mount['name']} ({path}) is not a hostPath"
    return volume["hostPath"]["path"].rstrip("/") + path[len(at) :], mount


def help_text(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--help"])
    assert exit_.value.code == 0
    return out.getvalue()


def claimed_kube_versions() -> tuple[str, str]:
    """The oldest Kubernetes release Chart.yaml's kubeVersion allows, and the newest one
    kubernetes-validate has schemas for (the range is open-ended)."""
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    match = re.fullmatch(r">=\s*(\d+)\.(\d+)\.0-0", meta["kubeVersion"])
    assert match, f"kubeVersion {meta['kubeVersion']!r}: expected '>=X.Y.0-0'"
    return f"{match[1]}.{match[2]}.0", kubernetes_validate.latest_version()


KUBE_VERSIONS = claimed_kube_versions()


# --- schema, lint, Kubernetes schemas ------------------------------------------------------


@pytest.mark.parametrize("name", VALUE_SETS)
def test_values_pass_the_schema(name: str) -> None:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(chart.merge_values(VALUE_SETS[name]))


@pytest.mark.parametrize("name", ["defaults", "all-on"])
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_helm_lint_strict_is_clean(name: str, kube_version: str) -> None:
    report = helm.lint(CHART, VALUE_SETS[name], strict=True, kube_version=f"v{kube_version}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize("name", VALUE_SETS)
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_objects_validate_against_kubernetes(name: str, kube_version: str) -> None:
    objs = objects(VALUE_SETS[name])
    assert objs
    for obj in objs:
        major, minor, *_ = kube_version.split(".")
        if obj["kind"] == "VolumeAttributesClass" and (int(major), int(minor)) < VAC_SINCE:
            continue  # the chart's values document that these need Kubernetes 1.34
        if obj["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = "/".join(str(p) for p in e.path)
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']} at {where}: {e.message}")


def test_kube_version_range_is_covered_by_the_schemas() -> None:
    oldest, newest = KUBE_VERSIONS
    versions = kubernetes_validate.utils.all_versions()

    def minor(v: str) -> tuple[int, int]:
        major, minor_, *_ = v.split(".")
        return int(major), int(minor_)

    assert minor(versions[0]) <= minor(oldest) <= minor(newest)


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"kubeletDir": "var/lib/kubelet"}, "kubeletDir"),
        ({"kubeletDir": "/var/lib/kubelet/"}, "kubeletDir"),
        ({"driverNmae": "vduse.csi.dev"}, "driverNmae"),
        ({"driverName": "Not_A_Domain"}, "driverName"),
        ({"storageClasses": [{"name": "x", "parameters": {"queueSize": 3}}]}, "queueSize"),
        ({"storageClasses": [{"name": "x", "parameters": {"queueSize": 2}}]}, "queueSize"),
        (
            {"storageClasses": [{"name": "x", "parameters": {"provisioning": "fat"}}]},
            "provisioning",
        ),
        ({"storageClasses": [{"name": "x", "parameters": {"queues": 65}}]}, "queues"),
        ({"storageClasses": [{"name": "x", "parameters": {"attach": "vhost"}}]}, "attach"),
        ({"storageClasses": [{"name": "x", "fsType": "btrfs"}]}, "fsType"),
        ({"storageClasses": [{"name": "x", "parameters": {"backend": "ceph"}}]}, "backend"),
        ({"storageClasses": [{"name": "x", "parameters": {"pool": "a/b"}}]}, "pool"),
        ({"storageClasses": [{"name": "x", "secret": {"name": "s"}}]}, "namespace"),
        ({"storageClasses": [{"name": "x", "parameters": {"readIOPS": -1}}]}, "readIOPS"),
        (
            {"storageClasses": [{"name": "x", "parameters": {"writeBytesPerSecond": "fast"}}]},
            "writeBytesPerSecond",
        ),
        ({"volumeAttributesClasses": [{"name": "x", "parameters": {"queues": 2}}]}, "queues"),
        ({"volumeAttributesClasses": [{"name": "x", "parameters": {}}]}, "parameters"),
        # impossible settings are not settings
        ({"csiDriver": {"attachRequired": True}}, "attachRequired"),
        ({"images": {"provisioner": {"repository": "r", "tag": "latest"}}}, "tag"),
        ({"images": {"plugin": {"repository": "r", "tag": "latest"}}}, "tag"),
        ({"updateStrategy": {"type": "Recreate"}}, "updateStrategy"),
        ({"logLevel": "verbose"}, "logLevel"),
        ({"resources": {"plugin": {"requests": {"cpu": "lots"}}}}, "cpu"),
        # the sidecars the plugin replaced: an old values file names what is gone
        ({"registrarHealthPort": 9819}, "registrarHealthPort"),
        ({"images": {"registrar": {"repository": "r", "tag": "v2.14.0"}}}, "registrar"),
    ],
)
def test_schema_rejects_bad_values_naming_the_key(values: Obj, key: str) -> None:
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError) as err:
            chart.validate_schema(chart.merge_values(values))
        assert key in str(err.value)
        # An install or template with the same values stops with the same message.
        with pytest.raises(helm.HelmValuesError) as err:
            chart.render(values, name=RELEASE, namespace=NAMESPACE)
        assert key in str(err.value)


def test_values_file_violating_the_schema_is_rejected(tmp_path: Path) -> None:
    """What `helm install -f my-values.yaml` does with a file holding two mistakes."""
    values_file = tmp_path / "my-values.yaml"
    values_file.write_text(
        "kubeletDir: /var/lib/kubelet\n"
        "storageClasses:\n"
        "  - name: fast\n"
        "    parameters:\n"
        "      queueSize: 100\n"
        "updateStrategy:\n"
        "  type: OnDelete\n"
        "  maxUnavailable: 1\n"
    )
    values = helm.values_from_yaml(values_file.read_text())
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError) as err:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    message = str(err.value)
    assert "/storageClasses/0/parameters/queueSize" in message
    assert "maxUnavailable" in message


# --- the plugin container -----------------------------------------------------------------


def csi_vduse_containers(objs: list[Obj]) -> dict[str, Obj]:
    """Every container that runs the csi-vduse image: the node plugin, its agent and the
    controller's plugin."""
    return {
        "node plugin": containers(objs)["csi-vduse"], "agent": containers(objs)["agent"],
        "controller plugin": controller(objs)["csi-vduse"],
    }  # fmt: skip


@pytest.mark.parametrize("name", VALUE_SETS)
def test_plugin_flags_exist_in_the_cli(name: str) -> None:
    for which, container in csi_vduse_containers(objects(VALUE_SETS[name])).items():
        args = container["args"]
        command = "agent" if which == "agent" else "serve"
        assert command in args, args
        where = args.index(command)
        helps = {"global": help_text([]), command: help_text([command])}
        for i, arg in enumerate(args):
            if arg == command:
                continue
            assert arg.startswith("--"), f"{which}: unexpected argument {arg!r}"
            option = arg.split("=", 1)[0]
            scope = "global" if i < where else command
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", helps[scope]), (
                f"{which}: {option} is not a {scope} flag of csi-vduse (`csi-vduse "
                f"{'' if scope == 'global' else command + ' '}--help`)"
            )


@pytest.mark.parametrize("name", VALUE_SETS)
def test_plugin_env_names_serve_settings(name: str) -> None:
    for which, container in csi_vduse_containers(objects(VALUE_SETS[name])).items():
        settings = AgentConfig if which == "agent" else ServeConfig
        env = container.get("env", [])
        names = [e["name"] for e in env if e["name"].startswith("CSI_VDUSE_")]
        assert "CSI_VDUSE_NODE_ID" in names
        for env_name in names:
            field = env_name.removeprefix("CSI_VDUSE_").lower()
            assert field in settings.model_fields, f"{which}: {env_name} is no setting"
        node_id = next(e for e in env if e["name"] == "CSI_VDUSE_NODE_ID")
        assert node_id["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


@pytest.fixture
def keep_logging() -> Iterator[None]:
    """cli.main configures the root logger; put it back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize("name", ["defaults", "all-on"])
@pytest.mark.usefixtures("keep_logging")
def test_plugin_starts_with_the_charts_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The container's args and env through the real CLI give the intended ServeConfig."""
    values = merged(VALUE_SETS[name])
    plugin = containers(objects(VALUE_SETS[name]))["csi-vduse"]
    seen: list[ServeConfig] = []

    def fake_serve(config: ServeConfig) -> int:
        seen.append(config)
        return 0

    monkeypatch.setattr(csi_vduse.csi.server, "serve", fake_serve)
    assert run_with_env(plugin, monkeypatch) == 0
    (config,) = seen
    assert config.node_id == "node-1"
    assert config.driver_name == values["driverName"]
    assert config.topology_key == f"topology.{values['driverName']}/node"
    assert str(config.state_dir) == values["stateDir"]
    assert str(config.data_dir) == values["dataDir"]
    assert config.components == ("identity", "controller", "node")
    assert config.max_volumes == values["maxVolumesPerNode"]
    assert config.log_level == values["logLevel"]
    assert config.log_format == values["logFormat"]
    assert config.health_address == f":{values['pluginHealthPort']}"
    kubelet, driver = values["kubeletDir"], values["driverName"]
    assert config.registration_socket == Path(f"{kubelet}/plugins_registry/{driver}-reg.sock")
    assert config.kubelet_endpoint == f"{kubelet}/plugins/{driver}/csi.sock"
    assert config.controller_scope == "node"

    seen.clear()
    assert run_with_env(controller(objects(VALUE_SETS[name]))["csi-vduse"], monkeypatch) == 0
    (config,) = seen
    assert config.components == ("identity", "controller")
    assert config.controller_scope == "cluster" and config.kubeconfig is None  # in-cluster
    assert config.driver_name == values["driverName"]
    assert config.agent_wait == values["controller"]["agentWaitSeconds"]
    assert config.health_address == f":{values['controller']['healthPort']}"

    agents: list[AgentConfig] = []

    def fake_agent(config: AgentConfig) -> int:
        agents.append(config)
        return 0

    monkeypatch.setattr(csi_vduse.cluster.run, "run_agent", fake_agent)
    assert run_with_env(containers(objects(VALUE_SETS[name]))["agent"], monkeypatch) == 0
    (agent,) = agents
    assert agent.node_id == "node-1" and agent.kubeconfig is None
    assert f"unix://{agent.endpoint.removeprefix('unix://')}" == flag(plugin["args"], "--endpoint")


def run_with_env(container: Obj, monkeypatch: pytest.MonkeyPatch) -> int:
    """cli.main with the container's args and environment (spec.nodeName = node-1)."""
    for key in [k for k in os.environ if k.startswith("CSI_VDUSE_")]:
        monkeypatch.delenv(key)
    for env in container.get("env", []):
        value = env.get("value")
        if value is None and env["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName":
            value = "node-1"
        assert value is not None, env
        monkeypatch.setenv(env["name"], value)
    assert "command" not in container, "the image's ENTRYPOINT is csi-vduse"
    return cli.main(container["args"])


@pytest.mark.parametrize("name", VALUE_SETS)
def test_one_socket_shared_by_plugin_sidecars_and_kubelet(name: str) -> None:
    """The sidecars dial the plugin's socket, and the plugin tells the kubelet (registering
    itself) the host path of that same socket."""
    values = merged(VALUE_SETS[name])
    objs = objects(VALUE_SETS[name])
    spec, by_name = pod_spec(objs), containers(objs)
    plugin = by_name["csi-vduse"]
    endpoint = flag(plugin["args"], "--endpoint")
    assert endpoint.startswith("unix:///")
    socket, _ = host_mount(spec, plugin, endpoint.removeprefix("unix://"))
    kubelet_socket = f"{values['kubeletDir']}/plugins/{values['driverName']}/csi.sock"
    assert socket == kubelet_socket

    agent = by_name["agent"]
    assert (
        host_mount(spec, agent, flag(agent["args"], "--endpoint").removeprefix("unix://"))[0]
        == socket
    )
    assert flag(plugin["args"], "--kubelet-endpoint") == kubelet_socket
    assert not [s for s in SIDECARS if s in by_name], "the sidecars run in the controller"

    # the controller: its sidecars dial its plugin's socket, in a volume of their own pod
    ctl, ctl_spec = controller(objs), pod_spec(objs, "Deployment")
    sidecars = [s for s in SIDECARS if s in ctl]
    switched = {"csi-resizer": values["resizer"]["enabled"],
                "csi-snapshotter": values["snapshotter"]["enabled"]}  # fmt: skip
    assert sidecars == [s for s in SIDECARS if switched.get(s, True)]
    own = flag(ctl["csi-vduse"]["args"], "--endpoint").removeprefix("unix://")
    volumes = {v["name"]: v for v in ctl_spec["volumes"]}
    for sidecar in sidecars:
        assert flag(ctl[sidecar]["args"], "--csi-address") == own, sidecar
        (mount,) = ctl[sidecar]["volumeMounts"]
        assert own.startswith(mount["mountPath"] + "/")
        assert "emptyDir" in volumes[mount["name"]]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_plugin_registers_itself_where_the_kubelet_watches(name: str) -> None:
    """The kubelet's plugin watcher looks for sockets in <kubeletDir>/plugins_registry on the
    host; the plugin's registration socket must land there, under the driver's name."""
    values = merged(VALUE_SETS[name])
    objs = objects(VALUE_SETS[name])
    spec, by_name = pod_spec(objs), containers(objs)
    plugin = by_name["csi-vduse"]
    config = ServeConfig(
        node_id="node-1", driver_name=flag(plugin["args"], "--driver-name"),
        registration_dir=Path(flag(plugin["args"], "--registration-dir")),
        kubelet_endpoint=flag(plugin["args"], "--kubelet-endpoint"),
    )  # fmt: skip
    assert config.registration_socket is not None
    host, _ = host_mount(spec, plugin, str(config.registration_socket))
    registry = f"{values['kubeletDir']}/plugins_registry"
    assert host == f"{registry}/{values['driverName']}-reg.sock"
    volume = next(v for v in spec["volumes"] if v.get("hostPath", {}).get("path") == registry)
    assert volume["hostPath"]["type"] == "Directory", "the kubelet creates it; never guess it"
    others = [c["name"] for c in by_name.values() if c is not plugin and any(
        m["name"] == volume["name"] for m in c.get("volumeMounts", []))]  # fmt: skip
    assert others == [], "only the plugin registers with the kubelet"


@pytest.mark.parametrize("name", VALUE_SETS)
def test_plugin_sees_every_host_path_it_uses(name: str) -> None:
    values = merged(VALUE_SETS[name])
    objs = objects(VALUE_SETS[name])
    spec = pod_spec(objs)
    plugin = containers(objs)["csi-vduse"]
    assert spec["hostNetwork"] is True, "vdpa netlink answers in the host network namespace"
    assert spec["hostPID"] is True, "openers of a device are found in the host's /proc"
    assert plugin["securityContext"]["privileged"] is True

    kubelet = values["kubeletDir"]
    driver = values["driverName"]
    # path inside the container -> propagation it needs (None: any)
    needed: dict[str, str | None] = {
        "/dev/vduse/control": None,
        "/dev/vda": None,
        "/sys/bus/vdpa/drivers/virtio_vdpa/bind": None,
        "/sys/class/block/vda/holders": None,
        "/sys/block/vda/size": None,
        values["stateDir"]: None,
        values["dataDir"]: None,
        f"{kubelet}/plugins": "Bidirectional",
        f"{kubelet}/pods": "Bidirectional",
        f"{kubelet}/plugins_registry": None,
        # what kubelet passes: a staging path, a block publish path, a pod's publish target
        f"{kubelet}/plugins/kubernetes.io/csi/{driver}/0123abcd/globalmount": "Bidirectional",
        f"{kubelet}/plugins/kubernetes.io/csi/volumeDevices/publish/pv-1/uid-1": "Bidirectional",
        f"{kubelet}/pods/uid-1/volumes/kubernetes.io~csi/pv-1/mount": "Bidirectional",
    }
    for path, propagation in needed.items():
        host, mount = host_mount(spec, plugin, path)
        assert host == path, f"{path} is host path {host}: it must be the same path"
        if propagation:
            assert mount.get("mountPropagation") == propagation, path
    for option, value in (("--state-dir", values["stateDir"]), ("--data-dir", values["dataDir"])):
        assert flag(plugin["args"], option) == value
    state = next(
        v for v in spec["volumes"] if v.get("hostPath", {}).get("path") == values["stateDir"]
    )
    assert state["hostPath"]["type"] == "DirectoryOrCreate"


@pytest.mark.parametrize("name", VALUE_SETS)
def test_liveness_is_the_process_and_readiness_the_host(name: str) -> None:
    """Every probe of the plugin is its own HTTP endpoint (no livenessprobe sidecar): startup
    and liveness /livez, readiness /readyz, on the port --health-address serves."""
    values = merged(VALUE_SETS[name])
    objs = objects(VALUE_SETS[name])
    plugin = containers(objs)["csi-vduse"]
    ports = {p["name"]: p["containerPort"] for p in plugin["ports"]}
    own = int(flag(plugin["args"], "--health-address").rsplit(":", 1)[1])
    assert own == values["pluginHealthPort"]
    wanted = {"startupProbe": "/livez", "livenessProbe": "/livez", "readinessProbe": "/readyz"}
    for kind, path in wanted.items():
        get = plugin[kind]["httpGet"]
        assert get["path"] == path, kind
        assert ports[get["port"]] == own, kind
    # The pod shares the host's network: no two containers may claim one port.
    claimed = [p["containerPort"] for c in pod_spec(objs)["containers"] for p in c.get("ports", [])]
    assert len(claimed) == len(set(claimed)), claimed


def test_probe_paths_are_what_the_plugin_serves() -> None:
    """The probes' paths answer on the plugin's real health server (200 when healthy)."""
    plugin = containers(objects(None))["csi-vduse"]
    paths = {plugin[kind]["httpGet"]["path"] for kind in
             ("startupProbe", "livenessProbe", "readinessProbe")}  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = HealthServer(f"127.0.0.1:{port}", lambda: [], lambda: [], CollectorRegistry())
    server.start()
    try:
        for path in sorted(paths):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                assert r.status == 200, path
    finally:
        server.stop()


# --- sidecars, RBAC, CSIDriver, StorageClasses ---------------------------------------------


@pytest.mark.parametrize("name", VALUE_SETS)
def test_one_controller_elects_a_leader_among_its_sidecars(name: str) -> None:
    values = merged(VALUE_SETS[name])
    objs = objects(VALUE_SETS[name])
    deployment = one(objs, "Deployment")
    assert deployment["spec"]["replicas"] == values["controller"]["replicas"]
    spec, ctl = pod_spec(objs, "Deployment"), controller(objs)
    assert spec.get("hostNetwork", False) is values["controller"]["hostNetwork"]
    assert spec.get("nodeSelector", {}) == values["controller"]["nodeSelector"]
    assert spec.get("tolerations", []) == values["controller"]["tolerations"]
    assert "privileged" not in ctl["csi-vduse"]["securityContext"]
    assert not [v for v in spec["volumes"] if "hostPath" in v], "the controller needs no host"
    for sidecar in [s for s in SIDECARS if s in ctl]:
        args = ctl[sidecar]["args"]
        assert "--leader-election=true" in args, sidecar
        assert flag(args, "--leader-election-namespace") == NAMESPACE
        assert not [a for a in args if a.startswith("--node-deployment")], sidecar
    provisioner = ctl["csi-provisioner"]
    args = provisioner["args"]
    for required in ("--strict-topology=true", "--extra-create-metadata=true"):
        assert required in args
    # Topology is GA; newer provisioners refuse the gate
    assert not [a for a in args if a.startswith("--feature-gates")]
    assert flag(args, "--default-fstype") == values["defaultFsType"]
    env = {e["name"]: e for e in provisioner.get("env", [])}
    capacity = values["storageCapacity"]
    assert one(objs, "CSIDriver")["spec"]["storageCapacity"] is capacity
    assert ("--enable-capacity=true" in args) is capacity
    if capacity:  # pod -> ReplicaSet -> Deployment owns the CSIStorageCapacity objects
        assert flag(args, "--capacity-ownerref-level") == "2"
    assert ({"NAMESPACE", "POD_NAME"} <= set(env)) is capacity
    roles = of_kind(objs, "Role")
    resources = {r for role in roles for rule in role["rules"] for r in rule["resources"]}
    assert ("csistoragecapacities" in resources) is capacity
    assert "leases" in resources
    enabled = values["resizer"]["enabled"]
    assert ("csi-resizer" in ctl) is enabled
    assert (
        any(o["metadata"]["name"].endswith("-resizer") for o in of_kind(objs, "ClusterRole"))
        is enabled
    )


def rules_of(role: Obj) -> dict[tuple[str, str], set[str]]:
    return {(g, r): set(rule["verbs"]) for rule in role["rules"]
            for g in rule["apiGroups"] for r in rule["resources"]}  # fmt: skip


@pytest.mark.parametrize("name", VALUE_SETS)
def test_rbac_is_bound_to_the_pods_account_and_least_privilege(name: str) -> None:
    values = merged(VALUE_SETS[name])
    objs = objects(VALUE_SETS[name])
    node_account = pod_spec(objs)["serviceAccountName"]
    controller_account = pod_spec(objs, "Deployment")["serviceAccountName"]
    assert node_account != controller_account
    created = sorted(o["metadata"]["name"] for o in of_kind(objs, "ServiceAccount"))
    wanted = sorted([node_account, controller_account])
    assert created == (wanted if values["serviceAccount"]["create"] else [])
    roles = {(o["kind"], o["metadata"]["name"]): o for o in objs if o["kind"].endswith("Role")}
    bindings = of_kind(objs, "ClusterRoleBinding") + of_kind(objs, "RoleBinding")
    assert len(bindings) == len(roles)
    for binding in bindings:
        ref = (binding["roleRef"]["kind"], binding["roleRef"]["name"])
        assert ref in roles
        account = node_account if ref[1].endswith("-agent") else controller_account
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}
        ], ref
    for role in roles.values():
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
            if "secrets" in rule["resources"]:  # a class's CSI secrets, read by sidecars
                assert rule["resources"] == ["secrets"] and rule["verbs"] == ["get"], rule
                assert role["metadata"]["name"].endswith(
                    ("-provisioner", "-resizer", "-snapshotter")
                ), role
    # the agents act on their objects and report; only the controller creates or deletes them
    (agent,) = [r for (_, n), r in roles.items() if n.endswith("-agent")]
    granted = rules_of(agent)
    assert granted[("vduse.csi.dev", "vdusevolumes")] == {"get", "list", "watch", "patch"}
    assert granted[("vduse.csi.dev", "vdusevolumes/status")] == {"patch"}
    assert {g for g, _ in granted} == {"vduse.csi.dev"}
    (ctl,) = [r for (_, n), r in roles.items() if n.endswith("-controller")]
    assert "delete" in rules_of(ctl)[("vduse.csi.dev", "vdusevolumes")]
    # only an RBD volume's or snapshot's status (its object has no node, so no agent)
    assert rules_of(ctl)[("vduse.csi.dev", "vdusevolumes/status")] == {"patch"}
    assert rules_of(ctl)[("vduse.csi.dev", "vdusesnapshots/status")] == {"patch"}


def test_crds_are_what_the_code_reads_and_writes() -> None:
    crds = {yaml.safe_load(text)["spec"]["names"]["plural"]: yaml.safe_load(text)
            for _, text in crd_documents()}  # fmt: skip
    assert set(crds) == {resources.VOLUMES, resources.SNAPSHOTS, resources.NODES}
    for crd in crds.values():
        assert crd["spec"]["group"] == resources.GROUP
        assert crd["spec"]["scope"] == "Cluster"
        assert [v["name"] for v in crd["spec"]["versions"]] == [resources.VERSION]
        kubernetes_validate.validate(crd, KUBE_VERSIONS[0], strict=True)
    for plural in (resources.VOLUMES, resources.SNAPSHOTS):
        (version,) = crds[plural]["spec"]["versions"]
        assert version["subresources"] == {"status": {}}, "observedGeneration needs it"


@pytest.mark.parametrize("name", VALUE_SETS)
def test_csidriver(name: str) -> None:
    values = merged(VALUE_SETS[name])
    driver = one(objects(VALUE_SETS[name]), "CSIDriver")
    assert driver["metadata"]["name"] == values["driverName"]
    spec = driver["spec"]
    assert spec["attachRequired"] is False
    assert spec["fsGroupPolicy"] == values["csiDriver"]["fsGroupPolicy"]
    assert spec["volumeLifecycleModes"] == ["Persistent"]


def test_attach_is_not_required_by_default() -> None:
    """No ControllerPublishVolume, no external-attacher: kubelet must not wait for one."""
    assert one(objects(None), "CSIDriver")["spec"]["attachRequired"] is False
    assert not [c for c in containers(objects(None)) if "attacher" in c]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_storage_classes(name: str) -> None:
    values = merged(VALUE_SETS[name])
    classes = {o["metadata"]["name"]: o for o in of_kind(objects(VALUE_SETS[name]), "StorageClass")}
    assert list(classes) == sorted(c["name"] for c in values["storageClasses"])
    for wanted in values["storageClasses"]:
        sc = classes[wanted["name"]]
        assert sc["provisioner"] == values["driverName"]
        rbd = wanted.get("parameters", {}).get("backend") == "rbd"
        assert sc["volumeBindingMode"] == ("Immediate" if rbd else "WaitForFirstConsumer")
        expand = wanted.get("allowVolumeExpansion", values["resizer"]["enabled"])
        assert sc["allowVolumeExpansion"] is expand
        params = sc.get("parameters", {})
        assert all(isinstance(v, str) for v in params.values())
        assert params.pop("csi.storage.k8s.io/fstype", None) == wanted.get("fsType")
        secret = wanted.get("secret")
        for use in ("provisioner", "controller-expand", "node-stage"):
            prefix = f"csi.storage.k8s.io/{use}-secret"
            name_, namespace = (
                params.pop(f"{prefix}-name", None),
                params.pop(f"{prefix}-namespace", None),
            )
            assert (name_, namespace) == (
                (secret["name"], secret["namespace"]) if secret else (None, None)
            )
        assert params == {k: str(v) for k, v in wanted.get("parameters", {}).items()}
        assert parse_parameters(params) and parse_qos(params, only_qos=False)  # all known
        default = (
            sc["metadata"].get("annotations", {}).get("storageclass.kubernetes.io/is-default-class")
        )
        assert default == ("true" if wanted.get("isDefault") else None)


def test_an_rbd_class_names_its_secret() -> None:
    values = {"storageClasses": [{"name": "x", "parameters": {"backend": "rbd", "pool": "p"}}]}
    with pytest.raises(helm.HelmError) as err:
        render(values)
    assert "secret" in str(err.value)


def test_default_storage_classes_cover_filesystem_and_block() -> None:
    classes = {o["metadata"]["name"]: o for o in of_kind(objects(None), "StorageClass")}
    fs_types = {
        n: c.get("parameters", {}).get("csi.storage.k8s.io/fstype") for n, c in classes.items()
    }
    assert fs_types == {"csi-vduse": "ext4", "csi-vduse-block": None}
    for sc in classes.values():
        assert sc["allowVolumeExpansion"] is True
        # one queue: what the benchmark measured fastest on small nodes (README: Performance)
        assert "queues" not in sc.get("parameters", {})


def test_no_expansion_is_offered_without_a_resizer() -> None:
    values = {"resizer": {"enabled": False}, "storageClasses": [{"name": "x"}]}
    assert one(objects(values), "StorageClass")["allowVolumeExpansion"] is False
    values["storageClasses"] = [{"name": "x", "allowVolumeExpansion": True}]
    with pytest.raises(helm.HelmError) as err:
        render(values)
    assert "resizer.enabled" in str(err.value)
    vac = {"name": "x", "parameters": {"readIOPS": 1}}
    values = {"resizer": {"enabled": False}, "volumeAttributesClasses": [vac]}
    with pytest.raises(helm.HelmError) as err:
        render(values)
    assert "resizer.enabled" in str(err.value)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_volume_attributes_classes(name: str) -> None:
    values = merged(VALUE_SETS[name])
    classes = of_kind(objects(VALUE_SETS[name]), "VolumeAttributesClass")
    assert [c["metadata"]["name"] for c in classes] == [
        c["name"] for c in values.get("volumeAttributesClasses", [])
    ]
    for vac, wanted in zip(classes, values.get("volumeAttributesClasses", []), strict=True):
        assert vac["driverName"] == values["driverName"]
        assert vac["parameters"] == {k: str(v) for k, v in wanted["parameters"].items()}
        parse_qos(vac["parameters"])  # every one a mutable parameter the driver takes


@pytest.mark.parametrize("name", VALUE_SETS)
def test_snapshotter_runs_in_the_controller_with_its_classes(name: str) -> None:
    values = merged(VALUE_SETS[name])
    objs = objects(VALUE_SETS[name])
    enabled = values["snapshotter"]["enabled"]
    sidecar = controller(objs).get("csi-snapshotter")
    assert (sidecar is not None) is enabled
    classes = of_kind(objs, "VolumeSnapshotClass")
    roles = [
        o for o in of_kind(objs, "ClusterRole") if o["metadata"]["name"].endswith("-snapshotter")
    ]
    assert bool(roles) is enabled
    if not enabled:
        assert not classes
        return
    assert sidecar is not None
    assert [c["metadata"]["name"] for c in classes] == sorted(
        c["name"] for c in values["volumeSnapshotClasses"]
    )
    for vsc in classes:
        wanted = next(
            c for c in values["volumeSnapshotClasses"] if c["name"] == vsc["metadata"]["name"]
        )
        assert vsc["driver"] == values["driverName"]
        assert vsc["deletionPolicy"] == wanted.get("deletionPolicy", "Delete")
        default = (
            vsc["metadata"]
            .get("annotations", {})
            .get("snapshot.storage.kubernetes.io/is-default-class")
        )
        assert default == ("true" if wanted.get("isDefault") else None)
        # an rbd class's Secret, for CreateSnapshot and DeleteSnapshot
        secret = wanted.get("secret")
        assert vsc.get("parameters") == (
            {
                "csi.storage.k8s.io/snapshotter-secret-name": secret["name"],
                "csi.storage.k8s.io/snapshotter-secret-namespace": secret["namespace"],
            }
            if secret
            else None
        )
    rules = {(g, r): set(rule["verbs"]) for rule in roles[0]["rules"]
             for g in rule["apiGroups"] for r in rule["resources"]}  # fmt: skip
    assert rules[("snapshot.storage.k8s.io", "volumesnapshotcontents/status")] == {
        "update",
        "patch",
    }
    assert "delete" not in rules[("snapshot.storage.k8s.io", "volumesnapshotcontents")]
    # restores: the provisioner reads the snapshot and its content
    provisioner = next(
        o for o in of_kind(objs, "ClusterRole") if o["metadata"]["name"].endswith("-provisioner")
    )
    granted = {(g, r) for rule in provisioner["rules"] for g in rule["apiGroups"]
               for r in rule["resources"]}  # fmt: skip
    assert {("snapshot.storage.k8s.io", "volumesnapshots"),
            ("snapshot.storage.k8s.io", "volumesnapshotcontents")} <= granted  # fmt: skip


@pytest.mark.parametrize("name", VALUE_SETS)
def test_metrics_wiring_reaches_the_plugins_metrics_port(name: str) -> None:
    values = merged(VALUE_SETS[name])
    objs = objects(VALUE_SETS[name])
    plugin = containers(objs)["csi-vduse"]
    ports = {p["name"]: p["containerPort"] for p in plugin["ports"]}
    assert ports["health"] == values["pluginHealthPort"]
    assert flag(plugin["args"], "--health-address") == f":{values['pluginHealthPort']}"
    pod_labels = pod_spec_labels(objs)
    services = of_kind(objs, "Service")
    assert bool(services) is values["metrics"]["service"]["enabled"]
    for service in services:
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert [p["targetPort"] for p in service["spec"]["ports"]] == ["health"]
    monitors = of_kind(objs, "PodMonitor")
    assert bool(monitors) is values["metrics"]["podMonitor"]["enabled"]
    for monitor in monitors:
        assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        [endpoint] = monitor["spec"]["podMetricsEndpoints"]
        assert (endpoint["port"], endpoint["path"]) == ("health", "/metrics")
        assert (
            values["metrics"]["podMonitor"]["labels"].items()
            <= monitor["metadata"]["labels"].items()
        )


def pod_spec_labels(objs: list[Obj]) -> Obj:
    labels: Obj = one(objs, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    return labels


@pytest.mark.parametrize("name", VALUE_SETS)
def test_only_the_agent_gets_an_api_token_on_the_nodes(name: str) -> None:
    objs = objects(VALUE_SETS[name])
    spec = pod_spec(objs)
    assert spec["automountServiceAccountToken"] is False
    token_path = "/var/run/secrets/kubernetes.io/serviceaccount"
    for container_name, container in containers(objs).items():
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        assert (token_path in mounts) is (container_name == "agent"), container_name
    # every container of the controller calls the API, none is privileged
    assert pod_spec(objs, "Deployment").get("automountServiceAccountToken", True) is True
    (api,) = [v for v in spec["volumes"] if v["name"] == "api-token"]
    kinds = [next(iter(source)) for source in api["projected"]["sources"]]
    assert kinds == ["serviceAccountToken", "configMap", "downwardAPI"]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_daemonset_defaults_and_options(name: str) -> None:
    values = merged(VALUE_SETS[name])
    objs = objects(VALUE_SETS[name])
    ds = one(objs, "DaemonSet")
    assert ds["spec"]["updateStrategy"]["type"] == values["updateStrategy"]["type"]
    spec = pod_spec(objs)
    assert spec.get("priorityClassName", "") == values["priorityClassName"]
    assert spec.get("tolerations", []) == values["tolerations"]
    assert spec.get("nodeSelector", {}) == values["nodeSelector"]
    for obj in objs:
        namespace = obj["metadata"].get("namespace")
        assert namespace == (NAMESPACE if obj["kind"] in NAMESPACED else None), obj["kind"]


def test_update_strategy_defaults_to_on_delete_with_the_reason() -> None:
    assert one(objects(None), "DaemonSet")["spec"]["updateStrategy"] == {"type": "OnDelete"}
    template = (CHART / "templates" / "daemonset.yaml").read_text()
    comment = template[: template.index("updateStrategy:")].rsplit("spec:", 1)[1]
    assert "OnDelete" in comment and "re-attach" in comment and "I/O" in comment


IMAGES = {
    "csi-vduse": "plugin", "agent": "plugin", "csi-provisioner": "provisioner",
    "csi-resizer": "resizer", "csi-snapshotter": "snapshotter",
}  # fmt: skip


@pytest.mark.parametrize("name", VALUE_SETS)
def test_images_are_pinned(name: str) -> None:
    values = merged(VALUE_SETS[name])
    objs = objects(VALUE_SETS[name])
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    pods = [containers(objs), controller(objs)]
    for container in [c for pod in pods for c in pod.values()]:
        key = IMAGES[container["name"]]
        wanted = values["images"][key]
        image = container["image"]
        if wanted.get("digest"):
            assert image == f"{wanted['repository']}@{wanted['digest']}"
        else:
            assert image == f"{wanted['repository']}:{wanted.get('tag') or app_version}"
            assert not image.endswith(":latest")
        if name == "defaults" and key != "plugin":
            assert image.startswith("registry.k8s.io/sig-storage/"), image


def test_versions_agree() -> None:
    """Chart appVersion = default plugin image tag = package version = pyproject version."""
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    pyproject = (ROOT / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.MULTILINE)
    assert version and version[1] == csi_vduse.__version__ == meta["appVersion"]
    image = containers(objects(None))["csi-vduse"]["image"]
    assert image.endswith(f":{csi_vduse.__version__}")


# --- manifests/ and examples/ -------------------------------------------------------------


def test_manifests_are_the_default_render() -> None:
    expected = manifest_text()
    actual = MANIFEST.read_text() if MANIFEST.exists() else ""
    if actual != expected:
        diff = difflib.unified_diff(
            actual.splitlines(), expected.splitlines(), "manifests (committed)", "chart render",
            lineterm="", n=1,
        )  # fmt: skip
        shown = "\n".join(list(diff)[:40])
        pytest.fail(
            f"{MANIFEST.relative_to(ROOT)} differs from the chart rendered with its default "
            f"values; regenerate it with `{REGENERATE}` and commit it.\n{shown}"
        )


def example_objects() -> list[Obj]:
    objs = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        objs += [o for o in yaml.safe_load_all(path.read_text()) if o is not None]
    return objs


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_example_core_objects_validate(kube_version: str) -> None:
    core = [o for o in example_objects() if o["apiVersion"] == "v1"]
    assert {o["kind"] for o in core} == {"PersistentVolumeClaim", "Pod"}
    for obj in core:
        kubernetes_validate.validate(obj, kube_version, strict=True)


def test_examples_use_the_charts_storage_classes() -> None:
    classes = {o["metadata"]["name"]: o for o in of_kind(objects(None), "StorageClass")}
    block_classes = {n for n, c in classes.items() if "parameters" not in c or
                     "csi.storage.k8s.io/fstype" not in c["parameters"]}  # fmt: skip
    objs = example_objects()
    claims = {
        o["metadata"]["name"]: o["spec"] for o in objs if o["kind"] == "PersistentVolumeClaim"
    }
    vm = one(objs, "VirtualMachine")
    for template in vm["spec"]["dataVolumeTemplates"]:
        claims[template["metadata"]["name"]] = template["spec"]["storage"]
    for claim in claims.values():
        assert claim["storageClassName"] in classes
        assert claim["accessModes"] == ["ReadWriteOnce"], "node-local volumes are RWO"
        if claim.get("volumeMode") == "Block":
            assert claim["storageClassName"] in block_classes
    assert sum(c.get("volumeMode") == "Block" for c in claims.values()) == 2
    pods = [o for o in objs if o["kind"] == "Pod"]
    assert any("volumeDevices" in c for p in pods for c in p["spec"]["containers"])
    assert vm["spec"]["template"]["spec"]["evictionStrategy"] == "None", "no live migration"
    snapshot = one(objs, "VolumeSnapshot")
    assert snapshot["spec"]["volumeSnapshotClassName"] == "csi-vduse"
    assert snapshot["spec"]["volumeSnapshotClassName"] in [
        c["name"] for c in merged(None)["volumeSnapshotClasses"]
    ]
    assert snapshot["spec"]["source"]["persistentVolumeClaimName"] in claims
    restored = claims["vduse-fs-restored"]
    assert restored["dataSource"]["name"] == snapshot["metadata"]["name"]
    for vac in of_kind(objs, "VolumeAttributesClass"):
        assert vac["driverName"] == merged(None)["driverName"]
        parse_qos(vac["parameters"])
    profile = one(objs, "StorageProfile")
    assert profile["metadata"]["name"] in block_classes
    assert profile["spec"]["claimPropertySets"] == [
        {"accessModes": ["ReadWriteOnce"], "volumeMode": "Block"}
    ]


# --- regenerate manifests/ ------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render charts/csi-vduse into manifests/.")
    parser.add_argument("--write", action="store_true", help=f"write {MANIFEST.name}")
    args = parser.parse_args(argv)
    text = manifest_text()
    if args.write:
        MANIFEST.parent.mkdir(parents=True, exist_ok=True)
        MANIFEST.write_text(text)
        print(f"wrote {MANIFEST.relative_to(ROOT)}")
        return 0
    current = MANIFEST.read_text() if MANIFEST.exists() else ""
    if current != text:
        print(f"{MANIFEST.relative_to(ROOT)} is out of date: run {REGENERATE}", file=sys.stderr)
        return 1
    print(f"{MANIFEST.relative_to(ROOT)} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
