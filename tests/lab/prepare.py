"""What the lab needs on the host before a guest boots, made once and cached: QEMU and the
tools the tests run (Debian's packages), both lab kernels, the VM tests' guest kernel and
csi-sanity (the e2e suite runs it; the guest cannot build it). The test command runs this
once, before its lab stages start side by side.

Usage: python -m tests.lab.prepare
"""

from __future__ import annotations

import sys
import time

from tests.cluster.build import ensure_components
from tests.lab.kernel import KINDS, guest_kernel, lab_kernel
from tests.lab.runner import compile_bytecode, ensure_host_tools


def main() -> int:
    started = time.monotonic()
    ensure_host_tools()
    for kind in KINDS:
        print(f"lab: kernel {kind}: {lab_kernel(kind).image}", flush=True)
    print(f"lab: the VM tests' guest kernel: {guest_kernel()}", flush=True)
    for name, path in ensure_components(["csi-sanity"]).items():
        print(f"lab: {name}: {path}", flush=True)
    compile_bytecode()
    print(f"lab: ready in {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
