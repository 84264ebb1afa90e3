"""The gate's two connections: its caps, the addresses and the signer of a connection
dict (client's or kernel's), and the warden's one-shot ``kernel_info`` probe of a kernel
that has no client yet (the warm pool).

Who calls what: :class:`cellblock.gate.Gate` (``GateLimits``, ``address``, ``signer``);
the warden (``probe_kernel``).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cellblock.gate.wire import DELIM, SIGNATURE_SCHEME, Signer

__all__ = ["GateLimits", "address", "probe_kernel", "signer"]


@dataclass(frozen=True, slots=True)
class GateLimits:
    """Caps on what the gate accepts. Defaults suit a notebook kernel."""

    max_frame_bytes: int = 64 * 1024 * 1024  #: zmq.MAXMSGSIZE: a bigger frame disconnects the peer
    max_frames: int = 64  #: frames per multipart, idents and buffers included
    max_header_bytes: int = 64 * 1024  #: header and parent_header frames each
    replay_window: int = 65536  #: kernel msg_ids remembered (P4)
    max_buffer_bytes: int = 16 * 1024 * 1024  #: total buffer bytes on one comm message
    max_open_requests: int = 1024  #: requests tracked at once; the oldest is evicted past this
    #: zmq.RCVHWM on kernel-facing sockets (messages). It bounds what the gate buffers when
    #: a kernel floods faster than it relays: about kernel_rcvhwm x message size per socket
    #: (a 1 MiB-message flood held 1 GiB at 1000). Beyond it the kernel's own queue fills
    #: (its memory, in its cgroup) and its PUB drops.
    kernel_rcvhwm: int = 16
    linger_ms: int = 1000  #: how long close() waits to flush client-facing sockets

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(
                    f"cellblock gate: GateLimits.{name} must be an int >= 1, got {value!r}"
                )
        if self.max_frames < 6:
            raise ValueError(
                f"cellblock gate: GateLimits.max_frames must be at least 6 (a message without "
                f"idents has 6 frames), got {self.max_frames}"
            )


def address(conn: Mapping[str, Any], port: int) -> str:
    transport = conn.get("transport", "tcp")
    if transport == "tcp":
        return f"tcp://{conn['ip']}:{port}"
    if transport == "ipc":
        return f"ipc://{conn['ip']}-{port}"
    raise ValueError(f"cellblock gate: transport {transport!r} is not tcp or ipc")


def signer(conn: Mapping[str, Any], side: str) -> Signer:
    scheme = conn.get("signature_scheme", SIGNATURE_SCHEME)
    if scheme != SIGNATURE_SCHEME:
        raise ValueError(f"cellblock gate: {side} signature_scheme {scheme!r} is not hmac-sha256")
    return Signer(conn["key"])



def probe_kernel(conn: Mapping[str, Any], deadline: float,
                 check: Callable[[], None]) -> bool:
    """Send the kernel of ``conn`` (its shell socket, its key) one ``kernel_info_request``
    and wait for the reply until ``deadline`` (time.monotonic). ``check`` runs every 50 ms
    and may raise to give up (the jail ended, a stop signal). Returns whether a reply came;
    the reply itself is not used."""
    import zmq

    header = json.dumps({"msg_id": secrets.token_hex(16), "msg_type": "kernel_info_request",
                         "username": "cellblock", "session": secrets.token_hex(16),
                         "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                         "version": "5.3"}).encode()
    parts = [header, b"{}", b"{}", b"{}"]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
        sock.connect(address(conn, int(conn["shell_port"])))
        sock.send_multipart([DELIM, signer(conn, "kernel").sign(parts), *parts])
        while not sock.poll(50):
            check()
            if time.monotonic() > deadline:
                return False
        sock.recv_multipart()
        return True
    finally:
        sock.close()
        ctx.term()
