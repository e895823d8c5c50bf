"""The Kubernetes suite: build what is missing on the host, then boot the lab on Debian's
6.12 kernel (what containers need, as modules) with the memory a cluster needs, and run
tests/kubernetes inside.

Usage: python -m tests.cluster.run [--timeout S] [--memory MiB] [PYTEST ARGS...]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

from tests.cluster import image_cache
from tests.cluster.prepare import prepare
from tests.lab.runner import exit_on_sigterm, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster.run", description=__doc__)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--memory", type=int, default=8192, help="guest memory in MiB")
    args, pytest_args = parser.parse_known_args(argv)
    exit_on_sigterm()
    started = time.monotonic()
    env, disks = image_cache.attached(prepare())
    print(f"cluster: components and images ready in {time.monotonic() - started:.0f} s", flush=True)
    command = ["python", "-m", "pytest", "tests/kubernetes", "-v", "-rA", "-p", "no:cacheprovider"]
    result = run(
        shlex.join([*command, *pytest_args]),
        timeout=args.timeout,
        memory_mib=args.memory,
        extra_env=env,
        kernel="debian612",
        disks=disks,
    )
    print(f"cluster: {time.monotonic() - started:.0f} s in all", flush=True)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
