"""The heartbeat: pings from clients go to the kernel, echoes come back only for pings sent.

Who calls this: the gate's loop (:mod:`cellblock.gate.relay`) hands every multipart of the
client-facing and kernel-facing ``hb`` sockets to :meth:`Heartbeat.from_client` and
:meth:`Heartbeat.from_kernel`. Liveness must reflect the kernel, so pings are forwarded;
an echo is passed back only if it matches a ping the gate forwarded and not yet matched,
so a kernel cannot send a client unsolicited bytes on hb.
"""

from __future__ import annotations

from collections.abc import Callable

import zmq

from cellblock.gate.wire import Dropped

__all__ = ["HB_MAX_BYTES", "HB_MAX_PENDING", "Heartbeat"]

HB_MAX_BYTES = 4096  #: a ping of more bytes (or more than 4 frames) is dropped
HB_MAX_PENDING = 256  #: distinct pings awaiting their echo; the oldest is forgotten past it

Drop = Callable[[str, str, Dropped], None]


class Heartbeat:
    """The pings in flight between the client-facing and the kernel-facing hb sockets."""

    __slots__ = ("_client", "_drop", "_kernel", "_pending")

    def __init__(self, drop: Drop) -> None:
        self._drop = drop
        self._pending: dict[tuple[bytes, ...], int] = {}
        self._client: zmq.Socket[bytes] | None = None
        self._kernel: zmq.Socket[bytes] | None = None

    def attach(self, client: zmq.Socket[bytes], kernel: zmq.Socket[bytes]) -> None:
        self._client, self._kernel = client, kernel

    def clear(self) -> None:
        """Forget pings in flight (the jail was restarted: its kernel never saw them)."""
        self._pending.clear()

    def from_client(self, frames: list[bytes]) -> None:
        if len(frames) > 4 or sum(map(len, frames)) > HB_MAX_BYTES:
            self._drop("client", "hb", Dropped("bad_heartbeat"))
            return
        key = tuple(frames)
        pending = self._pending
        pending[key] = pending.get(key, 0) + 1
        if len(pending) > HB_MAX_PENDING:
            del pending[next(iter(pending))]
        assert self._kernel is not None
        try:
            self._kernel.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            pass  # the kernel is not there: no echo, which is the truth

    def from_kernel(self, frames: list[bytes]) -> None:
        key = tuple(frames)
        count = self._pending.get(key)
        if count is None:
            self._drop("kernel", "hb", Dropped("unsolicited_heartbeat"))
            return
        if count == 1:
            del self._pending[key]
        else:
            self._pending[key] = count - 1
        assert self._client is not None
        self._client.send_multipart(frames, zmq.NOBLOCK)
