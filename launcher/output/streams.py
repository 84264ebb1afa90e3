"""Stream output of one cell: a head and tail budget, and the redaction carry-over.

A cell's stream text (stdout and stderr together) is released up to ``head``
bytes. After that, text is only counted and kept in a bounded tail buffer,
without being scanned: a cell that floods megabytes costs the gate a byte count
and a slice, not a scan. When the cell ends (the gate is about to release its
``idle``), :meth:`CellStreams.flush` returns what is left: the carried-over text,
a marker saying how much was cut, and the redacted tail.

Redaction needs a carry-over window: a secret printed in two halves (or one
character per message) must not leave the gate as two harmless halves. Each
stream keeps back the last ``redactor.max_match_len`` characters that could
still be the start of a match, and releases them with the next message or at
flush, once the whole candidate has been seen.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from ..redact.partial import MARKER, continuation, partial_start
from .spool import Spool, StreamKeeper, kept_hint
from .text import marker

__all__ = ["CellStreams"]


class _Tail:
    """The last ``size`` characters of a stream, plus counts of everything that passed."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.parts: deque[str] = deque()
        self.chars = 0
        self.total_bytes = 0
        self.total_lines = 0

    def add(self, text: str, start: int = 0) -> None:
        """Add ``text[start:]`` (a huge message's overflow is passed with its offset, not
        copied: a 48 MB slice cost 28 ms of a 50 MB print's ~180 ms in the gate)."""
        if start >= len(text):
            return
        if text.isascii():
            self.total_bytes += len(text) - start
        else:
            self.total_bytes += len(text[start:].encode("utf-8", "surrogatepass"))
        self.total_lines += text.count("\n", start)
        if self.size == 0:
            return
        if len(text) - start >= self.size:
            self.parts.clear()
            self.parts.append(text[-self.size:])
            self.chars = self.size
            return
        if start:
            text = text[start:]
        self.parts.append(text)
        self.chars += len(text)
        while self.chars > self.size:
            first = self.parts[0]
            extra = self.chars - self.size
            if len(first) <= extra:
                self.parts.popleft()
                self.chars -= len(first)
            else:
                self.parts[0] = first[extra:]
                self.chars -= extra

    def text(self) -> str:
        return "".join(self.parts)


class CellStreams:
    """Stream state of one cell (one parent msg_id); lives from its first stream
    message until the gate releases the cell's idle."""

    def __init__(self, head: int, tail: int, redactor: Any, normalise: bool, nonce: str,
                 spool: Spool | None = None, execution: int | None = None) -> None:
        self.head_left = head
        self.tail_size = tail
        self.redactor = redactor
        self.normalise = normalise
        self.nonce = nonce
        self.pending: dict[str, str] = {}
        self.since: dict[str, float] = {}  # when each stream's held-back text started waiting
        self.tails: dict[str, _Tail] = {}
        self.findings: list[Any] = []
        #: bytes of each stream cut by the budget, set by `flush` (the filter audits them)
        self.cut: dict[str, int] = {}
        #: values redacted so far in this cell, redacted wherever they come back (in memory
        #: only, never logged)
        self.known: dict[str, None] = {}
        #: streams whose held text went out on the timer ending with a masked partial token:
        #: the token characters their next message starts with are its continuation
        self.masking: set[str] = set()
        #: the cut text of each stream, kept redacted on disk (.spool), when the cell has a
        #: number (the gate's count of execute_requests) and the kernel a spool
        self.spool = spool
        self.execution = execution
        self.keepers: dict[str, StreamKeeper | None] = {}
        #: bytes of each stream kept on disk, and not kept (the spool's cap), set by `flush`
        self.kept: dict[str, int] = {}
        self.dropped: dict[str, int] = {}

    def _clean(self, text: str) -> str:
        if self.redactor is None:
            return text
        result = self.redactor.redact(text)
        self.findings.extend(result.findings)
        return str(result.text)

    def _tail(self, name: str) -> _Tail:
        tail = self.tails.get(name)
        if tail is None:
            tail = self.tails[name] = _Tail(self.tail_size)
        return tail

    def _keeper(self, name: str) -> StreamKeeper | None:
        if name not in self.keepers:
            self.keepers[name] = None if self.spool is None or self.execution is None else \
                self.spool.keeper(self.execution, name, self.redactor, self.known)
        return self.keepers[name]

    def _to_tail(self, name: str, text: str, start: int = 0) -> None:
        """Text past the head: into the tail, and (all of it) to the stream's keeper. The
        continuation of a partial token the head masked on the timer is masked here too."""
        if name in self.masking and start < len(text):
            self.masking.discard(name)
            cont = continuation(text[start:start + 8192])
            if cont:
                text, start = MARKER + text[start + cont:], 0
        self._tail(name).add(text, start)
        keeper = self._keeper(name)
        if keeper is not None:
            keeper.rest(text[start:] if start else text)

    def feed(self, name: str, text: str) -> str:
        """The text to release now for one stream message ("" to hold it back)."""
        if self.head_left <= 0:
            self._to_tail(name, text)
            return ""
        # Only what can still fit in the head, plus the carry-over window, is scanned;
        # the rest of a huge message goes to the tail unscanned.
        window = self.redactor.max_match_len if self.redactor is not None else 0
        room = self.head_left + 2 * window
        if len(text) <= room:
            return self._head(name, text)
        out = self._head(name, text[:room])
        self.head_left = 0  # the head ends here even if redaction shortened it
        for other, held in list(self.pending.items()):
            self._to_tail(other, held)
        self.pending.clear()
        self.since.clear()
        self._to_tail(name, text, room)  # the overflow, text[room:], without a copy
        return out

    def _head(self, name: str, text: str) -> str:
        lead = ""
        if name in self.masking:
            self.masking.discard(name)
            cont = continuation(text)
            if cont:
                lead, text = MARKER, text[cont:]
        if self.redactor is not None:
            # One scan: what can go now (redacted) and what must wait for the next piece.
            result, rest = self.redactor.release(text, self.pending.pop(name, ""),
                                                 self.known)
            self.known.update(dict.fromkeys(result.secrets))
            if rest:
                self.pending[name] = rest
                self.since.setdefault(name, time.monotonic())
            else:
                self.since.pop(name, None)
            self.findings.extend(result.findings)
            out = str(result.text)
        else:
            out = text
        return self._budget(name, lead + out)

    def _known(self, text: str) -> str:
        """`text` (redacted) with every value redacted earlier in the cell redacted too."""
        for value in self.known:
            if value in text:
                text = text.replace(value, "[REDACTED:repeat]")
        return text

    def release_due(self, now: float, latency: float) -> list[tuple[str, str]]:
        """Held-back text that has waited ``latency`` seconds, redacted, to send now.

        The carry-over catches a secret split across messages sent close together;
        a short ``print`` in a long-running cell must still show up promptly (THREATS
        O3's "small latency budget"). Held text that ends with a plausible partial token
        (redact/partial.py) goes out with that token masked, and the token characters the
        stream's next message starts with are masked as its continuation."""
        out = []
        for name, since in list(self.since.items()):
            if now - since < latency:
                continue
            del self.since[name]
            text = self.pending.pop(name, "")
            if text and self.head_left <= 0:  # never dropped: past the head it is tail
                self._to_tail(name, text)
            elif text:
                # the start of a secret whose rest comes later is masked, and its rest with it
                cut = partial_start(text) if self.redactor is not None else None
                masked = ""
                if cut is not None:
                    text, masked = text[:cut], MARKER if cut < len(text) else ""
                released = self._budget(name, self._known(self._clean(text)) + masked)
                if cut is not None:
                    # only now: had the marker run past the head, _budget would have sent
                    # its own remainder to the tail as the token's continuation, clearing
                    # the mask before the real continuation came (found from the jail)
                    self.masking.add(name)
                if released:
                    out.append((name, released))
        return out

    def _budget(self, name: str, out: str) -> str:
        """Release ``out`` within the head budget; the excess starts the tail. Once the head
        is full (exactly, too), what every stream holds back joins its tail."""
        keeper = self._keeper(name)
        if out.isascii() and len(out) <= self.head_left:
            self.head_left -= len(out)
            if keeper is not None:
                keeper.head(out)
            if self.head_left == 0:
                self._held_to_tails()
            return out
        raw = out.encode("utf-8", "surrogatepass")
        if len(raw) <= self.head_left:
            self.head_left -= len(raw)
            if keeper is not None:
                keeper.head(out)
            if self.head_left == 0:
                self._held_to_tails()
            return out
        keep = raw[: self.head_left].decode("utf-8", "ignore")
        self.head_left = 0
        if keeper is not None:
            keeper.head(keep)
        rest = out[len(keep):] + self.pending.pop(name, "")
        self._to_tail(name, rest)
        self._held_to_tails()  # the other streams' carried-over text joins their tails too
        return keep

    def _held_to_tails(self) -> None:
        for other, held in list(self.pending.items()):
            self._to_tail(other, held)
        self.pending.clear()
        self.since.clear()

    def flush(self) -> list[tuple[str, str]]:
        """What is left of each stream at the end of the cell, redacted, with markers (and
        what the markers say in `cut`)."""
        out: list[tuple[str, str]] = []
        names = list(dict.fromkeys([*self.pending, *self.tails]))
        for name in names:
            text = (self._known(self._clean(self.pending.pop(name, "")))
                    if name in self.pending else "")
            tail = self.tails.get(name)
            if tail is not None and tail.total_bytes:
                kept = tail.text()
                if len(kept) < len(tail.text()) or tail.total_bytes > len(kept.encode()):
                    kept = _drop_partial_token(kept)
                kept_bytes = len(kept.encode("utf-8", "surrogatepass"))
                cut_bytes = tail.total_bytes - kept_bytes
                cut_lines = tail.total_lines - kept.count("\n")
                keeper = self.keepers.pop(name, None)
                if keeper is not None:
                    keeper.finish(cut_bytes > 0)
                    if cut_bytes > 0:
                        self.kept[name], self.dropped[name] = keeper.kept, keeper.dropped
                if cut_bytes > 0:
                    self.cut[name] = cut_bytes
                    text += marker(self.nonce, name, cut_bytes, cut_lines, kept_hint(keeper))
                text += self._known(self._clean(kept))
            if text:
                out.append((name, text))
        for keeper in self.keepers.values():  # streams that never passed the head
            if keeper is not None:
                keeper.finish(False)
        self.tails.clear()
        return out


def _drop_partial_token(text: str, window: int = 256) -> str:
    """The tail starts mid-stream: drop the partial token at the cut (THREATS O17), so
    the end of a secret whose start was cut off is not released as a harmless tail."""
    for i, ch in enumerate(text[:window]):
        if ch in " \n\t":
            return text[i + 1:] if ch != "\n" else text[i:]
    return text[window:] if len(text) > window else ""
