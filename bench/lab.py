"""Runs inside the lab: serves one backing file three ways in turn and runs fio on each.
With --cold (a small guest, the scratch disk uncached on the host, the page cache dropped
before every run) the references are fio with O_DIRECT on the file itself and
qemu-storage-daemon reading the file with O_DIRECT through thread-pool and io_uring AIO.
With --rbd, one image in a single-node Ceph started here is served by csi-vduse and by what
ceph-csi users run today: the kernel client (krbd), rbd-nbd, and qemu-storage-daemon's
vduse-blk export on its rbd driver.

Prints one JSON document between BEGIN/END markers for the host side (bench.run)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from csi_vduse.kernel import sysfs
from csi_vduse.kernel.vdpa import VdpaClient

BEGIN, END = "=== BENCH JSON BEGIN ===", "=== BENCH JSON END ==="
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str
    bs: str
    iodepth: int
    numjobs: int = 1


WORKLOADS = [
    Workload("randread-4k-qd1", "randread", "4k", 1),
    Workload("randwrite-4k-qd1", "randwrite", "4k", 1),
    Workload("randread-4k-qd32", "randread", "4k", 32),
    Workload("randwrite-4k-qd32", "randwrite", "4k", 32),
    Workload("read-1m-qd8", "read", "1m", 8),
    Workload("write-1m-qd8", "write", "1m", 8),
    Workload("randread-4k-qd32-2jobs", "randread", "4k", 32, 2),
]


@dataclass
class Served:
    device: Path
    pid: int | None  # the server process whose CPU time is charged, if any


def _wait_device(name: str) -> Path:
    sysfs.bind(name, sysfs.VIRTIO_VDPA)
    return sysfs.wait_device(name, sysfs.VIRTIO_VDPA)


# Data-plane levers, each measured against the defaults in the same run (--levers).
LEVERS: dict[str, dict[str, str]] = {
    "csi-vduse": {},
    "no-parallel-split": {"CSI_VDUSE_DP_PARALLEL_MIN_BYTES": "0"},
    "no-event-idx": {"CSI_VDUSE_DP_EVENT_IDX": "false"},
    "no-poll": {"CSI_VDUSE_DP_POLL_US": "0"},
    "one-queue": {"QUEUES": "1"},
}
LEVER_WORKLOADS = ["randread-4k-qd1", "randwrite-4k-qd32", "read-1m-qd8", "randread-4k-qd32-2jobs"]


@contextmanager
def serve_csi_vduse(
    image: Path, queues: int, queue_size: int, env: dict[str, str] | None = None,
    flags: tuple[str, ...] = (),
) -> Iterator[Served]:  # fmt: skip
    env = dict(env or {})
    queues = int(env.pop("QUEUES", queues))
    proc = subprocess.Popen(
        [sys.executable, "-m", "csi_vduse", "--log-level=warning", "export", str(image),
         "--name", "bench-csi-vduse", "--queues", str(queues), "--queue-size", str(queue_size),
         *flags],
        stdout=subprocess.PIPE, text=True, env={**os.environ, **env},
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line:
        raise RuntimeError("csi-vduse export did not start")
    try:
        yield Served(Path(line), proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


@contextmanager
def serve_qsd(
    image: Path, queues: int, queue_size: int, direct: bool = False, aio: str = "threads"
) -> Iterator[Served]:
    name = "bench-qsd"
    cache = "on" if direct else "off"
    proc = subprocess.Popen([
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=file0,filename={image},cache.direct={cache},"
                      f"aio={aio}",
        "--blockdev", "driver=raw,node-name=disk0,file=file0",
        "--export", f"type=vduse-blk,id=exp0,node-name=disk0,name={name},"
                    f"num-queues={queues},queue-size={queue_size},writable=on",
    ])  # fmt: skip
    vdpa = VdpaClient()
    try:
        deadline = time.monotonic() + 30
        while not Path(f"/dev/vduse/{name}").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("qemu-storage-daemon did not create its device")
            time.sleep(0.05)
        vdpa.add(name)
        try:
            yield Served(_wait_device(name), proc.pid)
        finally:
            vdpa.delete(name)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


@contextmanager
def serve_loop(image: Path, queues: int, queue_size: int) -> Iterator[Served]:
    dev = subprocess.run(["losetup", "--find", "--show", "--direct-io=off", str(image)],
                         check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    try:
        yield Served(Path(dev), None)
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)


@dataclass(frozen=True)
class RbdImage:
    conf: Path
    keyfile: Path  # client.admin's key
    monitors: str
    spec: str  # pool/image


class Unavailable(RuntimeError):
    """This server cannot run in this lab (a kernel without the module, say)."""


def _command(*argv: str) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"{' '.join(argv)}: no answer in 120 s") from None
    if r.returncode != 0:
        raise Unavailable(f"{' '.join(argv)}: {r.stderr.strip()[-300:]}")
    return r.stdout.strip()


@contextmanager
def serve_csi_vduse_rbd(rbd: RbdImage, queues: int, queue_size: int) -> Iterator[Served]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "csi_vduse", "--log-level=warning", "export", f"rbd:{rbd.spec}",
         "--name", "bench-csi-vduse", "--queues", str(queues), "--queue-size", str(queue_size),
         "--ceph-monitors", rbd.monitors, "--ceph-user", "admin",
         "--ceph-keyfile", str(rbd.keyfile)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line:
        raise RuntimeError("csi-vduse export did not start")
    try:
        yield Served(Path(line), proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


@contextmanager
def serve_krbd(rbd: RbdImage, queues: int, queue_size: int) -> Iterator[Served]:
    _command("modprobe", "rbd")
    # noudev: the lab runs no udev, and rbd would wait for its events forever
    dev = _command("rbd", "-c", str(rbd.conf), "device", "map", "-o",
                   "ms_mode=prefer-crc,noudev", rbd.spec)  # fmt: skip
    try:
        yield Served(Path(dev), None)  # the kernel's CPU time is not a process's
    finally:
        subprocess.run(["rbd", "-c", str(rbd.conf), "device", "unmap", "-o", "noudev", dev],
                       check=True)  # fmt: skip


@contextmanager
def serve_rbd_nbd(rbd: RbdImage, queues: int, queue_size: int) -> Iterator[Served]:
    _command("modprobe", "nbd", "nbds_max=4")
    dev = _command("rbd-nbd", "-c", str(rbd.conf), "map", rbd.spec)
    pid = int(_command("pgrep", "-n", "rbd-nbd"))
    try:
        yield Served(Path(dev), pid)
    finally:
        subprocess.run(["rbd-nbd", "-c", str(rbd.conf), "unmap", dev], check=True)


@contextmanager
def serve_qsd_rbd(rbd: RbdImage, queues: int, queue_size: int) -> Iterator[Served]:
    name = "bench-qsd"
    pool, image = rbd.spec.split("/")
    proc = subprocess.Popen([
        "qemu-storage-daemon",
        "--blockdev", f"driver=rbd,node-name=disk0,pool={pool},image={image},"
                      f"conf={rbd.conf},user=admin,cache.direct=on",
        "--export", f"type=vduse-blk,id=exp0,node-name=disk0,name={name},"
                    f"num-queues={queues},queue-size={queue_size},writable=on",
    ])  # fmt: skip
    vdpa = VdpaClient()
    try:
        deadline = time.monotonic() + 30
        while not Path(f"/dev/vduse/{name}").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("qemu-storage-daemon did not create its device")
            time.sleep(0.05)
        vdpa.add(name)
        try:
            yield Served(_wait_device(name), proc.pid)
        finally:
            vdpa.delete(name)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


RBD_SERVERS = {
    "csi-vduse": serve_csi_vduse_rbd,
    "krbd": serve_krbd,
    "rbd-nbd": serve_rbd_nbd,
    "qsd-rbd": serve_qsd_rbd,
}
RBD_WORKLOADS = ["randread-4k-qd1", "randwrite-4k-qd1", "randread-4k-qd32", "randwrite-4k-qd32"]


@contextmanager
def rbd_image(size: str) -> Iterator[RbdImage]:
    """A single-node Ceph with one image of `size`, written once end to end."""
    from csi_vduse.lifecycle.export import read_key
    from tests.ceph.cluster import CephCluster

    with CephCluster(parent=Path(os.environ.get("LAB_SCRATCH", "/run/scratch"))) as ceph:
        ceph.rbd("create", "--size", size, f"{ceph.pool}/bench")
        ceph.rbd("bench", "--io-type", "write", "--io-pattern", "seq", "--io-size", "4M",
                 "--io-total", size, f"{ceph.pool}/bench", timeout=600)  # fmt: skip
        keyfile = ceph.dir / "admin.key"
        keyfile.write_text(read_key(ceph.dir / "keyring", "admin").get_secret_value())
        yield RbdImage(ceph.conf, keyfile, ceph.monitors, f"{ceph.pool}/bench")


@contextmanager
def serve_file_direct(image: Path, queues: int, queue_size: int) -> Iterator[Served]:
    """No server: fio reads the file itself with O_DIRECT, the disk's own speed."""
    yield Served(image, None)


SERVERS = {"csi-vduse": serve_csi_vduse, "qsd": serve_qsd, "loop": serve_loop}
COLD_SERVERS = {
    "file-o_direct": serve_file_direct,
    "csi-vduse": serve_csi_vduse,
    "csi-vduse-sync": partial(serve_csi_vduse, env={"CSI_VDUSE_DP_ENGINE": "sync"}),
    "csi-vduse-direct": partial(serve_csi_vduse, flags=("--cache", "direct")),
    "qsd-threads": partial(serve_qsd, direct=True, aio="threads"),
    "qsd-io_uring": partial(serve_qsd, direct=True, aio="io_uring"),
}
COLD_WORKLOADS = ["randread-4k-qd1", "randread-4k-qd32"]


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def cpu_seconds(pid: int | None) -> float | None:
    if pid is None:
        return None
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def run_fio(device: Path, w: Workload, runtime: int, size: str) -> dict[str, float]:
    argv = [
        "fio", "--name=bench", f"--filename={device}", "--direct=1", "--ioengine=libaio",
        f"--rw={w.rw}", f"--bs={w.bs}", f"--iodepth={w.iodepth}", f"--numjobs={w.numjobs}",
        f"--size={size}", "--time_based=1", f"--runtime={runtime}", "--ramp_time=1",
        "--group_reporting=1", "--output-format=json", "--randrepeat=0", "--norandommap=1",
    ]  # fmt: skip
    if w.numjobs > 1:
        argv.append("--cpus_allowed_policy=split")
        argv.append("--cpus_allowed=0-1")
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    side = job["read"] if "read" in w.rw else job["write"]
    clat = side["clat_ns"]
    return {
        "iops": side["iops"],
        "bw_mib": side["bw_bytes"] / (1 << 20),
        "lat_mean_us": clat["mean"] / 1000,
        "lat_p99_us": clat.get("percentile", {}).get("99.000000", 0) / 1000,
        "ios": side["total_ios"],
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runtime", type=int, default=6)
    parser.add_argument("--size", default="1G")
    parser.add_argument("--queues", type=int, default=2)
    parser.add_argument("--queue-size", type=int, default=256)
    parser.add_argument("--workloads", default="", help="comma list of names (default all)")
    parser.add_argument("--levers", action="store_true", help="csi-vduse variants only")
    parser.add_argument("--cold", action="store_true", help="reads that miss every cache")
    parser.add_argument("--rbd", action="store_true", help="an RBD image in a Ceph started here")
    args = parser.parse_args()
    if args.rbd:
        return run_rbd(args)
    wanted = args.workloads.split(",") if args.workloads else []
    if args.levers and not wanted:
        wanted = LEVER_WORKLOADS
    if args.cold and not wanted:
        wanted = COLD_WORKLOADS
    servers: dict[str, Any] = COLD_SERVERS if args.cold else SERVERS
    chosen = [w for w in WORKLOADS if not wanted or w.name in wanted]
    image = Path(os.environ.get("LAB_SCRATCH", "/run/scratch")) / "bench.img"
    subprocess.run(["fio", "--name=fill", f"--filename={image}", "--rw=write", "--bs=1m",
                    f"--size={args.size}", "--ioengine=psync", "--end_fsync=1"],
                   check=True, capture_output=True)  # fmt: skip
    order = list(LEVERS) if args.levers else list(servers)
    results: list[dict[str, object]] = []
    for rnd in range(args.rounds):
        names = order if rnd % 2 == 0 else list(reversed(order))
        for server in names:
            if args.levers:
                serving = serve_csi_vduse(image, args.queues, args.queue_size, LEVERS[server])
            else:
                serving = servers[server](image, args.queues, args.queue_size)
            with serving as served:
                for w in chosen:
                    if args.cold:
                        drop_caches()
                    r = measure(served, w, args.runtime, args.size)
                    results.append({"round": rnd, "server": server, **asdict(w), **r})
                    print(f"round {rnd} {server:9} {w.name:24} {r['iops']:9.0f} IOPS "
                          f"p99 {r['lat_p99_us']:8.1f} us", flush=True)  # fmt: skip
    doc = {"kernel": os.uname().release, "args": vars(args), "results": results}
    print(BEGIN)
    print(json.dumps(doc))
    print(END)
    return 0


def run_rbd(args: argparse.Namespace) -> int:
    wanted = args.workloads.split(",") if args.workloads else RBD_WORKLOADS
    chosen = [w for w in WORKLOADS if w.name in wanted]
    results: list[dict[str, object]] = []
    unavailable: dict[str, str] = {}
    with rbd_image(args.size) as image:
        for rnd in range(args.rounds):
            names = list(RBD_SERVERS) if rnd % 2 == 0 else list(reversed(RBD_SERVERS))
            for server in names:
                if server in unavailable:
                    continue
                try:
                    with RBD_SERVERS[server](image, args.queues, args.queue_size) as served:
                        for w in chosen:
                            r = measure(served, w, args.runtime, args.size)
                            results.append({"round": rnd, "server": server, **asdict(w), **r})
                            print(f"round {rnd} {server:9} {w.name:24} {r['iops']:9.0f} IOPS "
                                  f"p99 {r['lat_p99_us']:8.1f} us", flush=True)  # fmt: skip
                except Unavailable as e:
                    unavailable[server] = str(e)
                    print(f"{server}: unavailable here: {e}", flush=True)
    doc = {"kernel": os.uname().release, "args": vars(args), "results": results,
           "unavailable": unavailable}  # fmt: skip
    print(BEGIN)
    print(json.dumps(doc))
    print(END)
    return 0


def measure(served: Served, w: Workload, runtime: int, size: str) -> dict[str, float]:
    before = cpu_seconds(served.pid)
    r = run_fio(served.device, w, runtime, size)
    after = cpu_seconds(served.pid)
    cpu = None if before is None or after is None else after - before
    r["cpu_us_per_io"] = cpu * 1e6 / r["ios"] if cpu is not None and r["ios"] else -1
    return r


if __name__ == "__main__":
    raise SystemExit(main())
