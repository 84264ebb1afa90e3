"""The server name (SNI) of a TLS ClientHello, parsed with bounds.

Only reads: every length is checked against what is left before it is used, and anything
that does not parse is ``None`` (the proxy then refuses the tunnel). The record may be
split across TCP segments: :func:`needed` says how many bytes the first record takes.
"""

from __future__ import annotations

__all__ = ["MAX_HELLO", "SniError", "needed", "server_name"]

MAX_HELLO = 16 * 1024 + 5  # one TLS record (2^14 bytes) and its header
HANDSHAKE = 22
CLIENT_HELLO = 1
EXT_SERVER_NAME = 0
HOST_NAME = 0


class SniError(ValueError):
    """Not a ClientHello the proxy can read; the message says what."""


def needed(data: bytes) -> int:
    """How many bytes the first TLS record needs (5 until its header is in)."""
    if len(data) < 5:
        return 5
    if data[0] != HANDSHAKE:
        raise SniError("the first bytes in the tunnel are not a TLS handshake")
    return 5 + int.from_bytes(data[3:5], "big")


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise SniError("a length runs past the end of the ClientHello")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def num(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, n: int) -> _Reader:
        return _Reader(self.take(self.num(n)))

    def done(self) -> bool:
        return self.pos == len(self.data)


def server_name(record: bytes) -> str | None:
    """The host_name in the ClientHello's server_name extension (None if it has none).
    ``record`` is the first TLS record, complete (:func:`needed`). Raises SniError."""
    if len(record) > MAX_HELLO:
        raise SniError("the ClientHello record is longer than 16 KiB")
    rec = _Reader(record)
    if rec.num(1) != HANDSHAKE:
        raise SniError("not a TLS handshake record")
    rec.take(2)  # record version
    body = rec.vector(2)
    if not rec.done():
        raise SniError("bytes after the first record")
    if body.num(1) != CLIENT_HELLO:
        raise SniError("the first handshake message is not a ClientHello")
    hello = _Reader(body.take(body.num(3)))  # a ClientHello split over records is refused
    hello.take(2 + 32)  # client_version, random
    hello.vector(1)  # session_id
    hello.vector(2)  # cipher_suites
    hello.vector(1)  # compression_methods
    if hello.done():
        return None  # no extensions at all
    extensions = hello.vector(2)
    name: str | None = None
    seen: set[int] = set()
    while not extensions.done():
        kind = extensions.num(2)
        data = extensions.vector(2)
        if kind in seen:
            raise SniError(f"extension {kind} appears twice")
        seen.add(kind)
        if kind != EXT_SERVER_NAME:
            continue
        names = data.vector(2)
        if not data.done():
            raise SniError("bytes after the server_name list")
        while not names.done():
            name_type = names.num(1)
            value = names.vector(2).data
            if name_type != HOST_NAME:
                continue
            if name is not None:
                raise SniError("two host names in server_name")
            try:
                name = value.decode("ascii")
            except UnicodeDecodeError:
                raise SniError("a server name that is not ASCII") from None
    return name
