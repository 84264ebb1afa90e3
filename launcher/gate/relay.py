"""The gate: a ZMQ relay between Jupyter clients (client key) and a hostile kernel (kernel key).

Who calls what: the warden makes one :class:`Gate` per kernel (with the kernel-facing
sockets it bound before the jail started, :mod:`cellblock.gate.kernelside`), calls
:meth:`Gate.start` before or after the jailed kernel is up, :meth:`Gate.announce` when it
knows why the kernel died, reads :attr:`Gate.shutdown_requested` to tell a requested exit
from a crash, and calls :meth:`Gate.close` on every exit path. For budgets it passes an ``observer``
(:mod:`cellblock.gate.observe`), calls :meth:`Gate.interrupt` to send the kernel an
``interrupt_request`` of the gate's own, and :meth:`Gate.rekey` before it restarts the jail
in place with a fresh kernel key. Everything else happens on the gate's one background
thread, which owns every socket between ``start()`` and ``close()``.

Client -> kernel (trusted, but verified): signature checked with the client key, header
parsed, msg_type checked against the channel's allowlist (and the profile's, if given),
the request recorded, the four JSON frames re-signed with the kernel key and forwarded
with the client's ROUTER identity as the one ident frame.

Kernel -> client (hostile): layout, signature (kernel key), header and parent JSON, size,
replay window, msg_type allowlist per channel, then binding to a request the gate forwarded
(see :mod:`cellblock.gate.tracker`). Replies are routed by the gate's own table, never by the
ident frames the kernel sent. An ``input_reply`` is forwarded only from the client that
was sent an ``input_request``, once; without ``input_reply`` in the allowlist, no
``input_request`` is forwarded at all (nobody could answer it). The original frames are
re-signed with the client key; JSON is re-encoded only when an output rule changed the
content. Iopub topics are replaced by the msg_type (the kernel's topic frame is unsigned).

Decisions:

- **Buffers** are not covered by the wire signature, so a buffer is only as trustworthy as
  the transport. Only ``comm_open``/``comm_msg`` (widgets) use them; on every other message
  they are stripped (audited ``gate.strip``), and comm buffers are capped in total.
- **Empty parent**: dropped, except ``status: starting`` (what a kernel publishes at boot).
  An empty-parent ``busy`` or ``idle`` could flip a UI's busy indicator, so it is dropped.
- **Status** content is the one content the relay parses (it is tiny and drives P3);
  ``execution_state`` must be busy, idle or starting.
- **Heartbeat** is forwarded to the kernel, so liveness reflects the kernel; an echo is only
  passed back if it matches a ping the gate forwarded (no unsolicited bytes to clients).
- **Connections** are the kernel's to make: the gate binds and never reconnects. Every
  accepted connection is counted per channel; past ``GateLimits.max_kernel_connections``
  in one jail's life the gate calls ``on_fault`` once (the warden stops the kernel). A
  connection that breaks and comes back (libzmq drops a peer that sends a frame over
  MAXMSGSIZE) leaves a marker in the output of every open request.
- **Audit** fields never carry content: a msg_type outside the known set is omitted.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Any

import zmq

from cellblock.gate.connection import GateLimits, address, signer
from cellblock.gate.kernelside import KernelSockets
from cellblock.gate.observe import Observed, Observer
from cellblock.gate.replay import ReplayWindow
from cellblock.gate.rules import OutputRule, Withheld, apply_rules, flush_rules, tick_rules
from cellblock.gate.tracker import (
    BUFFER_TYPES,
    CLIENT_TYPES,
    HOLD,
    KERNEL_TYPES,
    KNOWN_TYPES,
    NO_REPLY,
    RequestTable,
)
from cellblock.gate.wire import (
    DELIM,
    Dropped,
    Signer,
    check,
    load_object,
)

__all__ = ["AuditCallback", "Gate", "GateLimits"]

AuditCallback = Callable[[str, dict[str, Any]], None]

_ROUTED = ("shell", "control", "stdin")
_BATCH = 256  # messages read from one socket before the poller is consulted again
# ...or this long, whichever comes first: a kernel flooding iopub with big messages must not
# keep an interrupt_request waiting on control for 256 of them (seconds, when measured).
_SLICE_S = 0.01
_TICK_S = 0.05  # how often output rules with a tick() are asked for timed releases
_HB_MAX_BYTES = 4096
_RESET_MARKER = (
    "[cellblock: the kernel's {channel} connection broke and came back; whatever it was "
    "sending then was dropped (a message over the {limit} MiB frame limit does this)]\n"
)
_HB_MAX_PENDING = 256
_EXECUTION_STATES = frozenset({"busy", "idle", "starting"})
_NOT_OUTPUT = frozenset({"status", "execute_input"})  # not charged to an output budget


def monitor_event(frames: list[bytes]) -> tuple[int, int]:
    """The event number and value (a descriptor for ACCEPTED and DISCONNECTED) of one
    libzmq monitor message (its first frame: u16 event, u32 value). Raises ValueError for
    anything else."""
    if not frames or len(frames[0]) < 6:
        raise ValueError("not a monitor message")
    head = frames[0]
    return int.from_bytes(head[:2], "little"), int.from_bytes(head[2:6], "little")


def _without_stdin(parts: list[bytes]) -> list[bytes]:
    """The four frames of an execute_request, its content's ``allow_stdin`` made false."""
    content = load_object(parts[3], "content")
    if content.get("allow_stdin") is False:
        return parts
    content["allow_stdin"] = False
    return [parts[0], parts[1], parts[2], json.dumps(content).encode()]


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class Gate:
    """One kernel's relay. See the module docstring for what it checks and why."""

    def __init__(
        self,
        client: Mapping[str, Any],
        kernel: Mapping[str, Any] | KernelSockets,
        limits: GateLimits | None = None,
        rules: Sequence[OutputRule] = (),
        audit: AuditCallback | None = None,
        allowed_client_msg_types: frozenset[str] | None = None,
        observer: Observer | None = None,
        on_fault: Callable[[str], None] | None = None,
    ) -> None:
        self._limits = limits or GateLimits()
        # The kernel-facing sockets: bound by the warden (a KernelSockets it owns), or by
        # this gate at start() from a connection dict (then the gate closes them).
        self._owns_kernel = not isinstance(kernel, KernelSockets)
        self._ks = KernelSockets(kernel, self._limits) if not isinstance(
            kernel, KernelSockets) else kernel
        self._client_conn = dict(client)
        self._kernel_conn = dict(self._ks.conn)
        self._client_signer = signer(client, "client")
        self._kernel_signer = signer(self._kernel_conn, "kernel")
        self._on_fault = on_fault
        self._accepts: dict[str, int] = {}  # connections accepted per channel, this jail
        self._live: dict[str, set[int]] = {}  # per channel, the fds of its connections
        self._up: set[str] = set()  # channels with a connection whose handshake succeeded
        self._broken: set[str] = set()  # channels whose connection broke, until it is back
        self._down_held: list[tuple[str, list[bytes]]] = []  # requests for a broken channel
        self._faulted = False
        self._rules = tuple(rules)
        self._audit = audit
        self._allowed = allowed_client_msg_types
        # No input_reply allowed (P12): nobody could answer an input_request, so it is
        # dropped, and execute_requests go out with allow_stdin false, so that input()
        # raises StdinNotImplementedError at once instead of waiting for an answer.
        self._stdin = self._allowed is None or "input_reply" in self._allowed
        self._table = RequestTable(self._limits.max_open_requests)
        self._replay = ReplayWindow(self._limits.replay_window)
        self._session = uuid.uuid4().hex  # the gate's own session, for announce()
        self._identity = self._ks.identity
        self._hb_pending: dict[tuple[bytes, ...], int] = {}
        self._lock = threading.Lock()
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._client: dict[str, zmq.Socket[bytes]] = {}
        self._kernel: dict[str, zmq.Socket[bytes]] = {}
        self._monitors: dict[str, zmq.Socket[bytes]] = {}
        self._wake_in: zmq.Socket[bytes] | None = None
        self._wake_out: zmq.Socket[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        self._shutdown_requested = False
        self.audit_errors = 0  #: audit callbacks that raised (counted, then ignored)
        self._observer = observer
        self._own: dict[str, None] = {}  # msg_ids of the gate's own requests to the kernel
        self._told: dict[str, str] = {}  # msg_id -> the last error the gate told that request
        self._rekeyed = threading.Event()
        self._kernel_welcomed = False
        self._kernel_ready = threading.Event()  # welcomed, and all five sockets connected
        self._kernel_connected = threading.Event()  # all five sockets connected
        self._held: list[tuple[str, list[bytes]]] | None = None  # requests during a restart

    # ----------------------------------------------------------- the warden's side

    @property
    def shutdown_requested(self) -> bool:
        """True once a client's shutdown_request was forwarded to the kernel."""
        return self._shutdown_requested

    @property
    def client_connection_info(self) -> dict[str, Any]:
        """The client connection dict with the ports actually bound (port 0 = any free port)."""
        return dict(self._client_conn)

    def start(self) -> None:
        """Bind the client-facing sockets (and the kernel-facing ones, unless the warden
        bound them), start the loop thread. The kernel may connect before or after. On
        any failure everything opened here is closed and the error is raised."""
        if self._ctx is not None or self._closed:
            raise RuntimeError("cellblock gate: start() may be called once, before close()")
        self._ctx = ctx = zmq.Context()
        try:
            for name in (*_ROUTED, "hb"):
                sock = self._client[name] = ctx.socket(zmq.ROUTER)
                sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
                self._bind(sock, name)
            # XPUB, as ipykernel's own iopub: each new subscriber gets an iopub_welcome
            # (JEP 65), so a client knows its subscription is live before it asks.
            self._client["iopub"] = ctx.socket(zmq.XPUB)
            self._client["iopub"].setsockopt(zmq.XPUB_VERBOSE, 1)
            self._bind(self._client["iopub"], "iopub")
            if self._owns_kernel:
                self._ks.bind()
            self._kernel = self._ks.sockets
            self._monitors = self._ks.monitors
            endpoint = f"inproc://cellblock-gate-{uuid.uuid4().hex}"
            self._wake_in = ctx.socket(zmq.PAIR)
            self._wake_in.bind(endpoint)
            self._wake_out = ctx.socket(zmq.PAIR)
            self._wake_out.connect(endpoint)
            self._thread = threading.Thread(target=self._run, name="cellblock-gate", daemon=True)
            self._thread.start()
        except BaseException:
            self.close()
            raise

    def announce(
        self, ename: str, evalue: str, *, msg_id: str | None = None, replies: bool = False
    ) -> None:
        """Publish an ``error`` (then ``status: idle``) for every request the kernel has not yet
        answered, or one error with an empty parent if there is none; every open request is
        then forgotten (the kernel is going away). Thread-safe; a no-op before start() or
        after close(). What was announced is flushed before close() returns.

        ``replies=True`` also answers each of those requests on its own channel with an
        error reply (a client waiting for ``execute_reply`` then stops waiting; used when
        the jail is restarted in place). ``msg_id`` instead publishes only the ``error``, to
        that one open request, and keeps it open: the kernel is expected to answer it (a
        budget interrupted the cell)."""
        payload = json.dumps([str(ename), str(evalue), msg_id, bool(replies)]).encode()
        self._wake(b"announce", payload)

    def interrupt(self) -> None:
        """Send the kernel an ``interrupt_request`` of the gate's own (signed with the kernel
        key) on control. Its reply and status messages are consumed, never forwarded.
        Thread-safe; a no-op before start() or after close()."""
        self._wake(b"interrupt")

    def rekey(self, key: str, timeout: float = 5.0) -> bool:
        """Verify and sign kernel messages with ``key`` from now on (the warden restarts the
        jail with a fresh key). Until :meth:`resume`, client requests are held (at most
        ``GateLimits.max_open_requests``), not forwarded: a request that reached the new
        kernel before the gate's iopub subscription to it was live would lose its output.
        Thread-safe; returns once the loop has switched (True), or False after ``timeout``
        or when the gate is not running."""
        self._rekeyed.clear()
        if not self._wake(b"rekey", key.encode()):
            return False
        return self._rekeyed.wait(timeout)

    def resume(self) -> None:
        """Forward the client requests held since :meth:`rekey`, and the new ones again
        (the warden calls it once the restarted kernel has welcomed the gate). Thread-safe."""
        self._wake(b"resume")

    def wait_kernel_ready(self, timeout: float) -> bool:
        """Block until the kernel has connected all five sockets and welcomed the gate's
        iopub subscription (JEP 65), so nothing it publishes from now on is lost to ZMQ's
        slow joiner and a client's first heartbeat reaches it; False after ``timeout``.
        Thread-safe."""
        return self._kernel_ready.wait(timeout)

    def wait_kernel_connected(self, timeout: float) -> bool:
        """Block until the kernel has connected all five sockets (a request sent before
        finds no peer and is dropped as ``kernel_queue_full``); False after ``timeout``.
        Thread-safe."""
        return self._kernel_connected.wait(timeout)

    def _wake(self, *frames: bytes) -> bool:
        with self._lock:
            if self._wake_out is None or self._closed:
                return False
            self._wake_out.send_multipart(list(frames))
            return True

    def close(self) -> None:
        """Stop the loop, join it, close every socket (client-facing ones with a short linger
        so an announce gets out). Idempotent; safe after a failed start(). Call it from the
        warden's thread, never from the audit callback (which runs on the loop thread)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            if thread is not None and self._wake_out is not None:
                self._wake_out.send_multipart([b"stop"])
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        for sock in self._client.values():
            sock.close(linger=self._limits.linger_ms)
        if self._owns_kernel:
            self._ks.close()
        for pair in (self._wake_in, self._wake_out):
            if pair is not None:
                pair.close(linger=0)
        if self._ctx is not None:
            self._ctx.term()

    def _bind(self, sock: zmq.Socket[bytes], name: str) -> None:
        sock.setsockopt(zmq.LINGER, self._limits.linger_ms)
        sock.setsockopt(zmq.MAXMSGSIZE, self._limits.max_frame_bytes)
        key = f"{name}_port"
        port = int(self._client_conn.get(key, 0))
        if port == 0 and self._client_conn.get("transport", "tcp") == "tcp":
            self._client_conn[key] = sock.bind_to_random_port(f"tcp://{self._client_conn['ip']}")
        else:
            sock.bind(address(self._client_conn, port))

    # ----------------------------------------------------------- the loop thread

    def _run(self) -> None:
        poller = zmq.Poller()
        handlers: dict[zmq.Socket[bytes], Callable[[list[bytes]], None]] = {}

        def watch(sock: zmq.Socket[bytes], handler: Callable[[list[bytes]], None]) -> None:
            poller.register(sock, zmq.POLLIN)
            handlers[sock] = handler

        assert self._wake_in is not None
        watch(self._wake_in, self._from_waker)
        for name in _ROUTED:
            watch(self._client[name], partial(self._from_client, name))
            watch(self._kernel[name], partial(self._from_kernel, name))
        watch(self._kernel["iopub"], partial(self._from_kernel, "iopub"))
        watch(self._client["iopub"], self._subscription)
        watch(self._client["hb"], self._hb_from_client)
        watch(self._kernel["hb"], self._hb_from_kernel)
        for name, monitor in self._monitors.items():
            watch(monitor, partial(self._connection_event, name))
        keep = self._limits.max_frames + 1  # one more than allowed, so split() sees the excess
        ticking = any(hasattr(rule, "tick") for rule in self._rules)
        timeout = int(_TICK_S * 1000) if ticking else None
        next_tick = time.monotonic() + _TICK_S
        while not self._stopping:
            try:
                ready = poller.poll(timeout)
            except zmq.ContextTerminated:
                return
            if ticking and time.monotonic() >= next_tick:
                next_tick = time.monotonic() + _TICK_S
                try:
                    self._tick()
                except Exception:  # the gate never crashes on what it is sent
                    self._emit("gate.error", {"reason": "internal_error"})
            for sock, _event in ready:
                handler = handlers[sock]
                until = time.monotonic() + _SLICE_S
                for _ in range(_BATCH):
                    try:
                        frames = [sock.recv(zmq.NOBLOCK)]
                        while sock.getsockopt(zmq.RCVMORE):
                            part = sock.recv()
                            if len(frames) < keep:
                                frames.append(part)
                    except zmq.Again:
                        break
                    except zmq.ZMQError:
                        break
                    try:
                        handler(frames)
                    except Exception:  # the gate never crashes on what it is sent
                        self._emit("gate.error", {"reason": "internal_error"})
                    if time.monotonic() > until:
                        break

    def _from_waker(self, frames: list[bytes]) -> None:
        if frames[0] == b"stop":
            self._stopping = True
        elif frames[0] == b"announce":
            ename, evalue, msg_id, replies = json.loads(frames[1])
            self._publish_announce(ename, evalue, msg_id, replies)
        elif frames[0] == b"interrupt":
            self._send_own_interrupt()
        elif frames[0] == b"rekey":
            self._kernel_signer = Signer(frames[1].decode())
            self._hb_pending.clear()
            self._accepts.clear()  # a new jail connects anew
            self._live.clear()
            self._up.clear()
            self._broken.clear()
            self._down_held.clear()
            self._kernel_welcomed = False
            self._kernel_ready.clear()
            self._kernel_connected.clear()
            self._held = []
            self._rekeyed.set()
        elif frames[0] == b"resume":
            held, self._held = self._held, None
            for channel, message in held or ():
                self._from_client(channel, message)

    def _observe(self, observed: Observed) -> str | None:
        if self._observer is None:
            return None
        try:
            return self._observer(observed)
        except Exception:  # an observer's failure must not stop the relay
            self.audit_errors += 1
            return None

    def _emit(self, event: str, fields: dict[str, Any]) -> None:
        if self._audit is not None:
            try:
                self._audit(event, fields)
            except Exception:  # an audit sink's failure must not stop the relay
                self.audit_errors += 1

    def _drop(self, direction: str, channel: str, dropped: Dropped) -> None:
        fields: dict[str, Any] = {
            "direction": direction,
            "channel": channel,
            "reason": dropped.reason,
        }
        if dropped.msg_type in KNOWN_TYPES:
            fields["msg_type"] = dropped.msg_type
        self._emit("gate.drop", fields)

    def _connection_event(self, channel: str, frames: list[bytes]) -> None:
        """A kernel-facing socket accepted or lost a connection (libzmq's monitor). The
        kernel reconnects by itself; the gate counts, and tells open requests what a
        broken connection lost."""
        try:
            event, fd = monitor_event(frames)
        except ValueError:
            return
        live = self._live.setdefault(channel, set())
        if event == zmq.EVENT_DISCONNECTED:
            live.discard(fd)
            if not live:  # another connection (a second socket of the kernel's) may remain
                self._up.discard(channel)
                self._broken.add(channel)
            return
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            if not live:
                return
            self._up.add(channel)
            self._check_ready()
            if channel in self._broken:
                self._broken.discard(channel)
                self._emit("gate.reconnect", {"channel": channel, "reason": "kernel_reconnected",
                                              "connections": self._accepts.get(channel, 0)})
                self._mark_open_requests(_RESET_MARKER.format(
                    channel=channel, limit=self._limits.max_frame_bytes >> 20))
                held = [m for m in self._down_held if m[0] == channel]
                self._down_held = [m for m in self._down_held if m[0] != channel]
                for held_channel, message in held:
                    self._from_client(held_channel, message)
            return
        if event != zmq.EVENT_ACCEPTED:
            return
        live.add(fd)
        count = self._accepts[channel] = self._accepts.get(channel, 0) + 1
        if count > self._limits.max_kernel_connections and not self._faulted:
            self._faulted = True
            self._emit("gate.fault", {"channel": channel, "reason": "too_many_connections",
                                      "connections": count})
            if self._on_fault is not None:
                try:
                    self._on_fault(
                        f"its {channel} connection to the warden was made {count} times "
                        f"(at most {self._limits.max_kernel_connections} in a kernel's life)")
                except Exception:  # the warden's callback must not stop the relay
                    self.audit_errors += 1

    def _check_ready(self) -> None:
        if len(self._up) == len(self._monitors):
            self._kernel_connected.set()
            if self._kernel_welcomed:
                self._kernel_ready.set()

    def _mark_open_requests(self, text: str) -> None:
        """Publish ``text`` on stderr to every open execute request."""
        content = json.dumps({"name": "stderr", "text": text}).encode()
        for request in self._table.open_requests():
            if request.msg_type == "execute_request":
                self._publish_own("stream", request.header, content)

    # client -> kernel

    def _from_client(self, channel: str, frames: list[bytes]) -> None:
        # The jail is restarting in place (keep it for resume()), or this channel's
        # connection broke and the kernel has not reconnected yet (keep it until it has).
        held = self._held if self._held is not None else (
            self._down_held if channel in self._broken else None)
        if held is not None:
            limits = self._limits
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
            limits = self._limits
            msg = check(
                frames, self._client_signer, limits.max_frames, limits.max_header_bytes, False
            )
            header = msg.header
            msg_type = header["msg_type"]
            if msg_type not in CLIENT_TYPES[channel] or (
                self._allowed is not None and msg_type not in self._allowed
            ):
                raise Dropped("msg_type_not_allowed", msg_type)
            idents = tuple(msg.idents)
            msg_id = header["msg_id"]
            if channel == "stdin":  # only from the client that was asked, once per question
                self._table.bind_input_reply(idents)
            if channel != "stdin" and self._observer is not None:
                refusal = self._observe(
                    Observed("request", msg_id, msg_type, header["session"], content=msg.parts[3])
                )
                if refusal is not None:
                    self._refuse(channel, idents, msg.parts[0], msg_type, refusal)
                    return
            if channel != "stdin":
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
        except Dropped as dropped:
            self._drop("client", channel, dropped)

    # kernel -> client

    def _from_kernel(self, channel: str, frames: list[bytes]) -> None:
        try:
            self._relay_kernel(channel, frames)
        except Dropped as dropped:
            self._drop("kernel", channel, dropped)
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
        if msg_type not in KERNEL_TYPES[channel]:
            raise Dropped("unexpected_msg_type", msg_type)
        if parent and self._own and parent["msg_id"] in self._own:
            return  # the answer to the gate's own interrupt_request: consumed
        buffers = msg.buffers
        if buffers:
            if msg_type not in BUFFER_TYPES:
                self._emit(
                    "gate.strip",
                    {"channel": channel, "msg_type": msg_type, "reason": "unsigned_buffers"},
                )
                buffers = []
            elif sum(map(len, buffers)) > limits.max_buffer_bytes:
                raise Dropped("buffers_too_large", msg_type)
        if channel == "iopub":
            self._relay_iopub(msg_type, header, parent, parts, buffers)
            return
        if channel == "stdin":
            if not self._stdin:
                raise Dropped("stdin_not_allowed", msg_type)
            request = self._table.bind_input_request(parent)
        else:
            request = self._table.bind_reply(channel, msg_type, parent)
        out = self._resign(channel, msg_type, header, parent, parts, buffers, request.idents)
        self._client[channel].send_multipart(out, zmq.NOBLOCK)
        if channel == "stdin":
            self._table.asked(request)
        else:
            held = self._table.replied(request)
            if self._observer is not None:
                observed = Observed(
                    "reply", request.msg_id, request.msg_type, request.session,
                    len(parts[3]), len(out[-1 - len(buffers)]), parts[3],
                )
                self._observe(observed)
            if held is not None:
                self._flush(request.msg_id, request.header)
                self._observe_idle(request.msg_id, request.msg_type, request.session)
                self._client["iopub"].send_multipart(held, zmq.NOBLOCK)

    def _relay_iopub(
        self,
        msg_type: str,
        header: dict[str, Any],
        parent: dict[str, Any],
        parts: list[bytes],
        buffers: list[bytes],
    ) -> None:
        idle = False
        if msg_type == "status":
            state = load_object(parts[3], "content").get("execution_state")
            if state not in _EXECUTION_STATES:
                raise Dropped("bad_status", msg_type)
            if not parent and state != "starting":
                raise Dropped("no_parent", msg_type)
            idle = state == "idle"
        topic = (msg_type.encode(),)
        if not parent and msg_type == "status":  # status: starting, at kernel boot
            out = self._resign("iopub", msg_type, header, parent, parts, buffers, topic)
            self._client["iopub"].send_multipart(out, zmq.NOBLOCK)
            return
        verdict, request = self._table.bind_iopub(msg_type, parent, idle)
        out = self._resign("iopub", msg_type, header, parent, parts, buffers, topic)
        if verdict == HOLD:
            request.held_idle = out
        else:
            if idle:
                self._flush(str(parent.get("msg_id", "")), parts[1])
            elif self._observer is not None and msg_type not in _NOT_OUTPUT:
                observed = Observed(
                    "output", request.msg_id, msg_type, request.session,
                    len(parts[3]), len(out[-1 - len(buffers)]),
                )
                refusal = self._observe(observed)
                if refusal is not None:
                    if refusal:
                        self._tell(request.msg_id, request.header, "CellblockBudget", refusal)
                    raise Dropped("budget", msg_type)
            if idle:  # observed first: the cell's audit record exists when a client sees idle
                self._observe_idle(request.msg_id, request.msg_type, request.session)
            self._client["iopub"].send_multipart(out, zmq.NOBLOCK)

    def _observe_idle(self, msg_id: str, msg_type: str, session: str) -> None:
        if self._observer is not None:
            self._observe(Observed("idle", msg_id, msg_type, session))

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
        if items:
            for msg_type, content in items:
                if self._observer is not None:  # held-back output is output too
                    refusal = self._observe(Observed("output", parent_msg_id, msg_type, "",
                                                     len(content), len(content)))
                    if refusal is not None:
                        if refusal:
                            self._tell(parent_msg_id, parent, "CellblockBudget", refusal)
                        self._drop("kernel", "iopub", Dropped("budget", msg_type))
                        continue
                self._publish_own(msg_type, parent, content)

    def _resign(
        self,
        channel: str,
        msg_type: str,
        header: dict[str, Any],
        parent: dict[str, Any],
        parts: list[bytes],
        buffers: list[bytes],
        idents: Sequence[bytes],
    ) -> list[bytes]:
        """Apply the output rules, re-sign with the client key, and frame for the client."""
        if self._rules:
            content, metadata = apply_rules(
                self._rules, channel, msg_type, header, parent, parts[3], parts[2]
            )
            if content is not parts[3] or metadata is not parts[2]:
                parts = [parts[0], parts[1], metadata, content]
        return [*idents, DELIM, self._client_signer.sign(parts), *parts, *buffers]

    # iopub subscriptions

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
            header = self._own_header("iopub_welcome")
            parts = [header, b"{}", b"{}", content]
            out = [topic or b"iopub_welcome", DELIM, self._client_signer.sign(parts), *parts]
            self._client["iopub"].send_multipart(out, zmq.NOBLOCK)

    # heartbeat

    def _hb_from_client(self, frames: list[bytes]) -> None:
        if len(frames) > 4 or sum(map(len, frames)) > _HB_MAX_BYTES:
            self._drop("client", "hb", Dropped("bad_heartbeat"))
            return
        key = tuple(frames)
        pending = self._hb_pending
        pending[key] = pending.get(key, 0) + 1
        if len(pending) > _HB_MAX_PENDING:
            del pending[next(iter(pending))]
        try:
            self._kernel["hb"].send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            pass  # the kernel is not there: no echo, which is the truth

    def _hb_from_kernel(self, frames: list[bytes]) -> None:
        key = tuple(frames)
        count = self._hb_pending.get(key)
        if count is None:
            self._drop("kernel", "hb", Dropped("unsolicited_heartbeat"))
            return
        if count == 1:
            del self._hb_pending[key]
        else:
            self._hb_pending[key] = count - 1
        self._client["hb"].send_multipart(frames, zmq.NOBLOCK)

    # announce

    def _publish_announce(
        self, ename: str, evalue: str, msg_id: str | None = None, replies: bool = False
    ) -> None:
        content = json.dumps(
            {"ename": ename, "evalue": evalue, "traceback": [evalue]}, ensure_ascii=False
        ).encode("utf-8", "replace")
        if msg_id is not None:  # one running request, kept open
            request = self._table.get(msg_id)
            if request is not None and not request.replied:
                self._tell(request.msg_id, request.header, ename, evalue)
            return
        # Executing = forwarded and not yet answered. A request that has its reply but
        # whose idle never came (published before the gate's SUB had joined) is not.
        requests = [r for r in self._table.close_all() if not r.replied]
        parents = [r.header for r in requests] or [b"{}"]
        idle = b'{"execution_state": "idle"}'
        for request in requests:
            self._flush(request.msg_id, request.header)
        told, self._told = self._told, {}
        if not requests:
            self._publish_own("error", b"{}", content)
        for request in requests:
            if told.get(request.msg_id) != evalue:  # not twice the same words to one cell
                self._publish_own("error", request.header, content)
        if replies:
            for request in requests:
                self._reply_error(request.channel, request.idents, request.header,
                                  request.msg_type, ename, evalue)
        for parent in parents:
            if requests:
                self._publish_own("status", parent, idle)

    def _tell(self, msg_id: str, parent: bytes, ename: str, evalue: str) -> None:
        """Publish an ``error`` to one open request, keeping it open."""
        content = json.dumps(
            {"ename": ename, "evalue": evalue, "traceback": [evalue]}, ensure_ascii=False
        ).encode("utf-8", "replace")
        self._publish_own("error", parent, content)
        self._told[msg_id] = evalue
        while len(self._told) > 64:
            del self._told[next(iter(self._told))]

    def _refuse(
        self, channel: str, idents: tuple[bytes, ...], parent: bytes, msg_type: str, text: str
    ) -> None:
        """Answer a request the observer refused, as the kernel would answer a failed one:
        an ``error`` on iopub, an error reply to the client, then ``status: idle``."""
        self._emit("gate.refuse", {"channel": channel, "msg_type": msg_type, "reason": "budget"})
        content = json.dumps(
            {"ename": "CellblockBudget", "evalue": text, "traceback": [text]}, ensure_ascii=False
        ).encode("utf-8", "replace")
        self._publish_own("error", parent, content)
        if msg_type not in NO_REPLY:
            self._reply_error(channel, idents, parent, msg_type, "CellblockBudget", text)
        self._publish_own("status", parent, b'{"execution_state": "idle"}')

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

    def _own_header(self, msg_type: str) -> bytes:
        return json.dumps(
            {
                "msg_id": uuid.uuid4().hex,
                "msg_type": msg_type,
                "username": "cellblock",
                "session": self._session,
                "date": _now(),
                "version": "5.3",
            }
        ).encode()

    def _publish_own(self, msg_type: str, parent: bytes, content: bytes) -> None:
        header = self._own_header(msg_type)
        parts = [header, parent, b"{}", content]
        out = [msg_type.encode(), DELIM, self._client_signer.sign(parts), *parts]
        self._client["iopub"].send_multipart(out, zmq.NOBLOCK)
