"""The rest of a cut output: what the stream budget cuts, kept redacted on the host's disk.

Who calls what: the warden makes one :class:`Spool` per kernel in ``<run dir>/output/``
(mode 0700, the warden's; never mounted in the jail) and hands it to the output filter,
whose per-cell stream state (:mod:`.streams`) opens one :class:`StreamKeeper` per stream
of a cell that has an execution number (the gate's own count of execute_requests, never
the kernel's ``execution_count``). Readers on the host (:mod:`cellblock.output_pages`)
read the files by number; nothing here is ever steered by a path or a name the kernel chose.

What is kept, per cell and stream, is the stream as the client would have seen it with no
budget: the head exactly as it was sent, then everything after it redacted with the same
stream semantics (one carry-over window that continues from the head's, the same values
redacted wherever they come back, a continuation of a masked partial token masked), so a
secret split across the head/cut boundary, or across any two messages, is caught in both.
Byte offsets in the file are offsets in that text (UTF-8): the cut marker names the offset
where the head ended.

Bounds (the kernel controls how much it prints, never how much the host keeps):

- ``cap`` bytes on disk per kernel (``output.spool_bytes``). Reaching it, the oldest other
  cells' files are dropped first (their metadata says so); a single cell larger than the cap
  keeps its first ``cap`` bytes and counts the rest as dropped, unscanned.
- Text past the head is redacted in pieces of at most ``CHUNK`` characters, and raw text
  waits in memory for at most ``BATCH`` characters before it is redacted and written, so a
  flood costs the warden a bounded buffer, one linear scan of what is kept, and nothing for
  what is dropped.
- Everything is removed with the run dir, when the kernel goes.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

from ..output_pages import STREAMS, data_name, meta_name

__all__ = ["BATCH", "CHUNK", "Spool", "StreamKeeper", "kept_hint"]

CHUNK = 1 << 20  # characters redacted at once
BATCH = 1 << 16  # raw characters held before they are redacted and written
MAX_FORGOTTEN = 4096  # dropped cells remembered (to say why they are gone)


def _utf8_prefix(raw: bytes, n: int) -> bytes:
    """The longest prefix of ``raw`` of at most ``n`` bytes that ends on a character."""
    if n >= len(raw):
        return raw
    while n > 0 and (raw[n] & 0xC0) == 0x80:
        n -= 1
    return raw[:n]


def _size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


class Spool:
    """One kernel's kept stream text (see the module docstring). Gate thread only."""

    def __init__(self, directory: Path, cap: int) -> None:
        self.dir = directory
        self.cap = cap
        self.used = 0
        self.files: OrderedDict[tuple[int, str], int] = OrderedDict()  # bytes, oldest first
        self.dropped: dict[str, int] = {}  # data name -> bytes dropped by an eviction
        self._made = False

    def keeper(self, execution: int, stream: str, redactor: Any,
               known: dict[str, None]) -> StreamKeeper | None:
        if self.cap <= 0 or stream not in STREAMS:
            return None
        return StreamKeeper(self, execution, stream, redactor, known)

    def _open(self, execution: int, stream: str, new: bool) -> int:
        """The data file, for appending (made empty when ``new``). Opened per write, so a
        cell that is never flushed holds no descriptor."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        if new:
            if not self._made:
                self.dir.mkdir(mode=0o700, exist_ok=True)
                self._made = True
            flags |= os.O_CREAT | os.O_TRUNC
            self.files[(execution, stream)] = 0
        return os.open(self.dir / data_name(execution, stream), flags, 0o600)

    def room(self, key: tuple[int, str], want: int) -> int:
        """How many of ``want`` more bytes ``key``'s file may take: older cells' files are
        dropped first to make room; never more than the cap in all."""
        while self.used + want > self.cap:
            victim = next((k for k in self.files if k[0] != key[0]), None)
            if victim is None:
                break
            self._evict(victim, key[0])
        allowed = max(0, min(want, self.cap - self.used))
        self.used += allowed
        self.files[key] = self.files.get(key, 0) + allowed
        return allowed

    def _evict(self, victim: tuple[int, str], by: int) -> None:
        size = self.files.pop(victim)
        self.used -= size
        name = data_name(*victim)
        with contextlib.suppress(OSError):
            os.unlink(self.dir / name)
        self.dropped[name] = size
        while len(self.dropped) > MAX_FORGOTTEN:
            del self.dropped[next(iter(self.dropped))]
        self._write_meta(victim[0], victim[1], {"evicted_by": by, "bytes": size,
                                                "cap": self.cap})

    def forget(self, execution: int, stream: str) -> None:
        """A cell whose stream was never cut: its file is of no use."""
        size = self.files.pop((execution, stream), None)
        if size is not None:
            self.used -= size
            with contextlib.suppress(OSError):
                os.unlink(self.dir / data_name(execution, stream))

    def _write_meta(self, execution: int, stream: str, meta: dict[str, Any]) -> None:
        """Written whole, then renamed: a reader sees the old metadata or the new."""
        final = self.dir / meta_name(execution, stream)
        tmp = final.with_name(final.name + ".tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        with contextlib.suppress(OSError):
            fd = os.open(tmp, flags, 0o600)
            try:
                os.write(fd, json.dumps({"execution": execution, "stream": stream,
                                         **meta}).encode())
            finally:
                os.close(fd)
            os.replace(tmp, final)


class StreamKeeper:
    """One stream of one cell, as kept on disk (see the module docstring)."""

    def __init__(self, spool: Spool, execution: int, stream: str, redactor: Any,
                 known: dict[str, None]) -> None:
        self.spool = spool
        self.execution = execution
        self.stream = stream
        self.redactor = redactor
        self.known = known
        self.head_bytes = 0  # where the head ends: the offset the marker names
        self.kept = 0  # bytes on disk
        self.dropped = 0  # bytes not kept: the cap was reached (counted raw, unscanned)
        self._created = False
        self._head: list[str] = []
        self._raw: list[str] = []
        self._raw_len = 0
        self._pending = ""  # redaction carry-over of the part past the head
        self._full = False
        self._failed = False

    # -- fed by CellStreams --------------------------------------------------------

    def head(self, text: str) -> None:
        """Text the head released to the client (redacted already): kept as it was sent,
        written only once the stream passes the head (at most ``stream_head`` bytes wait in
        memory; a cell that is never cut writes nothing)."""
        if text:
            self.head_bytes += _size(text)
            self._head.append(text)

    def rest(self, text: str) -> None:
        """Raw text past the head, in stream order."""
        if not text:
            return
        if self._head:
            head, self._head = "".join(self._head), []
            self._write(head)
        if self._full or self._failed:
            self.dropped += _size(text)
            return
        self._raw.append(text)
        self._raw_len += len(text)
        if self._raw_len >= BATCH:
            self._redact_raw(final=False)

    def finish(self, cut: bool) -> None:
        """The cell's end: the carried-over text, then the metadata (or nothing if nothing
        was cut)."""
        if not cut:
            self._head.clear()
            self.spool.forget(self.execution, self.stream)
            return
        if self._head:  # never reached: a cut stream has had text past its head
            self._write("".join(self._head))
            self._head.clear()
        self._redact_raw(final=True)
        self.spool._write_meta(self.execution, self.stream, {
            "bytes": self.kept, "head_bytes": self.head_bytes, "dropped_bytes": self.dropped,
            "cap": self.spool.cap, "complete": True})

    # -- internals -----------------------------------------------------------------

    def _redact_raw(self, final: bool) -> None:
        text = "".join(self._raw)
        self._raw.clear()
        self._raw_len = 0
        start = 0
        while start < len(text) and not self._full:
            end = min(len(text), start + CHUNK)
            if end < len(text):  # cut at a line end where there is one
                line = text.rfind("\n", start, end)
                end = line + 1 if line > start else end
            self._release(text[start:end])
            start = end
        if start < len(text):
            self.dropped += _size(text[start:])
        if final and self._pending and self._full:
            self.dropped += _size(self._pending)
        elif final and self._pending:
            out = self._pending if self.redactor is None else \
                str(self.redactor.redact(self._pending, self.known).text)
            self._pending = ""
            self._write(out)

    def _release(self, piece: str) -> None:
        if self.redactor is None:
            self._write(piece)
            return
        result, self._pending = self.redactor.release(piece, self._pending, self.known)
        self.known.update(dict.fromkeys(result.secrets))
        self._write(str(result.text))

    def _write(self, text: str) -> None:
        if not text or self._failed:
            return
        raw = text.encode("utf-8", "surrogatepass")
        if self._full:
            self.dropped += len(raw)
            return
        fd = -1
        try:
            fd = self.spool._open(self.execution, self.stream, not self._created)
            self._created = True
            allowed = self.spool.room((self.execution, self.stream), len(raw))
            if allowed < len(raw):
                part = _utf8_prefix(raw, allowed)
                self.spool.used -= allowed - len(part)  # the split character is not kept
                self.spool.files[(self.execution, self.stream)] -= allowed - len(part)
                self._full = True
                self.dropped += len(raw) - len(part)
                raw = part
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view):]
            self.kept += len(raw)
        except OSError:
            self._failed = True  # a full disk: what is not written is counted as dropped
            self.dropped += len(raw)
        finally:
            if fd >= 0:
                os.close(fd)


def kept_hint(keeper: StreamKeeper | None) -> str:
    """What a cut marker adds about the kept text: how to read it, and what was not kept."""
    if keeper is None or (keeper.kept <= keeper.head_bytes and not keeper.dropped):
        return ""
    where = "" if keeper.stream == "stdout" else f', stream="{keeper.stream}"'
    hint = f"; the rest is kept: read_output(execution={keeper.execution}{where}, " \
           f"offset={keeper.head_bytes})"
    if keeper.dropped:
        why = "the host could not write it" if keeper._failed else \
            f"the kernel's output spool of {keeper.spool.cap:,} bytes is full"
        hint += (f"; only up to byte {keeper.kept:,}: {keeper.dropped:,} bytes after it were "
                 f"not kept ({why})")
    return hint
