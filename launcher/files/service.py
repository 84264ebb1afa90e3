"""The warden's file service: answers clients on ``<run dir>/files.sock``.

Who calls it: the warden (:meth:`cellblock.warden.budgeting.Bookkeeping._serve_files`)
starts one when its kernel is ready (a cold launch, or a pooled kernel once adopted: the
inbox and outbox exist from the jail's start, the socket only once a client owns the
kernel) and closes it with the kernel. Clients reach it through
:mod:`cellblock.files.client`.

Why the warden and not the client reads the outbox: only the warden can name the jail for
sure (nsjail is its unreaped child, and it holds nsjail's pidfd), it runs as the user who
can read the jail's files (root's jail uid is another uid), and it holds the profile and
the redaction rules the gate uses. A client only ever gets bytes the warden chose to send.

What it sends: a text file (by suffix, ``files.text_suffixes``) must be UTF-8 and, with
``files.redact_text``, passes the profile's redaction (``[profiles.NAME.output]``: secrets,
PII, exact values) as the gate's output does; an image (``files.image_suffixes``) is sent
as bytes when its first bytes are the format's magic number, never decoded; any other file
is refused. Names that hold a finding of the redactor are neither listed nor served. Every
upload and download, and every refusal, is an audit event with names, sizes and sha256s,
never contents.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import select
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import CellblockError, FileRefused
from ..policy import Profile
from .inbox import Inbox, check_name
from .outbox import jail_outbox, list_outbox, read_outbox
from .wire import FILES_SOCKET, read_body, read_json_line, send_json

__all__ = ["IMAGE_MAGIC", "FileService", "classify"]

log = logging.getLogger("cellblock.files")
Audit = Callable[..., Any]
#: what the current jail is: nsjail's pid and a new pidfd of it (closed by the caller)
JailLookup = Callable[[], "tuple[int, int] | None"]
MAX_CLIENTS = 4  # connections served at once; more wait in the listen backlog
CLIENT_TIMEOUT = 60.0  # seconds a client may take between two reads or writes
IMAGE_MAGIC = {
    ".png": ("image/png", (b"\x89PNG\r\n\x1a\n",)),
    ".jpg": ("image/jpeg", (b"\xff\xd8\xff",)),
    ".jpeg": ("image/jpeg", (b"\xff\xd8\xff",)),
    ".gif": ("image/gif", (b"GIF87a", b"GIF89a")),
    ".webp": ("image/webp", (b"RIFF",)),
}
TEXT_MIME = {".csv": "text/csv", ".tsv": "text/tab-separated-values",
             ".json": "application/json", ".md": "text/markdown", ".html": "text/html",
             ".svg": "image/svg+xml", ".py": "text/x-python"}


def _suffix(name: str) -> str:
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 else ""


def classify(profile: Profile, redactor: Any, name: str, data: bytes
             ) -> tuple[dict[str, Any], bytes]:
    """What may leave for the outbox file ``name`` holding ``data``: (its description, the
    bytes to send). FileRefused (``type``, ``not_text``) when nothing may."""
    files = profile.files
    suffix = _suffix(name)
    if suffix in files.text_suffixes:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FileRefused(f"{name!r} is not UTF-8 text (byte {exc.start}); a "
                              f"{suffix} file leaves as text only", "not_text") from None
        rules: list[str] = []
        if files.redact_text and redactor is not None:
            result = redactor.redact(text)
            if result.findings:
                rules = sorted({f.rule for f in result.findings})
                data = str(result.text).encode("utf-8")
        return {"kind": "text", "mime": TEXT_MIME.get(suffix, "text/plain"),
                "redactions": rules}, data
    if suffix in files.image_suffixes:
        mime, magics = IMAGE_MAGIC[suffix]
        if not any(data.startswith(m) for m in magics) or (
                suffix == ".webp" and data[8:12] != b"WEBP"):
            raise FileRefused(f"{name!r} does not start like a {mime} file; it was not sent",
                              "type")
        return {"kind": "image", "mime": mime, "redactions": []}, data
    allowed = ", ".join((*files.text_suffixes, *files.image_suffixes)) or "none"
    raise FileRefused(f"{name!r}: this profile lets out only files named *{{{allowed}}} "
                      "(files.text_suffixes, files.image_suffixes)", "type")


class FileService:
    """The file socket of one kernel (see the module docstring). :meth:`close` is
    idempotent."""

    def __init__(self, run_path: Path, profile: Profile, redactor: Any, audit: Audit,
                 jail: JailLookup) -> None:
        self.profile = profile
        self.redactor = redactor
        self.audit = audit
        self.jail = jail
        self.path = run_path / FILES_SOCKET
        self.inbox = Inbox(run_path, profile.files) if profile.files.inbox else None
        self._slots = threading.Semaphore(MAX_CLIENTS)
        self._wake_r, self._wake_w = os.pipe()
        self._listen = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self._listen.bind(str(self.path))  # 0600: the warden's uid only
        finally:
            os.umask(old)
        self._listen.listen(16)
        self._thread = threading.Thread(target=self._serve, name="cellblock-files",
                                        daemon=True)
        self._closed = False
        self._thread.start()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self._thread.join(5)
        self._listen.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            self.path.unlink()
        # the inbox's descriptors are closed only once no client uses them (a number reused
        # by another open must never be written to); else the process's exit closes them
        held = [self._slots.acquire(timeout=CLIENT_TIMEOUT / 12) for _ in range(MAX_CLIENTS)]
        if self.inbox is not None and all(held):
            self.inbox.close()

    def _serve(self) -> None:
        while True:
            ready, _, _ = select.select([self._listen, self._wake_r], [], [])
            if self._wake_r in ready:
                return
            try:
                conn, _ = self._listen.accept()
            except OSError:
                continue
            self._slots.acquire()
            threading.Thread(target=self._client, args=(conn,), name="cellblock-files-client",
                             daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(CLIENT_TIMEOUT)
                pending = bytearray()
                try:
                    req = read_json_line(conn, pending)
                    reply, body = self._handle(req, conn, pending)
                except CellblockError as exc:
                    code = exc.code if isinstance(exc, FileRefused) else "refused"
                    reply, body = {"ok": False, "code": code, "message": str(exc)}, b""
                except (OSError, ValueError) as exc:
                    reply, body = {"ok": False, "code": "bad_request",
                                   "message": f"bad request: {exc}"}, b""
                except Exception as exc:  # a bug must fail this request, with an answer
                    log.exception("files: request failed")
                    reply, body = {"ok": False, "code": "internal",
                                   "message": f"the warden failed this request "
                                              f"({type(exc).__name__}); see its log"}, b""
                with contextlib.suppress(OSError):
                    send_json(conn, reply)
                    if body:
                        conn.sendall(body)
        finally:
            self._slots.release()

    def _handle(self, req: dict[str, Any], conn: socket.socket, pending: bytearray
                ) -> tuple[dict[str, Any], bytes]:
        op = req.get("op")
        files = self.profile.files
        if op in ("upload", "inbox") and self.inbox is None:
            raise FileRefused("this kernel's profile has no inbox (files.inbox = false)",
                              "disabled")
        if op in ("outbox", "download") and not files.outbox:
            raise FileRefused("this kernel's profile has no outbox (files.outbox = false)",
                              "disabled")
        if op == "upload":
            assert self.inbox is not None
            name = req.get("name")
            size = req.get("size")
            if not isinstance(size, int) or isinstance(size, bool):
                raise FileRefused("an upload needs its size in bytes", "bad_request")
            try:
                sha = self.inbox.receive(check_name(name), size, read_body(conn, pending, size),
                                         lambda: send_json(conn, {"ok": True, "send": size}))
            except FileRefused as exc:
                self.audit("files.refused", op="upload", name=self._shown(name), size=size,
                           code=exc.code)
                raise
            self.audit("files.upload", name=name, size=size, sha256=sha)
            return {"ok": True, "name": name, "size": size, "sha256": sha}, b""
        if op == "inbox":
            assert self.inbox is not None
            return {"ok": True, "files": [{"name": n, "size": s}
                                          for n, s in self.inbox.files()]}, b""
        if op == "outbox":
            with self._outbox() as fd:
                entries, hidden = list_outbox(fd)
            shown = [e for e in entries if self._shown(e.name) == e.name]
            return {"ok": True, "hidden": hidden + len(entries) - len(shown),
                    "files": [{"name": e.name, "size": e.size, "kind": e.kind}
                              for e in shown]}, b""
        if op == "download":
            return self._download(req.get("name"))
        raise FileRefused(f"unknown request {op!r}; one of upload, inbox, outbox, download",
                          "bad_request")

    def _download(self, name: object) -> tuple[dict[str, Any], bytes]:
        try:
            name = check_name(name)
            if self._shown(name) != name:
                raise FileRefused("that file name holds what the redaction rules hide; it "
                                  "is not served", "refused")
            with self._outbox() as fd:
                data = read_outbox(fd, name, self.profile.files.max_download)
            read_sha = hashlib.sha256(data).hexdigest()
            info, body = classify(self.profile, self.redactor, name, data)
        except FileRefused as exc:
            self.audit("files.refused", op="download", name=self._shown(name), code=exc.code)
            raise
        sha = hashlib.sha256(body).hexdigest()
        self.audit("files.download", name=name, size=len(body), sha256=sha,
                   read_size=len(data), read_sha256=read_sha, kind=info["kind"],
                   redactions=info["redactions"])
        return {"ok": True, "name": name, "size": len(body), "sha256": sha, "body": True,
                **info}, body

    def _shown(self, name: object) -> str | None:
        """``name`` if it may appear in a listing or the audit log, else None."""
        if not isinstance(name, str):
            return None
        try:
            check_name(name)
        except FileRefused:
            return None
        if self.redactor is not None and self.redactor.redact(name).findings:
            return None
        return name

    @contextlib.contextmanager
    def _outbox(self) -> Any:
        found = self.jail()
        if found is None:
            raise FileRefused("the kernel's jail is not running", "not_running")
        pid, pidfd = found
        try:
            fd = jail_outbox(pid, pidfd)
        finally:
            os.close(pidfd)
        try:
            yield fd
        finally:
            os.close(fd)
