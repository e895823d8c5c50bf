"""`csi-vduse doctor`: can this host serve VDUSE block devices, and what to do if not."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from csi_vduse.kernel import sysfs
from csi_vduse.kernel.vdpa import VDUSE_MGMTDEV, VdpaClient
from csi_vduse.kernel.vduse import CONTROL_PATH

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _effective_caps() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def run_checks() -> list[Check]:
    checks = []
    vdpa_bus = sysfs.VDPA_BUS.is_dir()
    checks.append(Check(
        "vdpa bus", vdpa_bus,
        "/sys/bus/vdpa present" if vdpa_bus else "/sys/bus/vdpa missing",
        "modprobe vdpa (kernel needs CONFIG_VDPA)",
    ))  # fmt: skip
    control = CONTROL_PATH.exists()
    checks.append(Check(
        "VDUSE control device", control,
        f"{CONTROL_PATH} present" if control else f"{CONTROL_PATH} missing",
        "modprobe vduse (kernel needs CONFIG_VDPA_USER, Linux 5.15 or newer)",
    ))  # fmt: skip
    for driver, config in ((sysfs.VIRTIO_VDPA, "CONFIG_VIRTIO_VDPA"),
                           (sysfs.VHOST_VDPA, "CONFIG_VHOST_VDPA")):  # fmt: skip
        present = (sysfs.VDPA_BUS / "drivers" / driver).is_dir()
        checks.append(Check(
            f"{driver} driver", present,
            "loaded" if present else "not loaded",
            f"modprobe {driver} (kernel needs {config})"
            + (" -- only needed for VM (vhost) volumes" if driver == sysfs.VHOST_VDPA else ""),
        ))  # fmt: skip
    try:
        names = [m.name for m in VdpaClient().mgmtdevs()]
        ok = VDUSE_MGMTDEV in names
        detail = f"management devices: {', '.join(names) or 'none'}"
    except OSError as e:
        ok, detail = False, f"vdpa netlink: {e.strerror or e}"
    checks.append(
        Check(
            "vduse vdpa management device",
            ok,
            detail,
            "modprobe vduse; run in the host network namespace (hostNetwork)",
        )
    )
    caps = _effective_caps()
    for cap, label in ((CAP_SYS_ADMIN, "CAP_SYS_ADMIN"), (CAP_NET_ADMIN, "CAP_NET_ADMIN")):
        has = bool(caps & (1 << cap))
        checks.append(
            Check(
                label, has, "held" if has else "missing", "run as root, or privileged in Kubernetes"
            )
        )
    return checks


def run_doctor() -> int:
    checks = run_checks()
    for c in checks:
        mark = "ok  " if c.ok else "FAIL"
        line = f"[{mark}] {c.name}: {c.detail}"
        if not c.ok and c.fix:
            line += f"\n       fix: {c.fix}"
        print(line)
    required = [c for c in checks if c.name != f"{sysfs.VHOST_VDPA} driver"]
    ready = all(c.ok for c in required)
    print("this host can serve VDUSE block devices" if ready
          else "this host cannot serve VDUSE block devices yet")  # fmt: skip
    return 0 if ready else 1


if __name__ == "__main__":
    raise SystemExit(run_doctor())
