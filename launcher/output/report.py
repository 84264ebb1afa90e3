"""What the output policy did to one cell: the ``output.cell`` audit event.

Who calls what: the output filter (:mod:`.filter`) keeps one :class:`CellReport` per parent
msg_id, adds to it what each message of the request went through (redactions, cuts, withheld
MIME types and images, removed URLs; :mod:`.rich` records its part through the same object),
adds the stream truncation the cell's :class:`~.streams.CellStreams` did when the cell ends,
and writes it as ONE ``output.cell`` event from its ``flush``, which the relay calls right
before it releases the request's ``status: idle``. So a client that saw the idle finds the
event in the kernel's audit log (``cellblock.sandbox`` reads it to tell an agent what the
policy did), and the log has one event per request the policy changed, however many messages
that request had.

Nothing here holds kernel text except labels: a finding is its rule and a 12-hex sha256 prefix;
a label (a MIME type, a JSON key of a truncated value) is the *redacted* string, at most
`LABEL_MAX` characters.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["LABEL_MAX", "CellReport", "label"]

#: The longest label (MIME type, JSON key) kept in a report or a marker.
LABEL_MAX = 64
#: At most this many distinct finding hashes and notes per event; the rest are counted.
MAX_HASHES = 50
MAX_NOTES = 20


def label(text: str) -> str:
    """`text` (already redacted) cut to LABEL_MAX characters for a marker or the audit log."""
    return text if len(text) <= LABEL_MAX else text[: LABEL_MAX - 1] + "…"


def _add(counts: dict[str, int], key: str, n: int = 1) -> None:
    counts[key] = counts.get(key, 0) + n


class CellReport:
    """The sums for one parent msg_id (see the module doc). Empty until something happens."""

    __slots__ = ("hashes", "images_withheld", "input_redactions", "mime_dropped", "notes",
                 "omitted_hashes", "omitted_notes", "redactions", "truncated_bytes",
                 "urls_neutralised")

    def __init__(self) -> None:
        self.redactions: dict[str, int] = {}
        self.input_redactions: dict[str, int] = {}
        self.hashes: dict[str, None] = {}  # ordered set of "rule:sha256-prefix"
        self.omitted_hashes = 0
        self.truncated_bytes: dict[str, int] = {}
        self.images_withheld: dict[str, int] = {}
        self.mime_dropped: dict[str, int] = {}
        self.urls_neutralised = 0
        self.notes: dict[str, None] = {}
        self.omitted_notes = 0

    def __bool__(self) -> bool:
        return bool(self.redactions or self.input_redactions or self.truncated_bytes
                    or self.images_withheld or self.mime_dropped or self.urls_neutralised
                    or self.notes)

    # -- what the filter records -------------------------------------------------------------

    def findings(self, findings: Iterable[Any], code_echo: bool = False) -> None:
        """Redaction findings (`cellblock.redact.Finding`); `code_echo`: they were in an
        ``execute_input`` (the kernel's echo of the code the client sent), counted apart."""
        counts = self.input_redactions if code_echo else self.redactions
        for f in findings:
            _add(counts, f.rule)
            digest = f"{f.rule}:{f.sha256_prefix}"
            if digest in self.hashes:
                continue
            if len(self.hashes) < MAX_HASHES:
                self.hashes[digest] = None
            else:
                self.omitted_hashes += 1

    def truncated(self, what: str, cut_bytes: int) -> None:
        """`cut_bytes` of a text value were cut by its cap (``max_text``), or of a stream by
        the cell's budget (`what` is then ``stdout`` or ``stderr``)."""
        if cut_bytes > 0:
            _add(self.truncated_bytes, label(what), cut_bytes)

    def note(self, text: str) -> None:
        """A line for a person (what was withheld, cut or removed), kept once."""
        if text in self.notes:
            return
        if len(self.notes) < MAX_NOTES:
            self.notes[text] = None
        else:
            self.omitted_notes += 1

    def mime_withheld(self, mime: str) -> None:
        """A MIME type outside the profile's ``allowed_mime`` was dropped from a bundle."""
        _add(self.mime_dropped, label(mime))

    def image_withheld(self, mime: str) -> None:
        """An image over ``max_image`` (or not a string) was replaced by a note."""
        _add(self.images_withheld, label(mime))

    def urls(self, n: int) -> None:
        """`n` remote URLs were neutralised in markdown, HTML or SVG."""
        self.urls_neutralised += n

    def merge(self, other: CellReport) -> None:
        """Add `other` (one message's report) to this one (the cell's)."""
        for rule, n in other.redactions.items():
            _add(self.redactions, rule, n)
        for rule, n in other.input_redactions.items():
            _add(self.input_redactions, rule, n)
        for digest in other.hashes:
            if digest not in self.hashes:
                if len(self.hashes) < MAX_HASHES:
                    self.hashes[digest] = None
                else:
                    self.omitted_hashes += 1
        self.omitted_hashes += other.omitted_hashes
        for mine, theirs in ((self.truncated_bytes, other.truncated_bytes),
                             (self.images_withheld, other.images_withheld),
                             (self.mime_dropped, other.mime_dropped)):
            for key, n in theirs.items():
                _add(mine, key, n)
        self.urls_neutralised += other.urls_neutralised
        for text in other.notes:
            self.note(text)
        self.omitted_notes += other.omitted_notes

    # -- the event ---------------------------------------------------------------------------

    def fields(self, parent_msg_id: str) -> dict[str, Any]:
        """The ``output.cell`` event's fields (`cellblock.audit.OutputCell`)."""
        return {
            "parent_msg_id": parent_msg_id,
            "redactions": self.redactions,
            "input_redactions": self.input_redactions,
            "hashes": list(self.hashes),
            "hashes_omitted": self.omitted_hashes,
            "truncated_bytes": self.truncated_bytes,
            "images_withheld": self.images_withheld,
            "mime_dropped": self.mime_dropped,
            "urls_neutralised": self.urls_neutralised,
            "notes": list(self.notes),
            "notes_omitted": self.omitted_notes,
        }
