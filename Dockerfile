# syntax=docker/dockerfile:1
#
# The csi-vduse image: one image for the node plugin and the controller (one process serves
# identity, controller and node; the Helm chart runs it in a DaemonSet).
#
#   docker build -t ghcr.io/csi-vduse/csi-vduse:0.1.0 .
#
# BASE is any Debian bookworm image with Python 3.11, its venv module and apt. The default is
# the python: image, pinned to an exact release (pin it by digest too, @sha256:..., in a release
# pipeline); where no registry is reachable, tests/cluster/images.py builds one from Debian
# packages and passes it as --build-arg BASE=... . Both stages use the same base: the wheels
# are built for its Python.
ARG BASE=docker.io/library/python:3.11.14-slim-bookworm

############################################################################################
# builder: compiles the cffi extension (the VDUSE ioctls and the C data plane) against the
# kernel's UAPI headers, generates the gRPC modules from csi.proto (grpcio-tools, a build
# requirement in pyproject.toml), and collects the wheels of every dependency.
FROM ${BASE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# gcc, libc headers, the kernel UAPI headers (<linux/vduse.h>, <linux/vdpa.h>,
# <linux/virtio_blk.h>), liburing's (io_uring for the file backend) and librbd's (the Ceph RBD
# backend): needed to build only, never copied into the runtime stage. Python's
# own headers come with the python: image; Debian's python3 needs python3-dev for them.
RUN include=$(python3 -c 'import sysconfig; print(sysconfig.get_path("include"))') \
    && if [ -e "$include/Python.h" ]; then python_dev=; else python_dev=python3-dev; fi \
    && apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev linux-libc-dev liburing-dev \
        librbd-dev $python_dev \
    && rm -rf /var/lib/apt/lists/*

# pip runs from a virtual environment: the same on both bases, and Debian's python3 has no pip
# and refuses installs into the system (PEP 668).
RUN python3 -m venv /opt/build
ENV PATH=/opt/build/bin:$PATH

WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY csi_vduse ./csi_vduse

# The project's wheel, then the wheels of its dependencies (resolved from that wheel).
RUN pip wheel --no-deps --wheel-dir /wheels . \
    && pip wheel --wheel-dir /wheels /wheels/csi_vduse-*.whl

############################################################################################
# runtime: the wheels, liburing (the file backend's io_uring), librbd1 (the RBD backend) and
# the tools the plugin runs:
# mount/umount/blkid (util-linux, mount), mkfs.ext4/resize2fs (e2fsprogs),
# mkfs.xfs/xfs_growfs (xfsprogs), vdpa (iproute2, optional, for people debugging a node).
# No compiler, no headers, no pip cache.
FROM ${BASE}

ARG BASE
ARG VERSION=0.1.0
ARG REVISION=unknown

LABEL org.opencontainers.image.title="csi-vduse" \
      org.opencontainers.image.description="Kubernetes CSI driver whose volumes are VDUSE virtio-blk devices served by an in-process C data plane" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/csi-vduse/csi-vduse" \
      org.opencontainers.image.url="https://github.com/csi-vduse/csi-vduse" \
      org.opencontainers.image.documentation="https://github.com/csi-vduse/csi-vduse#readme" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE}"

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        e2fsprogs \
        iproute2 \
        librbd1 \
        liburing2 \
        mount \
        util-linux \
        xfsprogs \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*

# Installed from the builder's wheels through a bind mount, so no wheel stays in a layer; no
# index is used, so what runs is exactly what the builder resolved. Into a virtual environment
# for the builder's reason; its bin/ comes first on PATH, so `csi-vduse` and `python` are its.
# pip and setuptools leave with the install: nothing at run time needs them.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python3 -m venv /opt/csi-vduse \
    && /opt/csi-vduse/bin/pip install --no-cache-dir --no-index --find-links=/wheels csi-vduse \
    && /opt/csi-vduse/bin/pip uninstall --yes --quiet pip setuptools
ENV PATH=/opt/csi-vduse/bin:$PATH

# Smoke test: the command runs, the compiled extension (with io_uring and RBD built in) and the
# generated gRPC modules import, and every tool the plugin calls is on PATH.
RUN csi-vduse --version \
    && python -c "import csi_vduse._native, csi_vduse.csi.proto.csi_pb2_grpc, csi_vduse.cluster.agent" \
    && python -c "from csi_vduse._native import ffi, lib; assert lib.dp_file_uring_ops.aio_open != ffi.NULL" \
    && python -c "from csi_vduse.backends import rbd; assert rbd.available()" \
    && for tool in mount umount blkid mkfs.ext4 resize2fs mkfs.xfs xfs_growfs vdpa; do \
         command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 1; }; \
       done

# Root on purpose, not by omission: the node plugin opens /dev/vduse/control, creates vdpa
# devices over generic netlink (CAP_NET_ADMIN in the host network namespace), binds them
# through sysfs and mounts file systems (CAP_SYS_ADMIN); the chart runs it privileged. A
# non-root user could do none of that, so the image does not pretend otherwise.
USER root

ENTRYPOINT ["csi-vduse"]
CMD ["serve"]
