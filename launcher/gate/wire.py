"""The Jupyter wire format, checked strictly, without jupyter_client's Session.

Who calls this: :mod:`cellblock.gate.relay` calls :func:`split` on every multipart it
receives, :meth:`Signer.verify` with the sender's key, :func:`parse_header` on the header
and parent frames, and :meth:`Signer.sign` with the receiver's key before forwarding.
Tests call the same functions with exact-value tables.

A message on the wire is::

    [ident, ..., b"<IDS|MSG>", signature, header, parent_header, metadata, content, buffer, ...]

where ``signature`` is the lowercase hex HMAC-SHA256 of the four JSON frames, in that
order (buffers are *not* signed; see the relay's docstring). Session objects would parse
and re-serialise all four JSON frames; the gate parses only header and parent, re-signs
the original bytes, and so adds a few microseconds per message instead of most of a
millisecond.

Everything here treats its input as hostile: any malformed input raises :class:`Dropped`
with a short reason code that is safe to put in an audit log (never message content).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DELIM",
    "SIGNATURE_SCHEME",
    "Checked",
    "Dropped",
    "Signer",
    "WireMessage",
    "check",
    "load_object",
    "parse_header",
    "parse_parent",
    "split",
]

DELIM = b"<IDS|MSG>"
SIGNATURE_SCHEME = "hmac-sha256"

_HEX_SHA256_LEN = 64
_MAX_FIELD_CHARS = 512  # msg_id, msg_type, session: ipykernel's are under 80
_VERSION = re.compile(r"5\.\d{1,3}")
# A \uD800-\uDFFF escape: the only way JSON can smuggle a lone surrogate past a strict
# UTF-8 decode. Legitimate senders (json_packer uses ensure_ascii=False) never escape one.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class Dropped(Exception):
    """A message the gate refuses.

    ``reason`` is a fixed code such as ``"bad_signature"`` (safe to audit);
    ``msg_type`` is the parsed type when parsing got that far, else None.
    """

    def __init__(self, reason: str, msg_type: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.msg_type = msg_type


class Signer:
    """HMAC-SHA256 over the four JSON frames with one key (the client's or the kernel's)."""

    __slots__ = ("_proto",)

    def __init__(self, key: bytes | str) -> None:
        if isinstance(key, str):
            key = key.encode("utf-8")
        if not key:
            raise ValueError("cellblock gate: an empty HMAC key would disable signing; refusing")
        self._proto = hmac.new(key, digestmod=hashlib.sha256)

    def sign(self, parts: Sequence[bytes]) -> bytes:
        """Return the hex signature (as bytes) of ``parts`` (header, parent, metadata, content)."""
        h = self._proto.copy()
        for part in parts:
            h.update(part)
        return h.hexdigest().encode("ascii")

    def verify(self, signature: bytes, parts: Sequence[bytes]) -> bool:
        """True if ``signature`` is this key's signature of ``parts`` (constant-time compare)."""
        if len(signature) != _HEX_SHA256_LEN:
            return False
        return hmac.compare_digest(signature, self.sign(parts))


@dataclass(slots=True)
class WireMessage:
    """One multipart, split but not parsed. ``parts`` = [header, parent, metadata, content]."""

    idents: list[bytes]
    signature: bytes
    parts: list[bytes]
    buffers: list[bytes]


def split(frames: Sequence[bytes], max_frames: int) -> WireMessage:
    """Split a received multipart at the delimiter, refusing any ambiguous layout.

    Raises Dropped("too_many_frames"), ("no_delimiter"), ("short_message") or
    ("delimiter_as_ident") when an ident equal to the delimiter would shift the frames
    (the ambiguity jupyter_client's own ``feed_identities`` documents).
    """
    if len(frames) > max_frames:
        raise Dropped("too_many_frames")
    try:
        i = frames.index(DELIM)
    except ValueError:
        raise Dropped("no_delimiter") from None
    if len(frames) < i + 6:
        raise Dropped("short_message")
    if DELIM in frames[i + 1 : i + 6]:
        raise Dropped("delimiter_as_ident")
    return WireMessage(
        idents=list(frames[:i]),
        signature=frames[i + 1],
        parts=list(frames[i + 2 : i + 6]),
        buffers=list(frames[i + 6 :]),
    )


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key")
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError("NaN or Infinity")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("non-finite float")
    return value


_DECODER = json.JSONDecoder(
    object_pairs_hook=_no_duplicate_keys,
    parse_constant=_no_constant,
    parse_float=_finite_float,
)


def load_object(raw: bytes, what: str = "json") -> dict[str, Any]:
    """Parse ``raw`` as one strict JSON object, or raise Dropped(f"bad_{what}").

    Strict means: UTF-8 only (no UTF-16 sniffing, no invalid sequences), no lone
    surrogates, no NaN/Infinity (nor 1e999), no duplicate keys, ints within Python's
    digit limit, nesting within the interpreter's recursion limit, an object at the top.
    Every exception is caught: the caller only ever sees Dropped.
    """
    try:
        obj = _DECODER.decode(raw.decode("utf-8"))
        if type(obj) is not dict:
            raise ValueError("not an object")
        if _SURROGATE_ESCAPE.search(raw):
            # Slow path, only when an escaped surrogate appears: pairs were joined by the
            # decoder, so any surrogate left is lone and fails to encode.
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        return obj
    except Exception:
        raise Dropped(f"bad_{what}") from None


def _field(obj: dict[str, Any], key: str, what: str) -> str:
    value = obj.get(key)
    if type(value) is not str or not value or len(value) > _MAX_FIELD_CHARS:
        raise Dropped(f"bad_{what}")
    return value


def parse_header(raw: bytes, max_bytes: int) -> dict[str, Any]:
    """Parse a header frame: an object with non-empty str msg_id, msg_type and session,
    and a protocol version "5.x". Raises Dropped("oversized_header") or ("bad_header")."""
    if len(raw) > max_bytes:
        raise Dropped("oversized_header")
    header = load_object(raw, "header")
    _field(header, "msg_id", "header")
    _field(header, "msg_type", "header")
    _field(header, "session", "header")
    version = header.get("version")
    if type(version) is not str or not _VERSION.fullmatch(version):
        raise Dropped("bad_version", header["msg_type"])
    return header


def parse_parent(raw: bytes, max_bytes: int) -> dict[str, Any]:
    """Parse a parent_header frame: ``{}`` or an object with str msg_id and session.
    Raises Dropped("oversized_parent") or ("bad_parent")."""
    global _last_parent
    if len(raw) > max_bytes:
        raise Dropped("oversized_parent")
    last = _last_parent  # one read: another gate's thread may replace it meanwhile
    if raw == last[0]:
        return last[1]
    parent = load_object(raw, "parent")
    if parent:
        _field(parent, "msg_id", "parent")
        _field(parent, "session", "parent")
    _last_parent = (raw, parent)
    return parent


# Every message a cell's request causes carries that request's header as its parent,
# byte for byte: the last one parsed is kept (read-only to every caller) and reused.
_last_parent: tuple[bytes, dict[str, Any]] = (b"{}", {})


@dataclass(slots=True)
class Checked:
    """A multipart that passed :func:`check`: layout, signature, header (and parent)."""

    idents: list[bytes]
    parts: list[bytes]
    buffers: list[bytes]
    header: dict[str, Any]
    parent: dict[str, Any]

    @property
    def msg_type(self) -> str:
        return str(self.header["msg_type"])


def check(
    frames: Sequence[bytes],
    signer: Signer,
    max_frames: int,
    max_header_bytes: int,
    with_parent: bool = True,
) -> Checked:
    """Everything the gate checks about a message before it looks at its state.

    Order matters for cost and for trust: layout, then the signature (so nothing unsigned
    is parsed), then the header, then the parent (skipped for client messages, whose parent
    the gate never reads). Raises Dropped; returns only for a message that verifies.
    """
    msg = split(frames, max_frames)
    if not signer.verify(msg.signature, msg.parts):
        raise Dropped("bad_signature")
    header = parse_header(msg.parts[0], max_header_bytes)
    parent = parse_parent(msg.parts[1], max_header_bytes) if with_parent else {}
    return Checked(msg.idents, msg.parts, msg.buffers, header, parent)
