"""The VDUSE control device and per-device file descriptors."""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path

from csi_vduse._native import ffi, lib

CONTROL_PATH = Path("/dev/vduse/control")
DEVICE_DIR = Path("/dev/vduse")
NAME_MAX = lib.VDUSE_NAME_MAX - 1  # the kernel's buffer holds the terminating NUL


class VduseError(OSError):
    pass


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise VduseError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret


@dataclass(frozen=True)
class VqInfo:
    num: int
    desc_addr: int
    driver_addr: int
    device_addr: int
    avail_index: int
    ready: bool


@dataclass(frozen=True)
class Request:
    type: int
    request_id: int
    vq_index: int
    status: int
    iova_start: int
    iova_last: int


class VduseControl:
    """/dev/vduse/control, negotiated to API version 0."""

    def __init__(self) -> None:
        try:
            self.fd = os.open(CONTROL_PATH, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise VduseError(
                errno.ENOENT, f"{CONTROL_PATH} is missing: load the vduse module (modprobe vduse)"
            ) from None
        try:
            version = ffi.new("uint64_t *")
            _check(lib.vk_get_api_version(self.fd, version), "VDUSE_GET_API_VERSION")
            # Asking promotes the fd to the newest API on 7.0+; pin the one we speak.
            _check(lib.vk_set_api_version(self.fd, 0), "VDUSE_SET_API_VERSION")
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> VduseControl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create(
        self, name: str, device_id: int, features: int, vq_num: int, vq_align: int, config: bytes
    ) -> None:
        buf = ffi.from_buffer("uint8_t[]", config)
        ret = lib.vk_create_dev(
            self.fd, name.encode(), device_id, features, vq_num, vq_align, buf, len(config)
        )
        _check(ret, f"create VDUSE device {name}")

    def destroy(self, name: str, retries: int = 50) -> None:
        """Destroys the device, waiting out the EBUSY of a release still in progress."""
        for _ in range(retries):
            ret = lib.vk_destroy_dev(self.fd, name.encode())
            if ret != -errno.EBUSY:
                break
            time.sleep(0.1)
        if ret == -errno.ENOENT:
            return
        _check(ret, f"destroy VDUSE device {name}")


class VduseDevice:
    """/dev/vduse/NAME: only one process may hold it open."""

    def __init__(self, name: str) -> None:
        self.name = name
        path = DEVICE_DIR / name
        for _ in range(50):
            try:
                self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
                return
            except FileNotFoundError:
                time.sleep(0.02)
            except OSError as e:
                if e.errno == errno.EBUSY:
                    raise VduseError(
                        errno.EBUSY, f"VDUSE device {name} is already served by another process"
                    ) from None
                raise
        raise VduseError(errno.ENOENT, f"{path} did not appear")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def features(self) -> int:
        out = ffi.new("uint64_t *")
        _check(lib.vk_dev_get_features(self.fd, out), "VDUSE_DEV_GET_FEATURES")
        return int(out[0])

    def set_config(self, offset: int, data: bytes) -> None:
        buf = ffi.from_buffer("uint8_t[]", data)
        _check(lib.vk_dev_set_config(self.fd, offset, buf, len(data)), "VDUSE_DEV_SET_CONFIG")

    def inject_config_irq(self) -> None:
        _check(lib.vk_dev_inject_config_irq(self.fd), "VDUSE_DEV_INJECT_CONFIG_IRQ")

    def vq_setup(self, index: int, max_size: int) -> None:
        _check(lib.vk_vq_setup(self.fd, index, max_size), f"VDUSE_VQ_SETUP {index}")

    def vq_info(self, index: int) -> VqInfo:
        out = ffi.new("struct vk_vq_info *")
        _check(lib.vk_vq_get_info(self.fd, index, out), f"VDUSE_VQ_GET_INFO {index}")
        return VqInfo(
            out.num,
            out.desc_addr,
            out.driver_addr,
            out.device_addr,
            out.avail_index,
            bool(out.ready),
        )

    def vq_set_kickfd(self, index: int, fd: int) -> None:
        _check(lib.vk_vq_setup_kickfd(self.fd, index, fd), f"VDUSE_VQ_SETUP_KICKFD {index}")

    def inject_irq(self, index: int) -> None:
        _check(lib.vk_vq_inject_irq(self.fd, index), f"VDUSE_VQ_INJECT_IRQ {index}")

    def read_request(self) -> Request | None:
        out = ffi.new("struct vk_request *")
        ret = lib.vk_read_request(self.fd, out)
        if ret == -errno.EAGAIN:
            return None
        _check(ret, "read VDUSE request")
        return Request(
            out.type, out.request_id, out.vq_index, out.status, out.iova_start, out.iova_last
        )

    def respond(self, request_id: int, ok: bool, vq_index: int = 0, avail_index: int = 0) -> None:
        result = lib.VDUSE_REQ_RESULT_OK if ok else lib.VDUSE_REQ_RESULT_FAILED
        ret = lib.vk_write_response(self.fd, request_id, result, vq_index, avail_index)
        _check(ret, "write VDUSE response")
