"""The egress proxy: a unix socket the warden binds in the run dir's ``ipc/`` (read-only
in the jail, as the kernel's ZMQ sockets), served by an asyncio loop on a thread of the
warden. Every connection the jail makes arrives here; nothing else leaves the jail.

For each: the request head is read with a bound and a timeout and parsed
(:mod:`.httphead`); the host must match the allowlist (:mod:`.hosts`); the proxy resolves
it itself (:mod:`.resolver`), refuses if any address is forbidden (:mod:`.addresses`),
and connects to the address it checked (never a second resolution). A CONNECT tunnel's
first record must be a TLS ClientHello whose SNI is the CONNECT host (:mod:`.sni`) before
any byte goes upstream; a plain-HTTP request is rewritten to origin form with
``Connection: close`` and only its Content-Length body follows. The proxy connects to
TCP addresses only: no path the jail names is ever opened.

Budgets: total bytes (both ways) and connections per kernel; past one, ``on_budget`` is
called with the reason (the warden stops the kernel) and every connection is closed. At
most ``max_concurrent`` connections at once (more are refused, 503). :meth:`lock` (the
operator, ``Sandbox.lock_network``, or ``lock_after_seconds``) closes the allowlist and
every open connection. Every connection is one audit event, without payloads:
``net.connection`` (allowed: host, port, address, bytes each way, seconds) or
``net.denied`` (host, port, the reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..policy import NetworkPolicy
from .addresses import forbidden_reason, host_owns
from .hosts import ip_literal, match, normalise_host
from .httphead import MAX_HEAD, HeadError, ProxyRequest, parse_head
from .resolver import Resolver, resolver_from_env
from .sni import MAX_HELLO, SniError, needed, server_name

__all__ = ["CONTROL_NAME", "SOCKET_NAME", "EgressProxy", "Refused", "start_egress"]

log = logging.getLogger("cellblock.egress")

SOCKET_NAME = "egress.sock"  # in the run dir's ipc/, /run/cellblock/egress.sock in the jail
CONTROL_NAME = "egress.ctl"  # in the run dir itself (never mounted): lock, stats
HEAD_TIMEOUT = 15.0  # seconds for the request head, and for a tunnel's ClientHello
RESOLVE_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
IDLE_TIMEOUT = 300.0  # a connection with no byte either way for this long is closed
CHUNK = 64 * 1024
MAX_DENIED_EVENTS = 1000  # net.denied events written one by one; later ones only counted

Audit = Callable[[str, dict[str, Any]], None]


class Refused(Exception):
    """A connection the proxy refuses: the HTTP status and the reason (audited, and sent
    to the jail in the status line)."""

    def __init__(self, reason: str, status: int = 403) -> None:
        super().__init__(reason)
        self.reason, self.status = reason, status


class _Conn:
    """One connection's books."""

    def __init__(self) -> None:
        self.host = ""
        self.port = 0
        self.address = ""
        self.up = 0
        self.down = 0
        self.started = time.monotonic()
        self.writers: list[asyncio.StreamWriter] = []

    def fields(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "address": self.address,
                "bytes_up": self.up, "bytes_down": self.down,
                "seconds": round(time.monotonic() - self.started, 6)}

    def close(self) -> None:
        for w in self.writers:
            w.close()


class EgressProxy:
    """Serves one kernel's egress (see the module docstring). :meth:`start` binds and
    starts the thread; :meth:`close` stops it and removes the sockets; closing twice is
    fine."""

    def __init__(self, net: NetworkPolicy, ipc_dir: Path, run_dir: Path, *,
                 owner: tuple[int, int] | None, audit: Audit,
                 on_budget: Callable[[str], None], resolver: Resolver | None = None) -> None:
        self.net = net
        self.rules = net.rules()
        self.path = ipc_dir / SOCKET_NAME
        self.control_path = run_dir / CONTROL_NAME
        self.owner = owner
        self.audit = audit
        self.on_budget = on_budget
        self.resolver = resolver if resolver is not None else resolver_from_env()
        self.locked: str | None = None
        self.stopped: str | None = None  # a budget ran out
        self.bytes = 0
        self.connections = 0
        self.open: set[_Conn] = set()
        self.denied = 0
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._socks: list[socket.socket] = []
        self._closed = False

    # -- life -----------------------------------------------------------------

    def start(self) -> None:
        """Bind both sockets (before the jail starts) and serve them on a thread."""
        listen = self._bind(self.path, self.owner)
        control = self._bind(self.control_path, None)
        ready = threading.Event()

        async def serve() -> None:
            await asyncio.start_unix_server(self._handle, sock=listen, limit=MAX_HEAD)
            await asyncio.start_unix_server(self._control, sock=control, limit=4096)
            if self.net.lock_after_seconds > 0:
                self._loop.call_later(self.net.lock_after_seconds, self._lock,
                                      f"lock_after_seconds ({self.net.lock_after_seconds:g})")
            ready.set()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.create_task(serve())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="cellblock-egress", daemon=True)
        self._thread.start()
        ready.wait(10)

    def _bind(self, path: Path, owner: tuple[int, int] | None) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socks.append(sock)
        sock.bind(str(path))  # a fresh name in a directory only the warden writes
        if owner is not None and os.geteuid() == 0:
            os.chown(path, *owner, follow_symlinks=False)
        os.chmod(path, 0o600, follow_symlinks=False)
        sock.listen(64)
        sock.setblocking(False)
        return sock

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            def stop() -> None:
                for conn in list(self.open):
                    conn.close()
                self._loop.stop()
            self._loop.call_soon_threadsafe(stop)
            self._thread.join(10)
        for sock in self._socks:
            sock.close()
        for path in (self.path, self.control_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if self._thread is None or not self._thread.is_alive():
            self._loop.close()
        if self.denied > MAX_DENIED_EVENTS:
            self.audit("net.denied_count", {"denied": self.denied,
                                            "not_written": self.denied - MAX_DENIED_EVENTS})

    def lock(self, reason: str = "locked by the operator") -> None:
        """Close the allowlist now, and every open connection (any thread)."""
        self._loop.call_soon_threadsafe(self._lock, reason)

    def _lock(self, reason: str) -> None:
        if self.locked is None:
            self.locked = reason
            self.audit("net.lock", {"reason": reason, "open": len(self.open),
                                    "bytes": self.bytes, "connections": self.connections})
        for conn in list(self.open):
            conn.close()

    # -- the control socket -----------------------------------------------------------

    async def _control(self, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            if line.strip() == b"lock":
                self._lock("locked by the operator")
                writer.write(b"ok network locked\n")
            else:
                writer.write(b"error unknown request (expected 'lock')\n")
            await writer.drain()
        except (OSError, TimeoutError, ValueError):
            pass
        finally:
            writer.close()

    # -- one connection --------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        conn = _Conn()
        conn.writers.append(writer)
        try:
            self._admit()
            self.open.add(conn)
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
            except asyncio.LimitOverrunError:
                raise Refused("request head longer than 16 KiB", 431) from None
            except (asyncio.IncompleteReadError, TimeoutError):
                raise Refused("no complete request head", 400) from None
            try:
                req = parse_head(head)
            except HeadError as exc:
                raise Refused(str(exc), exc.status) from None
            conn.host, conn.port = req.host, req.port
            if self.stopped is not None:
                raise Refused(self.stopped)
            if self.locked is not None:
                raise Refused(f"network locked ({self.locked})")
            addr = await self._check(req)
            conn.address = str(addr)
            up_reader, up_writer = await self._connect(addr, req.port)
            conn.writers.append(up_writer)
            if req.method == "CONNECT":
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                first = await self._client_hello(reader, req.host)
            else:
                first = req.forwarded_head() + await self._body(reader, req.body_length)
            self._count(conn, up=len(first))
            up_writer.write(first)
            await self._pump(conn, reader, writer, up_reader, up_writer,
                             client_more=req.method == "CONNECT")
            self.audit("net.connection", {"verdict": "allowed", **conn.fields()})
        except Refused as exc:
            self._refuse(conn, writer, exc)
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            self.audit("net.connection", {"verdict": "allowed", "end": type(exc).__name__,
                                          **conn.fields()})
        except Exception as exc:  # a bug here must end this connection, not the proxy
            log.exception("egress: connection to %s failed", conn.host or "?")
            self._refuse(conn, writer, Refused(f"proxy error ({type(exc).__name__})", 500))
        finally:
            self.open.discard(conn)
            conn.close()

    def _admit(self) -> None:
        self.connections += 1
        cap = self.net.max_connections
        if cap and self.connections > cap:
            self._budget(f"network budget: more than {cap} connections")
            raise Refused(f"network budget: more than {cap} connections")
        if len(self.open) >= self.net.max_concurrent:
            raise Refused(f"more than {self.net.max_concurrent} connections at once", 503)

    async def _check(self, req: ProxyRequest) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        """The address to connect to, after every check; raises Refused."""
        literal = ip_literal(req.host)
        if not match(self.rules, req.host, req.port):
            what = "IP address" if literal is not None else "host"
            raise Refused(f"{what} {req.host} port {req.port} is not in the allowlist")
        if literal is not None:
            addresses = [literal]
        else:
            try:
                addresses = await asyncio.wait_for(
                    self.resolver.resolve(req.host, req.port), RESOLVE_TIMEOUT)
            except (OSError, TimeoutError, UnicodeError) as exc:
                raise Refused(f"cannot resolve {req.host}: {exc}", 502) from None
        if not addresses:
            raise Refused(f"{req.host} has no address", 502)
        for addr in addresses:
            why = forbidden_reason(addr)
            if why is None and host_owns(addr):
                why = f"address of this host {addr}"
            if why is not None:
                raise Refused(f"{req.host} resolves to a {why}")
        return addresses[0]

    async def _connect(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address,
                       port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        target = self.resolver.route(addr)  # the checked address (tests: its stand-in)
        try:
            return await asyncio.wait_for(
                asyncio.open_connection(str(target), port, limit=CHUNK), CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            raise Refused(f"cannot connect to {addr} port {port}: "
                          f"{exc.strerror if isinstance(exc, OSError) else 'timeout'}",
                          502) from None

    async def _client_hello(self, reader: asyncio.StreamReader, host: str) -> bytes:
        """The tunnel's first TLS record, once its SNI is checked against ``host``."""
        data = b""
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):
                while len(data) < needed(data):
                    if needed(data) > MAX_HELLO:
                        raise SniError("the first TLS record is longer than 16 KiB")
                    chunk = await reader.read(needed(data) - len(data))
                    if not chunk:
                        raise SniError("the tunnel closed before a ClientHello")
                    data += chunk
                name = server_name(data)
        except TimeoutError:
            raise Refused("no TLS ClientHello in the tunnel", 400) from None
        except SniError as exc:
            raise Refused(f"tunnel to {host}: {exc}", 400) from None
        if name is None:
            if ip_literal(host) is None:
                raise Refused(f"tunnel to {host}: the ClientHello names no server (SNI)")
            return data
        try:
            sni = normalise_host(name)
        except ValueError:
            raise Refused(f"tunnel to {host}: the SNI is not a host name") from None
        if sni != host:
            raise Refused(f"tunnel to {host}: the TLS SNI names another host ({sni})")
        return data

    async def _body(self, reader: asyncio.StreamReader, length: int) -> bytes:
        if length > CHUNK * 16:
            raise Refused("a request body over 1 MiB", 413)
        try:
            return await asyncio.wait_for(reader.readexactly(length), HEAD_TIMEOUT)
        except (asyncio.IncompleteReadError, TimeoutError):
            raise Refused("the request body is shorter than its Content-Length") from None

    async def _pump(self, conn: _Conn, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter, up_reader: asyncio.StreamReader,
                    up_writer: asyncio.StreamWriter, *, client_more: bool) -> None:
        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                       up: bool) -> None:
            while True:
                chunk = await asyncio.wait_for(src.read(CHUNK), IDLE_TIMEOUT)
                if not chunk:
                    break
                self._count(conn, up=len(chunk)) if up else self._count(conn, down=len(chunk))
                dst.write(chunk)
                await dst.drain()
            if dst.can_write_eof():
                with contextlib.suppress(OSError):
                    dst.write_eof()

        down = asyncio.ensure_future(copy(up_reader, writer, False))
        tasks = [down]
        if client_more:  # plain HTTP: one request per connection, nothing after its body
            tasks.append(asyncio.ensure_future(copy(reader, up_writer, True)))
        try:
            await down
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, OSError, TimeoutError):
                    await t

    def _count(self, conn: _Conn, up: int = 0, down: int = 0) -> None:
        conn.up += up
        conn.down += down
        self.bytes += up + down
        cap = self.net.max_bytes
        if cap and self.bytes > cap and self.stopped is None:
            self._budget(f"network budget: more than {cap} bytes transferred")
        if self.stopped is not None:
            raise Refused(self.stopped)
        if self.locked is not None:  # a request resolving or connecting when the lock came
            raise Refused(f"network locked ({self.locked})")

    def _budget(self, reason: str) -> None:
        if self.stopped is None:
            self.stopped = reason
            for other in list(self.open):
                other.close()
            self.on_budget(reason)

    def _refuse(self, conn: _Conn, writer: asyncio.StreamWriter, exc: Refused) -> None:
        self.denied += 1
        if self.denied <= MAX_DENIED_EVENTS:  # with max_connections = 0 nothing else caps it
            self.audit("net.denied", {"verdict": "denied", "reason": exc.reason,
                                      "status": exc.status, **conn.fields()})
        phrase = exc.reason.encode("ascii", "replace")[:300].replace(b"\r", b" ") \
            .replace(b"\n", b" ")
        body = b"cellblock egress: " + phrase + b"\n"
        with contextlib.suppress(OSError, RuntimeError):
            writer.write(b"HTTP/1.1 %d cellblock: %s\r\nContent-Type: text/plain\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                         % (exc.status, phrase, len(body), body))


def start_egress(net: NetworkPolicy, run_dir: Path, owner: tuple[int, int],
                 audit: Callable[..., Any], on_budget: Callable[[str], None]
                 ) -> EgressProxy | None:
    """The warden's one call: the proxy of a profile with network, bound and serving in
    ``run_dir`` (``ipc/egress.sock`` for the jail, ``egress.ctl`` for the operator), or
    None for a profile without. ``audit`` is called as ``audit(event, **fields)``."""
    if not net.allow:
        return None
    proxy = EgressProxy(net, run_dir / "ipc", run_dir, owner=owner,
                        audit=lambda event, fields: audit(event, **fields), on_budget=on_budget)
    try:
        proxy.start()
    except BaseException:
        proxy.close()
        raise
    return proxy
