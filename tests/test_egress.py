"""The egress proxy's pure parts, by exact-value tables (allowlist matching, forbidden
addresses, the request head, the SNI parser with a fuzz table), and the proxy itself on
real sockets without a jail: request smuggling, oversize heads, SNI checks, the lock."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import random
import socket
import ssl
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from networld import PYPI_ADDR, World, world

from cellblock.egress.addresses import forbidden_reason
from cellblock.egress.hosts import HostError, match, normalise_host, parse_rule, split_authority
from cellblock.egress.httphead import HeadError, parse_head
from cellblock.egress.proxy import EgressProxy
from cellblock.egress.resolver import FileResolver
from cellblock.egress.sni import SniError, needed, server_name
from cellblock.policy import NetworkPolicy

from conftest import wait_for

pytestmark = pytest.mark.nonroot  # no jail: real sockets only, as any user

# -- hosts -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [
    ("PyPI.org", "pypi.org"),
    ("pypi.org.", "pypi.org"),
    ("bücher.example", "xn--bcher-kva.example"),
    ("[::FFFF:127.0.0.1]", "::ffff:7f00:1"),
    ("1.2.3.4", "1.2.3.4"),
    ("exa\u200bmple.org", "example.org"),  # IDNA maps it away: checked and used as one
])
def test_normalise_host(raw: str, expected: str) -> None:
    assert normalise_host(raw) == expected


@pytest.mark.parametrize("raw", [
    "", "a..b", "-a.org", "a_b.org", "127.1", "0x7f.0.0.1", "2130706433", "a.0x7f",
    "[1.2.3.4]", "fe80::1%eth0", "a" * 64 + ".org", "pypi.org\x00.evil", "pypi.org ",
])
def test_normalise_host_refuses(raw: str) -> None:
    with pytest.raises(HostError):
        normalise_host(raw)


@pytest.mark.parametrize(("raw", "expected"), [
    ("pypi.org:443", ("pypi.org", 443)),
    ("[::1]:8080", ("::1", 8080)),
    ("PYPI.ORG.:80", ("pypi.org", 80)),
])
def test_split_authority(raw: str, expected: tuple[str, int]) -> None:
    assert split_authority(raw) == expected


@pytest.mark.parametrize("raw", [
    "user@pypi.org:443", "pypi.org@evil.test:443", "pypi.org:443/x", "pypi.org", "::1:80",
    "[::1]80", "pypi.org:+443", "pypi.org:0443x", "pypi.org:65536", "pypi.org:443#x",
    "pypi.org:44 3", "evil.test\\@pypi.org:443", "pypi.org%2f:443",
])
def test_split_authority_refuses(raw: str) -> None:
    with pytest.raises(HostError):
        split_authority(raw)


RULES = tuple(parse_rule(r) for r in ("pypi.org", "*.example.com:443", "1.2.3.4:8080"))


@pytest.mark.parametrize(("host", "port", "allowed"), [
    ("pypi.org", 443, True), ("pypi.org", 80, True), ("pypi.org", 22, False),
    ("files.pypi.org", 443, False), ("pypi.org.evil.test", 443, False),
    ("evilpypi.org", 443, False),
    ("a.example.com", 443, True), ("a.b.example.com", 443, True),
    ("example.com", 443, False), ("a.example.com", 80, False),
    ("aexample.com", 443, False), ("example.com.evil.test", 443, False),
    ("1.2.3.4", 8080, True), ("1.2.3.4", 443, False), ("1.2.3.5", 8080, False),
])
def test_allowlist_match(host: str, port: int, allowed: bool) -> None:
    assert match(RULES, host, port) is allowed


# -- addresses -------------------------------------------------------------------------------

@pytest.mark.parametrize(("addr", "reason"), [
    ("127.0.0.1", "loopback"), ("127.255.0.9", "loopback"), ("0.0.0.0", "this-network"),
    ("10.1.2.3", "private (10/8)"), ("172.31.0.1", "private (172.16/12)"),
    ("192.168.1.1", "private (192.168/16)"), ("100.64.0.1", "carrier-grade NAT"),
    ("169.254.169.254", "cloud metadata"), ("169.254.1.1", "link-local"),
    ("224.0.0.1", "multicast"), ("255.255.255.255", "reserved"), ("240.0.0.1", "reserved"),
    ("::1", "loopback"), ("::", "unspecified"), ("fd00:ec2::254", "cloud metadata"),
    ("fd12::1", "unique local"), ("fe80::1", "link-local"), ("ff02::1", "multicast"),
    ("::ffff:127.0.0.1", "loopback address 127.0.0.1 (inside"),
    ("::ffff:169.254.169.254", "cloud metadata address 169.254.169.254 (inside"),
    ("::127.0.0.1", "loopback address 127.0.0.1 (inside"),
    ("64:ff9b::a00:1", "private (10/8) address 10.0.0.1 (inside"),
    ("64:ff9b:1::7f00:1", "local-use NAT64"), ("64:ff9b:1::a9fe:a9fe", "local-use NAT64"),
    ("::ffff:0:7f00:1", "loopback address 127.0.0.1 (inside"),
    ("::ffff:0:a9fe:a9fe", "cloud metadata address 169.254.169.254 (inside"),
    ("2002:7f00:1::", "loopback address 127.0.0.1 (inside"),
])
def test_forbidden_addresses(addr: str, reason: str) -> None:
    found = forbidden_reason(ipaddress.ip_address(addr))
    assert found is not None and found.startswith(reason), found


@pytest.mark.parametrize("addr", ["151.101.0.223", "203.0.113.10", "2a04:4e42::223",
                                  "::ffff:151.101.0.223", "8.8.8.8"])
def test_public_addresses_pass(addr: str) -> None:
    assert forbidden_reason(ipaddress.ip_address(addr)) is None


# -- request heads ----------------------------------------------------------------------------

def test_parse_connect_and_absolute_get() -> None:
    req = parse_head(b"CONNECT PyPI.org.:443 HTTP/1.1\r\nHost: pypi.org:443\r\n\r\n")
    assert (req.method, req.host, req.port, req.path) == ("CONNECT", "pypi.org", 443, "")
    req = parse_head(b"GET http://pypi.org/simple/x?y=1 HTTP/1.1\r\nHost: PYPI.org\r\n"
                     b"Proxy-Authorization: x\r\nConnection: keep-alive, X-Secret\r\n"
                     b"Accept: */*\r\n\r\n")
    assert req.forwarded_head() == (b"GET /simple/x?y=1 HTTP/1.1\r\nHost: pypi.org\r\n"
                                    b"Accept: */*\r\nConnection: close\r\n\r\n")


@pytest.mark.parametrize(("head", "message"), [
    (b"GET /simple HTTP/1.1\r\nHost: pypi.org\r\n\r\n", "absolute http:// URL"),
    (b"GET https://pypi.org/ HTTP/1.1\r\n\r\n", "absolute http:// URL"),
    (b"GET http://pypi.org/ HTTP/1.1\r\nHost: evil.test\r\n\r\n", "not the URL's host"),
    (b"GET http://pypi.org/ HTTP/1.1\r\nHost: pypi.org\r\nHost: evil.test\r\n\r\n",
     "two Host"),
    (b"POST http://pypi.org/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
     "Transfer-Encoding"),
    (b"POST http://pypi.org/ HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
     "one decimal"),
    (b"POST http://pypi.org/ HTTP/1.1\r\nContent-Length: -1\r\n\r\n", "one decimal"),
    (b"GET http://pypi.org/ HTTP/1.1\r\n X-Folded: 1\r\n\r\n", "no folding"),
    (b"GET http://pypi.org/ HTTP/1.1\nHost: pypi.org\r\n\r\n", "CRLF"),
    (b"GET http://pypi.org/ HTTP/1.1\r\nX: a\nGET http://evil.test/ HTTP/1.1\r\n\r\n", "CRLF"),
    # a bare CR ends a line for some upstreams: a second Host, or a Transfer-Encoding
    (b"GET http://pypi.org/ HTTP/1.1\r\nHost: pypi.org\r\nX-A: a\rHost: evil.test\r\n\r\n",
     "bare CR"),
    (b"POST http://pypi.org/ HTTP/1.1\r\nX-B: b\rTransfer-Encoding: chunked\r\n\r\n",
     "bare CR"),
    (b"GET http://a@pypi.org/ HTTP/1.1\r\n\r\n", "no userinfo"),
    (b"GET http://pypi.org/a b HTTP/1.1\r\n\r\n", "METHOD TARGET"),
    (b"TRACE http://pypi.org/ HTTP/1.1\r\n\r\n", "not forwarded"),
    (b"GET http://pypi.org/ HTTP/2.0\r\n\r\n", "METHOD TARGET"),
    (b"CONNECT pypi.org HTTP/1.1\r\n\r\n", "names no port"),
])
def test_parse_head_refuses(head: bytes, message: str) -> None:
    with pytest.raises(HeadError, match=message):
        parse_head(head)


# -- SNI -----------------------------------------------------------------------------------

def client_hello(name: str | None) -> bytes:
    """A real ClientHello, made by Python's ssl module."""
    out = ssl.MemoryBIO()
    ctx = ssl.create_default_context()
    if name is None:
        ctx.check_hostname = False
    tls = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return out.read()


def test_sni_of_real_client_hellos() -> None:
    for name in ("pypi.org", "files.pythonhosted.org", "xn--bcher-kva.example"):
        hello = client_hello(name)
        assert needed(hello) == len(hello)
        assert server_name(hello) == name
    assert server_name(client_hello(None)) is None


def _hello_with(extensions: bytes) -> bytes:
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00" + extensions
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(hs).to_bytes(2, "big") + hs


def _sni_ext(*names: bytes) -> bytes:
    entries = b"".join(b"\x00" + len(n).to_bytes(2, "big") + n for n in names)
    data = len(entries).to_bytes(2, "big") + entries
    return b"\x00\x00" + len(data).to_bytes(2, "big") + data


def _exts(*exts: bytes) -> bytes:
    data = b"".join(exts)
    return struct.pack(">H", len(data)) + data


@pytest.mark.parametrize(("record", "message"), [
    (b"GET / HTTP/1.1\r\n", "not a TLS handshake"),
    (_hello_with(struct.pack(">H", 40) + _sni_ext(b"a.org")), "past the end"),
    (_hello_with(_exts(_sni_ext(b"a.org", b"b.org"))), "two host names"),
    (_hello_with(_exts(_sni_ext(b"a.org"), _sni_ext(b"a.org"))), "appears twice"),
    (_hello_with(_exts(_sni_ext(b"\xff\xfe"))), "not ASCII"),
    (_hello_with(_exts(_sni_ext(b"a.org") + b"\x00")), "past the end"),
    (_hello_with(b"")[:-3], "past the end"),
    (_hello_with(b"") + b"x", "bytes after"),
])
def test_sni_refuses(record: bytes, message: str) -> None:
    with pytest.raises(SniError, match=message):
        needed(record)
        server_name(record)


def test_sni_fuzz_never_crashes() -> None:
    """Every truncation, and random byte flips, of real hellos: a name, None or SniError."""
    rng = random.Random(17)
    for name in ("pypi.org", "a.example.com"):
        hello = client_hello(name)
        for cut in range(len(hello)):
            with pytest.raises(SniError):
                server_name(hello[:cut])
        for _ in range(3000):
            data = bytearray(hello)
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            try:
                got = server_name(bytes(data))
            except SniError:
                continue
            assert got is None or isinstance(got, str)


# -- the proxy on real sockets, no jail --------------------------------------------------------

@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[tuple[EgressProxy, World, list[tuple[str, Any]]]]:
    with world(tmp_path) as w:
        ipc = tmp_path / "ipc"
        ipc.mkdir()
        seen: list[tuple[str, Any]] = []
        stops: list[str] = []
        net = NetworkPolicy(allow=(f"pypi.test:{w.index_port}", f"sink.test:{w.sink_port}"),
                            max_connections=50)
        p = EgressProxy(net, ipc, tmp_path, owner=None, audit=lambda e, f: seen.append((e, f)),
                        on_budget=stops.append, resolver=FileResolver.load(str(w.resolver)))
        p.start()
        try:
            yield p, w, seen
        finally:
            p.close()
            p.close()  # twice is fine
            assert not (ipc / "egress.sock").exists()


def ask(p: EgressProxy, data: bytes, then: bytes = b"") -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(p.path))
        s.sendall(data)
        if then:
            s.sendall(then)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_one_request_per_connection_nothing_smuggled(proxy: Any) -> None:
    p, w, seen = proxy
    host = f"pypi.test:{w.index_port}"
    smuggled = f"GET http://{host}/simple/cbdemo/ HTTP/1.1\r\nHost: {host}\r\n\r\n" \
               f"GET /blob/5 HTTP/1.1\r\nHost: {host}\r\n\r\n"
    out = ask(p, smuggled.encode())
    assert out.startswith(b"HTTP/1.0 200") and out.count(b"HTTP/1.") == 1
    assert w.requests == [f"{host} /simple/cbdemo/"]
    assert wait_for(lambda: seen)
    assert seen[-1][0] == "net.connection" and seen[-1][1]["address"] == PYPI_ADDR


def test_oversize_head_and_sni_mismatch(proxy: Any) -> None:
    p, w, seen = proxy
    out = ask(p, b"GET http://pypi.test/ HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 431 cellblock: request head longer than 16 KiB")
    out = ask(p, f"CONNECT sink.test:{w.sink_port} HTTP/1.1\r\n\r\n".encode(),
              client_hello("pypi.test"))
    assert b"the TLS SNI names another host (pypi.test)" in out
    out = ask(p, f"CONNECT sink.test:{w.sink_port} HTTP/1.1\r\n\r\n".encode(),
              client_hello(None))
    assert b"the ClientHello names no server (SNI)" in out
    out = ask(p, f"CONNECT sink.test:{w.sink_port} HTTP/1.1\r\n\r\n".encode(),
              client_hello("sink.test"))
    assert out == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert wait_for(lambda: len(w.sink_bytes) == 3 and len(seen) == 4)
    assert w.sink_bytes[:2] == [0, 0] and w.sink_bytes[2] == len(client_hello("sink.test"))
    assert [f["verdict"] for _, f in seen] == ["denied"] * 3 + ["allowed"]


def test_lock_closes_open_connections_and_refuses_new(proxy: Any) -> None:
    p, w, seen = proxy
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(p.path))
        s.sendall(f"CONNECT sink.test:{w.sink_port} HTTP/1.1\r\n\r\n".encode()
                  + client_hello("sink.test"))
        assert s.recv(100).startswith(b"HTTP/1.1 200")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(str(p.control_path))
            c.sendall(b"lock\n")
            assert c.recv(100) == b"ok network locked\n"
        assert s.recv(100) == b""  # the open tunnel was closed
    out = ask(p, f"CONNECT sink.test:{w.sink_port} HTTP/1.1\r\n\r\n".encode())
    assert out.startswith(b"HTTP/1.1 403 cellblock: network locked (locked by the operator)")
    assert wait_for(lambda: any(e == "net.lock" for e, _ in seen))
    locks = [f for e, f in seen if e == "net.lock"]
    assert locks == [{"reason": "locked by the operator", "open": 1,
                      "bytes": len(client_hello("sink.test")) * 0 + locks[0]["bytes"],
                      "connections": 1}]
    assert locks[0]["bytes"] > 0


def test_socket_modes(proxy: Any) -> None:
    p, _w, _seen = proxy
    assert os.stat(p.path).st_mode & 0o777 == 0o600
    assert os.stat(p.control_path).st_mode & 0o777 == 0o600


def test_lock_after_seconds_locks_by_itself(tmp_path: Path) -> None:
    with world(tmp_path) as w:
        ipc = tmp_path / "ipc"
        ipc.mkdir()
        seen: list[tuple[str, Any]] = []
        net = NetworkPolicy(allow=(f"pypi.test:{w.index_port}",), lock_after_seconds=0.2)
        p = EgressProxy(net, ipc, tmp_path, owner=None, audit=lambda e, f: seen.append((e, f)),
                        on_budget=lambda reason: None,
                        resolver=FileResolver.load(str(w.resolver)))
        p.start()
        try:
            assert wait_for(lambda: p.locked is not None)
            out = ask(p, f"GET http://pypi.test:{w.index_port}/ HTTP/1.1\r\n\r\n".encode())
            assert out.startswith(b"HTTP/1.1 403 cellblock: network locked "
                                  b"(lock_after_seconds (0.2))")
            assert seen[0] == ("net.lock", {"reason": "lock_after_seconds (0.2)", "open": 0,
                                            "bytes": 0, "connections": 0})
            assert not w.requests
        finally:
            p.close()


def test_byte_budget_calls_on_budget_once_and_closes(proxy: Any) -> None:
    p, w, seen = proxy
    stops: list[str] = []
    p.on_budget = stops.append
    p.net = NetworkPolicy(allow=p.net.allow, max_bytes=300_000)
    for _ in range(3):
        ask(p, f"GET http://pypi.test:{w.index_port}/blob/200000 HTTP/1.1\r\n\r\n".encode())
    assert stops == ["network budget: more than 300000 bytes transferred"]
    assert p.bytes <= 300_000 + 65536 + 1000  # stopped within one chunk of the budget
    assert wait_for(lambda: len(seen) == 3)
    assert [f["reason"] for e, f in seen if e == "net.denied"][-1] == stops[0]


def own_address() -> str:
    """An address of this host that is not loopback (the one its default route uses)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.200", 9))  # no packet is sent: this only picks a route
            return str(s.getsockname()[0])
        except OSError:
            return socket.gethostbyname(socket.gethostname())


def test_host_owns() -> None:
    from cellblock.egress.addresses import host_owns

    for addr, owned in (("127.0.0.1", True), ("::1", True), (own_address(), True),
                        ("203.0.113.10", False), ("2001:db8::1", False)):
        assert host_owns(ipaddress.ip_address(addr)) is owned, addr


def test_a_name_resolving_to_this_host_is_refused(tmp_path: Path) -> None:
    """Services of the host bound to 0.0.0.0 answer on its own public address too."""
    me = own_address()
    listener = socket.create_server(("0.0.0.0", 0))  # the kind of service at risk
    port = listener.getsockname()[1]
    (tmp_path / "r.json").write_text(f'{{"names": {{"self.test": ["{me}"]}}}}')
    ipc = tmp_path / "ipc"
    ipc.mkdir()
    seen: list[tuple[str, Any]] = []
    p = EgressProxy(NetworkPolicy(allow=(f"self.test:{port}",)), ipc, tmp_path, owner=None,
                    audit=lambda e, f: seen.append((e, f)), on_budget=lambda r: None,
                    resolver=FileResolver.load(str(tmp_path / "r.json")))
    p.start()
    try:
        out = ask(p, f"GET http://self.test:{port}/ HTTP/1.1\r\n\r\n".encode())
        why = forbidden_reason(ipaddress.ip_address(me)) or f"address of this host {me}"
        assert out.startswith(f"HTTP/1.1 403 cellblock: self.test resolves to a {why}"
                              .encode()), out
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing connected: it was refused before any connect
    finally:
        p.close()
        listener.close()


class _GatedResolver(FileResolver):
    """The file resolver, held at each lookup until the test lets it go."""

    def __init__(self, base: FileResolver) -> None:
        super().__init__({}, {})
        self.names, self.routes = base.names, base.routes
        self.asked = threading.Event()
        self.go = threading.Event()

    async def resolve(self, host: str, port: int) -> list[Any]:
        self.asked.set()
        while not self.go.is_set():  # the proxy's loop keeps running meanwhile
            await asyncio.sleep(0.01)
        return await super().resolve(host, port)


def test_lock_while_a_request_resolves_stops_it(tmp_path: Path) -> None:
    """Found from the jail: a plain-HTTP request past its lock check and waiting on its name
    (or its upstream connect) when the lock came still went upstream after the lock."""
    with world(tmp_path) as w:
        ipc = tmp_path / "ipc"
        ipc.mkdir()
        seen: list[tuple[str, Any]] = []
        resolver = _GatedResolver(FileResolver.load(str(w.resolver)))
        p = EgressProxy(NetworkPolicy(allow=(f"pypi.test:{w.index_port}",)), ipc, tmp_path,
                        owner=None, audit=lambda e, f: seen.append((e, f)),
                        on_budget=lambda _r: None, resolver=resolver)
        p.start()
        try:
            host = f"pypi.test:{w.index_port}"
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(30)
                s.connect(str(p.path))
                s.sendall(f"GET http://{host}/simple/cbdemo/ HTTP/1.1\r\nHost: {host}\r\n\r\n"
                          .encode())
                assert resolver.asked.wait(30)
                p.lock()
                resolver.go.set()
                out = b""
                while chunk := s.recv(65536):
                    out += chunk
            # the lock closed the client's connection (or answered 403): nothing came back...
            assert out == b"" or out.startswith(b"HTTP/1.1 403 cellblock: network locked")
            # ...and once the proxy is done with it, nothing reached the upstream either
            assert wait_for(lambda: any(e in ("net.denied", "net.connection") for e, _ in seen))
            assert w.requests == []
        finally:
            p.close()
