"""Lint of the Dockerfile and .dockerignore: pinned multi-stage build on one base that a build
argument can swap, no build tools or secrets in the runtime stage, OCI labels, the smoke test,
and root only with its reason.

Building the image takes minutes and needs root (buildah) or a Docker daemon:
`scripts/build-image` builds it, and tests/cluster/images.py for the cluster tests.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dockerfile_parse import DockerfileParser

import csi_vduse

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

BUILD_TOOLS = re.compile(
    r"\b(gcc|g\+\+|cc|clang|make|cmake|build-essential|libc6-dev|linux-libc-dev|python3-dev)\b"
)
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|TOKEN|SECRET|KEY|CREDENTIAL", re.IGNORECASE)
RUNTIME_PACKAGES = ("e2fsprogs", "xfsprogs", "util-linux", "iproute2", "liburing2")
# An image reference pinned to an exact release (x.y.z, then an optional variant), optionally
# also by digest, or by digest alone.
PINNED = re.compile(
    r"^(?P<repo>[a-z0-9][\w.\-/]*)"
    r"(:(?P<tag>v?\d+\.\d+\.\d+[\w.\-]*))?(@sha256:(?P<digest>[0-9a-f]{64}))?$"
)
OCI_LABELS = ("title", "description", "version", "revision", "source", "licenses", "base.name")


@dataclass
class Stage:
    image: str
    """The base image with the build arguments' defaults filled in."""
    written: str
    """FROM's image as written, e.g. ${BASE}."""
    name: str | None
    instructions: list[dict[str, Any]] = field(default_factory=list)

    def values(self, instruction: str) -> list[str]:
        return [i["value"] for i in self.instructions if i["instruction"] == instruction]


def parse() -> tuple[DockerfileParser, list[Stage]]:
    parser = DockerfileParser(path=str(DOCKERFILE), env_replace=True)
    stages: list[Stage] = []
    resolved = iter(parser.parent_images)
    for instruction in parser.structure:
        if instruction["instruction"] == "FROM":
            image, _, name = instruction["value"].partition(" AS ")
            if not name:
                image, _, name = instruction["value"].partition(" as ")
            stages.append(Stage(next(resolved), image.strip(), name.strip() or None))
        elif stages:
            stages[-1].instructions.append(instruction)
    return parser, stages


def test_multi_stage_from_pinned_base_images() -> None:
    parser, stages = parse()
    assert parser.is_multistage and len(stages) >= 2
    assert stages[0].name == "builder"
    names = {s.name for s in stages}
    for stage in stages:
        if stage.image in names:
            continue
        match = PINNED.match(stage.image)
        assert match, f"FROM {stage.image}: pin an exact version tag (or a digest)"
        assert match["tag"] or match["digest"], f"FROM {stage.image} is untagged"
        assert "latest" not in stage.image
    # The runtime installs the builder's wheels: same base, so the same Python and libc; and
    # one build argument (BASE, for an image built from Debian packages) swaps both.
    assert stages[0].image == stages[-1].image
    assert stages[0].written == stages[-1].written == "${BASE}"


def test_base_python_is_the_projects() -> None:
    _, stages = parse()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    python = pyproject["tool"]["mypy"]["python_version"]
    for stage in stages:
        match = PINNED.match(stage.image)
        assert match and match["repo"] in ("python", "docker.io/library/python"), stage.image
        assert match["tag"] and match["tag"].startswith(f"{python}."), stage.image


def test_no_python_image_layout_assumed() -> None:
    """The same stages work on the python: image and on Debian's python3 (other paths, no pip,
    no headers, PEP 668): pip only from virtual environments, headers installed if missing."""
    _, stages = parse()
    builder, runtime = stages[0], stages[-1]
    assert "/usr/local" not in DOCKERFILE.read_text()
    headers = next(r for r in builder.values("RUN") if "Python.h" in r)
    assert "python_dev=python3-dev" in headers, "Debian's python3 has no Python.h"
    assert re.search(r"apt-get install [^&]*\$python_dev", headers)
    for stage, venv in ((builder, "/opt/build"), (runtime, "/opt/csi-vduse")):
        runs = [i for i in stage.instructions if i["instruction"] == "RUN"]
        creates = next(i for i in runs if f"python3 -m venv {venv}" in i["value"])
        path = next(
            i for i in stage.instructions if i["instruction"] == "ENV" and "PATH=" in i["value"]
        )
        assert f"PATH={venv}/bin:" in path["value"]
        for run in runs:
            uses_pip = re.search(r"(^|[\s/])pip ", run["value"])
            if uses_pip:
                assert run["startline"] > path["startline"] or f"{venv}/bin/pip " in run["value"]
                assert run["startline"] >= creates["startline"]


def test_builder_builds_the_wheel_and_its_dependencies() -> None:
    _, stages = parse()
    builder = stages[0]
    runs = " ".join(builder.values("RUN"))
    assert "pip wheel --no-deps" in runs
    assert re.search(r"pip wheel --wheel-dir /wheels /wheels/csi_vduse-\*\.whl", runs)
    copied = " ".join(builder.values("COPY"))
    # pyproject.toml names README.md as the readme; setup.py runs the build hooks.
    for source in ("pyproject.toml", "setup.py", "README.md", "csi_vduse"):
        assert re.search(rf"(^|\s){re.escape(source)}(\s|$)", copied), source
    assert "linux-libc-dev" in runs, "the cffi extension includes <linux/vduse.h>"


def test_runtime_stage_has_no_build_tools_and_the_plugins_tools() -> None:
    _, stages = parse()
    runtime = stages[-1]
    runs = runtime.values("RUN")
    for run in runs:
        assert not BUILD_TOOLS.search(run), f"build tool in the runtime stage: {run}"
    installs = [r for r in runs if "apt-get install" in r]
    assert len(installs) == 1
    for package in RUNTIME_PACKAGES:
        assert re.search(rf"\b{re.escape(package)}\b", installs[0]), package
    assert "--no-install-recommends" in installs[0]
    assert "rm -rf /var/lib/apt/lists" in installs[0]
    # Only the wheels come from the builder, and no pip cache stays behind.
    for copy in runtime.values("COPY"):
        assert "--from=builder" not in copy or "/wheels" in copy, copy
    pip = [r for r in runs if "pip install" in r]
    assert len(pip) == 1
    assert "--no-cache-dir" in pip[0] and "--no-index" in pip[0]
    assert "from=builder,source=/wheels" in pip[0], "wheels come through a bind mount"


def test_no_remote_add_and_no_secrets() -> None:
    parser, _ = parse()
    for instruction in parser.structure:
        kind, value = instruction["instruction"], instruction["value"]
        if kind == "ADD":
            assert "://" not in value and "git@" not in value, f"remote ADD: {value}"
        if kind in ("ENV", "ARG"):
            names = re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)(?==|\s|$)", value)
            assert names, value
            for name in names:
                assert not SECRET_NAME.search(name), f"{kind} {name} looks like a secret"


def test_oci_labels() -> None:
    parser, stages = parse()
    labels = parser.labels
    for key in OCI_LABELS:
        assert labels.get(f"org.opencontainers.image.{key}"), f"missing label {key}"
    assert labels["org.opencontainers.image.version"] == csi_vduse.__version__
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.base.name"] == stages[-1].image
    # A build argument declared before the first FROM is empty in a stage that does not
    # declare it again.
    assert any(a.split("=")[0] == "BASE" for a in stages[-1].values("ARG"))


def test_smoke_test_runs_the_installed_command() -> None:
    _, stages = parse()
    runs = stages[-1].values("RUN")
    install = next(i for i, r in enumerate(runs) if "pip install" in r)
    smoke = [i for i, r in enumerate(runs) if "csi-vduse --version" in r]
    assert smoke and smoke[0] > install, "RUN csi-vduse --version after the install"
    assert "csi_vduse._native" in runs[smoke[0]], "the compiled extension must import"


def test_entrypoint_and_root_with_its_reason() -> None:
    parser, stages = parse()
    runtime = stages[-1]
    (entrypoint,) = runtime.values("ENTRYPOINT")
    assert json.loads(entrypoint) == ["csi-vduse"]
    users = [i for i in runtime.instructions if i["instruction"] == "USER"]
    assert [u["value"] for u in users] == ["root"], "the runtime stage says USER root"
    comments: list[str] = []
    for instruction in reversed(parser.structure[: parser.structure.index(users[0])]):
        if instruction["instruction"] != "COMMENT":
            break
        comments.insert(0, instruction["value"])
    reason = " ".join(comments).lower()
    assert "root" in reason and "privileged" in reason and "netlink" in reason, reason


def _ignored(patterns: list[str], path: str) -> bool:
    """Whether .dockerignore patterns exclude `path` (or a directory holding it)."""

    def regex(pattern: str) -> re.Pattern[str]:
        out = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out)

    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    return any(regex(p).fullmatch(prefix) for p in patterns for prefix in prefixes)


def test_dockerignore_keeps_the_build_inputs_only() -> None:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    patterns = [line.rstrip("/") for line in lines if line and not line.startswith("#")]
    assert not [p for p in patterns if p.startswith("!")], "no exceptions: keep it simple"
    needed = [
        "pyproject.toml", "setup.py", "README.md", "csi_vduse/__init__.py",
        "csi_vduse/_native_build.py", "csi_vduse/csi/proto/csi.proto",
        "csi_vduse/kernel/native/vduse_ioctl.c", "csi_vduse/kernel/native/vduse_ioctl.h",
        "csi_vduse/dataplane/native/dataplane.h", "csi_vduse/py.typed",
    ]  # fmt: skip
    for path in needed:
        assert (ROOT / path).exists(), path
        assert not _ignored(patterns, path), f".dockerignore drops {path}, which the build needs"
    for path in (
        ".git/HEAD", ".venv/bin/python", "tests/unit/test_chart.py", "bench-results/x",
        "csi_vduse/_native.abi3.so", "csi_vduse/csi/proto/csi_pb2.py",
        "csi_vduse/kernel/__pycache__/x.pyc",
    ):  # fmt: skip
        assert _ignored(patterns, path), f".dockerignore should drop {path}"
