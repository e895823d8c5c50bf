"""The test command after its set-up (`scripts/test` installs and then runs this): every stage,
what it runs, which stages must pass before it, and its budget.

A stage starts as soon as the stages it needs have passed and the ones it comes after have
ended, so the lab's guests (which leave a core idle much of the time) and the builds run side
by side, but never three guests at once. Every line a stage prints comes
out prefixed with its name. A stage past its budget is stopped; the deadlines inside it come
first and say what they waited for (the lab's guest prints what was still running and the last
lines of its logs). At the end, pass or fail, a table of seconds per stage.

Usage: python -m tests.pipeline [--only STAGE ...] [--list]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
# Past this, every stage still running is stopped: the table comes out before CI's 90 minutes
# (scripts/test's set-up takes up to about 3 of them on a new machine).
DEADLINE = float(os.environ.get("CSI_VDUSE_PIPELINE_DEADLINE", 80 * 60))
GRACE = 60.0  # from SIGTERM to SIGKILL of a stage over its budget
TAIL_LINES = 40  # of a failed stage, repeated above the table

# The e2e suite runs whole on Debian's 6.12 and, on the shared 6.1, only what depends on the
# kernel (the tests marked any_kernel run once) but the VM tests, whose QEMU in QEMU costs the
# most (scripts/test-6.1 runs all of it there).
E2E = ("python", "-m", "pytest", "tests/e2e", "-v", "-rfE", "-p", "no:cacheprovider")
E2E_61 = (*E2E, "-m", "not any_kernel", "--deselect", "tests/e2e/test_vm.py")


@dataclass(frozen=True)
class Stage:
    name: str
    what: str
    commands: tuple[tuple[str, ...], ...]
    budget: float
    needs: tuple[str, ...] = ()
    # Started only once these have ended, whatever their result (when they run at all): an
    # order, not a need. Three lab guests at once on two cores slow each past its deadline.
    after: tuple[str, ...] = ()


def py(*args: str) -> tuple[str, ...]:
    return (PY, "-m", *args)


def lab(kernel: str, timeout: int, *command: str) -> tuple[str, ...]:
    return py("tests.lab.runner", "--kernel", kernel, "--timeout", str(timeout), "--", *command)


LINT = (py("ruff", "check", "."), py("ruff", "format", "--check", "."), py("mypy"))
STAGES = (
    Stage("lint", "ruff, ruff format, mypy", LINT, 600),
    Stage("unit", "unit tests (host)", (py("pytest", "tests/unit", "-q"),), 900, ("lint",)),
    Stage("ceph", "RBD on a single-node Ceph (host)", (py("pytest", "tests/ceph", "-q"),), 900,
          ("lint",)),
    Stage("lab", "QEMU, lab kernels, the VM tests' guest kernel, csi-sanity",
          (py("tests.lab.prepare"),), 1500, ("lint",)),
    Stage("e2e-6.12", "e2e and csi-sanity in the lab on Debian's 6.12",
          (lab("debian612", 2100, *E2E),), 2400, ("lab",)),
    Stage("e2e-6.1", "the e2e tests that depend on the kernel but the VM tests, on the shared 6.1",
          (lab("shared61", 1500, *E2E_61),), 1800, ("lab",)),
    Stage("cluster-build", "Kubernetes, containerd, sidecars; the images",
          (py("tests.cluster.prepare"),), 2700, ("lint",)),
    Stage("cluster", "Kubernetes in the lab: helm, claims, pods (but the extended steps)",
          (py("tests.cluster.run", "--timeout", "2100", "-m", "not extended"),), 2400,
          ("cluster-build", "lab"), after=("e2e-6.1",)),
)  # fmt: skip


@dataclass
class Run:
    stage: Stage
    state: str = "waiting"  # waiting, running, passed, failed, over budget, skipped, stopped
    started: float = 0.0
    ended: float = 0.0
    cpu: float = 0.0
    proc: subprocess.Popen[bytes] | None = None
    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=400))
    thread: threading.Thread | None = None

    @property
    def seconds(self) -> float:
        if not self.started:
            return 0.0
        return (self.ended or time.monotonic()) - self.started


class Pipeline:
    def __init__(self, stages: Sequence[Stage]) -> None:
        self.runs = {s.name: Run(s) for s in stages}
        self.printing = threading.Lock()
        self.width = max(len(name) for name in self.runs)
        self.started = time.monotonic()
        self.stopping = False

    def say(self, name: str, line: str) -> None:
        with self.printing:
            sys.stdout.write(f"{name:<{self.width}} | {line}\n")
            sys.stdout.flush()

    def run(self) -> bool:
        while any(r.state in ("waiting", "running") for r in self.runs.values()):
            for run in self.runs.values():
                if run.state == "waiting" and not self.stopping:
                    self._maybe_start(run)
                elif run.state == "running":
                    self._check(run)
            if time.monotonic() - self.started > DEADLINE and not self.stopping:
                self.stop(f"the pipeline's deadline of {DEADLINE:.0f} s passed")
            time.sleep(0.5)
        return all(r.state == "passed" for r in self.runs.values())

    def _maybe_start(self, run: Run) -> None:
        needs = [self.runs[n] for n in run.stage.needs]
        if any(n.state not in ("waiting", "running", "passed") for n in needs):
            failed = ", ".join(n.stage.name for n in needs if n.state != "passed")
            run.state = "skipped"
            self.say("pipeline", f"{run.stage.name}: skipped ({failed} did not pass)")
        elif all(n.state == "passed" for n in needs) and not self._waits_for(run):
            run.state, run.started = "running", time.monotonic()
            self.say("pipeline", f"{run.stage.name}: started ({run.stage.what})")
            run.thread = threading.Thread(target=self._execute, args=(run,), daemon=True)
            run.thread.start()

    def _waits_for(self, run: Run) -> bool:
        return any(
            self.runs[name].state in ("waiting", "running")
            for name in run.stage.after
            if name in self.runs
        )

    def _execute(self, run: Run) -> None:
        ok = True
        for argv in run.stage.commands:
            if run.state != "running":
                break
            run.proc = subprocess.Popen(
                argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, start_new_session=True,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
            )  # fmt: skip
            assert run.proc.stdout is not None
            for raw in run.proc.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                run.tail.append(line)
                self.say(run.stage.name, line)
            _, status, usage = os.wait4(run.proc.pid, 0)
            run.proc.returncode = os.waitstatus_to_exitcode(status)
            run.cpu += usage.ru_utime + usage.ru_stime
            if run.proc.returncode != 0:
                ok = False
                self.say(run.stage.name, f"exit {run.proc.returncode}: {' '.join(argv)}")
                break
        run.ended = time.monotonic()
        if run.state == "running":
            run.state = "passed" if ok else "failed"
        self.say("pipeline", f"{run.stage.name}: {run.state} in {run.seconds:.0f} s")

    def _check(self, run: Run) -> None:
        if run.seconds > run.stage.budget and run.state == "running":
            run.state = "over budget"
            self.say("pipeline", f"{run.stage.name}: past its budget of {run.stage.budget:.0f} s,"
                                 " stopping it")  # fmt: skip
            self._terminate(run)

    def _terminate(self, run: Run) -> None:
        proc = run.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)

        def kill_later() -> None:
            time.sleep(GRACE)
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)

        threading.Thread(target=kill_later, daemon=True).start()

    def stop(self, why: str) -> None:
        """Stops every running stage; the ones not started yet never start."""
        self.stopping = True
        self.say("pipeline", f"stopping: {why}")
        for run in self.runs.values():
            if run.state == "running":
                run.state = "stopped"
                self._terminate(run)
            elif run.state == "waiting":
                run.state = "skipped"

    def report(self, setup_seconds: float | None) -> str:
        lines = []
        for run in self.runs.values():
            if run.state not in ("passed", "skipped", "waiting"):
                lines.append(f"== {run.stage.name}: {run.state}; its last lines:")
                lines += [f"   {line}" for line in list(run.tail)[-TAIL_LINES:]]
        lines.append("== seconds per stage (wall time; cpu: the stage's processes, 2 cores)")
        lines.append(f"{'stage':<{self.width}}  {'seconds':>7}  {'budget':>6}  {'cpu':>6}  result")
        total = time.monotonic() - self.started
        if setup_seconds is not None:
            lines.append(f"{'setup':<{self.width}}  {setup_seconds:7.0f}  {'':>6}  {'':>6}  passed")
            total += setup_seconds
        for run in self.runs.values():
            lines.append(
                f"{run.stage.name:<{self.width}}  {run.seconds:7.0f}  {run.stage.budget:6.0f}  "
                f"{run.cpu:6.0f}  {run.state}"
            )
        ok = all(r.state == "passed" for r in self.runs.values())
        lines.append(f"{'all':<{self.width}}  {total:7.0f}  {'':>6}  {_own_cpu():6.0f}  "
                     f"{'passed' if ok else 'FAILED'}")  # fmt: skip
        return "\n".join(lines)


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def selected(only: Sequence[str]) -> list[Stage]:
    """The stages named and every stage they need, in the pipeline's order."""
    by_name = {s.name: s for s in STAGES}
    wanted: set[str] = set()
    todo = list(only)
    while todo:
        name = todo.pop()
        if name not in by_name:
            raise SystemExit(f"unknown stage {name!r}; stages: {', '.join(by_name)}")
        if name not in wanted:
            wanted.add(name)
            todo += by_name[name].needs
    return [s for s in STAGES if s.name in wanted]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.pipeline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--only", nargs="+", metavar="STAGE", help="these and what they need")
    parser.add_argument("--list", action="store_true", help="print the stages and exit")
    args = parser.parse_args(argv)
    stages = selected(args.only) if args.only else list(STAGES)
    if args.list:
        for s in stages:
            needs = f" (needs {', '.join(s.needs)})" if s.needs else ""
            after = f" (after {', '.join(s.after)} ends)" if s.after else ""
            print(f"{s.name:<14} {s.budget:5.0f} s  {s.what}{needs}{after}")
        return 0
    pipeline = Pipeline(stages)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _: pipeline.stop(f"signal {signum}"))
    ok = False
    try:
        ok = pipeline.run()
    finally:
        setup = os.environ.get("CSI_VDUSE_SETUP_SECONDS")
        print(pipeline.report(float(setup) if setup else None), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
