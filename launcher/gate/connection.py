"""The gate's two connections: its caps, and the addresses and the signer of a connection
dict (client's or kernel's).

Who calls what: :class:`cellblock.gate.Gate` and :mod:`cellblock.gate.kernelside`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cellblock.gate.wire import SIGNATURE_SCHEME, Signer

__all__ = ["GateLimits", "address", "signer"]


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
    #: connections the kernel may make to one kernel-facing socket in one jail's life: 1 at
    #: start, one more each time libzmq drops it (a frame over max_frame_bytes). A kernel
    #: past it is stopped: its connections are a host cost (the warden accepts each one).
    max_kernel_connections: int = 32
    #: zmq.SNDHWM of the client-facing iopub (messages queued per subscriber, XPUB_NODROP):
    #: past it kernel output is dropped, with a marker in its cell's output, instead of the
    #: gate's memory growing for a client that does not read (ipykernel's own default).
    client_iopub_hwm: int = 1000
    #: bytes the kernel may send that the gate drops (bound to no open request, malformed,
    #: over a bound), as a bucket that drains at ``dropped_bytes_per_second``. Honest
    #: kernels drop little (a background thread printing after its cell ended); a kernel
    #: past it is flooding the gate and is stopped (``on_fault``).
    max_dropped_bytes: int = 256 * 1024 * 1024
    dropped_bytes_per_second: int = 1024 * 1024

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
