"""The capability broker: hands a kernel read-only descriptors of its granted datasets.

It runs in the warden, on its own thread, and never blocks the warden. Two unix
sockets, both made before the jail starts:

- ``<run dir>/broker/broker.sock``, the kernel's. Its directory (not the socket) is
  bind-mounted read-only at ``/run/cellblock-broker`` in the jail. The socket is the
  capability: one per kernel, grants kept here, the peer checked with SO_PEERCRED,
  so there is no token to forge or replay. Wire format: ``cellblock_kernel.datasets``.
- ``<run dir>/control.sock``, the operator's (``cellblock grant`` / ``revoke``):
  mode 0600, never mounted into the jail, peer must be this user or root.

Each kernel request: at most ``max_connections`` at once and ``rate`` per second
(token bucket), a deadline from accept to reply, a length cap, received without an
ancillary buffer (fds sent *to* the broker are closed by the kernel, and the request
is refused), and a strict parse (unknown fields, bad names refused). A granted
``open`` is ``openat2(root, leaf, O_RDONLY|O_NONBLOCK|O_NOFOLLOW|O_NOCTTY|O_CLOEXEC,
RESOLVE_BENEATH|NO_SYMLINKS|NO_MAGICLINKS|NO_XDEV)`` from a read-only view pinned
when the grant was made (:mod:`cellblock.roview`); only a regular file is passed.
Every request, granted or refused, is an audit event ``broker.open`` (or
``broker.list``); refusals before a request is read (busy, rate-limited) are audited
one by one up to a cap, then counted.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cellblock_kernel import datasets as wire

from .datasets import Dataset
from .errors import HostUnsupported, PolicyError
from .jailcmd import RUN_BROKER
from .roview import openat2_beneath, readonly_view

if TYPE_CHECKING:
    pass

__all__ = ["CONTROL_SOCKET", "Broker", "BrokerLimits", "Grant"]

CONTROL_SOCKET = "control.sock"
BROKER_SUBDIR = RUN_BROKER  # the run dir's broker/, bound read-only in the jail
_PEERCRED = struct.Struct("3i")
_CONTROL_OPS = {"grant", "revoke", "grants"}
AUDIT_CAP = 100  # refusals of one kind audited one by one; the rest are counted

Audit = Callable[..., Any]


@dataclass(frozen=True)
class BrokerLimits:
    """How much a kernel may ask of its broker."""

    max_connections: int = 8  # open kernel connections at once
    rate: float = 50.0  # requests per second, sustained
    burst: int = 100  # requests allowed in a burst
    deadline: float = 2.0  # seconds from accept to a complete request
    control_deadline: float = 5.0


@dataclass
class Grant:
    """One dataset granted to this kernel, pinned: a read-only view of its directory
    (the dataset itself, or a file dataset's parent) and, for a file, its name."""

    name: str
    kind: str  # "file" or "directory"
    description: str
    root_fd: int
    leaf: str | None
    mounted: str | None = None  # /data/<name> when bound into the jail at start

    @classmethod
    def pin(cls, name: str, dataset: Dataset) -> Grant:
        """Resolve the dataset's path once, now. Raises HostUnsupported naming it."""
        try:
            st = os.stat(dataset.path)
        except OSError as exc:
            raise HostUnsupported(f"dataset {name!r}: {dataset.path} cannot be read "
                                  f"({exc.strerror})") from None
        if stat.S_ISDIR(st.st_mode):
            root, leaf, kind = dataset.path, None, "directory"
        else:
            root, leaf, kind = os.path.dirname(dataset.path), os.path.basename(dataset.path), \
                "file"
        try:
            fd = readonly_view(root)
        except OSError as exc:
            raise HostUnsupported(f"dataset {name!r}: cannot make a read-only view of {root}: "
                                  f"{exc}") from None
        return cls(name, kind, dataset.description, fd, leaf)

    def close(self) -> None:
        if self.root_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.root_fd)
            self.root_fd = -1


@dataclass
class _Conn:
    sock: socket.socket
    control: bool
    deadline: float
    pid: int = 0
    uid: int = -1
    buf: bytearray = field(default_factory=bytearray)
    need: int = 0  # body length, once the header is read


def _peer(sock: socket.socket) -> tuple[int, int, int]:
    pid, uid, gid = _PEERCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return pid, uid, gid


class Broker:
    """The broker of one kernel. ``prepare`` (before the jail starts), ``start``, ``close``.

    ``close`` is idempotent and releases every socket, view and thread.
    """

    def __init__(self, *, run_path: Path, datasets: dict[str, Dataset],
                 allowed: tuple[str, ...], jail_uid: int, audit: Audit,
                 limits: BrokerLimits | None = None) -> None:
        self.run_path = run_path
        self.socket_dir = run_path / BROKER_SUBDIR
        self.socket_path = self.socket_dir / wire.BROKER_SOCKET_NAME
        self.control_path = run_path / CONTROL_SOCKET
        self.datasets = datasets
        self.allowed = allowed
        self.jail_uid = jail_uid
        self.audit = audit
        self.limits = limits or BrokerLimits()
        self.grants: dict[str, Grant] = {}
        self.refusals: dict[str, int] = {}
        self._lock = threading.Lock()
        self._listen: socket.socket | None = None
        self._control: socket.socket | None = None
        self._conns: dict[int, _Conn] = {}
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        self._tokens = float(self.limits.burst)
        self._refilled = time.monotonic()

    # -- setup -----------------------------------------------------------------------

    def prepare(self, granted: tuple[str, ...], mounted: tuple[str, ...] = ()) -> None:
        """Pin the launch's grants and bind both sockets (before the jail starts)."""
        for name in granted:
            grant = Grant.pin(name, self._dataset(name))
            if name in mounted:
                grant.mounted = f"{wire.DATA_ROOT}/{name}"
            self.grants[name] = grant
        self.socket_dir.mkdir(mode=0o700 if os.geteuid() else 0o711)
        self._listen = self._bind(self.socket_path)
        if os.geteuid() == 0:
            os.chown(self.socket_path, self.jail_uid, self.jail_uid)
        self._control = self._bind(self.control_path)
        for sock in (self._listen, self._control):
            self._sel.register(sock, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)

    @staticmethod
    def _bind(path: Path) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(64)
        sock.setblocking(False)
        return sock

    def _dataset(self, name: str) -> Dataset:
        if name not in self.allowed or name not in self.datasets:
            raise PolicyError(f"dataset {name!r} is not allowed by this kernel's profile; "
                              f"it allows: {', '.join(self.allowed) or 'none'}")
        return self.datasets[name]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="broker", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        for conn in list(self._conns.values()):
            self._drop(conn)
        for sock in (self._listen, self._control):
            if sock is not None:
                sock.close()
        self._sel.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        with self._lock:
            for grant in self.grants.values():
                grant.close()
            self.grants.clear()
        counted = {k: v for k, v in self.refusals.items() if v > AUDIT_CAP}
        if counted:
            self.audit("broker.refusal_counts", counts=counted)

    # -- the loop --------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            now = time.monotonic()
            timeout = min((c.deadline for c in self._conns.values()), default=now + 1) - now
            try:
                events = self._sel.select(max(0.0, timeout))
            except (OSError, ValueError):
                return
            for key, _ in events:
                if self._stopping:
                    return
                try:
                    self._on_ready(key.fileobj)
                except Exception as exc:  # the broker must stay up, whatever a peer sends
                    self.audit("broker.error", error=f"{type(exc).__name__}: {exc}")
            now = time.monotonic()
            for conn in [c for c in self._conns.values() if c.deadline <= now]:
                self._refuse(conn, "timeout", "the request did not arrive in time", quiet=True)

    def _on_ready(self, fileobj: Any) -> None:
        if fileobj == self._wake_r:
            with contextlib.suppress(OSError):
                os.read(self._wake_r, 64)
            return
        if isinstance(fileobj, socket.socket) and fileobj in (self._listen, self._control):
            self._accept(fileobj, control=fileobj is self._control)
            return
        conn = self._conns.get(fileobj.fileno())
        if conn is not None:
            self._read(conn)

    def _accept(self, listener: socket.socket, *, control: bool) -> None:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        sock.setblocking(False)
        pid, uid, _ = _peer(sock)
        deadline = self.limits.control_deadline if control else self.limits.deadline
        conn = _Conn(sock, control, time.monotonic() + deadline, pid, uid)
        if control:
            if uid not in (os.getuid(), 0):
                self._count("control_peer", pid=pid, uid=uid)
                sock.close()
                return
        else:
            if uid != self.jail_uid:
                self._count("peer", pid=pid, uid=uid)
                self._reply(conn, _error(wire.PEER, "this socket serves one kernel only"))
                return
            if sum(not c.control for c in self._conns.values()) >= self.limits.max_connections:
                self._count("busy", pid=pid)
                self._reply(conn, _error(wire.BUSY, "too many dataset requests at once"))
                return
            if not self._take_token():
                self._count("rate_limited", pid=pid)
                self._reply(conn, _error(wire.RATE_LIMITED,
                                         "too many dataset requests; slow down"))
                return
        self._conns[sock.fileno()] = conn
        self._sel.register(sock, selectors.EVENT_READ, None)

    def _take_token(self) -> bool:
        now = time.monotonic()
        self._tokens = min(float(self.limits.burst),
                           self._tokens + (now - self._refilled) * self.limits.rate)
        self._refilled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def _read(self, conn: _Conn) -> None:
        want = (wire.HEADER.size if conn.need == 0 else conn.need) - len(conn.buf)
        try:
            # no ancillary buffer: fds sent to us are closed by the kernel (MSG_CTRUNC)
            data, _anc, flags, _ = conn.sock.recvmsg(max(want, 1), 0)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._refuse(conn, "reset", "connection error", quiet=True)
            return
        if flags & socket.MSG_CTRUNC:
            self._refuse(conn, wire.MALFORMED, "descriptors are not accepted")
            return
        if not data:
            self._refuse(conn, "eof", "the request ended early", quiet=True)
            return
        conn.buf += data
        limit = 4096 if conn.control else wire.MAX_REQUEST_BYTES
        try:
            if conn.need == 0 and len(conn.buf) == wire.HEADER.size:
                conn.need = wire.decode_frame_length(bytes(conn.buf), limit)
                conn.buf.clear()
            elif conn.need and len(conn.buf) == conn.need:
                body = bytes(conn.buf)
                if conn.control:
                    self._handle_control(conn, body)
                else:
                    self._handle(conn, wire.parse_request(body))
        except wire.WireError as exc:
            self._refuse(conn, exc.code, str(exc))

    # -- requests --------------------------------------------------------------------

    def _handle(self, conn: _Conn, req: dict[str, Any]) -> None:
        if req["op"] == "list":
            with self._lock:
                items = [{"name": g.name, "description": g.description, "kind": g.kind,
                          "path": g.mounted} for g in self.grants.values()]
            self.audit("broker.list", decision="granted", peer_pid=conn.pid,
                       datasets=[i["name"] for i in items])
            self._reply(conn, {"v": 1, "ok": True, "datasets": items})
            return
        name, member = req["dataset"], req.get("member")
        with self._lock:
            grant = self.grants.get(name)
            granted = sorted(self.grants)
            fd, reason, message = self._open(grant, name, member)
        fields = {"dataset": name, "member": member, "peer_pid": conn.pid}
        if fd is None:
            self.audit("broker.open", decision="refused", reason=reason, **fields)
            reply = _error(wire.NOT_GRANTED if grant is None else wire.UNAVAILABLE, message)
            if grant is None:
                reply["granted"] = granted
            self._reply(conn, reply)
            return
        try:
            size = os.fstat(fd).st_size
            self.audit("broker.open", decision="granted", reason="granted", size=size, **fields)
            self._reply(conn, {"v": 1, "ok": True, "dataset": name, "size": size}, fd)
        finally:
            os.close(fd)

    def _open(self, grant: Grant | None, name: str,
              member: str | None) -> tuple[int | None, str, str]:
        """(fd, reason, message for the kernel). Never a host path in the message."""
        if grant is None:
            # the same answer whether the name exists in the policy or not (B1)
            return None, "not granted", f"dataset {name!r} is not granted to this kernel"
        if grant.kind == "file" and member is not None:
            return None, "member of a file", (f"dataset {name!r} is a file; open it "
                                              f"without a file name")
        if grant.kind == "directory" and member is None:
            where = f" (mounted at {grant.mounted})" if grant.mounted else ""
            return None, "directory", (f"dataset {name!r} is a directory{where}; name a file "
                                       f"in it: datasets.open({name!r}, 'path/in/it.csv')")
        relative = grant.leaf if member is None else member
        assert relative is not None
        what = f"dataset {name!r}" if member is None else f"file {member!r} of dataset {name!r}"
        try:
            fd = openat2_beneath(grant.root_fd, relative)
        except OSError as exc:
            return None, errno.errorcode.get(exc.errno or 0, "error"), f"{what} is not available"
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return None, "not a regular file", f"{what} is not available"
        # O_NONBLOCK was only for opening (a FIFO must not hang us); a file never needs it
        os.set_blocking(fd, True)
        return fd, "granted", ""

    def _handle_control(self, conn: _Conn, body: bytes) -> None:
        req = wire.load_object(body)
        op, name = req.get("op"), req.get("dataset")
        if set(req) - {"v", "op", "dataset"} or op not in _CONTROL_OPS or req.get("v") != 1:
            raise wire.WireError(wire.MALFORMED, "unknown control request")
        if op == "grants":
            with self._lock:
                names = sorted(self.grants)
            self._reply(conn, {"v": 1, "ok": True, "granted": names})
            return
        wire.check_name(name)
        assert isinstance(name, str)
        try:
            message = self.grant(name) if op == "grant" else self.revoke(name)
        except (PolicyError, HostUnsupported) as exc:
            self.audit(f"broker.{op}", dataset=name, decision="refused", reason=str(exc))
            self._reply(conn, _error("refused", str(exc)))
            return
        self.audit(f"broker.{op}", dataset=name, decision="done", reason=message)
        self._reply(conn, {"v": 1, "ok": True, "message": message})

    def grant(self, name: str) -> str:
        """Grant an allowed dataset to the running kernel (pinned now)."""
        dataset = self._dataset(name)
        with self._lock:
            if name in self.grants:
                return f"dataset {name!r} was already granted"
        grant = Grant.pin(name, dataset)
        with self._lock:
            if name in self.grants:
                grant.close()
                return f"dataset {name!r} was already granted"
            self.grants[name] = grant
        if grant.kind == "directory":
            return (f"granted {name!r}: a directory granted while the kernel runs is not "
                    f"mounted; the kernel reads its files with datasets.open({name!r}, path)")
        return f"granted {name!r}"

    def revoke(self, name: str) -> str:
        """Refuse future opens of ``name``. Descriptors already passed stay readable, and
        a directory mounted at start stays mounted until the kernel restarts."""
        with self._lock:
            grant = self.grants.pop(name, None)
        if grant is None:
            raise PolicyError(f"dataset {name!r} is not granted to this kernel")
        grant.close()
        note = "; it stays mounted until the kernel restarts" if grant.mounted else ""
        return f"revoked {name!r}: new opens are refused (descriptors already passed stay " \
               f"readable{note})"

    # -- replies ---------------------------------------------------------------------

    def _reply(self, conn: _Conn, reply: dict[str, Any], fd: int | None = None) -> None:
        """Send one reply without blocking, then close. A peer that does not read
        loses its reply; the broker never waits for it."""
        frame = wire.encode_frame(reply)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))] \
            if fd is not None else []
        with contextlib.suppress(OSError):
            conn.sock.sendmsg([frame], anc, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        self._drop(conn)

    def _refuse(self, conn: _Conn, reason: str, message: str, *, quiet: bool = False) -> None:
        if conn.control:
            self._reply(conn, _error(reason, message))
            return
        if quiet:
            self._count(reason, pid=conn.pid)
        else:
            self.audit("broker.open", decision="refused", reason=reason, dataset=None,
                       peer_pid=conn.pid)
        self._reply(conn, _error(reason, message))

    def _count(self, reason: str, **fields: Any) -> None:
        self.refusals[reason] = self.refusals.get(reason, 0) + 1
        if self.refusals[reason] <= AUDIT_CAP:
            self.audit("broker.open", decision="refused", reason=reason, dataset=None,
                       **{k: v for k, v in fields.items()})

    def _drop(self, conn: _Conn) -> None:
        self._conns.pop(conn.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(conn.sock)
        conn.sock.close()


def _error(code: str, message: str) -> dict[str, Any]:
    return {"v": 1, "ok": False, "error": code, "message": message}
