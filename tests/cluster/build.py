"""Build, once per version, the real Kubernetes components the cluster tests run.

Go components come from the Go module proxy and land in
``$XDG_CACHE_HOME/csi-vduse/cluster/<name>-<version>/`` (default ``~/.cache``); Debian packages
are installed with apt-get when missing. ``python -m tests.cluster.build`` builds what is missing
and prints the path of every binary.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests import apt

HERE = Path(__file__).resolve().parent
VERSIONS_FILE = HERE / "versions.env"
NICE = ["nice", "-n", os.environ.get("CSI_VDUSE_BUILD_NICE", "19")]
WRAPPER_MODULE = "csi-vduse.test/cluster/build"


class BuildError(RuntimeError):
    pass


def read_versions(path: Path = VERSIONS_FILE) -> dict[str, str]:
    versions: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            if not sep:
                raise BuildError(f"{path}: not a KEY=value line: {line!r}")
            versions[key.strip()] = value.strip()
    return versions


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "csi-vduse" / "cluster"


def log(message: str) -> None:
    print(f"[cluster-build] {message}", file=sys.stderr, flush=True)


def run(cmd: Sequence[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        output = (proc.stderr.strip() or proc.stdout.strip())[-8000:]
        raise BuildError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{output}")
    if proc.stderr.strip():
        sys.stderr.write(proc.stderr)
    return proc.stdout


@contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass(frozen=True)
class GoComponent:
    name: str
    module: str
    version: str
    packages: tuple[str, ...]
    tags: tuple[str, ...] = ()
    cgo: bool = False
    version_ldflags: tuple[str, ...] = ()
    """``-X`` assignments; ``{version}``, ``{commit}`` and ``{date}`` are filled in."""
    local_replace_version: str | None = None
    """Published version that replaces go.mod's ``=> ./local/dir`` directives."""
    build_debs: tuple[str, ...] = ()
    """Debian packages the build needs (cgo headers and libraries)."""
    on_request: bool = False
    """Built only when named (a tool for people, which no test runs)."""

    @property
    def targets(self) -> list[str]:
        return [self.module if p == "." else f"{self.module}/{p}" for p in self.packages]

    @property
    def binaries(self) -> list[str]:
        return [target.rsplit("/", 1)[-1] for target in self.targets]

    @property
    def cache_dir(self) -> Path:
        return cache_root() / f"{self.name}-{self.version}"

    def paths(self) -> dict[str, Path]:
        return {binary: self.cache_dir / binary for binary in self.binaries}

    def is_built(self) -> bool:
        return all(path.is_file() and os.access(path, os.X_OK) for path in self.paths().values())


@dataclass(frozen=True)
class DebComponent:
    package: str
    version: str
    """Upstream version prefix the installed package must have."""
    paths: dict[str, Path] = field(default_factory=dict)


def go_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["GOWORK"] = "off"
    env["GOFLAGS"] = " ".join(f for f in env.get("GOFLAGS", "").split() if not f.startswith("-mod"))
    env.update(extra or {})
    return env


def download(module: str, version: str) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(
        run([*NICE, "go", "mod", "download", "-json", f"{module}@{version}"], env=go_env())
    )
    if info.get("Error"):
        raise BuildError(f"go mod download {module}@{version}: {info['Error']}")
    return info


def module_facts(info: dict[str, Any]) -> tuple[dict[str, Any], str, str]:
    gomod: dict[str, Any] = json.loads(run(["go", "mod", "edit", "-json", info["GoMod"]]))
    released = json.loads(Path(info["Info"]).read_text()).get("Time", "")
    commit = (info.get("Origin") or {}).get("Hash", "")
    return gomod, commit, released


def wrapper_gomod(component: GoComponent, gomod: dict[str, Any]) -> str:
    lines = [f"module {WRAPPER_MODULE}/{component.name}", "", f"go {gomod['Go']}"]
    if gomod.get("Toolchain"):
        lines.append(f"toolchain {gomod['Toolchain']}")
    lines += [f"godebug {d['Key']}={d['Value']}" for d in gomod.get("GoDebug") or []]
    lines += ["", f"require {component.module} {component.version}", ""]
    for rep in gomod.get("Replace") or []:
        old_version = rep["Old"].get("Version")
        old = rep["Old"]["Path"] + (f" {old_version}" if old_version else "")
        new_path, new_version = rep["New"]["Path"], rep["New"].get("Version")
        if not new_version:
            if component.local_replace_version is None:
                raise BuildError(f"{component.name}: local replace {old} => {new_path}")
            new_path, new_version = rep["Old"]["Path"], component.local_replace_version
        lines.append(f"replace {old} => {new_path} {new_version}")
    lines += [f"exclude {e['Path']} {e['Version']}" for e in gomod.get("Exclude") or []]
    return "\n".join(lines) + "\n"


def go_build(component: GoComponent, out: Path) -> dict[str, Any]:
    info = download(component.module, component.version)
    gomod, commit, released = module_facts(info)
    values = {"version": component.version, "commit": commit, "date": released}
    assignments = [flag.format(**values) for flag in component.version_ldflags]
    xflags = [f"-X {a}" for a in assignments if not a.endswith("=")]
    flags = ["-trimpath", "-ldflags", " ".join(["-s", "-w", *xflags])]
    if component.tags:
        flags += ["-tags", ",".join(component.tags)]
    env = go_env({"CGO_ENABLED": "1" if component.cgo else "0"})
    targets = component.targets
    needs_wrapper = bool(gomod.get("Replace") or gomod.get("Exclude"))
    if needs_wrapper:
        src = out / "wrapper"
        src.mkdir()
        (src / "go.mod").write_text(wrapper_gomod(component, gomod))
        cmd = ["go", "build", "-mod=mod", *flags, "-o", str(out) + "/", *targets]
        run(NICE + cmd, cwd=src, env=env)
    else:
        env["GOBIN"] = str(out)
        cmd = ["go", "install", *flags, *(f"{t}@{component.version}" for t in targets)]
        run(NICE + cmd, cwd=out, env=env)
    return {"command": cmd, "wrapper": needs_wrapper, "commit": commit, "released": released}


def ensure_go(component: GoComponent) -> dict[str, Path]:
    if component.is_built():
        return component.paths()
    root = cache_root()
    with locked(root / f".{component.name}-{component.version}.lock"):
        if component.is_built():
            return component.paths()
        log(f"building {component.name} {component.version} ({', '.join(component.binaries)})")
        missing_debs = [p for p in component.build_debs if installed_deb_version(p) is None]
        if missing_debs:
            apt_install(missing_debs)
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{component.name}-{component.version}.", dir=root))
        try:
            record = go_build(component, tmp)
            missing = [b for b in component.binaries if not (tmp / b).is_file()]
            if missing:
                raise BuildError(f"{component.name}: build produced no {missing}")
            record["seconds"] = round(time.monotonic() - started, 1)
            record["go"] = run(["go", "env", "GOVERSION"]).strip()
            (tmp / "build-info.json").write_text(json.dumps(record, indent=2) + "\n")
            tmp.chmod(0o755)
            if component.cache_dir.exists():
                shutil.rmtree(component.cache_dir)
            tmp.rename(component.cache_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"built {component.name} in {record['seconds']} s")
    return component.paths()


def installed_deb_version(package: str) -> str | None:
    return apt.installed_version(package)


def apt_install(packages: list[str]) -> None:
    log(f"installing {' '.join(packages)} with apt-get")
    try:
        apt.install(packages, recommends=False)
    except apt.AptError as error:
        raise BuildError(str(error)) from None


def ensure_debs(components: list[DebComponent]) -> dict[str, Path]:
    missing = [c.package for c in components if installed_deb_version(c.package) is None]
    if missing:
        apt_install(missing)
    paths: dict[str, Path] = {}
    for component in components:
        version = (installed_deb_version(component.package) or "").split(":", 1)[-1]
        if not version.startswith(component.version):
            raise BuildError(
                f"{component.package} {version!r} installed, {component.version} pinned"
            )
        absent = [str(p) for p in component.paths.values() if not p.exists()]
        if absent:
            raise BuildError(f"{component.package}: missing {absent}")
        paths.update(component.paths)
    return paths


def go_components(v: dict[str, str]) -> list[GoComponent]:
    kube_x = [
        f"{pkg}.{key}={value}"
        for pkg in ("k8s.io/client-go/pkg/version", "k8s.io/component-base/version")
        for key, value in (
            ("gitVersion", "{version}"),
            ("gitMajor", v["KUBERNETES_VERSION"].lstrip("v").split(".")[0]),
            ("gitMinor", v["KUBERNETES_VERSION"].split(".")[1]),
            ("gitCommit", "{commit}"),
            ("gitTreeState", "clean"),
            ("buildDate", "{date}"),
        )
    ]
    containerd = "github.com/containerd/containerd/v2"
    return [
        GoComponent(
            "kubernetes",
            "k8s.io/kubernetes",
            v["KUBERNETES_VERSION"],
            tuple(
                f"cmd/{c}"
                for c in (
                    "kube-apiserver",
                    "kube-controller-manager",
                    "kube-scheduler",
                    "kubelet",
                    "kubectl",
                )
            ),
            tags=("selinux", "notest", "grpcnotrace"),
            version_ldflags=tuple(kube_x),
            local_replace_version=v["KUBERNETES_STAGING_VERSION"],
        ),
        GoComponent(
            "containerd",
            containerd,
            v["CONTAINERD_VERSION"],
            ("cmd/containerd", "cmd/containerd-shim-runc-v2", "cmd/ctr"),
            tags=("urfave_cli_no_docs", "no_btrfs", "osusergo", "netgo"),
            version_ldflags=(
                f"{containerd}/version.Version={{version}}",
                f"{containerd}/version.Revision={{commit}}",
            ),
        ),
        GoComponent(
            "runc",
            "github.com/opencontainers/runc",
            v["RUNC_VERSION"],
            (".",),
            tags=("seccomp", "urfave_cli_no_docs"),
            cgo=True,
            build_debs=("libseccomp-dev",),
            version_ldflags=("main.gitCommit={commit}",),
        ),
        GoComponent(
            "crictl",
            "sigs.k8s.io/cri-tools",
            v["CRICTL_VERSION"],
            ("cmd/crictl",),
            version_ldflags=("sigs.k8s.io/cri-tools/pkg/version.Version={version}",),
            on_request=True,  # for a person looking into the lab's containers
        ),
        GoComponent(
            "helm",
            "helm.sh/helm/v4",
            v["HELM_VERSION"],
            ("cmd/helm",),
            version_ldflags=(
                "helm.sh/helm/v4/internal/version.version={version}",
                "helm.sh/helm/v4/internal/version.gitCommit={commit}",
                "helm.sh/helm/v4/internal/version.gitTreeState=clean",
            ),
        ),
        GoComponent(
            "external-provisioner",
            "github.com/kubernetes-csi/external-provisioner/v6",
            v["EXTERNAL_PROVISIONER_VERSION"],
            ("cmd/csi-provisioner",),
            version_ldflags=("main.version={version}",),
        ),
        GoComponent(
            "external-resizer",
            "github.com/kubernetes-csi/external-resizer/v2",
            v["EXTERNAL_RESIZER_VERSION"],
            ("cmd/csi-resizer",),
            version_ldflags=("main.version={version}",),
        ),
        GoComponent(
            "external-snapshotter",
            "github.com/kubernetes-csi/external-snapshotter/v8",
            v["EXTERNAL_SNAPSHOTTER_VERSION"],
            ("cmd/csi-snapshotter", "cmd/snapshot-controller"),
            version_ldflags=("main.version={version}",),
            local_replace_version=v["EXTERNAL_SNAPSHOTTER_VERSION"],  # its client/v8 module
        ),
        GoComponent(
            "csi-sanity",
            "github.com/kubernetes-csi/csi-test/v5",
            v["CSI_SANITY_VERSION"],
            ("cmd/csi-sanity",),
            version_ldflags=("main.VERSION={version}",),
        ),
    ]


def deb_components(v: dict[str, str]) -> list[DebComponent]:
    cni_dir = Path(v["CNI_BIN_DIR"])
    return [
        DebComponent("etcd-server", v["ETCD_DEB_VERSION"], {"etcd": Path("/usr/bin/etcd")}),
        DebComponent("etcd-client", v["ETCD_DEB_VERSION"], {"etcdctl": Path("/usr/bin/etcdctl")}),
        DebComponent(
            "containernetworking-plugins",
            v["CNI_PLUGINS_DEB_VERSION"],
            {"cni-bin-dir": cni_dir, "cni-bridge": cni_dir / "bridge"},
        ),
    ]


def ensure_components(only: Sequence[str] | None = None) -> dict[str, Path]:
    """Build or install what is missing and return the path of every binary by name.

    ``only`` limits the work to those component names (``kubernetes``, ``containerd``, ...,
    or ``debian`` for the apt packages).
    """
    versions = read_versions()
    wanted = set(only) if only else None
    paths: dict[str, Path] = {}
    if wanted is None or "debian" in wanted:
        paths.update(ensure_debs(deb_components(versions)))
    for component in go_components(versions):
        if component.name in (wanted or ()) or (wanted is None and not component.on_request):
            paths.update(ensure_go(component))
    return paths


def component_path(binary: str) -> Path:
    """Where a built binary is, without building (inside the lab the root is read-only):
    `python -m tests.cluster.build` on the host builds it first."""
    for component in go_components(read_versions()):
        path = component.paths().get(binary)
        if path is not None:
            if not component.is_built():
                raise BuildError(f"{binary} is not built: run python -m tests.cluster.build")
            return path
    raise KeyError(binary)


def component_names() -> list[str]:
    return ["debian", *(c.name for c in go_components(read_versions()))]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster.build", description=__doc__)
    names = component_names()
    parser.add_argument("components", nargs="*", metavar="COMPONENT", help=", ".join(names))
    parser.add_argument("--json", action="store_true", help="print the paths as JSON")
    args = parser.parse_args(argv)
    unknown = set(args.components) - set(names)
    if unknown:
        parser.error(f"unknown components {sorted(unknown)}; known: {', '.join(names)}")
    try:
        paths = ensure_components(args.components or None)
    except BuildError as error:
        log(f"FAILED: {error}")
        return 1
    if args.json:
        print(json.dumps({name: str(path) for name, path in paths.items()}, indent=2))
    else:
        for name, path in paths.items():
            print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
