"""The wire between the client side, the spawner and the wardens: JSON lines on unix
sockets, and descriptors passed with SCM_RIGHTS. Defined once here; every reader of a
status line (the client's warden handle, the spawner's pool, a pooled warden waiting to be
adopted) uses :class:`LineBuffer`.

Who calls it: :mod:`cellblock.warden.client`, :mod:`cellblock.warden.spawner`,
:mod:`cellblock.warden.life` and :mod:`cellblock.warden.warden`. Nothing here listens on a
path: every socket is a socketpair end handed over by descriptor.
"""

from __future__ import annotations

import array
import contextlib
import json
import socket
from collections.abc import Iterator
from typing import Any

__all__ = ["LineBuffer", "read_line", "recv_fds", "send_fds", "write_line"]


def send_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    """One message with ``fds`` attached (SCM_RIGHTS)."""
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


def recv_fds(sock: socket.socket, size: int, max_fds: int) -> tuple[bytes, list[int]]:
    """Receive one message and the descriptors attached to it (MSG_CMSG_CLOEXEC)."""
    fds = array.array("i")
    data, ancdata, _flags, _addr = sock.recvmsg(
        size, socket.CMSG_SPACE(max_fds * fds.itemsize), socket.MSG_CMSG_CLOEXEC)
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


def read_line(sock: socket.socket, limit: int, timeout: float) -> bytes:
    """One newline-terminated line from a blocking socket, and nothing after it; else
    ValueError (or OSError from the socket)."""
    sock.settimeout(timeout)
    buf = bytearray()
    while b"\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ValueError("the peer closed the socket before a full line")
        buf += chunk
        if len(buf) > limit:
            raise ValueError(f"line longer than {limit} bytes")
    sock.settimeout(None)
    line, _, rest = bytes(buf).partition(b"\n")
    if rest:
        raise ValueError("unexpected data after the request line")
    return line


def write_line(sock: socket.socket, payload: dict[str, Any]) -> None:
    """One JSON line; a peer that is gone is not an error (it learns nothing anyway)."""
    with contextlib.suppress(OSError):
        sock.sendall(json.dumps(payload).encode() + b"\n")


class LineBuffer:
    """Bytes in, JSON objects out: :meth:`feed` what a socket gave, iterate the complete
    lines that decode to an object (others are skipped). ``limit`` bounds what is kept
    of an unfinished line."""

    def __init__(self, pending: bytes = b"", limit: int = 1 << 20) -> None:
        self._buf = bytearray(pending)
        self._limit = limit

    def feed(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) > self._limit and b"\n" not in self._buf:
            raise ValueError(f"status line longer than {self._limit} bytes")

    def __bool__(self) -> bool:
        return b"\n" in self._buf

    def lines(self) -> Iterator[dict[str, Any]]:
        while b"\n" in self._buf:
            line, _, rest = bytes(self._buf).partition(b"\n")
            self._buf = bytearray(rest)
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict):
                    yield obj
