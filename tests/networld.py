"""The stand-in internet of the egress tests: servers on this machine's loopback, and the
resolver file that names them (cellblock.egress.resolver.FileResolver).

- a simple package index (PEP 503) serving one wheel, ``cbdemo`` (``cbdemo.VALUE == 42``),
  and a ``/blob/<n>`` of n bytes for download loops;
- the same index over TLS (a self-signed certificate for ``pypi.test``, made with openssl);
- a raw TCP sink that counts the bytes it receives (a tunnel's upstream: the SNI test
  checks that nothing reached it).

Names: ``pypi.test`` and ``sink.test`` resolve to TEST-NET addresses routed to loopback;
``loop.test`` to 127.0.0.1, ``meta.test`` to 169.254.169.254, ``meta6.test`` to
fd00:ec2::254, ``mapped.test`` to ::ffff:127.0.0.1 (all refused after resolution)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import io
import json
import socket
import ssl
import subprocess
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PYPI_ADDR = "203.0.113.10"
SINK_ADDR = "203.0.113.11"
WHEEL = "cbdemo-1.0-py3-none-any.whl"


def make_wheel() -> bytes:
    files = {
        "cbdemo/__init__.py": b"VALUE = 42\n",
        "cbdemo-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: cbdemo\nVersion: 1.0\n",
        "cbdemo-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: cellblock-tests\n"
                                      b"Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append("cbdemo-1.0.dist-info/RECORD,,")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr("cbdemo-1.0.dist-info/RECORD", "\n".join(record) + "\n")
    return buf.getvalue()


@dataclass
class World:
    index_port: int
    sink_port: int
    resolver: Path
    sink_bytes: list[int] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    tls_port: int = 0  # the same index over TLS, a certificate for pypi.test
    ca_pem: str = ""  # that certificate (self-signed), for the client to trust

    @property
    def index_url(self) -> str:
        return f"http://pypi.test:{self.index_port}/simple/"


@contextlib.contextmanager
def world(tmp: Path) -> Iterator[World]:
    wheel = make_wheel()
    sha = hashlib.sha256(wheel).hexdigest()
    seen: list[str] = []

    class Index(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(f"{self.headers.get('Host')} {self.path}")
            if self.path.rstrip("/") == "/simple/cbdemo":
                body = (f'<html><body><a href="/files/{WHEEL}#sha256={sha}">{WHEEL}</a>'
                        "</body></html>").encode()
                ctype = "text/html"
            elif self.path == f"/files/{WHEEL}":
                body, ctype = wheel, "application/octet-stream"
            elif self.path.startswith("/blob/"):
                body, ctype = b"x" * int(self.path[6:]), "application/octet-stream"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    index = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Index)
    index.daemon_threads = True
    key, cert = tmp / "tls-key.pem", tmp / "tls-cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=pypi.test",
                    "-addext", "subjectAltName=DNS:pypi.test"], check=True,
                   capture_output=True)
    tls_index = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Index)
    tls_index.daemon_threads = True
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    tls_index.socket = server_ctx.wrap_socket(tls_index.socket, server_side=True)
    sink = socket.create_server(("127.0.0.1", 0))
    sink_bytes: list[int] = []

    def serve_sink() -> None:
        while True:
            try:
                conn, _ = sink.accept()
            except OSError:
                return
            with conn:
                total = 0
                while chunk := conn.recv(65536):
                    total += len(chunk)
                sink_bytes.append(total)

    threads = [threading.Thread(target=index.serve_forever, daemon=True),
               threading.Thread(target=tls_index.serve_forever, daemon=True),
               threading.Thread(target=serve_sink, daemon=True)]
    for t in threads:
        t.start()
    resolver = tmp / "resolver.json"
    resolver.write_text(json.dumps({
        "names": {"pypi.test": [PYPI_ADDR], "sink.test": [SINK_ADDR],
                  "other.test": [PYPI_ADDR], "loop.test": ["127.0.0.1"],
                  "meta.test": ["169.254.169.254"], "meta6.test": ["fd00:ec2::254"],
                  "mapped.test": ["::ffff:127.0.0.1"], "mixed.test": [PYPI_ADDR, "10.0.0.1"]},
        "routes": {PYPI_ADDR: "127.0.0.1", SINK_ADDR: "127.0.0.1"},
    }))
    resolver.chmod(0o644)
    try:
        yield World(index.server_address[1], sink.getsockname()[1], resolver, sink_bytes,
                    seen, tls_index.server_address[1], cert.read_text())
    finally:
        for server in (index, tls_index):
            server.shutdown()
            server.server_close()
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_RDWR)
        sink.close()
        for t in threads:
            t.join(5)
