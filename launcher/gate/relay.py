"""The gate: a ZMQ relay between Jupyter clients (client key) and a hostile kernel (kernel key).

Who calls what: the warden makes one :class:`Gate` per kernel (with the kernel-facing
sockets it bound before the jail started, :mod:`cellblock.gate.kernelside`), calls
:meth:`Gate.start` before or after the jailed kernel is up, :meth:`Gate.announce` when it
knows why the kernel died, reads :attr:`Gate.shutdown_requested` to tell a requested exit
from a crash, and calls :meth:`Gate.close` on every exit path. For budgets it passes an ``observer``
(:mod:`cellblock.gate.observe`), calls :meth:`Gate.interrupt` to send the kernel an
``interrupt_request`` of the gate's own, and :meth:`Gate.rekey` before it restarts the jail
in place with a fresh kernel key. ``on_fault`` is called (once per jail, on the gate's
thread) when the kernel costs the host too much: its connections keep coming back, or it
sends more than ``GateLimits.max_dropped_bytes`` the gate has to drop; the warden stops it.

This module is the gate's life: its sockets, its one background thread (which owns every
socket between ``start()`` and ``close()``) and the poll loop. What the loop does with a
message lives in one module per concern, mixed into :class:`Gate`:
:mod:`cellblock.gate.forward` (the relay, both directions, kernel messages rebuilt),
:mod:`cellblock.gate.own` (what the gate publishes in its own name, the bounded client
iopub), :mod:`cellblock.gate.links` (kernel connections, faults) and
:mod:`cellblock.gate.heartbeat`.

An ``input_reply`` is forwarded only from the client that was sent an ``input_request``,
once; without ``input_reply`` in the allowlist, no ``input_request`` is forwarded at all
(nobody could answer it) and execute requests go out with ``allow_stdin`` false.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import zmq

from cellblock.gate.connection import GateLimits, address, signer
from cellblock.gate.forward import Forwarding
from cellblock.gate.heartbeat import Heartbeat
from cellblock.gate.kernelside import KernelSockets
from cellblock.gate.links import KernelLinks, monitor_event
from cellblock.gate.observe import ALLOW, Observed, Observer, Verdict, as_verdict
from cellblock.gate.own import OwnMessages
from cellblock.gate.replay import ReplayWindow
from cellblock.gate.rules import OutputRule
from cellblock.gate.tracker import KERNEL_TYPES, KNOWN_TYPES, Request, RequestTable
from cellblock.gate.wire import Dropped, Signer

__all__ = ["AuditCallback", "Gate", "GateLimits", "monitor_event"]

AuditCallback = Callable[[str, dict[str, Any]], None]

_ROUTED = ("shell", "control", "stdin")
_BATCH = 256  # messages read from one socket before the poller is consulted again
# ...or this long, whichever comes first: a kernel flooding iopub with big messages must not
# keep an interrupt_request waiting on control for 256 of them (seconds, when measured).
_SLICE_S = 0.01
_TICK_S = 0.05  # how often output rules with a tick() are asked for timed releases
_COMM_TYPES = frozenset({"comm_open", "comm_msg", "comm_close"})


def kernel_types(comms: bool, debug: bool) -> dict[str, frozenset[str]]:
    """What each kernel-facing channel may carry for a profile: comm messages only where it
    allows comms, ``debug_event`` only where it allows ``debug_request``."""
    iopub = KERNEL_TYPES["iopub"]
    if not comms:
        iopub = iopub - _COMM_TYPES
    if not debug:
        iopub = iopub - {"debug_event"}
    return {**KERNEL_TYPES, "iopub": iopub}


class Gate(Forwarding, OwnMessages, KernelLinks):
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
        self._comms = self._allowed is None or "comm_msg" in self._allowed
        self._kernel_types = kernel_types(
            self._comms, self._allowed is None or "debug_request" in self._allowed)
        self._comm_requests: dict[str, Request] = {}  # comm_id -> the request it was opened in
        self._started = False  # the kernel's one empty-parent status: starting was forwarded
        self._count = 0  # msg_ids the gate gave (<session>_<n>)
        self._backlog: deque[list[bytes]] = deque()  # the gate's own, waiting for the client
        self._dropped = 0.0  # bytes in the dropped-bytes bucket (links.py)
        self._dropped_at = time.monotonic()
        self._table = RequestTable(self._limits.max_open_requests)
        self._replay = ReplayWindow(self._limits.replay_window)
        self._session = uuid.uuid4().hex  # the session of every message a client gets
        self._identity = self._ks.identity
        self._hb = Heartbeat(self._drop)
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
            # Bounded (never grows): a client that does not read loses kernel output, with
            # a marker at its cell's end; the gate's own messages wait (own.py).
            self._client["iopub"] = ctx.socket(zmq.XPUB)
            self._client["iopub"].setsockopt(zmq.XPUB_VERBOSE, 1)
            self._client["iopub"].setsockopt(zmq.SNDHWM, self._limits.client_iopub_hwm)
            self._client["iopub"].setsockopt(zmq.XPUB_NODROP, 1)
            self._bind(self._client["iopub"], "iopub")
            if self._owns_kernel:
                self._ks.bind()
            self._kernel = self._ks.sockets
            self._hb.attach(self._client["hb"], self._kernel["hb"])
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
        watch(self._client["hb"], self._hb.from_client)
        watch(self._kernel["hb"], self._hb.from_kernel)
        for name, monitor in self._monitors.items():
            watch(monitor, partial(self._connection_event, name))
        keep = self._limits.max_frames + 1  # one more than allowed, so split() sees the excess
        ticking = any(hasattr(rule, "tick") for rule in self._rules)
        timeout = int(_TICK_S * 1000) if ticking else None
        next_tick = time.monotonic() + _TICK_S
        while not self._stopping:
            try:
                ready = poller.poll(10 if self._backlog else timeout)
            except zmq.ContextTerminated:
                return
            if self._backlog:
                self._drain_backlog()
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
            self._hb.clear()
            self._started = False  # a new kernel boots: one starting again
            self._dropped = 0.0
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

    def _observe(self, observed: Observed) -> Verdict:
        if self._observer is None:
            return ALLOW
        try:
            return as_verdict(self._observer(observed))
        except Exception:  # an observer's failure must not stop the relay
            self.audit_errors += 1
            return ALLOW

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
