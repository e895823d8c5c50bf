"""A minimal generic netlink client: resolve a family, send a command, parse attributes."""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator

from csi_vduse._native import lib

NLMSG_HDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
GENL_HDR = struct.Struct("=BBH")  # command, version, reserved
NLA_HDR = struct.Struct("=HH")  # length, type
NLA_TYPE_MASK = 0x3FFF

Attrs = dict[int, bytes]


class NetlinkError(OSError):
    """A netlink request refused by the kernel, with its extended-ack message if any."""


def _align(n: int) -> int:
    return (n + 3) & ~3


def pack_attr(kind: int, value: bytes) -> bytes:
    raw = NLA_HDR.pack(NLA_HDR.size + len(value), kind) + value
    return raw + b"\0" * (_align(len(raw)) - len(raw))


def strz(value: str) -> bytes:
    return value.encode() + b"\0"


def parse_attrs(data: bytes) -> Attrs:
    attrs: Attrs = {}
    offset = 0
    while offset + NLA_HDR.size <= len(data):
        length, kind = NLA_HDR.unpack_from(data, offset)
        if length < NLA_HDR.size:
            break
        attrs[kind & NLA_TYPE_MASK] = data[offset + NLA_HDR.size : offset + length]
        offset += _align(length)
    return attrs


def attr_str(attrs: Attrs, kind: int) -> str | None:
    raw = attrs.get(kind)
    return raw.split(b"\0", 1)[0].decode() if raw is not None else None


def attr_int(attrs: Attrs, kind: int) -> int | None:
    raw = attrs.get(kind)
    return int.from_bytes(raw, "little") if raw is not None else None


class GenlSocket:
    def __init__(self, family: str) -> None:
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, lib.NETLINK_GENERIC
        )
        self._sock.bind((0, 0))
        self._sock.setsockopt(lib.SOL_NETLINK, lib.NETLINK_EXT_ACK, 1)
        self._sock.setsockopt(lib.SOL_NETLINK, lib.NETLINK_CAP_ACK, 1)
        self._seq = 0
        self.family = family
        self._family_id = lib.GENL_ID_CTRL
        try:
            reply = self.request(
                lib.CTRL_CMD_GETFAMILY, [pack_attr(lib.CTRL_ATTR_FAMILY_NAME, strz(family))]
            )
        except NetlinkError as e:
            self.close()
            if e.errno != errno.ENOENT:
                raise
            reply = []
        family_id = attr_int(reply[0], lib.CTRL_ATTR_FAMILY_ID) if reply else None
        if family_id is None:
            raise NetlinkError(
                errno.ENOENT,
                f"generic netlink family {family!r} not found (is its kernel module loaded?)",
            )
        self._family_id = family_id

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> GenlSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, cmd: int, attrs: list[bytes], dump: bool = False) -> list[Attrs]:
        """Send one command; return the attributes of every reply message."""
        self._seq += 1
        flags = lib.NLM_F_REQUEST | lib.NLM_F_ACK | (lib.NLM_F_DUMP if dump else 0)
        payload = GENL_HDR.pack(cmd, 1, 0) + b"".join(attrs)
        header = NLMSG_HDR.pack(NLMSG_HDR.size + len(payload), self._family_id, flags, self._seq, 0)
        self._sock.send(header + payload)
        replies: list[Attrs] = []
        while True:
            for kind, msg_flags, body in self._receive():
                if kind == lib.NLMSG_ERROR:
                    self._raise_if_error(body, msg_flags)
                    return replies
                if kind == lib.NLMSG_DONE:
                    return replies
                replies.append(parse_attrs(body[GENL_HDR.size :]))

    def _receive(self) -> Iterator[tuple[int, int, bytes]]:
        data = self._sock.recv(1 << 16)
        offset = 0
        while offset + NLMSG_HDR.size <= len(data):
            length, kind, flags, seq, _ = NLMSG_HDR.unpack_from(data, offset)
            if length < NLMSG_HDR.size:
                break
            if seq == self._seq:
                yield kind, flags, data[offset + NLMSG_HDR.size : offset + length]
            offset += _align(length)

    def _raise_if_error(self, body: bytes, flags: int) -> None:
        (code,) = struct.unpack_from("=i", body)
        if code == 0:
            return
        message = os.strerror(-code)
        if flags & lib.NLM_F_ACK_TLVS:
            tlvs = parse_attrs(body[4 + NLMSG_HDR.size :])
            extra = attr_str(tlvs, lib.NLMSGERR_ATTR_MSG)
            if extra:
                message = f"{message} ({extra})"
        raise NetlinkError(-code, f"{self.family} netlink: {message}")
