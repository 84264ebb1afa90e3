"""The gate's kernel-facing sockets: bound by the warden, connected to by the jailed kernel.

Who calls what: the warden makes one :class:`KernelSockets` per kernel and calls
:meth:`KernelSockets.bind` before the jail starts (a pooled kernel has no gate yet; the
warden probes it with :meth:`KernelSockets.probe`); :class:`cellblock.gate.Gate` then takes
the sockets over (its loop thread owns them from ``Gate.start()`` on) and the warden calls
:meth:`KernelSockets.close` after ``Gate.close()``. A gate given a connection dict instead
makes and closes its own.

Why the host binds. The first version let the kernel bind its sockets in a directory the
jail could write and the gate (re)connected by path: a symlink planted there made the root
warden connect to any host unix socket, tens of thousands of times a second. Now the warden
binds every endpoint in its own directory (mounted read-only in the jail), so the only
paths the host opens are ones it created, and a kernel that drops its connections makes
*the kernel* reconnect, never the host. Each accepted connection is an event the gate
counts (:attr:`KernelSockets.monitors`): a kernel whose connections keep coming back is
stopped (``GateLimits.max_kernel_connections``).
"""

from __future__ import annotations

import json
import os
import secrets
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import zmq

from cellblock.gate.connection import GateLimits, address, signer
from cellblock.gate.wire import DELIM

__all__ = ["CHANNELS", "KernelSockets"]

#: the kernel-facing channels, in the order they are bound
CHANNELS = ("shell", "control", "stdin", "hb", "iopub")
HB_MAX_BYTES = 4096  #: MAXMSGSIZE of the heartbeat socket
#: libzmq socket events the gate counts on each kernel-facing socket
#: (a connection is usable once its handshake succeeded: a DEALER that lost its peer takes a
#: message into the dying pipe and loses it until then)
MONITORED = zmq.EVENT_ACCEPTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED


class KernelSockets:
    """The five sockets one kernel connects to. ``conn`` is the kernel's connection dict
    as the host sees it (``transport`` ipc, ``ip`` the socket path prefix in the warden's
    directory, the five ports, the kernel ``key``); ``owner`` is the jail's host uid and
    gid, given the socket files (mode 0600) so that the kernel may connect to them."""

    def __init__(self, conn: Mapping[str, Any], limits: GateLimits | None = None,
                 owner: tuple[int, int] | None = None) -> None:
        self.conn = dict(conn)
        self.limits = limits or GateLimits()
        self.owner = owner
        #: the routing id of the shell, control and stdin DEALERs: ipykernel routes an
        #: input_request to the shell identity, so stdin must carry the same one
        self.identity = b"cellblock-gate-" + uuid.uuid4().hex.encode()
        self.ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self.sockets: dict[str, zmq.Socket[bytes]] = {}
        self.monitors: dict[str, zmq.Socket[bytes]] = {}
        self.paths: dict[str, str] = {}
        self._closed = False

    def bind(self) -> None:
        """Bind the five sockets and give their files to the jail's uid. On any failure
        everything made so far is closed and the error raised."""
        if self.ctx is not None or self._closed:
            raise RuntimeError("cellblock gate: KernelSockets.bind() may be called once")
        if self.conn.get("transport") != "ipc":
            raise ValueError(f"cellblock gate: kernel transport {self.conn.get('transport')!r}"
                             " is not ipc")
        self.ctx = ctx = zmq.Context()
        try:
            for name in CHANNELS:
                sock = self.sockets[name] = ctx.socket(zmq.SUB if name == "iopub"
                                                       else zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.RCVHWM, self.limits.kernel_rcvhwm)
                sock.setsockopt(zmq.MAXMSGSIZE, HB_MAX_BYTES if name == "hb"
                                else self.limits.max_frame_bytes)
                if name == "iopub":
                    sock.setsockopt(zmq.SUBSCRIBE, b"")
                else:
                    sock.setsockopt(zmq.IDENTITY, self.identity)
                endpoint = address(self.conn, int(self.conn[f"{name}_port"]))
                self.monitors[name] = sock.get_monitor_socket(MONITORED)
                sock.bind(endpoint)
                path = self.paths[name] = endpoint.removeprefix("ipc://")
                if self.owner is not None and os.geteuid() == 0:
                    os.chown(path, *self.owner, follow_symlinks=False)
                os.chmod(path, 0o600, follow_symlinks=False)
        except BaseException:
            self.close()
            raise

    def probe(self, deadline: float, check: Callable[[], None]) -> bool:
        """One ``kernel_info_request`` to the kernel on shell (signed with its key); wait for
        the reply until ``deadline`` (time.monotonic). ``check`` runs every 50 ms and may
        raise to give up. Only before a gate owns the sockets (a pooled kernel). Returns
        whether a reply came; the reply itself is not used."""
        shell = self.sockets["shell"]
        header = json.dumps({"msg_id": secrets.token_hex(16),
                             "msg_type": "kernel_info_request", "username": "cellblock",
                             "session": secrets.token_hex(16),
                             "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                             "version": "5.3"}).encode()
        parts = [header, b"{}", b"{}", b"{}"]
        frames = [self.identity, DELIM, signer(self.conn, "kernel").sign(parts), *parts]
        sent = False
        while True:
            if not sent:  # a DEALER with no peer yet refuses a non-blocking send
                try:
                    shell.send_multipart(frames, zmq.NOBLOCK)
                    sent = True
                except zmq.Again:
                    pass
            if sent and shell.poll(50):
                shell.recv_multipart()
                return True
            if not sent:
                shell.poll(50, zmq.POLLOUT)
            check()
            if time.monotonic() > deadline:
                return False

    def close(self) -> None:
        """Close every socket and the context. Idempotent; safe after a failed bind."""
        if self._closed:
            return
        self._closed = True
        for name, monitor in self.monitors.items():
            sock = self.sockets.get(name)
            if sock is not None and not sock.closed:
                sock.disable_monitor()
            monitor.close(linger=0)
        for sock in self.sockets.values():
            sock.close(linger=0)
        if self.ctx is not None:
            self.ctx.term()
