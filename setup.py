"""Build hooks: the cffi extension, and the protobuf/gRPC modules generated from csi.proto
(the CSI services) and pluginregistration.proto (the kubelet's plugin registration).

The generated modules (csi_vduse/csi/proto/<name>_pb2.py, <name>_pb2.pyi, <name>_pb2_grpc.py)
are not checked in: build_py runs grpc_tools.protoc on every build and writes them both into
the source tree (so an editable install, which imports from the source tree, sees them)
and into build_lib (so a wheel carries them, the .pyi included).
"""

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTOS = ("csi_vduse/csi/proto/csi.proto", "csi_vduse/csi/proto/pluginregistration.proto")


def generate_proto_modules(out_dir: Path) -> None:
    """Run protoc on PROTOS with ROOT as the import root, writing the modules under out_dir."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(ROOT / proto) for proto in PROTOS),
    ]
    status = protoc.main(args)
    if status != 0:
        sys.exit(f"grpc_tools.protoc failed on {', '.join(PROTOS)} (exit {status})")


class BuildPyWithProtos(build_py):
    """build_py that first generates the proto modules into the source tree and build_lib."""

    def run(self) -> None:
        generate_proto_modules(ROOT)
        build_lib = Path(self.build_lib).resolve()
        if build_lib != ROOT:
            generate_proto_modules(build_lib)
        super().run()


setup(
    cmdclass={"build_py": BuildPyWithProtos},
    cffi_modules=["csi_vduse/_native_build.py:ffibuilder"],
)
