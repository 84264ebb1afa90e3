"""A bounded parse of one proxy request's line and headers; nothing is forwarded before
this has accepted the whole head (no request smuggling: one request per connection, the
body by Content-Length only, ``Transfer-Encoding`` refused). Errors name the host at most,
never quote a header or the path: they are audited, and a header may hold a token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .hosts import HostError, split_authority

__all__ = ["MAX_HEAD", "HeadError", "ProxyRequest", "parse_head"]

MAX_HEAD = 16 * 1024  # request line and headers
MAX_HEADERS = 100
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: never forwarded: hop-by-hop headers and the proxy's own
_DROPPED = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authorization",
                      "proxy-authenticate", "te", "trailer", "upgrade", "host"})


class HeadError(ValueError):
    """A request head the proxy refuses; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ProxyRequest:
    """One parsed request: CONNECT (``path`` empty) or an absolute-form plain-HTTP one."""

    method: str
    host: str  # normalised
    port: int
    path: str  # origin-form path and query (plain HTTP)
    headers: tuple[tuple[str, str], ...]
    body_length: int

    def forwarded_head(self) -> bytes:
        """The origin-form head sent upstream: the proxy's Host, ``Connection: close``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        authority = host if self.port == 80 else f"{host}:{self.port}"
        lines = [f"{self.method} {self.path} HTTP/1.1", f"Host: {authority}"]
        lines += [f"{k}: {v}" for k, v in self.headers if k.lower() not in _DROPPED]
        lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def parse_head(head: bytes) -> ProxyRequest:
    """Parse ``head`` (up to and including the blank line). Raises HeadError."""
    if len(head) > MAX_HEAD:
        raise HeadError("request head longer than 16 KiB", 431)
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise HeadError("undecodable request head") from None
    bare = text.replace("\r\n", "")
    if not text.endswith("\r\n\r\n") or "\n" in bare or "\r" in bare or "\0" in text:
        # a bare CR is a line end to some upstream parsers: "X: a\rHost: evil" would pass
        # the Host check here and be another header there (found from the jail)
        raise HeadError("request head lines must end in CRLF, no bare CR, bare LF or NUL")
    lines = text[:-4].split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
        raise HeadError("the request line is not 'METHOD TARGET HTTP/1.x'")
    method, target, _version = parts
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.fullmatch(name):
            raise HeadError("a header line is not 'Name: value' (no folding)")
        headers.append((name, value.strip(" \t")))
    if len(headers) > MAX_HEADERS:
        raise HeadError(f"more than {MAX_HEADERS} headers", 431)
    by_name: dict[str, list[str]] = {}
    for k, v in headers:
        by_name.setdefault(k.lower(), []).append(v)
    if "transfer-encoding" in by_name:
        raise HeadError("Transfer-Encoding is not supported by this proxy", 501)
    lengths = by_name.get("content-length", [])
    if len(lengths) > 1 or (lengths and not lengths[0].isdigit()) or \
            (lengths and len(lengths[0]) > 12):
        raise HeadError("Content-Length must be one decimal number")
    length = int(lengths[0]) if lengths else 0
    if len(by_name.get("host", [])) > 1:
        raise HeadError("two Host headers")
    try:
        if method == "CONNECT":
            host, port = split_authority(target)
            return ProxyRequest(method, host, port, "", tuple(headers), length)
        if method not in _METHODS:
            raise HeadError(f"method {method[:20]!r} is not forwarded", 405)
        if not target[:7].lower() == "http://":
            raise HeadError("plain HTTP needs an absolute http:// URL; HTTPS goes through "
                            "CONNECT")
        rest = target[7:]
        cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        authority, path = rest[:cut], rest[cut:] or "/"
        if path.startswith("?"):
            path = "/" + path
        if any(c in path for c in " \t#") or not path.isascii():
            raise HeadError("the URL's path has spaces, a fragment or non-ASCII characters")
        host, port = split_authority(authority, default_port=80)
        for value in by_name.get("host", []):
            if split_authority(value, default_port=80) != (host, port):
                raise HeadError(f"Host header {value[:100]!r} is not the URL's host")
        return ProxyRequest(method, host, port, path, tuple(headers), length)
    except HostError as exc:
        raise HeadError(str(exc)) from None
