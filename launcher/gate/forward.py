"""The relay proper: client requests to the kernel, and kernel messages rebuilt for clients.

Who calls this: :class:`cellblock.gate.relay.Gate` mixes :class:`Forwarding` in; its loop
hands every multipart of the shell, control, stdin and iopub sockets to
:meth:`Forwarding._from_client` or :meth:`Forwarding._from_kernel`.

Client -> kernel (trusted, but verified): signature checked with the client key, header
parsed, msg_type checked against the channel's allowlist (and the profile's, if given), the
request recorded (with the client's raw header bytes), the four JSON frames re-signed with
the kernel key and forwarded with the client's ROUTER identity as the one ident frame.

Kernel -> client (hostile, DESIGN decision 4: the gate rebuilds, it does not filter): layout,
signature (kernel key), header and parent JSON, size, replay window, msg_type allowlist per
channel and profile (comm messages only where the profile allows comms, ``debug_event`` only
with ``debug_request``), then binding to an open request the gate forwarded
(:mod:`cellblock.gate.tracker`). The message the client gets is built by the gate
(:mod:`cellblock.gate.schema`): its header, the request's own header bytes as parent, the
metadata and content reduced to the spec's keys, then the output rules (every string
through the profile's policy), signed with the client key. Replies are routed by the gate's
table, never by the ident frames the kernel sent; iopub topics are the msg_type.

- **Status**: ``execution_state`` only, rebuilt; one ``busy`` and one ``idle`` per open
  request, and one ``starting`` with an empty parent per jail (its boot). Anything else
  (an empty-parent busy or idle, a second starting) is dropped.
- **Buffers** are not covered by the wire signature. Only ``comm_open``/``comm_msg`` on a
  profile that allows comms may carry them (capped at ``max_buffer_bytes`` in total); on
  every other message they are stripped, with a marker in the cell's output. A buffer
  that decodes as UTF-8 passes the output rules as text (a secret in it is redacted).
- **After its idle** nothing names a request any more, but for messages of a comm opened
  in it (by the client, or by its cell: a widget a thread updates later) on a profile
  that allows comms: those are forwarded with that request as parent, and charged.
- **Every byte counts**: the observer is asked about every kernel message bound to a
  request, status, execute_input and the reply included, with the bytes of every frame
  received and forwarded (buffers included); the budget is charged with what was sent.
  What the gate drops counts toward the dropped-bytes bound (:mod:`cellblock.gate.links`).
- **Audit** fields never carry content: a msg_type outside the known set is omitted.
"""

from __future__ import annotations

import json
import time
from typing import Any

import zmq

from cellblock.gate import schema
from cellblock.gate.observe import ALLOW, Observed, Verdict
from cellblock.gate.rules import Withheld, apply_rules, flush_rules, release_rules, tick_rules
from cellblock.gate.state import GateState
from cellblock.gate.tracker import BUFFER_TYPES, CLIENT_TYPES, HOLD, Request
from cellblock.gate.wire import DELIM, Dropped, check, load_object

__all__ = ["Forwarding"]

_COMM_TYPES = frozenset({"comm_open", "comm_msg", "comm_close"})
_STRIPPED = "[cellblock: {size} bytes of binary buffers on a {msg_type} message were removed: " \
            "{why}]\n"


def _without_stdin(parts: list[bytes]) -> list[bytes]:
    """The four frames of an execute_request, its content's ``allow_stdin`` made false."""
    content = load_object(parts[3], "content")
    if content.get("allow_stdin") is False:
        return parts
    content["allow_stdin"] = False
    return [parts[0], parts[1], parts[2], json.dumps(content).encode()]


class Forwarding(GateState):
    """Mixed into :class:`~cellblock.gate.relay.Gate`: the two directions of the relay."""

    # client -> kernel

    def _from_client(self, channel: str, frames: list[bytes]) -> None:
        # The jail is restarting in place (keep it for resume()), or this channel's
        # connection broke and the kernel has not reconnected yet (keep it until it has).
        held = self._held if self._held is not None else (
            self._down_held if channel in self._broken else None)
        limits = self._limits
        if held is not None:
            try:  # only what verifies is kept: nobody without the key fills the warden
                check(frames, self._client_signer, limits.max_frames, limits.max_header_bytes,
                      False)
                if len(held) >= limits.max_open_requests:
                    raise Dropped("restart_queue_full")
            except Dropped as dropped:
                self._drop("client", channel, dropped)
                return
            held.append((channel, frames))
            return
        try:
            msg = check(
                frames, self._client_signer, limits.max_frames, limits.max_header_bytes, False
            )
            header = msg.header
            msg_type = header["msg_type"]
            if msg_type not in CLIENT_TYPES[channel]:  # not a request of this channel
                raise Dropped("msg_type_not_allowed", msg_type)
            idents = tuple(msg.idents)
            if self._allowed is not None and msg_type not in self._allowed:
                if channel != "stdin":  # the profile's choice: answered, never silent
                    self._refuse_not_allowed(channel, idents, msg.parts[0], msg_type)
                    return
                raise Dropped("msg_type_not_allowed", msg_type)
            msg_id = header["msg_id"]
            if channel == "stdin":  # only from the client that was asked, once per question
                self._table.bind_input_reply(idents)
            else:
                if self._observer is not None:
                    verdict = self._observe(Observed(
                        "request", msg_id, msg_type, header["session"], content=msg.parts[3]))
                    if not verdict.allowed:
                        self._refuse(channel, idents, msg.parts[0], msg_type, verdict.message)
                        return
                evicted = self._table.add(
                    msg_id, channel, msg_type, header["session"], idents, msg.parts[0]
                )
                if evicted is not None:
                    self._emit("gate.evict", {"channel": evicted.channel, "reason": "table_full"})
            parts = msg.parts
            if msg_type == "execute_request" and not self._stdin:
                parts = _without_stdin(parts)
            out = [idents[0], DELIM, self._kernel_signer.sign(parts), *parts, *msg.buffers]
            try:
                self._kernel[channel].send_multipart(out, zmq.NOBLOCK)
            except zmq.Again:
                self._table.discard(msg_id)
                raise Dropped("kernel_queue_full", msg_type) from None
            if msg_type == "shutdown_request":
                self._shutdown_requested = True
            if msg_type in ("comm_open", "comm_close"):
                request = self._table.get(msg_id)
                if request is not None:
                    self._track_comm(msg_type, msg.parts[3], request)
        except Dropped as dropped:
            self._drop("client", channel, dropped)

    # kernel -> client

    def _from_kernel(self, channel: str, frames: list[bytes]) -> None:
        try:
            self._relay_kernel(channel, frames)
        except Dropped as dropped:
            self._drop("kernel", channel, dropped)
            self._spent_dropped(sum(map(len, frames)))
        except Withheld:
            pass  # an output rule kept it back on purpose (carry-over, budget)

    def _relay_kernel(self, channel: str, frames: list[bytes]) -> None:
        limits = self._limits
        msg = check(frames, self._kernel_signer, limits.max_frames, limits.max_header_bytes)
        header, parent, parts = msg.header, msg.parent, msg.parts
        msg_type = header["msg_type"]
        if self._replay.seen(header["msg_id"]):
            raise Dropped("replay", msg_type)
        if msg_type == "iopub_welcome" and channel == "iopub" and not parent:
            self._kernel_welcomed = True  # our subscription to the kernel is live
            self._check_ready()
            return
        if msg_type not in self._kernel_types[channel]:
            raise Dropped("unexpected_msg_type", msg_type)
        if parent and self._own and parent["msg_id"] in self._own:
            return  # the answer to the gate's own interrupt_request: consumed
        if channel == "iopub":
            if msg_type == "status":
                self._relay_status(header, parent, parts, frames)
                return
            request = self._bind_iopub(msg_type, parent, parts[3])
            if msg_type != "stream" and self._rules:  # earlier text first, never overtaken
                self._publish_held(request.msg_id, request.header,
                                   release_rules(self._rules, request.msg_id))
        elif channel == "stdin":
            if not self._stdin:
                raise Dropped("stdin_not_allowed", msg_type)
            request = self._table.bind_input_request(parent)
        else:
            request = self._table.bind_reply(channel, msg_type, parent)
        buffers = self._buffers(channel, msg_type, msg.buffers, request)
        idents = (msg_type.encode(),) if channel == "iopub" else request.idents
        out = self._build(channel, msg_type, header, parent, parts, buffers, request, idents)
        if channel == "iopub":
            verdict = self._charge(request, msg_type, frames, out)
            if not verdict.allowed:
                raise Dropped("budget", msg_type)
            self._send_iopub(out, request)
            if msg_type in _COMM_TYPES and self._comms:
                self._track_comm(msg_type, parts[3], request)
            return
        if channel == "stdin":  # charged; a question is never refused (the cell waits on it)
            self._charge(request, msg_type, frames, out)
            self._client[channel].send_multipart(out, zmq.NOBLOCK)
            self._table.asked(request)
            return
        verdict = self._charge(request, msg_type, frames, out)
        if verdict.allowed:
            self._client[channel].send_multipart(out, zmq.NOBLOCK)
            reply = parts[3]
        else:  # over the budget: the client still gets an answer, the gate's
            self._drop("kernel", channel, Dropped("budget", msg_type))
            text = verdict.message or "cellblock: output budget used"
            self._reply_error(channel, request.idents, request.header, request.msg_type,
                              "CellblockBudget", text)
            reply = b'{"status": "error"}'
        held = self._table.replied(request)
        if self._observer is not None:
            self._observe(Observed("reply", request.msg_id, request.msg_type, request.session,
                                   len(parts[3]), len(out[-1 - len(buffers)]), reply))
        if held is not None:
            self._close(request, held)

    def _bind_iopub(self, msg_type: str, parent: dict[str, Any],
                    content: bytes) -> Request:
        """The open request an iopub message belongs to; or, for a message of a comm opened
        in a request of a client (by the client or by its cell) on a profile with comms, that
        request even after its idle (a widget updated from a thread). Raises Dropped."""
        try:
            return self._table.bind_iopub(msg_type, parent, False)[1]
        except Dropped:
            if msg_type not in ("comm_msg", "comm_close") or not self._comm_requests:
                raise
            comm_id = load_object(content, "content").get("comm_id")
            request = self._comm_requests.get(comm_id) if type(comm_id) is str else None
            if request is None:
                raise
            return request

    def _track_comm(self, msg_type: str, content: bytes, request: Request) -> None:
        """Remember which request a comm was opened in; forget it when it closes."""
        comm_id = load_object(content, "content").get("comm_id")
        if type(comm_id) is not str:
            return
        comms = self._comm_requests
        if msg_type == "comm_close":
            comms.pop(comm_id, None)
        elif msg_type == "comm_open":
            comms.pop(comm_id, None)
            comms[comm_id] = request
            while len(comms) > self._limits.max_open_requests:
                del comms[next(iter(comms))]

    def _relay_status(self, header: dict[str, Any], parent: dict[str, Any],
                      parts: list[bytes], frames: list[bytes]) -> None:
        state = schema.status(parts[3])
        if not parent:  # the one starting of a kernel's boot; nothing else without a parent
            if state != "starting" or self._started:
                raise Dropped("no_parent", "status")
            self._started = True
            self._send_iopub(self._frame("status", header, b"{}", schema.STATUS[state]))
            return
        if state == "starting":
            raise Dropped("bad_status", "status")
        idle = state == "idle"
        verdict, request = self._table.bind_iopub("status", parent, idle)
        if not idle:
            if request.busy:
                raise Dropped("duplicate_status", "status")
            request.busy = True
        out = self._frame("status", header, request.header, schema.STATUS[state])
        self._charge(request, "status", frames, out)  # charged; sent even past the budget
        if verdict == HOLD:
            request.held_idle = out
        elif idle:
            self._close(request, out)
        else:
            self._send_iopub(out)

    def _close(self, request: Request, idle: list[bytes]) -> None:
        """Release a request's idle: what the rules held back first, then a marker for what
        the client could not be sent, then the idle (observed first: the cell's audit
        record exists when a client sees idle)."""
        self._flush(request.msg_id, request.header)
        self._lost_marker(request)
        if self._observer is not None:
            self._observe(Observed("idle", request.msg_id, request.msg_type, request.session))
        self._send_iopub(idle)

    def _frame(self, msg_type: str, header: dict[str, Any], parent: bytes,
               content: bytes) -> list[bytes]:
        parts = [schema.header(msg_type, header, self._next_id(), self._session), parent,
                 b"{}", content]
        return [msg_type.encode(), DELIM, self._client_signer.sign(parts), *parts]

    def _buffers(self, channel: str, msg_type: str, buffers: list[bytes],
                 request: Request) -> list[bytes]:
        if not buffers:
            return buffers
        size = sum(map(len, buffers))
        if msg_type in BUFFER_TYPES and self._comms:
            if size > self._limits.max_buffer_bytes:
                self._note(request.header, _STRIPPED.format(
                    size=size, msg_type=msg_type,
                    why=f"over the {self._limits.max_buffer_bytes} bytes allowed; the "
                        "message was dropped"))
                raise Dropped("buffers_too_large", msg_type)
            return buffers
        self._emit("gate.strip", {"channel": channel, "msg_type": msg_type,
                                  "reason": "unsigned_buffers"})
        self._note(request.header, _STRIPPED.format(
            size=size, msg_type=msg_type, why="only comm messages may carry them, where the "
                                              "profile allows comms"))
        self._spent_dropped(size)
        return []

    def _build(
        self, channel: str, msg_type: str, header: dict[str, Any], parent: dict[str, Any],
        parts: list[bytes], buffers: list[bytes], request: Request, idents: tuple[bytes, ...],
    ) -> list[bytes]:
        """The message the client gets: header, parent, metadata and content rebuilt
        (:mod:`cellblock.gate.schema`), then the output rules; signed with the client key."""
        content = schema.content(msg_type, parts[3])
        metadata = schema.metadata(msg_type, parts[2])
        if self._rules:
            content, metadata = apply_rules(
                self._rules, channel, msg_type, header, parent, content, metadata)
            if buffers:
                buffers = self._scan_buffers(channel, header, parent, buffers)
        new = [schema.header(msg_type, header, self._next_id(), self._session),
               request.header, metadata, content]
        return [*idents, DELIM, self._client_signer.sign(new), *new, *buffers]

    def _scan_buffers(self, channel: str, header: dict[str, Any], parent: dict[str, Any],
                      buffers: list[bytes]) -> list[bytes]:
        """Comm buffers that decode as text pass the output rules as a text/plain bundle: a
        finding (or a cut) replaces the buffer by what the rules made of it."""
        out = []
        for buffer in buffers:
            try:
                text = buffer.decode("utf-8")
            except UnicodeDecodeError:
                out.append(buffer)  # binary: counted and capped, not scanned
                continue
            bundle = json.dumps({"data": {"text/plain": text}, "metadata": {}},
                                ensure_ascii=False).encode("utf-8", "surrogatepass")
            try:
                cleaned, _meta = apply_rules(self._rules, channel, "display_data", header,
                                             parent, bundle, b"{}")
            except Withheld:
                raise Dropped("buffer_withheld", "comm_msg") from None
            if cleaned is bundle:
                out.append(buffer)
                continue
            data = load_object(cleaned, "content").get("data")
            value = data.get("text/plain") if type(data) is dict else None
            out.append(value.encode("utf-8", "replace") if type(value) is str else b"")
        return out

    def _charge(self, request: Request, msg_type: str, frames: list[bytes],
                out: list[bytes]) -> Verdict:
        """Ask the observer about one message of ``request``; tell the request a refusal."""
        if self._observer is None:
            return ALLOW
        verdict = self._observe(Observed(
            "output", request.msg_id, msg_type, request.session,
            sum(map(len, frames)), sum(map(len, out))))
        if not verdict.allowed and verdict.message:
            self._tell(request.msg_id, request.header, "CellblockBudget", verdict.message)
        return verdict

    # what the output rules held back

    def _tick(self) -> None:
        """Publish what output rules release on a timer, for requests still open."""
        for parent_msg_id, msg_type, content in tick_rules(self._rules, time.monotonic()):
            request = self._table.get(parent_msg_id)
            if request is not None:
                self._publish_held(parent_msg_id, request.header, [(msg_type, content)])

    def _flush(self, parent_msg_id: str, parent: bytes) -> None:
        """Publish what the output rules held back for this request, before its idle."""
        if self._rules:
            self._publish_held(parent_msg_id, parent, flush_rules(self._rules, parent_msg_id))

    def _publish_held(self, parent_msg_id: str, parent: bytes,
                      items: list[tuple[str, bytes]]) -> None:
        for msg_type, content in items:
            out = self._own_frames(msg_type, parent, content)
            if self._observer is not None:  # held-back output is output too, every byte
                verdict = self._observe(Observed("output", parent_msg_id, msg_type, "",
                                                 len(content), sum(map(len, out))))
                if not verdict.allowed:
                    if verdict.message:
                        self._tell(parent_msg_id, parent, "CellblockBudget", verdict.message)
                    self._drop("kernel", "iopub", Dropped("budget", msg_type))
                    continue
            self._send_iopub(out)
