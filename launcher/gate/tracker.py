"""What the gate may forward: the msg_type allowlists and the table of open requests.

Who calls this: the relay records every client request it forwards (:meth:`RequestTable.add`)
and asks :meth:`RequestTable.bind_reply`, :meth:`~RequestTable.bind_input_request` and
:meth:`~RequestTable.bind_iopub` whether a kernel message belongs to one of them. Pure logic,
no sockets: the tests drive it directly as well as through the relay.

The life of a request (THREATS P2, P3):

1. *open*: forwarded to the kernel. Iopub messages whose parent is this msg_id, from the
   same session, are forwarded; a ``status: idle`` is **held**, not forwarded, until the
   shell/control reply has been forwarded (a forged early idle must not end a client's
   collection while output is still coming). A second idle while one is held is dropped.
2. *replied*: the reply (right type, right channel, first one) was routed to the client
   identity that sent the request; a held idle is released right after it.
3. *closed*: reply and idle both forwarded. The entry is removed; anything later that names
   it as parent (late output, a second idle, a second reply) is dropped as ``unknown_parent``.

Stdin: an ``input_request`` is forwarded only for an open, unanswered ``execute_request``,
to the client that sent it; that client identity, and no other, may then send one
``input_reply`` (:meth:`RequestTable.bind_input_reply`). ipykernel takes any reply that reaches
its stdin socket as the answer, so without this a second client could answer the first one's
``input()`` or ``getpass()``.

Requests without a reply (``comm_open``, ``comm_msg``, ``comm_close``) start as replied, so
their idle closes them. The table is bounded: past ``max_open`` the oldest open request is
evicted (its late messages are then dropped), so a kernel that never answers costs memory
proportional to ``max_open``, not to the session's length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cellblock.gate.wire import Dropped

__all__ = [
    "BUFFER_TYPES",
    "CLIENT_TYPES",
    "FORWARD",
    "FORWARD_AND_CLOSE",
    "HOLD",
    "KERNEL_TYPES",
    "KNOWN_TYPES",
    "NO_REPLY",
    "Request",
    "RequestTable",
]

SHELL_REQUESTS = frozenset(
    {
        "execute_request",
        "inspect_request",
        "complete_request",
        "history_request",
        "is_complete_request",
        "kernel_info_request",
        "comm_info_request",
        "comm_open",
        "comm_msg",
        "comm_close",
    }
)
CONTROL_REQUESTS = frozenset(
    {
        "shutdown_request",
        "interrupt_request",
        "kernel_info_request",
        "debug_request",
        "usage_request",
    }
)
NO_REPLY = frozenset({"comm_open", "comm_msg", "comm_close"})

#: client -> kernel: what each channel accepts.
CLIENT_TYPES: dict[str, frozenset[str]] = {
    "shell": SHELL_REQUESTS,
    "control": CONTROL_REQUESTS,
    "stdin": frozenset({"input_reply"}),
}


def _replies(requests: frozenset[str]) -> frozenset[str]:
    return frozenset(r.removesuffix("_request") + "_reply" for r in requests - NO_REPLY)


#: kernel -> client: what each channel may carry (replies are further bound to a request).
KERNEL_TYPES: dict[str, frozenset[str]] = {
    "shell": _replies(SHELL_REQUESTS),
    "control": _replies(CONTROL_REQUESTS),
    "stdin": frozenset({"input_request"}),
    "iopub": frozenset(
        {
            "stream",
            "display_data",
            "update_display_data",
            "execute_input",
            "execute_result",
            "error",
            "status",
            "clear_output",
            "comm_open",
            "comm_msg",
            "comm_close",
            "debug_event",
            "shutdown_reply",
        }
    ),
}

#: Kernel messages that may keep their (unsigned) buffers; all others lose them.
BUFFER_TYPES = frozenset({"comm_open", "comm_msg"})

#: Every msg_type the gate knows; only these are ever written to the audit log.
#: (``iopub_welcome``, JEP 65, is known but never forwarded: ipykernel sends it to the
#: gate's own subscription, with an empty parent.)
KNOWN_TYPES = frozenset({"iopub_welcome"}).union(*CLIENT_TYPES.values(), *KERNEL_TYPES.values())

# bind_iopub verdicts
FORWARD, HOLD, FORWARD_AND_CLOSE = 0, 1, 2


@dataclass(slots=True)
class Request:
    """One forwarded client request.

    ``idents`` are the client's routing frames (its ROUTER identity first), ``header``
    the client's raw header bytes (the parent of anything the gate itself publishes).
    """

    msg_id: str
    channel: str
    msg_type: str
    session: str
    idents: tuple[bytes, ...]
    header: bytes
    reply_type: str | None
    replied: bool = False
    held_idle: list[bytes] | None = field(default=None)
    busy: bool = False  #: its one ``status: busy`` was forwarded
    lost: int = 0  #: its messages the gate could not queue for the client (a marker says so)
    lost_bytes: int = 0


class RequestTable:
    """Open requests by msg_id, oldest first, at most ``max_open`` of them."""

    __slots__ = ("_asked", "_max_open", "_open")

    def __init__(self, max_open: int) -> None:
        self._max_open = max_open
        self._open: dict[str, Request] = {}
        self._asked: dict[bytes, Request] = {}  # client identity -> request awaiting its input

    def __len__(self) -> int:
        return len(self._open)

    def add(
        self,
        msg_id: str,
        channel: str,
        msg_type: str,
        session: str,
        idents: tuple[bytes, ...],
        header: bytes,
    ) -> Request | None:
        """Record a request the relay is about to forward; return the evicted one, if any.

        Raises Dropped("duplicate_msg_id") if ``msg_id`` is already open.
        """
        if msg_id in self._open:
            raise Dropped("duplicate_msg_id", msg_type)
        no_reply = msg_type in NO_REPLY
        self._open[msg_id] = Request(
            msg_id=msg_id,
            channel=channel,
            msg_type=msg_type,
            session=session,
            idents=idents,
            header=header,
            reply_type=None if no_reply else msg_type.removesuffix("_request") + "_reply",
            replied=no_reply,
        )
        if len(self._open) > self._max_open:
            oldest = next(iter(self._open))
            return self._open.pop(oldest)
        return None

    def get(self, msg_id: str) -> Request | None:
        """The open request ``msg_id``, if any (``Gate.announce`` to one request)."""
        return self._open.get(msg_id)

    def open_requests(self) -> list[Request]:
        """The open requests, oldest first (without closing them)."""
        return list(self._open.values())

    def discard(self, msg_id: str) -> None:
        """Forget ``msg_id`` (the relay could not forward it after all)."""
        self._open.pop(msg_id, None)

    def _bound(self, msg_type: str, parent: dict[str, Any]) -> Request:
        if not parent:
            raise Dropped("no_parent", msg_type)
        request = self._open.get(parent["msg_id"])
        if request is None:
            raise Dropped("unknown_parent", msg_type)
        if request.session != parent["session"]:
            raise Dropped("session_mismatch", msg_type)
        return request

    def bind_reply(self, channel: str, msg_type: str, parent: dict[str, Any]) -> Request:
        """The request a shell/control reply answers. The caller forwards the reply to
        ``request.idents`` and then calls :meth:`replied`."""
        request = self._bound(msg_type, parent)
        if request.channel != channel:
            raise Dropped("wrong_channel", msg_type)
        if request.reply_type != msg_type:
            raise Dropped("reply_mismatch", msg_type)
        if request.replied:
            raise Dropped("duplicate_reply", msg_type)
        return request

    def replied(self, request: Request) -> list[bytes] | None:
        """Mark ``request`` replied; return its held idle (closing it) for the caller to send."""
        request.replied = True
        held = request.held_idle
        if held is not None:
            self._open.pop(request.msg_id, None)
        return held

    def bind_input_request(self, parent: dict[str, Any]) -> Request:
        """The execute_request an ``input_request`` belongs to (open, not yet replied)."""
        request = self._bound("input_request", parent)
        if request.msg_type != "execute_request" or request.replied:
            raise Dropped("unexpected_input_request", "input_request")
        return request

    def asked(self, request: Request) -> None:
        """An ``input_request`` of ``request`` was forwarded to its client: that client may
        now answer it once. At most one question per client identity, ``max_open`` in all."""
        identity = request.idents[0]
        self._asked.pop(identity, None)
        self._asked[identity] = request
        if len(self._asked) > self._max_open:
            del self._asked[next(iter(self._asked))]

    def bind_input_reply(self, idents: tuple[bytes, ...]) -> Request:
        """The request a client's ``input_reply`` answers: the one whose ``input_request`` was
        last forwarded to this client identity, still open and unanswered. Consumes the
        question. Raises Dropped("unexpected_input_reply")."""
        request = self._asked.pop(idents[0], None) if idents else None
        if request is None or request.replied or self._open.get(request.msg_id) is not request:
            raise Dropped("unexpected_input_reply", "input_reply")
        return request

    def bind_iopub(self, msg_type: str, parent: dict[str, Any], idle: bool) -> tuple[int, Request]:
        """Decide an iopub message whose parent is non-empty: FORWARD, HOLD (an idle before
        the reply; the caller stores the frames in ``request.held_idle``) or
        FORWARD_AND_CLOSE (the idle after the reply)."""
        request = self._bound(msg_type, parent)
        if not idle:
            return FORWARD, request
        if request.held_idle is not None:
            raise Dropped("duplicate_idle", msg_type)
        if request.replied:
            self._open.pop(request.msg_id, None)
            return FORWARD_AND_CLOSE, request
        return HOLD, request

    def close_all(self) -> list[Request]:
        """Remove and return every open request, oldest first (``Gate.announce`` calls this)."""
        requests = list(self._open.values())
        self._open.clear()
        self._asked.clear()
        return requests
