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

All steps are linear, and each is skipped when it cannot change anything, which is checked at
C speed: ASCII text without ESC, CR or BS is returned as is; Latin-1 text (accents, ``ñ``) needs
NFKC only if it holds one of the 14 Latin-1 characters NFKC changes, or a soft hyphen; other text
is NFKC-folded only if `unicodedata.is_normalized` says so, and a compiled class of every Cf
character finds format characters. ANSI sequences go in one ``re.sub`` (`_ANSI`), which is
linear: every branch starts with ESC, no class in it holds ESC, so an attempt that fails stops
at the next ESC (or BEL) and each stretch between two ESCs is looked at by one attempt; from one
ESC the branches are tried longest first (CSI and OSC before the two-character escape, which
from the same ESC only ever takes ``ESC [`` or ``ESC ]``), so the leftmost-first matches remove
exactly the union of every match of each pattern, which is what a scan for all of them removes
(`tests/test_redact.py` compares with such a scan). Carriage returns and backspaces are
rendered only on the lines that hold them.
"""

from __future__ import annotations

import codecs
import functools
import re
import sys
import unicodedata

import hyperscan

_SUB = "cellblock-redact-sub"


def _one_byte_per_char(err: UnicodeError) -> tuple[str, int]:
    assert isinstance(err, UnicodeEncodeError)
    return "\x1a" * (err.end - err.start), err.end


codecs.register_error(_SUB, _one_byte_per_char)


#: bytes.translate table: every non-ASCII byte of a Latin-1 encoding becomes SUB.
_HIGH_TO_SUB = bytes(range(128)) + b"\x1a" * 128


def scan_bytes(text: str) -> bytes:
    """`text` as bytes with one byte per character: non-ASCII characters become SUB (0x1a).

    Offsets in these bytes are offsets in `text`. Every pattern is ASCII, so nothing is lost.
    """
    if text.isascii():
        return text.encode("ascii")
    try:
        return text.encode("latin-1").translate(_HIGH_TO_SUB)
    except UnicodeEncodeError:
        pass
    if "?" not in text:  # the codec's own "replace" (C speed) writes one "?" per character
        return text.encode("ascii", "replace").replace(b"?", b"\x1a")
    return text.encode("ascii", _SUB)


#: ANSI escape sequences, longest first from any one ESC (see the module doc).
ANSI_PATTERNS = (
    r"\x1b\[[0-?]*[ -/]*[@-~]",  # CSI
    r"\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)",  # OSC, ended by BEL or ST
    r"\x1b[ -/]*[0-~]",  # two-character and nF escapes
)
_ANSI = re.compile("|".join(ANSI_PATTERNS))


@functools.cache
def _format_chars() -> re.Pattern[str]:
    """A class of every Unicode category Cf character (built once)."""
    cps = [cp for cp in range(sys.maxunicode + 1) if unicodedata.category(chr(cp)) == "Cf"]
    ranges: list[list[int]] = []
    for cp in cps:
        if ranges and ranges[-1][1] == cp - 1:
            ranges[-1][1] = cp
        else:
            ranges.append([cp, cp])
    return re.compile("[" + "".join(
        re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}"
        for a, b in ranges) + "]")


@functools.cache
def _latin1_unstable() -> bytes:
    """The Latin-1 characters NFKC changes, and the one Cf character (soft hyphen), as bytes
    for bytes.translate's delete argument's complement. No two Latin-1 characters compose, so
    a Latin-1 string is stable iff it holds none of them."""
    return bytes(c for c in range(256)
                 if unicodedata.normalize("NFKC", chr(c)) != chr(c)
                 or unicodedata.category(chr(c)) == "Cf")


@functools.cache
def _latin1_stable() -> bytes:
    unstable = set(_latin1_unstable())
    return bytes(c for c in range(256) if c not in unstable)


def _may_change() -> frozenset[int]:
    """Every code point whose presence can make NFKC or Cf removal change a text: those NFKC
    changes on their own, combining marks (reordering), the second character of every
    canonical composition and the Hangul vowel and trailing jamo (composition), and Cf.
    A text with none of them passes `unicodedata.is_normalized`'s quick check and has no Cf."""
    out: set[int] = set()
    for cp in range(0x80, sys.maxunicode + 1):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        c = chr(cp)
        if (unicodedata.category(c) == "Cf" or unicodedata.combining(c)
                or unicodedata.normalize("NFKC", c) != c):
            out.add(cp)
        decomposition = unicodedata.decomposition(c)
        if decomposition and not decomposition.startswith("<"):
            parts = decomposition.split()
            if len(parts) == 2:
                out.add(int(parts[1], 16))
    out.update(range(0x1161, 0x1176))
    out.update(range(0x11A8, 0x11C3))
    return frozenset(out)


def utf8_sequences(low: int, high: int) -> list[list[tuple[int, int]]]:
    """The code points ``low..high`` as UTF-8 byte-range sequences (one range per byte)."""
    out: list[list[tuple[int, int]]] = []
    for a, b in ((0, 0x7F), (0x80, 0x7FF), (0x800, 0xFFFF), (0x10000, sys.maxunicode)):
        if max(low, a) <= min(high, b):
            _same_length(max(low, a), min(high, b), out)
    return out


def _same_length(low: int, high: int, out: list[list[tuple[int, int]]]) -> None:
    n = len(chr(low).encode("utf-8", "surrogatepass"))
    for i in range(1, n):
        m = (1 << (6 * i)) - 1
        if low & ~m != high & ~m:
            if low & m:
                _same_length(low, low | m, out)
                _same_length((low | m) + 1, high, out)
                return
            if high & m != m:
                _same_length(low, (high & ~m) - 1, out)
                _same_length(high & ~m, high, out)
                return
    a, b = (chr(x).encode("utf-8", "surrogatepass") for x in (low, high))
    out.append(list(zip(a, b, strict=True)))


@functools.cache
def _guard_db() -> hyperscan.Database:
    """A database matching (the UTF-8 of) any character of `_may_change`. Compiling takes
    half a second: it is cached on disk like the detectors, keyed by the Unicode version."""
    from cellblock.redact.scanner import compiled

    def expressions() -> list[bytes]:
        ranges: list[list[int]] = []
        for cp in sorted(_may_change()):
            if ranges and ranges[-1][1] == cp - 1:
                ranges[-1][1] = cp
            else:
                ranges.append([cp, cp])
        seqs = [seq for a, b in ranges for seq in utf8_sequences(a, b)]
        return [("(?:" + "|".join("".join(f"\\x{a:02x}" if a == b else f"[\\x{a:02x}-\\x{b:02x}]"
                                          for a, b in seq) for seq in seqs) + ")").encode()]

    return compiled(expressions, [hyperscan.HS_FLAG_SINGLEMATCH], [0], True,
                    key=("nfkc-cf-guard", 1, unicodedata.unidata_version))


def _fold(text: str) -> str:
    """NFKC, then every Cf character removed, as ``normalize("NFKC", text)`` minus Cf; skipped
    when no character of the text can change (checked by bytes.translate for Latin-1 text, by
    one hyperscan pass over the UTF-8 otherwise)."""
    try:
        latin = text.encode("latin-1")
    except UnicodeEncodeError:
        hits: list[int] = []
        from cellblock.redact.scanner import SCAN_LOCK

        with SCAN_LOCK:  # its scratch is the process's one too
            _guard_db().scan(text.encode("utf-8", "surrogatepass"),
                             match_event_handler=lambda _i, _s, _e, _f, _c: hits.append(1))
        if not hits:
            return text
    else:
        if not latin.translate(None, _latin1_stable()):
            return text
    text = unicodedata.normalize("NFKC", text)
    if _format_chars().search(text) is not None:
        text = _format_chars().sub("", text)
    return text


def _strip_ansi(text: str) -> str:
    """Every ANSI sequence removed (the 8-bit CSI as the 7-bit one), then every stray ESC."""
    if "\x9b" in text:
        text = text.replace("\x9b", "\x1b[")
    return _ANSI.sub("", text).replace("\x1b", "")


def _render_carriage_returns(text: str) -> str:
    """Each line holding a CR as a terminal shows it; only those lines are visited."""
    text = text.replace("\r\n", "\n")
    cr = text.find("\r")
    if cr < 0:
        return text
    out: list[str] = []
    pos = 0
    while cr >= 0:
        start = text.rfind("\n", pos, cr) + 1 or pos
        end = text.find("\n", cr)
        end = len(text) if end < 0 else end
        segments = text[start:end].split("\r")
        shown = segments[-1]
        longest = max(map(len, segments))
        if len(shown) < longest:  # a shorter last write: earlier ones show past its end
            parts = [shown]
            covered = len(shown)
            for i in range(len(segments) - 2, -1, -1):  # the latest write reaching further
                if len(segments[i]) > covered:
                    parts.append(segments[i][covered:])
                    covered = len(segments[i])
                    if covered == longest:
                        break
            shown = "".join(parts)
        out.append(text[pos:start])
        out.append(shown)
        pos = end
        cr = text.find("\r", pos)
    out.append(text[pos:])
    return "".join(out)


def _render_backspaces(text: str) -> str:
    """Each backspace deletes the character before it on its line (none at a line's start).
    Only the lines holding one are visited, unless backspaces are so dense (one every few
    characters) that going through the whole text once costs less."""
    if text.count("\b") * 64 > len(text):
        return _backspaces_in(text)
    out: list[str] = []
    pos = 0
    bs = text.find("\b")
    while bs >= 0:
        start = text.rfind("\n", pos, bs) + 1 or pos
        end = text.find("\n", bs)
        end = len(text) if end < 0 else end
        out.append(text[pos:start])
        out.append(_backspaces_in(text[start:end]))
        pos = end
        bs = text.find("\b", pos)
    out.append(text[pos:])
    return "".join(out)


def _backspaces_in(text: str) -> str:
    """Backspaces rendered through all of `text` (a line, or a whole text)."""
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
        text = _fold(text)
    if "\x1b" in text or "\x9b" in text:
        text = _strip_ansi(text)
    if "\r" in text:
        text = _render_carriage_returns(text)
    if "\b" in text:
        text = _render_backspaces(text)
    return text
