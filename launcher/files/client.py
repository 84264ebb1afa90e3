"""The client side of a kernel's files: upload to its inbox, list and fetch its outbox.

Who calls it: :class:`cellblock.sandbox.Sandbox` (``upload``, ``files``, ``download``), the
MCP tools (:mod:`cellblock.files.mcp`), the REST handlers (:mod:`cellblock.rest.files`) and
the CLI (``cellblock upload|files|download``). Each call finds the kernel's run dir by its
id (``warden.json``; a kernel adopted from the warm pool keeps the run dir it started in)
and asks its warden on ``files.sock`` (:mod:`cellblock.files.wire`). Blocking; async
callers run it in a thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..errors import FileRefused, PolicyError
from ..names import check_kernel_id
from .inbox import check_name
from .wire import FILES_SOCKET, read_body, read_json_line, send_json

__all__ = ["DownloadedFile", "check_name", "download", "inbox", "outbox", "run_dir_of",
           "upload"]

TIMEOUT = 60.0
CHUNK = 1 << 16


@dataclass(frozen=True)
class DownloadedFile:
    """An outbox file as the warden sent it: text already redacted, images as bytes."""

    name: str
    data: bytes
    kind: str  #: "text" or "image"
    mime: str
    sha256: str  #: of ``data``
    redactions: list[str] = field(default_factory=list)  #: rules that redacted something

    @property
    def text(self) -> str:
        if self.kind != "text":
            raise ValueError(f"{self.name!r} is {self.mime}, not text")
        return self.data.decode("utf-8")


def run_dir_of(kernel_id: str, base: Path | None = None) -> Path:
    """The run dir of the running kernel ``kernel_id`` (exactly; FileRefused if none)."""
    from ..grants import find_kernel
    from ..rundir import RunDir

    check_kernel_id(kernel_id)
    try:
        run = find_kernel(kernel_id, base)
    except PolicyError:
        run = None
    record = RunDir(run.parent, run.name).read_record() if run is not None else None
    if run is None or record is None or record.kernel_id != kernel_id:
        raise FileRefused(f"no running cellblock kernel {kernel_id!r} here", "not_found")
    return run


@contextlib.contextmanager
def _ask(kernel_id: str, request: dict[str, Any]) -> Iterator[tuple[socket.socket, bytearray]]:
    path = run_dir_of(kernel_id) / FILES_SOCKET
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(TIMEOUT)
        try:
            sock.connect(str(path))
            send_json(sock, request)
        except OSError as exc:
            raise FileRefused(f"kernel {kernel_id}: its warden does not answer file "
                              f"requests ({exc.strerror or exc})", "not_running") from None
        yield sock, bytearray()
    finally:
        sock.close()


def _reply(kernel_id: str, sock: socket.socket, pending: bytearray) -> dict[str, Any]:
    try:
        reply = read_json_line(sock, pending)
    except (OSError, ValueError) as exc:
        raise FileRefused(f"kernel {kernel_id}: no answer from its warden ({exc})",
                          "not_running") from None
    if not reply.get("ok"):
        raise FileRefused(f"kernel {kernel_id}: {reply.get('message')}",
                          str(reply.get("code", "refused")))
    return reply


def upload(kernel_id: str, name: str, source: bytes | str | os.PathLike[str] | IO[bytes]
           ) -> dict[str, Any]:
    """Put ``source`` (bytes, a path, or a binary file object with a size) into the
    kernel's inbox as ``name``; return ``{"name", "size", "sha256"}``."""
    check_name(name)
    with contextlib.ExitStack() as stack:
        if isinstance(source, bytes | bytearray | memoryview):
            data = bytes(source)
            size, chunks = len(data), iter([data[i:i + CHUNK]
                                            for i in range(0, len(data), CHUNK)] or [b""])
        else:
            f = (stack.enter_context(open(source, "rb"))
                 if isinstance(source, str | os.PathLike) else source)
            start = f.tell()
            size = f.seek(0, os.SEEK_END) - start
            f.seek(start)
            chunks = iter(lambda: f.read(CHUNK), b"")
        with _ask(kernel_id, {"op": "upload", "name": name, "size": size}) as (sock, pending):
            _reply(kernel_id, sock, pending)  # the caps allow it: send
            digest = hashlib.sha256()
            sent = 0
            try:
                for chunk in chunks:
                    if sent + len(chunk) > size:
                        raise FileRefused(f"{name!r} grew while it was uploaded", "incomplete")
                    digest.update(chunk)
                    sock.sendall(chunk)
                    sent += len(chunk)
            except OSError:
                pass  # the warden stopped reading: its reply says why
            reply = _reply(kernel_id, sock, pending)
    if reply.get("sha256") != digest.hexdigest():
        raise FileRefused(f"upload {name!r}: the warden stored other bytes than were sent",
                          "incomplete")
    return {k: reply[k] for k in ("name", "size", "sha256")}


def inbox(kernel_id: str) -> list[dict[str, Any]]:
    """The kernel's inbox: ``[{"name", "size"}]``."""
    with _ask(kernel_id, {"op": "inbox"}) as (sock, pending):
        return list(_reply(kernel_id, sock, pending)["files"])


def outbox(kernel_id: str) -> dict[str, Any]:
    """The kernel's outbox: ``{"files": [{"name", "size", "kind"}], "hidden": N}``; ``kind``
    is ``file`` for what :func:`download` may fetch, else what the entry is (``symlink``,
    ``fifo``...); ``hidden`` counts entries whose names are not shown."""
    with _ask(kernel_id, {"op": "outbox"}) as (sock, pending):
        reply = _reply(kernel_id, sock, pending)
    return {"files": reply["files"], "hidden": reply["hidden"]}


def download(kernel_id: str, name: str) -> DownloadedFile:
    """Fetch the outbox file ``name`` (FileRefused says why not)."""
    check_name(name)
    with _ask(kernel_id, {"op": "download", "name": name}) as (sock, pending):
        reply = _reply(kernel_id, sock, pending)
        size = int(reply["size"])
        try:
            data = b"".join(read_body(sock, pending, size, 1 << 20))
        except OSError as exc:
            raise FileRefused(f"kernel {kernel_id}: {name!r} arrived cut short ({exc})",
                              "incomplete") from None
    if hashlib.sha256(data).hexdigest() != reply["sha256"]:
        raise FileRefused(f"kernel {kernel_id}: {name!r} arrived damaged", "incomplete")
    return DownloadedFile(name=name, data=data, kind=str(reply["kind"]),
                          mime=str(reply["mime"]), sha256=str(reply["sha256"]),
                          redactions=list(reply.get("redactions", [])))
