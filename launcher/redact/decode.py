"""One level of decoding: base64 / URL-safe base64 and hex runs, percent and ``\\uXXXX`` escapes
(called by engine.detect, which rescans what comes out with the secret rules).

Ordinary notebook output is full of things that look like base64 (paths, UUIDs, hashes: about
3,000 runs of 20+ characters per MB), so what to decode is decided by the hyperscan scan itself,
never by a Python step per run, and by literals only (a pattern that follows runs of base64
characters costs hyperscan a nanosecond per byte, more than all the detectors together):

- **Base64 and hex runs** (20 to `DECODE_CAP` characters of ``[A-Za-z0-9+/_-]``, as before) are
  decoded when they contain the encoding of a literal that some secret rule requires
  (factors.py: ``ghp_``, ``AKIA``, ``://``, ``-----BEGIN``, ``password`` in any case...): its
  base64 at any of the three byte alignments, in either alphabet, or its hex in either case. A
  run that decodes to text with a finding holds that finding's literal, so it holds one of these
  encodings: nothing that was found before is missed. The exception is a rule with no literal of
  three or more characters, `undecodable`: the Discord bot token. Runs are also still required
  to decode to mostly (3/4) printable bytes, as before.
- **Percent and ``\\u`` escapes** change the text around them (``%20ghp_...`` hides the word
  boundary a token needs), so when the scan saw one, the whole text is decoded at C speed (every
  ``%XX``, or every ``\\uXXXX``, one byte each: a *view*) and the view is scanned once with the
  secret rules. Only if a view has a hit is the escape run around it (``[A-Za-z0-9._~+/=-]``
  and escapes, as before) decoded on its own and rescanned, which is exactly the check that was
  made for every run before. A run's decoding is a substring of the view, between characters
  that cannot be part of a word, so whatever the run alone would show, the view shows too.
  A view is built at all only when it can hold a finding (`triggers`, `wanted`): when a
  literal some secret rule requires occurs as it is, or an escape of that kind stands for an
  ASCII byte. JSON full of ``\\u00e9`` and URL-encoded UTF-8 (``%C3%A9``) need no view.

A finding inside a decoded run redacts the whole run, ``[REDACTED:<rule>:<encoding>]``.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import cast
from urllib.parse import unquote_to_bytes

import hyperscan

from cellblock.redact import factors, keys
from cellblock.redact.normalise import scan_bytes
from cellblock.redact.rule import Block, Rule
from cellblock.redact.scanner import (
    PERCENT_ANY,
    PERCENT_LIT,
    PLAIN_LIT,
    RUN_HINT,
    UESCAPE_ANY,
    UESCAPE_LIT,
    AnyScanner,
    Scanner,
    context_free_start,
)

#: The longest encoded run that is decoded and rescanned (covers base64 of a PEM key).
DECODE_CAP = keys.KEY_BLOCK_CAP
#: The shortest base64/hex run that is decoded.
MIN_RUN = 20

_RUN_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_"
_HEX_BYTES = b"0123456789abcdefABCDEF"
_PRINTABLE = bytes(range(32, 127)) + b"\t\n\r"
_URLCH = "A-Za-z0-9._~+/=-"
_URL_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._~+/=-"

_RUN = rf"[{re.escape(_RUN_CHARS)}]*".encode()
_B64_RUN = re.compile(_RUN)
_PERCENT = re.compile(rb"%[0-9A-Fa-f]{2}")
_UESCAPE = re.compile(rb"\\u([0-9A-Fa-f]{4})")
_UESCAPE_WIDE = re.compile(
    rb"\\u(?:00[89A-Fa-f][0-9A-Fa-f]|0[1-9A-Fa-f][0-9A-Fa-f]{2}|[1-9A-Fa-f][0-9A-Fa-f]{3})")
_HEXDIGITS = "0123456789abcdefABCDEF"
#: What each ``\\uXXXX`` that _UESCAPE_WIDE leaves (an ASCII character) stands for.
_VIEW_BYTE = {f"\\u00{a}{b}".encode(): bytes([int(a + b, 16)])
              for a in "01234567" for b in _HEXDIGITS}
_PERCENT_RUN = re.compile(rf"(?:%[0-9A-Fa-f]{{2}}|[{_URLCH}])*".encode())
_PERCENT_RUN_BACK = re.compile(rf"(?:[0-9A-Fa-f]{{2}}%|[{_URLCH}])*".encode())
_UESCAPE_RUN = re.compile(rf"(?:\\u[0-9A-Fa-f]{{4}}|[{_URLCH}])*".encode())
_UESCAPE_RUN_BACK = re.compile(rf"(?:[0-9A-Fa-f]{{4}}u\\|[{_URLCH}])*".encode())


def undecodable(rules: Iterable[Rule], blocks: Iterable[Block] = ()) -> list[str]:
    """Ids of the rules whose findings are not looked for inside base64/hex runs."""
    out = [r.id for r in rules if factors.required(r.pattern, r.caseless) is None]
    out += [b.id for b in blocks if factors.required(b.begin) is None]
    return sorted(set(out))


def patterns(rules: Iterable[Rule], blocks: Iterable[Block],
             escapes: bool = True, gate: bool = True) -> list[tuple[int, str, int]]:
    """The decode-candidate patterns for the main scanner, (kind, pattern, hyperscan flags):
    the base64 and hex forms of the literals the secret rules (those rescanned in decoded runs)
    require, and (with `escapes`; a scanner joined to one that has them need not) whether a
    percent or ``\\u`` escape occurs at all; with `gate` too, the `triggers` instead when
    they can be built."""
    literals: set[bytes] = set()
    required = [factors.required(r.pattern, r.caseless) for r in rules]
    required += [factors.required(b.begin) for b in blocks]
    for alternatives in required:
        for seq in alternatives or ():
            literals.update(factors.combos(seq))
    b64: set[str] = set()
    hexes: set[str] = set()
    for literal in literals:
        b64 |= factors.base64_cores(literal)
        hexes.add(literal.hex())
    out = [(RUN_HINT, factors.hyperscan_literal(core), 0) for core in sorted(b64)]
    out += [(RUN_HINT, h, hyperscan.HS_FLAG_CASELESS) for h in sorted(hexes)]
    gates = triggers(rules, blocks) if escapes and gate else []
    if gates:  # instead of whether an escape occurs at all (`wanted`)
        return out + gates
    if escapes:
        out += [(PERCENT_ANY, r"%[0-9A-Fa-f]{2}", hyperscan.HS_FLAG_SINGLEMATCH),
                (UESCAPE_ANY, r"\\u[0-9A-Fa-f]{4}", hyperscan.HS_FLAG_SINGLEMATCH)]
    return out


def triggers(rules: Iterable[Rule], blocks: Iterable[Block]) -> list[tuple[int, str, int]]:
    """The patterns that say when an escape view can hold a finding (empty when they cannot
    be built: then every view is scanned, as `wanted` has it).

    A finding in an escape run is a match of a rule in the run's decoding, and holds a literal
    that rule requires (factors.required). Each byte of that literal is either a character of
    the run as it is (a URL character: the run has no other) or the byte an escape of the run
    stands for. So a view of one kind of escape can hold a finding only if (PERCENT_LIT,
    UESCAPE_LIT) an escape of that kind stands for a URL character some literal can hold, or
    else (PLAIN_LIT) some literal occurs in the text with every character that is not a URL
    character escaped (``bearer%20``; most literals are URL characters only: ``ghp_``).
    A rule that requires no literal (the Discord bot token) counts by its prefilter (every
    match holds one, as the main scan relies on) and the bytes of its alphabet."""
    seqs: list[factors.Seq] = []
    urlch = frozenset(_URL_BYTES)
    escaped: set[int] = set()  # bytes whose escape can be part of a finding's literal
    out: list[tuple[int, str, int]] = []
    single = hyperscan.HS_FLAG_SINGLEMATCH
    for rule in rules:
        required = factors.required(rule.pattern, rule.caseless)
        if required is not None:
            seqs += required
            continue
        chars = factors.alphabet(rule.pattern, rule.caseless)
        prefilter = rule.prefilter
        if chars is None or prefilter is None or not context_free_start(prefilter) \
                or prefilter.endswith(("\\b", "$")):
            return []
        escaped |= chars
        caseless = hyperscan.HS_FLAG_CASELESS if rule.caseless else 0
        out.append((PLAIN_LIT, prefilter, single | caseless))
    for block in blocks:
        required = factors.required(block.begin)
        if required is None:
            return []
        seqs += required
    literals = {tuple(seq) for seq in seqs}
    for seq in literals:
        for chars in seq:
            escaped |= chars & urlch
            if any(c >= 0x80 or c == 0x1A for c in chars):
                return []  # (no rule has one: a \\u escape of it would be SUB in the view)
    for literal in sorted(_fewest(literals), key=repr):
        out.append((PLAIN_LIT, "".join(_position(chars - urlch, chars & urlch)
                                       for chars in literal), single))
    if any(c >= 0x80 or c == 0x1A for c in escaped):
        return []
    out.append((PERCENT_LIT, f"%(?:{_hexes(escaped)})", single))
    out.append((UESCAPE_LIT, f"\\\\u00(?:{_hexes(escaped)})", single))
    return out


def _hexes(chars: Iterable[int]) -> str:
    """The two hex digits of each byte, in both cases, as alternatives."""
    return "|".join(sorted({f"{c:02x}" for c in chars} | {f"{c:02X}" for c in chars}))


def _position(escaped: frozenset[int], plain: frozenset[int]) -> str:
    """One position of a literal: a URL character as it is, or an escape of another byte."""
    out = ["[" + "".join(f"\\x{c:02x}" for c in sorted(plain)) + "]"] if plain else []
    if escaped:
        out += [f"%(?:{_hexes(escaped)})", f"\\\\u00(?:{_hexes(escaped)})"]
    return out[0] if len(out) == 1 else "(?:" + "|".join(out) + ")"


def _fewest(seqs: set[tuple[frozenset[int], ...]]) -> list[tuple[frozenset[int], ...]]:
    """`seqs` without those that hold another one (each of its positions a subset of the
    other's, somewhere in it): where the longer occurs, the shorter does too."""
    def holds(longer: tuple[frozenset[int], ...], shorter: tuple[frozenset[int], ...]) -> bool:
        return any(all(longer[i + j] <= chars for j, chars in enumerate(shorter))
                   for i in range(len(longer) - len(shorter) + 1))
    return [s for s in seqs if not any(t != s and holds(s, t) for t in seqs)]


def gated(scanner: AnyScanner, decoded: AnyScanner | None) -> bool:
    """True when the main scanner has the `triggers` of every rule of `decoded` (and not the
    escapes' hints): not with exact secrets joined to the built-in rules."""
    return isinstance(scanner, Scanner) and scanner.gated and isinstance(decoded, Scanner)


def wanted(hints: set[int], scanner: AnyScanner, decoded: AnyScanner | None,
           data: bytes) -> tuple[bool, bool]:
    """Which escape views of `data` to scan, (percent, unicode), given the hint kinds the main
    scan reported: those whose escapes occur, or if `gated`, those that can hold a finding: an
    escape of a literal's URL character, or a literal and any escape."""
    if not gated(scanner, decoded):
        return PERCENT_ANY in hints, UESCAPE_ANY in hints
    if PLAIN_LIT not in hints:
        return PERCENT_LIT in hints, UESCAPE_LIT in hints
    return (PERCENT_LIT in hints or (b"%" in data and _PERCENT.search(data) is not None),
            UESCAPE_LIT in hints or (b"\\u" in data and _UESCAPE.search(data) is not None))


def _mostly_printable(data: bytes) -> bool:
    return len(data) >= 8 and 4 * len(data.translate(None, _PRINTABLE)) <= len(data)


def _decodings(run: str, raw: bytes) -> list[tuple[str, bytes]]:
    """The one-level decodings of a base64/hex run worth rescanning."""
    out: list[tuple[str, bytes]] = []
    if not raw.translate(None, _HEX_BYTES):
        decoded = bytes.fromhex(run[: len(run) // 2 * 2])
        if _mostly_printable(decoded):
            out.append(("hex", decoded))
    body = run.rstrip("=")
    if len(body) % 4 == 1:
        body = body[:-1]
    try:
        decoded = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        return out
    if _mostly_printable(decoded):
        out.append(("base64", decoded))
    return out


Inner = Callable[[bytes], "str | None"]
Ends = Callable[[bytes], "list[int]"]


def findings(inner: Inner, ends: Ends, text: str, data: bytes, run_ends: list[int],
             percent: bool, uescape: bool) -> list[tuple[int, int, str]]:
    """Findings in decoded runs of `text` (`data` is its one-byte-per-character form).

    ``inner(decoded)`` scans decoded bytes with the secret rules and names the finding (or
    None); ``ends(view)`` gives the end offsets of every secret-rule hit in a decoded view (no
    checks; a superset). ``run_ends`` are the ends of hits of the encoded literals, each
    inside a run; ``percent`` and ``uescape`` say whether the text has such an escape at all.
    """
    found: list[tuple[int, int, str]] = []
    done = -1
    for end in sorted(run_ends):
        if end <= done:
            continue  # inside a run already looked at
        start, stop = _run_around(data, end)
        done = stop
        if not MIN_RUN <= stop - start <= DECODE_CAP:
            continue
        run_stop = stop
        while stop < len(text) and stop - run_stop < 2 and text[stop] == "=":
            stop += 1
        for encoding, decoded in _decodings(text[start:stop], data[start:stop]):
            rule = inner(decoded)
            if rule is not None:
                found.append((start, stop, f"{rule}:{encoding}"))
                break
    for kind, present in (("percent", percent), ("unicode", uescape)):
        if present:
            found += _escaped(inner, ends, data, kind)
    return found


def views_quiet(ends: Ends, data: bytes, percent: bool, uescape: bool) -> bool:
    """True when the views of the escapes in `data` (those asked for) have no hit of the
    secret rules at all, so no escape run in it can hold a finding."""
    if percent and ends(escape_view(data, "percent")):
        return False
    return not (uescape and ends(escape_view(data, "unicode")))


def escape_view(data: bytes, kind: str) -> bytes:
    """`data` with every escape of `kind` as one byte: the byte a ``%XX`` stands for, or the
    character of a ``\\uXXXX`` if ASCII and SUB if not (as scan_bytes has it). The escapes of
    non-ASCII characters (the usual ones: ``\\u00e9``) go in one pass without a callback."""
    if kind == "percent":
        return _unquote(data)
    data = _UESCAPE_WIDE.sub(b"\x1a", data)
    if b"\\u" not in data:
        return data
    return _UESCAPE.sub(lambda m: _VIEW_BYTE[m[0]], data)


def _unquote(data: bytes) -> bytes:
    """`urllib.parse.unquote_to_bytes`, at C speed when every ``%`` starts an escape (the
    usual case: URLs and query strings), with no Python step per escape: each backslash is
    doubled (so it stands for itself) and each ``%`` becomes ``\\x``, which the bytes-escape
    codec decodes with the two hex digits after it (either case) into the byte they spell, as
    `unquote_to_bytes` does. A ``%`` without two hex digits after it makes that codec fail,
    and then `unquote_to_bytes` decodes the text (it leaves such a ``%`` as it is)."""
    if b"%" not in data:
        return data
    try:
        decoded = codecs.escape_decode(data.replace(b"\\", b"\\\\").replace(b"%", b"\\x"))[0]
    except ValueError:
        return unquote_to_bytes(data)
    return cast("bytes", decoded)  # bytes in, bytes out (typeshed says str)


def _run_around(data: bytes, end: int) -> tuple[int, int]:
    """The base64/hex run holding ``data[end - 1]``, (start, stop); looked for at most
    DECODE_CAP + 1 characters each way, so a longer run comes out longer than DECODE_CAP."""
    low = max(0, end - DECODE_CAP - 1)
    start = end - _B64_RUN.match(data[low:end][::-1]).end()  # type: ignore[union-attr]
    stop = _B64_RUN.match(data, end, end + DECODE_CAP + 1).end()  # type: ignore[union-attr]
    return start, stop


def _run_unescape(run: bytes) -> bytes:
    """A ``\\uXXXX`` run decoded as before: by Python's unicode_escape, one byte a character."""
    return scan_bytes(run.decode("unicode_escape", "replace"))


_RUNS = {  # kind: one escape, the run forwards, the run backwards (reversed), decoder
    "percent": (_PERCENT, _PERCENT_RUN, _PERCENT_RUN_BACK, unquote_to_bytes),
    "unicode": (_UESCAPE, _UESCAPE_RUN, _UESCAPE_RUN_BACK, _run_unescape),
}


def _escaped(inner: Inner, ends: Ends, data: bytes, kind: str) -> list[tuple[int, int, str]]:
    """Findings in the escape runs of one kind, through one scan of their view."""
    hit_ends = ends(escape_view(data, kind))
    if not hit_ends:
        return []
    escape_re, forward, back, decoder = _RUNS[kind]
    starts: list[int] = []  # where each escape starts in `data`
    in_view: list[int] = []  # where it is in the view
    shrunk = [0]  # how much the first k escapes shrank the text
    for m in escape_re.finditer(data):
        starts.append(m.start())
        in_view.append(m.start() - shrunk[-1])
        shrunk.append(shrunk[-1] + m.end() - m.start() - 1)
    found: list[tuple[int, int, str]] = []
    done = -1
    for end in sorted(set(hit_ends)):
        g = end - 1  # the hit's last byte, in the view
        k = bisect_left(in_view, g)
        pos = starts[k] if k < len(in_view) and in_view[k] == g else g + shrunk[k]
        if pos < done:
            continue  # in a run already looked at
        low = max(0, pos - DECODE_CAP - 1)
        start = pos - back.match(data[low:pos][::-1]).end()  # type: ignore[union-attr]
        stop = forward.match(data, pos, pos + DECODE_CAP + 1).end()  # type: ignore[union-attr]
        done = max(stop, pos + 1)
        if stop - start > DECODE_CAP or not escape_re.search(data, start, stop):
            continue
        rule = inner(decoder(data[start:stop]))
        if rule is not None:
            found.append((start, stop, f"{rule}:{kind}"))
    return found
