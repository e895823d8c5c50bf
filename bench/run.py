"""The benchmark, from the host: boots the lab, runs bench.lab inside, and reports.

    scripts/bench [--rounds N] [--runtime S] [--workloads a,b] [--levers | --cold | --rbd]

Prints one table (IOPS, bandwidth, mean and p99 latency, CPU time per I/O of the server
process, ratios to qemu-storage-daemon and to loop), saves it as JSON plus a PNG of the
ratios under bench-results/, and compares with the previous run there. --cold measures 4k
random reads of a 2 GiB file in a 1 GiB guest on a disk the host does not cache, against fio
with O_DIRECT on the file, csi-vduse's synchronous worker and qemu-storage-daemon with
O_DIRECT (threads and io_uring AIO).

The --cold setup is the one issue 12's goals are stated in. --rbd serves one image of a
single-node Ceph started in the lab (kernel debian612, which has the rbd and nbd modules)
by csi-vduse, krbd, rbd-nbd and qemu-storage-daemon's rbd driver, and prints csi-vduse's
IOPS over each."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.lab import BEGIN, END
from tests.lab import runner

RESULTS = Path(__file__).resolve().parents[1] / "bench-results"
BASELINE = Path(__file__).resolve().parent / "baseline"  # the committed reference run
METRICS = ("iops", "bw_mib", "lat_mean_us", "lat_p99_us", "cpu_us_per_io")


def aggregate(results: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """workload -> server -> metric, the median over rounds."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for r in results:
        table.setdefault(r["name"], {}).setdefault(r["server"], {})
    for workload, servers in table.items():
        for server in servers:
            rows = [r for r in results if r["name"] == workload and r["server"] == server]
            servers[server] = {m: statistics.median(float(r[m]) for r in rows) for m in METRICS}
    return table


def ratios(table: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    out = {}
    for workload, s in table.items():
        ours, qsd, loop = s["csi-vduse"], s["qsd"], s["loop"]
        out[workload] = {
            "iops_vs_qsd": ours["iops"] / qsd["iops"],
            "iops_vs_loop": ours["iops"] / loop["iops"],
            "p99_vs_qsd": ours["lat_p99_us"] / qsd["lat_p99_us"] if qsd["lat_p99_us"] else 0,
            "cpu_vs_qsd": ours["cpu_us_per_io"] / qsd["cpu_us_per_io"]
            if qsd["cpu_us_per_io"] > 0 else 0,
        }  # fmt: skip
    return out


def render(table: dict[str, dict[str, dict[str, float]]], rel: dict[str, dict[str, float]]) -> str:
    lines = [
        f"{'workload':24} {'server':10} {'IOPS':>9} {'MiB/s':>8} {'mean us':>8} {'p99 us':>8} "
        f"{'cpu us/io':>9} {'x qsd':>6} {'x loop':>6}"
    ]
    for workload, servers in table.items():
        for server in ("csi-vduse", "qsd", "loop"):
            m = servers[server]
            cpu = f"{m['cpu_us_per_io']:9.1f}" if m["cpu_us_per_io"] >= 0 else f"{'-':>9}"
            qsd, loop = servers["qsd"]["iops"], servers["loop"]["iops"]
            lines.append(
                f"{workload:24} {server:10} {m['iops']:9.0f} {m['bw_mib']:8.1f} "
                f"{m['lat_mean_us']:8.1f} {m['lat_p99_us']:8.1f} {cpu} "
                f"{m['iops'] / qsd:6.2f} {m['iops'] / loop:6.2f}"
            )
        r = rel[workload]
        lines.append(f"{'':24} csi-vduse p99 x qsd {r['p99_vs_qsd']:.2f}, cpu/io x qsd "
                     f"{r['cpu_vs_qsd']:.2f}")  # fmt: skip
    return "\n".join(lines)


def render_per_server(
    table: dict[str, dict[str, dict[str, float]]],
    title: str,
    ratio: Callable[[str, float, float], float | None],
) -> str:
    """One row per workload and server; the last column is `ratio(server, its IOPS,
    csi-vduse's IOPS)`, blank where it is None."""
    lines = [f"{'workload':24} {'server':18} {'IOPS':>9} {'p99 us':>9} {'cpu us/io':>9} "
             f"{title:>16}"]  # fmt: skip
    for workload, servers in table.items():
        ours = servers["csi-vduse"]["iops"]
        for name, m in servers.items():
            cpu = f"{m['cpu_us_per_io']:9.1f}" if m["cpu_us_per_io"] >= 0 else f"{'-':>9}"
            r = ratio(name, m["iops"], ours)
            lines.append(f"{workload:24} {name:18} {m['iops']:9.0f} {m['lat_p99_us']:9.1f} "
                         f"{cpu} {'' if r is None else f'{r:.2f}':>16}")  # fmt: skip
    return "\n".join(lines)


def render_levers(table: dict[str, dict[str, dict[str, float]]]) -> str:
    return render_per_server(table, "IOPS x default", lambda _, iops, ours: iops / ours)


COLD_REFERENCES = (
    "file-o_direct", "csi-vduse-sync", "csi-vduse-direct", "qsd-threads", "qsd-io_uring",
)  # fmt: skip


def render_cold(table: dict[str, dict[str, dict[str, float]]]) -> str:
    return render_per_server(
        table, "csi-vduse x this",
        lambda name, iops, ours: ours / iops if name in COLD_REFERENCES else None,
    )  # fmt: skip


def render_rbd(table: dict[str, dict[str, dict[str, float]]]) -> str:
    return render_per_server(
        table, "csi-vduse x this",
        lambda name, iops, ours: None if name == "csi-vduse" else ours / iops,
    )  # fmt: skip


def plot(rel: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rel)
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.38
    ax.bar([i - width / 2 for i in x], [rel[n]["iops_vs_qsd"] for n in names], width,
           label="csi-vduse / qemu-storage-daemon")  # fmt: skip
    ax.bar([i + width / 2 for i in x], [rel[n]["iops_vs_loop"] for n in names], width,
           label="csi-vduse / loop")  # fmt: skip
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(1.25, color="grey", linestyle="--", linewidth=0.8, label="1.25x target")
    ax.set_xticks(list(x), names, rotation=20, ha="right")
    ax.set_ylabel("IOPS ratio")
    ax.set_title("csi-vduse throughput relative to qemu-storage-daemon and loop (same run)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def compare(rel: dict[str, dict[str, float]], previous: Path | None) -> str:
    if previous is None:
        return "no earlier run to compare with"
    old = json.loads(previous.read_text()).get("ratios", {})
    lines = [f"against {previous.name} (IOPS x qsd, then -> now):"]
    for workload, r in rel.items():
        if workload in old:
            lines.append(f"  {workload:24} {old[workload]['iops_vs_qsd']:.2f} -> "
                         f"{r['iops_vs_qsd']:.2f}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/bench", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runtime", type=int, default=6, help="seconds per fio run")
    parser.add_argument("--workloads", default="")
    parser.add_argument("--queues", type=int, default=2)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--levers", action="store_true", help="measure data-plane levers against the defaults"
    )
    mode.add_argument("--cold", action="store_true", help="reads that miss every cache")
    mode.add_argument("--rbd", action="store_true", help="an RBD image, against krbd and others")
    args = parser.parse_args(argv)
    command = (f"python -m bench.lab --rounds {args.rounds} --runtime {args.runtime} "
               f"--queues {args.queues} --workloads '{args.workloads}'"
               + (" --levers" if args.levers else "")
               + (" --cold --size 2G" if args.cold else "")
               + (" --rbd --size 512M" if args.rbd else ""))  # fmt: skip
    if args.rbd:
        result = runner.run(command, timeout=5400, kernel="debian612")
    elif args.cold:
        result = runner.run(command, timeout=5400, memory_mib=1024, scratch_cache="none")
    else:
        result = runner.run(command, timeout=5400)
    if result.returncode != 0 or BEGIN not in result.output:
        print(f"bench: the lab run failed (exit {result.returncode})", file=sys.stderr)
        return 1
    doc = json.loads(result.output.split(BEGIN, 1)[1].split(END, 1)[0])
    table = aggregate(doc["results"])
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if args.cold:
        doc["table"] = table
        (RESULTS / f"cold-{stamp}.json").write_text(json.dumps(doc, indent=1))
        print(render_cold(table))
        print(f"saved {RESULTS}/cold-{stamp}.json")
        return 0
    if args.rbd:
        doc["table"] = table
        (RESULTS / f"rbd-{stamp}.json").write_text(json.dumps(doc, indent=1))
        print(render_rbd(table))
        for server, why in doc.get("unavailable", {}).items():
            print(f"{server}: not measured: {why}")
        print(f"saved {RESULTS}/rbd-{stamp}.json")
        return 0
    if args.levers:
        doc["table"] = table
        (RESULTS / f"levers-{stamp}.json").write_text(json.dumps(doc, indent=1))
        print(render_levers(table))
        print(f"saved {RESULTS}/levers-{stamp}.json")
        return 0
    rel = ratios(table)
    previous = max(RESULTS.glob("2*.json"), default=None) or max(
        BASELINE.glob("*.json"), default=None
    )
    doc.update({"table": table, "ratios": rel})
    (RESULTS / f"{stamp}.json").write_text(json.dumps(doc, indent=1))
    plot(rel, RESULTS / f"{stamp}.png")
    print(render(table, rel))
    print(compare(rel, previous))
    print(f"saved {RESULTS / stamp}.json and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
