"""Make the text that is scanned the text that is shown (THREATS O8, O9, O10).

`normalise` applies, in order: NFKC (fullwidth and other compatibility forms become ASCII);
removal of Unicode format characters, category Cf (zero-width space and joiners, BOM, soft
hyphen, bidi controls); removal of ANSI escape sequences (CSI including the 8-bit form, OSC,
two-character escapes; a stray ESC is dropped); ``\\r\\n`` to ``\\n`` and rendering of the
other carriage returns (later text overwrites the line from its start, as a terminal and
JupyterLab show it); rendering of backspace (deletes the character before it on its line, as
JupyterLab does). The gate sends the *normalised* text on, so a client never renders anything
other than what was scanned.

Cyrillic and other confusable homoglyphs are not folded (that needs a UTS #39 skeleton), and
HTML entities are not decoded: both get through, as THREATS O7 and O9 record.

All steps are linear: ASCII text without ESC, CR or BS is returned as is; ANSI sequences are
found by hyperscan, never by Python `re`.
"""

from __future__ import annotations

import codecs
import functools
import sys
import unicodedata

import hyperscan

_SUB = "cellblock-redact-sub"


def _one_byte_per_char(err: UnicodeError) -> tuple[str, int]:
    assert isinstance(err, UnicodeEncodeError)
    return "\x1a" * (err.end - err.start), err.end


codecs.register_error(_SUB, _one_byte_per_char)


def scan_bytes(text: str) -> bytes:
    """`text` as bytes with one byte per character: non-ASCII characters become SUB (0x1a).

    Offsets in these bytes are offsets in `text`. Every pattern is ASCII, so nothing is lost.
    """
    return text.encode("ascii", _SUB)


_ANSI_PATTERNS = (
    rb"\x1b\[[0-?]*[ -/]*[@-~]",  # CSI
    rb"\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)",  # OSC, ended by BEL or ST
    rb"\x1b[ -/]*[0-~]",  # two-character and nF escapes
)


@functools.cache
def _ansi_db() -> hyperscan.Database:
    db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    db.compile(
        expressions=list(_ANSI_PATTERNS),
        ids=list(range(len(_ANSI_PATTERNS))),
        elements=len(_ANSI_PATTERNS),
        flags=[hyperscan.HS_FLAG_SOM_LEFTMOST] * len(_ANSI_PATTERNS),
    )
    return db


@functools.cache
def _format_chars() -> dict[int, None]:
    """str.translate table deleting every Unicode category Cf character (built once)."""
    return dict.fromkeys(
        cp for cp in range(sys.maxunicode + 1) if unicodedata.category(chr(cp)) == "Cf"
    )


def _strip_ansi(text: str) -> str:
    text = text.replace("\x9b", "\x1b[")
    spans: list[tuple[int, int]] = []
    _ansi_db().scan(
        scan_bytes(text), match_event_handler=lambda _i, s, e, _f, _c: spans.append((s, e))
    )
    out, pos = [], 0
    for start, end in sorted(spans):
        if start > pos:
            out.append(text[pos:start])
        pos = max(pos, end)
    out.append(text[pos:])
    return "".join(out).replace("\x1b", "")


def _render_carriage_returns(text: str) -> str:
    text = text.replace("\r\n", "\n")
    if "\r" not in text:
        return text
    lines = text.split("\n")
    for k, line in enumerate(lines):
        if "\r" in line:
            segments = line.split("\r")
            shown = list(segments[0])
            for segment in segments[1:]:
                if len(segment) >= len(shown):
                    shown = list(segment)
                else:
                    shown[: len(segment)] = segment
            lines[k] = "".join(shown)
    return "\n".join(lines)


def _render_backspaces(text: str) -> str:
    pieces = text.split("\b")
    out = list(pieces[0])
    for piece in pieces[1:]:
        if out and out[-1] != "\n":
            out.pop()
        out.extend(piece)
    return "".join(out)


def normalise(text: str) -> str:
    """The text as a client renders it; idempotent. See the module docstring."""
    if text.isascii():
        if "\x1b" not in text and "\r" not in text and "\b" not in text:
            return text
    else:
        text = unicodedata.normalize("NFKC", text).translate(_format_chars())
    if "\x1b" in text or "\x9b" in text:
        text = _strip_ansi(text)
    if "\r" in text:
        text = _render_carriage_returns(text)
    if "\b" in text:
        text = _render_backspaces(text)
    return text
