"""Datasets inside the jail: ask the broker for what this kernel was granted.

    from cellblock_kernel import datasets
    datasets.list()                      # granted names, descriptions, where mounted
    pd.read_csv(datasets.open("sales"))  # a read-only binary file object
    datasets.path("weather")             # /data/weather, a read-only directory
    datasets.open("weather", "2024/jan.csv")  # one file of a directory dataset

The broker runs on the host, in this kernel's warden, and listens on a unix socket
whose directory is bind-mounted read-only at :data:`BROKER_DIR`. The socket is the
capability: one per kernel, grants kept on the host, the peer identified by
SO_PEERCRED. Requests name a dataset (a grant), never a host path; the broker
opens the file read-only on the host and passes the descriptor back (SCM_RIGHTS).

This module is also where the broker's wire format is defined, once; the host
side (``cellblock.broker``) imports the constants and codecs from here. It uses
the standard library only. Nothing here is a security control: the kernel is
hostile, and every check that matters is repeated by the broker.

Wire format, one request per connection over SOCK_STREAM::

    frame   = length (4 bytes, big-endian, <= MAX_REQUEST_BYTES or MAX_REPLY_BYTES)
              + UTF-8 JSON object
    request = {"v": 1, "op": "list"}
            | {"v": 1, "op": "open", "dataset": NAME}
            | {"v": 1, "op": "open", "dataset": NAME, "member": "dir/file.csv"}
    reply   = {"v": 1, "ok": true, ...}     an "open" reply carries one fd
            | {"v": 1, "ok": false, "error": CODE, "message": TEXT, ["granted": [...]]}

Unknown keys, duplicate keys, wrong types, non-ASCII or non-normalised names and
oversized frames are refused before any file system call.
"""

from __future__ import annotations

import array
import builtins
import io
import json
import os
import re
import socket
import stat
import struct
from typing import Any, NamedTuple

__all__ = [
    "BROKER_DIR",
    "BROKER_SOCKET",
    "DATA_ROOT",
    "DatasetError",
    "DatasetInfo",
    "WireError",
    "decode_frame_length",
    "encode_frame",
    "list",
    "load_object",
    "open",
    "parse_reply",
    "parse_request",
    "path",
]

PROTOCOL_VERSION = 1
BROKER_DIR = "/run/cellblock-broker"  # in the jail; the host binds the run dir's broker/ here
BROKER_SOCKET_NAME = "broker.sock"
BROKER_SOCKET = f"{BROKER_DIR}/{BROKER_SOCKET_NAME}"
DATA_ROOT = "/data"  # directory datasets are mounted read-only at /data/<name>
HEADER = struct.Struct(">I")
MAX_REQUEST_BYTES = 1024  # a request is a name and a short relative path
MAX_REPLY_BYTES = 64 * 1024
MAX_MEMBER_BYTES = 255
MAX_MEMBER_DEPTH = 16
CLIENT_TIMEOUT = 30.0  # seconds the kernel waits for the broker

NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,39}")  # the policy's dataset names
_COMPONENT_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_FIELDS = {"list": {"v", "op"}, "open": {"v", "op", "dataset", "member"}}
_REQUIRED = {"list": {"v", "op"}, "open": {"v", "op", "dataset"}}

# error codes a reply may carry
NOT_GRANTED = "not_granted"
UNAVAILABLE = "unavailable"
MALFORMED = "malformed"
TOO_LARGE = "too_large"
RATE_LIMITED = "rate_limited"
BUSY = "busy"
PEER = "peer"


class WireError(ValueError):
    """A frame or request that breaks the wire format. ``code`` goes in the reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class DatasetError(OSError):
    """A dataset could not be listed or opened; the message says why, for a person."""


class DatasetInfo(NamedTuple):
    """One granted dataset, as :func:`list` returns it."""

    name: str
    description: str
    kind: str  # "file" or "directory"
    path: str | None  # where a directory dataset is mounted, else None


# -- codecs (shared with the host) ------------------------------------------------------

def encode_frame(obj: dict[str, Any], limit: int = MAX_REPLY_BYTES) -> bytes:
    """``obj`` as one frame; ValueError if it would exceed ``limit`` bytes of JSON."""
    body = json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    if len(body) > limit:
        raise ValueError(f"frame of {len(body)} bytes exceeds {limit}")
    return HEADER.pack(len(body)) + body


def decode_frame_length(header: bytes, limit: int) -> int:
    """The body length a 4-byte header announces; WireError when over ``limit`` or 0."""
    length: int
    (length,) = HEADER.unpack(header)
    if length == 0 or length > limit:
        raise WireError(TOO_LARGE, f"a frame must hold 1 to {limit} bytes, not {length}")
    return length


def _no_duplicates(pairs: builtins.list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise WireError(MALFORMED, f"duplicate key {key!r}")
        out[key] = value
    return out


def _refuse_constant(name: str) -> Any:
    raise WireError(MALFORMED, f"{name} is not valid JSON")


def load_object(body: bytes) -> dict[str, Any]:
    try:
        text = body.decode("ascii")
        obj = json.loads(text, object_pairs_hook=_no_duplicates,
                         parse_constant=_refuse_constant)
    except WireError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise WireError(MALFORMED, "the body is not an ASCII JSON object") from None
    if not isinstance(obj, dict):
        raise WireError(MALFORMED, "the body is not a JSON object")
    return obj


def check_name(name: object) -> str:
    """A dataset name as the policy spells them; WireError otherwise."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise WireError(MALFORMED, "a dataset name is 1-40 of a-z, 0-9, '_', '-', "
                                   "starting with a letter")
    return name


def check_member(member: object) -> str:
    """A relative path inside a directory dataset: ASCII components of letters, digits,
    '.', '_', '-' (not starting with '.' or '-'), joined by single '/'; WireError otherwise.
    ASCII-only makes NFC/NFD and homoglyph variants impossible by construction."""
    if not isinstance(member, str) or not member or len(member) > MAX_MEMBER_BYTES:
        raise WireError(MALFORMED, f"a file name is 1-{MAX_MEMBER_BYTES} characters")
    parts = member.split("/")
    if len(parts) > MAX_MEMBER_DEPTH or not all(_COMPONENT_RE.fullmatch(p) for p in parts):
        raise WireError(MALFORMED, "a file name is a relative path of letters, digits, "
                                   "'.', '_' and '-', without '..' or a leading '/'")
    return member


def parse_request(body: bytes) -> dict[str, Any]:
    """Validate one request body (the broker calls this on untrusted bytes)."""
    req = load_object(body)
    if req.get("v") != PROTOCOL_VERSION or type(req.get("v")) is not int:
        raise WireError(MALFORMED, f"'v' must be {PROTOCOL_VERSION}")
    op = req.get("op")
    if not isinstance(op, str) or op not in _FIELDS:
        raise WireError(MALFORMED, f"'op' must be one of: {', '.join(sorted(_FIELDS))}")
    unknown = set(req) - _FIELDS[op]
    if unknown:
        raise WireError(MALFORMED, f"unknown field(s): {', '.join(sorted(unknown))}")
    missing = _REQUIRED[op] - set(req)
    if missing:
        raise WireError(MALFORMED, f"missing field(s): {', '.join(sorted(missing))}")
    if op == "open":
        check_name(req["dataset"])
        if "member" in req:
            check_member(req["member"])
    return req


def parse_reply(body: bytes) -> dict[str, Any]:
    """Decode one reply body (the kernel calls this on the broker's bytes)."""
    reply = load_object(body)
    if not isinstance(reply.get("ok"), bool):
        raise WireError(MALFORMED, "a reply needs 'ok'")
    return reply


# -- the client (runs in the kernel) ----------------------------------------------------

def _recv_exact(sock: socket.socket, n: int, fds: builtins.list[int]) -> bytes:
    buf = bytearray()
    space = socket.CMSG_SPACE(4 * 4)  # room for a few fds: extras are closed, never kept
    while len(buf) < n:
        data, ancdata, _flags, _ = sock.recvmsg(n - len(buf), space,
                                               getattr(socket, "MSG_CMSG_CLOEXEC", 0))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
                fds.extend(got)
        if not data:
            raise DatasetError("the dataset broker closed the connection without an answer")
        buf += data
    return bytes(buf)


def _call(request: dict[str, Any]) -> tuple[dict[str, Any], builtins.list[int]]:
    fds: builtins.list[int] = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(CLIENT_TIMEOUT)
            sock.connect(BROKER_SOCKET)
            sock.sendall(encode_frame(request, MAX_REQUEST_BYTES))
            length = decode_frame_length(_recv_exact(sock, HEADER.size, fds), MAX_REPLY_BYTES)
            reply = parse_reply(_recv_exact(sock, length, fds))
    except FileNotFoundError:
        _close_all(fds)
        raise DatasetError("no dataset broker in this kernel (was it started by cellblock "
                           "with datasets enabled?)") from None
    except WireError as exc:
        _close_all(fds)
        raise DatasetError(f"the dataset broker sent a bad reply: {exc}") from None
    except OSError as exc:
        _close_all(fds)
        if isinstance(exc, DatasetError):
            raise
        raise DatasetError(f"cannot reach the dataset broker: {exc.strerror or exc}") from None
    return reply, fds


def _close_all(fds: builtins.list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _failure(reply: dict[str, Any], name: str | None) -> DatasetError:
    if reply.get("error") == NOT_GRANTED:
        granted = reply.get("granted")
        names = ", ".join(str(g) for g in granted) if isinstance(granted, builtins.list) else ""
        return DatasetError(f"dataset {name!r} is not granted to this kernel; "
                            f"granted: {names or 'none'}")
    return DatasetError(str(reply.get("message") or "the dataset broker refused"))


def list() -> builtins.list[DatasetInfo]:
    """The datasets granted to this kernel now, with descriptions and mount points."""
    reply, fds = _call({"v": PROTOCOL_VERSION, "op": "list"})
    _close_all(fds)
    if not reply["ok"]:
        raise _failure(reply, None)
    out = []
    for item in reply.get("datasets") or []:
        if isinstance(item, dict):
            out.append(DatasetInfo(str(item.get("name")), str(item.get("description", "")),
                                   str(item.get("kind")), item.get("path")))
    return out


def open(name: str, member: str | None = None) -> io.BufferedReader:
    """A read-only binary file object for dataset ``name`` (a file dataset), or for the
    file ``member`` (a relative path) of directory dataset ``name``. Close it when done;
    ``with datasets.open("sales") as f:`` does."""
    request: dict[str, Any] = {"v": PROTOCOL_VERSION, "op": "open", "dataset": name}
    if member is not None:
        request["member"] = member
    try:
        check_name(name)
        if member is not None:
            check_member(member)
    except WireError as exc:
        raise DatasetError(f"{exc}; got {name!r}" if member is None else
                           f"{exc}; got {member!r}") from None
    reply, fds = _call(request)
    if not reply["ok"]:
        _close_all(fds)
        raise _failure(reply, name)
    if len(fds) != 1:
        _close_all(fds)
        raise DatasetError("the dataset broker answered without a file")
    fd = fds[0]
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        _close_all(fds)
        raise DatasetError("the dataset broker passed something that is not a file")
    raw = io.FileIO(fd, "rb", closefd=True)
    return io.BufferedReader(raw)


def path(name: str) -> str:
    """Where directory dataset ``name`` is mounted (read-only), e.g. ``/data/weather``."""
    granted = list()
    for info in granted:
        if info.name == name:
            if info.path:
                return info.path
            if info.kind == "file":
                raise DatasetError(f"dataset {name!r} is a file, not a mounted directory; "
                                   f"read it with datasets.open({name!r})")
            raise DatasetError(f"dataset {name!r} was granted after the kernel started, so "
                               f"it is not mounted; read its files with "
                               f"datasets.open({name!r}, 'relative/path')")
    names = ", ".join(i.name for i in granted)
    raise DatasetError(f"dataset {name!r} is not granted to this kernel; "
                       f"granted: {names or 'none'}")
