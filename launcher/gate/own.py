"""The messages the gate writes itself: announcements, budget refusals, error replies,
markers in a cell's output, iopub welcomes, and its own interrupt_request to the kernel.

Who calls this: :class:`cellblock.gate.relay.Gate` mixes :class:`OwnMessages` in; the relay
and the loop call these methods on the gate's one thread. Everything here is signed with the
client key (the interrupt with the kernel key), carries the gate's own header (session and
msg_id of the gate) and, as parent, the raw header bytes of the client request it concerns.

Sending on the client-facing iopub is bounded (the XPUB has ``GateLimits.client_iopub_hwm``
and ``XPUB_NODROP``): kernel output that does not fit is dropped and counted on its request
(a marker says so at the cell's end); what the gate itself must deliver (status, markers,
errors) waits in a backlog of at most ``4 x max_open_requests`` messages, sent first as soon
as the client reads again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import zmq

from cellblock.gate import schema
from cellblock.gate.state import GateState
from cellblock.gate.tracker import NO_REPLY, Request
from cellblock.gate.wire import DELIM, Dropped

__all__ = ["OwnMessages"]

_IDLE = schema.STATUS["idle"]
_LOST = (
    "[cellblock: {count} message(s) of this cell's output ({size} bytes) were dropped: the "
    "client was not reading them and the gate queues at most {hwm} for it]\n"
)


def _error(ename: str, evalue: str) -> bytes:
    return json.dumps(
        {"ename": ename, "evalue": evalue, "traceback": [evalue]}, ensure_ascii=False
    ).encode("utf-8", "replace")


class OwnMessages(GateState):
    """Mixed into :class:`~cellblock.gate.relay.Gate`: what it publishes in its own name."""

    # -- the client-facing iopub, bounded

    def _send_iopub(self, out: list[bytes], request: Request | None = None) -> None:
        """Send ``out`` to the clients' iopub. ``request``: kernel output of that request,
        dropped (and counted on it) if the queue is full; None: the gate's own or a status,
        kept in the backlog until it fits."""
        if self._backlog and not self._drain_backlog():
            if request is None:
                self._keep(out)
            else:
                self._lose(request, out)
            return
        try:
            self._client["iopub"].send_multipart(out, zmq.NOBLOCK)
        except zmq.Again:
            if request is None:
                self._keep(out)
            else:
                self._lose(request, out)

    def _keep(self, out: list[bytes]) -> None:
        self._backlog.append(out)
        if len(self._backlog) > 4 * self._limits.max_open_requests:
            self._backlog.popleft()
            self._emit("gate.drop", {"direction": "gate", "channel": "iopub",
                                     "reason": "client_backlog_full"})

    def _lose(self, request: Request, out: list[bytes]) -> None:
        request.lost += 1
        request.lost_bytes += sum(map(len, out))
        self._drop("kernel", "iopub", Dropped("client_queue_full", out[0].decode(
            "ascii", "replace")))

    def _drain_backlog(self) -> bool:
        """Send what waits in the backlog; True once it is empty."""
        backlog = self._backlog
        sock = self._client["iopub"]
        while backlog:
            try:
                sock.send_multipart(backlog[0], zmq.NOBLOCK)
            except zmq.Again:
                return False
            backlog.popleft()
        return True

    def _lost_marker(self, request: Request) -> None:
        if request.lost:
            text = _LOST.format(count=request.lost, size=request.lost_bytes,
                                hwm=self._limits.client_iopub_hwm)
            request.lost = request.lost_bytes = 0
            self._note(request.header, text)

    def _note(self, parent: bytes, text: str) -> None:
        """A marker on stderr in the output of the request whose header is ``parent``."""
        content = json.dumps({"name": "stderr", "text": text}).encode()
        self._publish_own("stream", parent, content)

    def _mark_open_requests(self, text: str) -> None:
        """Publish ``text`` on stderr to every open execute request."""
        for request in self._table.open_requests():
            if request.msg_type == "execute_request":
                self._note(request.header, text)

    # -- headers and framing

    def _next_id(self) -> str:
        self._count += 1
        return f"{self._session}_{self._count}"

    def _own_header(self, msg_type: str) -> bytes:
        return schema.header(msg_type, {"version": "5.3"}, self._next_id(), self._session)

    def _own_frames(self, msg_type: str, parent: bytes, content: bytes) -> list[bytes]:
        parts = [self._own_header(msg_type), parent, b"{}", content]
        return [msg_type.encode(), DELIM, self._client_signer.sign(parts), *parts]

    def _publish_own(self, msg_type: str, parent: bytes, content: bytes) -> None:
        self._send_iopub(self._own_frames(msg_type, parent, content))

    def _subscription(self, frames: list[bytes]) -> None:
        """A client subscribed on the client-facing XPUB: welcome it, as ipykernel does."""
        for frame in frames:
            if frame[:1] != b"\x01" or len(frame) > 257:
                continue
            topic = frame[1:]
            try:
                subscription = topic.decode("utf-8")
            except UnicodeDecodeError:
                continue
            content = json.dumps({"subscription": subscription}).encode()
            parts = [self._own_header("iopub_welcome"), b"{}", b"{}", content]
            out = [topic or b"iopub_welcome", DELIM, self._client_signer.sign(parts), *parts]
            self._send_iopub(out)

    # -- announcements, refusals, error replies

    def _publish_announce(
        self, ename: str, evalue: str, msg_id: str | None = None, replies: bool = False
    ) -> None:
        content = _error(ename, evalue)
        if msg_id is not None:  # one running request, kept open
            request = self._table.get(msg_id)
            if request is not None and not request.replied:
                self._tell(request.msg_id, request.header, ename, evalue)
            return
        # Executing = forwarded and not yet answered. A request that has its reply but
        # whose idle never came is not (its reply may have been the message that crossed
        # the output budget, or the kernel died between the two): it only gets its idle,
        # for which its client still waits.
        closed = self._table.close_all()
        requests = [r for r in closed if not r.replied]
        answered = [r for r in closed if r.replied]
        for request in requests:
            self._flush(request.msg_id, request.header)
            self._lost_marker(request)
        told = self._told
        self._told = {}
        if not requests:
            self._publish_own("error", b"{}", content)
        for request in requests:
            if told.get(request.msg_id) != evalue:  # not twice the same words to one cell
                self._publish_own("error", request.header, content)
        if replies:
            for request in requests:
                self._reply_error(request.channel, request.idents, request.header,
                                  request.msg_type, ename, evalue)
        for request in (*requests, *answered):
            self._publish_own("status", request.header, _IDLE)

    def _tell(self, msg_id: str, parent: bytes, ename: str, evalue: str) -> None:
        """Publish an ``error`` to one open request, keeping it open."""
        self._publish_own("error", parent, _error(ename, evalue))
        self._told[msg_id] = evalue
        while len(self._told) > 64:
            del self._told[next(iter(self._told))]

    def _refuse(
        self, channel: str, idents: tuple[bytes, ...], parent: bytes, msg_type: str,
        text: str,
    ) -> None:
        """Answer a request the observer refused, as the kernel would answer a failed one:
        an ``error`` on iopub, an error reply to the client, then ``status: idle``."""
        self._emit("gate.refuse", {"channel": channel, "msg_type": msg_type, "reason": "budget"})
        self._publish_own("error", parent, _error("CellblockBudget", text))
        if msg_type not in NO_REPLY:
            self._reply_error(channel, idents, parent, msg_type, "CellblockBudget", text)
        self._publish_own("status", parent, _IDLE)

    def _refuse_not_allowed(self, channel: str, idents: tuple[bytes, ...], parent: bytes,
                            msg_type: str) -> None:
        """Answer a request the profile does not allow, as a kernel answers one it cannot
        serve: ``busy``, an error reply, ``idle`` (an execute_request also gets the error on
        iopub, as its cell's output). A client waiting for the reply (JupyterLab sends a
        ``history_request`` at start) is told, instead of waiting for ever."""
        text = (f"cellblock: {msg_type} is not allowed by this kernel's profile "
                "(allowed_requests in the policy)")
        self._emit("gate.refuse", {"channel": channel, "msg_type": msg_type,
                                   "reason": "msg_type_not_allowed"})
        if channel == "control":  # control replies are never bracketed by busy/idle
            if msg_type not in NO_REPLY:
                self._reply_error(channel, idents, parent, msg_type, "CellblockRefused", text)
            return
        self._publish_own("status", parent, schema.STATUS["busy"])
        if msg_type == "execute_request":
            self._publish_own("error", parent, _error("CellblockRefused", text))
        if msg_type not in NO_REPLY:
            self._reply_error(channel, idents, parent, msg_type, "CellblockRefused", text)
        self._publish_own("status", parent, _IDLE)

    def _reply_error(
        self, channel: str, idents: Sequence[bytes], parent: bytes, msg_type: str,
        ename: str, evalue: str,
    ) -> None:
        reply_type = msg_type.removesuffix("_request") + "_reply"
        body: dict[str, Any] = {
            "status": "error", "ename": ename, "evalue": evalue, "traceback": [evalue],
        }
        if reply_type == "execute_reply":
            body["execution_count"] = None
        content = json.dumps(body, ensure_ascii=False).encode("utf-8", "replace")
        parts = [self._own_header(reply_type), parent, b"{}", content]
        out = [*idents, DELIM, self._client_signer.sign(parts), *parts]
        self._client[channel].send_multipart(out, zmq.NOBLOCK)

    def _send_own_interrupt(self) -> None:
        header = self._own_header("interrupt_request")
        msg_id = json.loads(header)["msg_id"]
        self._own[msg_id] = None
        while len(self._own) > 64:
            del self._own[next(iter(self._own))]
        parts = [header, b"{}", b"{}", b"{}"]
        out = [self._identity, DELIM, self._kernel_signer.sign(parts), *parts]
        try:
            self._kernel["control"].send_multipart(out, zmq.NOBLOCK)
        except zmq.Again:
            self._emit("gate.drop", {"direction": "gate", "channel": "control",
                                     "reason": "kernel_queue_full",
                                     "msg_type": "interrupt_request"})
