"""The redaction engine: one hyperscan pass, candidate checks, one level of decoding, merge.

How a call to `Redactor.redact` runs, and why it is linear in the input whatever it holds:

1. `normalise` (linear; see normalise.py). The result is what is scanned *and* what is returned.
2. One hyperscan block-mode scan (``HS_FLAG_SOM_LEFTMOST``) of every pattern at once. Hyperscan
   is an automaton: no backtracking. It reports at most one match per pattern per end offset,
   so the reports are at most (patterns x length), and in practice a handful.
3. Per rule, per start: the longest end, clipped to the rule's ``max_len``; the rule's bounded
   `re` and validator (Luhn, mod-97, entropy, JWT header) run on that candidate only.
4. Encoded runs found by the same scan (base64/URL-safe base64 and hex runs of 20 to
   `DECODE_CAP` characters, percent-encoded runs, ``\\uXXXX`` runs) are decoded one level; if
   the decoded bytes are mostly printable they are scanned again with the secret rules, and a
   finding there redacts the whole encoded run as ``[REDACTED:<rule>:<encoding>]``.
5. Overlapping findings merge into one span, named after the longest (then earliest) finding.

Reversal, ROT13, XOR, HTML entities, gzip, Cyrillic homoglyphs and text interleaved with
separators (``"-".join(s)``) are *not* caught, by design (THREATS conclusion 1, O11): redaction
is a net for accidents, and the boundary is that secrets never enter the jail.

Not thread-safe: a hyperscan database carries one scratch space, so one `Redactor` (and the
databases it shares with other redactors of the same configuration) must be used from one
thread at a time, as the gate's event loop does.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import os
import re
from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

import hyperscan

from cellblock.redact import (
    chat,
    cloud,
    exact,
    generic,
    jwt,
    keys,
    llm,
    payment,
    pii,
    registry,
    urls,
    vcs,
)
from cellblock.redact.normalise import normalise, scan_bytes
from cellblock.redact.rule import Block, Rule

#: Secret detector modules, each a declarative RULES tuple.
SECRET_MODULES = (cloud, vcs, registry, chat, payment, llm, urls, generic, jwt)
#: The longest encoded run that is decoded and rescanned (covers base64 of a PEM key).
DECODE_CAP = keys.KEY_BLOCK_CAP
#: The shortest base64/hex run that is decoded.
MIN_RUN = 20

_B64 = "A-Za-z0-9+/_-"
_B64_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/_-")
_HEX_BYTES = b"0123456789abcdefABCDEF"
_PRINTABLE = bytes(range(32, 127)) + b"\t\n\r"
_URLCH = r"[A-Za-z0-9._~+/=-]"

# Pattern kinds in a compiled scanner.
_RULE, _BEGIN, _END, _RUN_START, _RUN_END, _PERCENT, _UESCAPE = range(7)

_RUN_PATTERNS = (
    (_RUN_START, rf"(?:^|[^{_B64}])[{_B64}]{{{MIN_RUN}}}"),
    (_RUN_END, rf"[{_B64}]{{{MIN_RUN}}}(?:[^{_B64}]|\z)"),
    (_PERCENT, rf"{_URLCH}*%[0-9A-Fa-f]{{2}}(?:{_URLCH}|%[0-9A-Fa-f]{{2}})*"),
    (_UESCAPE, rf"{_URLCH}*\\u[0-9A-Fa-f]{{4}}(?:{_URLCH}|\\u[0-9A-Fa-f]{{4}})*"),
)


@dataclass(frozen=True)
class Finding:
    """One redacted span. Never holds the secret: only a 12-hex sha256 prefix of it."""

    rule: str
    start: int
    end: int
    sha256_prefix: str


@dataclass(frozen=True)
class RedactResult:
    """``text`` is the *normalised* input with each finding replaced by ``[REDACTED:<rule>]``;
    finding offsets are offsets in the normalised input (the input itself when it was already
    normalised, as it is in the streaming loop shown on `Redactor.scan_end_safe`)."""

    text: str
    findings: list[Finding] = field(default_factory=list)


class _Scanner:
    """One compiled hyperscan database and what each pattern id means."""

    def __init__(self, rules: Iterable[Rule], blocks: Iterable[Block], runs: bool,
                 cacheable: bool = True) -> None:
        self.rules: list[Rule] = list(rules)
        self.blocks: list[Block] = list(blocks)
        expressions: list[bytes] = []
        flags: list[int] = []
        self.kinds: list[tuple[int, int]] = []
        for index, rule in enumerate(self.rules):
            expressions.append(rule.pattern.encode())
            flags.append(
                hyperscan.HS_FLAG_SOM_LEFTMOST
                | (hyperscan.HS_FLAG_CASELESS if rule.caseless else 0)
            )
            self.kinds.append((_RULE, index))
        for index, block in enumerate(self.blocks):
            for kind, pattern in ((_BEGIN, block.begin), (_END, block.end)):
                expressions.append(pattern.encode())
                flags.append(hyperscan.HS_FLAG_SOM_LEFTMOST)
                self.kinds.append((kind, index))
        if runs:
            for kind, pattern in _RUN_PATTERNS:
                expressions.append(pattern.encode())
                flags.append(hyperscan.HS_FLAG_SOM_LEFTMOST)
                self.kinds.append((kind, 0))
        self.db = _compiled(expressions, flags, cacheable)
        self.max_len = max([r.max_len for r in self.rules] + [b.max_len for b in self.blocks])
        if runs:
            self.max_len = max(self.max_len, DECODE_CAP)

    def scan(self, data: bytes) -> list[tuple[int, int, int]]:
        hits: list[tuple[int, int, int]] = []
        append = hits.append
        self.db.scan(data, match_event_handler=lambda i, s, e, _f, _c: append((i, s, e)))
        return hits


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cellblock" / "hyperscan"


def _compiled(expressions: list[bytes], flags: list[int], cacheable: bool) -> Any:
    """A compiled hyperscan database, from the on-disk cache when possible.

    Compiling the built-in rules takes about a second, and every kernel's warden is a
    new process: the serialised database is cached in ``~/.cache/cellblock/hyperscan``
    (mode 0700), keyed by the hyperscan version and the exact patterns and flags.
    A database holding operator-registered exact secrets is never written to disk
    (``cacheable=False``): it would persist the secrets.
    """
    key = hashlib.sha256(repr((getattr(hyperscan, "__version__", ""), expressions, flags))
                         .encode()).hexdigest()[:32]
    path = _cache_dir() / f"{key}.hsdb"
    if cacheable:
        try:
            db = hyperscan.loadb(path.read_bytes(), hyperscan.HS_MODE_BLOCK)
            db.scratch = hyperscan.Scratch(db)
            return db
        except Exception:  # noqa: S110 - missing, stale or torn: compile anew
            pass
    db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    db.compile(expressions=expressions, ids=list(range(len(expressions))),
               elements=len(expressions), flags=flags)
    if cacheable:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(hyperscan.dumpb(db))
            os.replace(tmp, path)
    return db


@functools.lru_cache(maxsize=16)
def _scanners(
    secrets: bool, pii_kinds: tuple[str, ...], exact_secrets: tuple[str, ...]
) -> tuple[_Scanner, _Scanner | None]:
    """The main scanner and the scanner for decoded runs, compiled once per configuration."""
    secret_rules: list[Rule] = []
    blocks: list[Block] = []
    if secrets:
        for module in SECRET_MODULES:
            secret_rules.extend(module.RULES)
        blocks.extend(keys.BLOCKS)
    secret_rules.extend(exact.rules_for(exact_secrets))
    pii_rules = [rule for kind in pii_kinds for rule in pii.RULES[kind]]
    decoding = bool(secret_rules or blocks)
    cacheable = not exact_secrets
    main = _Scanner(secret_rules + pii_rules, blocks, runs=decoding, cacheable=cacheable)
    decoded = _Scanner(secret_rules, blocks, runs=False, cacheable=cacheable) \
        if decoding else None
    return main, decoded


def _check(rule: Rule, text: str, start: int, end: int) -> tuple[int, int] | None:
    """The secret's span for one candidate of `rule`, or None if the candidate fails."""
    if end - start > rule.max_len:
        if rule.clip_end:
            start = end - rule.max_len
        else:
            end = start + rule.max_len
    if rule.secret is not None:
        candidate = text[start:end]
        if isinstance(rule.secret, re.Pattern):
            match = rule.secret.match(candidate)
            span = match.span("v") if match else None
        else:
            span = rule.secret(candidate)
        if span is None:
            return None
        start, end = start + span[0], start + span[1]
    if rule.validate is not None and not rule.validate(text[start:end]):
        return None
    return start, end


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


class Redactor:
    """Finds and replaces secrets (and, if asked, personal data) in text a kernel sends.

    ``secrets``: the built-in secret detectors. ``pii``: any of ``pii.KINDS`` ("email",
    "phone", "card", "iban", "ssn"). ``exact``: operator-registered secrets, also caught in
    their base64, hex and percent-encoded forms (see exact.py). Build one per kernel: the
    hyperscan databases are compiled once per process per configuration and shared.
    """

    def __init__(
        self,
        secrets: bool = True,
        pii: Iterable[str] = (),
        exact: Iterable[str] = (),
    ) -> None:
        kinds = tuple(sorted(set(pii)))
        unknown = sorted(set(kinds) - set(_pii_kinds()))
        if unknown:
            raise ValueError(f"unknown pii kind(s) {unknown}; allowed: {list(_pii_kinds())}")
        self._scanner, self._decoded = _scanners(bool(secrets), kinds, tuple(exact))

    @property
    def max_match_len(self) -> int:
        """The longest span a finding can have (in characters of normalised text).

        Rule candidates are clipped to their ``max_len``; key blocks and decoded runs to
        8192 (keys.KEY_BLOCK_CAP, DECODE_CAP). A caller that holds back this many characters
        between stream messages never splits a finding.
        """
        return self._scanner.max_len

    def normalise(self, text: str) -> str:
        """Same as `cellblock.redact.normalise`."""
        return normalise(text)

    def redact(self, text: str) -> RedactResult:
        """Normalise `text`, then replace each finding with ``[REDACTED:<rule>]``."""
        text = normalise(text)
        if not text:
            return RedactResult(text, [])
        spans = self._find(text)
        if not spans:
            return RedactResult(text, [])
        out: list[str] = []
        findings: list[Finding] = []
        pos = 0
        for start, end, rule in spans:
            digest = hashlib.sha256(text[start:end].encode("utf-8", "surrogatepass")).hexdigest()
            findings.append(Finding(rule, start, end, digest[:12]))
            out.append(text[pos:start])
            out.append(f"[REDACTED:{rule}]")
            pos = end
        out.append(text[pos:])
        return RedactResult("".join(out), findings)

    def scan_end_safe(self, text: str) -> int:
        """How much of `text` (already normalised) can be released without splitting a secret.

        Returns the largest ``i`` such that no finding could start before ``i`` and end after
        ``len(text)`` if more text were appended: ``len(text) - max_match_len``, moved back to
        the start of a finding that straddles it. Only the last ``2 * max_match_len``
        characters are scanned. The streaming loop::

            carry = ""
            for piece in pieces:
                buf = carry + redactor.normalise(piece)
                i = redactor.scan_end_safe(buf)
                emit(redactor.redact(buf[:i]).text)
                carry = buf[i:]
            emit(redactor.redact(carry).text)  # at the end of the cell or stream
        """
        cut = len(text) - self.max_match_len
        if cut <= 0:
            return 0
        base = max(0, cut - self.max_match_len)
        for start, end, _rule in self._find(text[base:]):
            if base + start < cut < base + end:
                return base + start
        return cut

    # -- internals -------------------------------------------------------------------------

    def _find(self, text: str) -> list[tuple[int, int, str]]:
        found = _detect(self._scanner, self._decoded, text, scan_bytes(text))
        return _merge(found)


@functools.cache
def _pii_kinds() -> tuple[str, ...]:
    return pii.KINDS


def _detect(
    scanner: _Scanner, decoded_scanner: _Scanner | None, text: str, data: bytes
) -> list[tuple[int, int, str]]:
    """Every finding (unmerged) of `scanner` in `text` (whose one-byte form is `data`)."""
    hits = scanner.scan(data)
    if not hits:
        return []
    longest: dict[int, dict[int, int]] = {}
    every_end: dict[int, dict[int, list[int]]] = {}
    begins: dict[int, list[tuple[int, int]]] = {}
    ends: dict[int, list[int]] = {}
    run_starts: list[int] = []
    run_ends: list[int] = []
    escapes: dict[tuple[int, int], int] = {}
    kinds = scanner.kinds
    rules = scanner.rules
    for pid, start, end in hits:
        kind, index = kinds[pid]
        if kind == _RULE:
            if rules[index].all_ends:
                every_end.setdefault(pid, {}).setdefault(start, []).append(end)
            else:
                per_start = longest.setdefault(pid, {})
                if end > per_start.get(start, -1):
                    per_start[start] = end
        elif kind == _BEGIN:
            begins.setdefault(index, []).append((start, end))
        elif kind == _END:
            ends.setdefault(index, []).append(end)
        elif kind == _RUN_START:
            run_starts.append(start if data[start] in _B64_BYTES else start + 1)
        elif kind == _RUN_END:
            run_ends.append(end if data[end - 1] in _B64_BYTES else end - 1)
        else:
            key = (kind, start)
            if end > escapes.get(key, -1):
                escapes[key] = end

    found: list[tuple[int, int, str]] = []
    for pid, per_start in longest.items():
        rule = rules[kinds[pid][1]]
        for start, end in per_start.items():
            span = _check(rule, text, start, end)
            if span is not None and span[1] > span[0]:
                found.append((span[0], span[1], rule.id))
    for pid, per_start_ends in every_end.items():
        rule = rules[kinds[pid][1]]
        for start, candidate_ends in per_start_ends.items():
            for end in sorted(candidate_ends, reverse=True):
                span = _check(rule, text, start, end)
                if span is not None:
                    found.append((span[0], span[1], rule.id))
                    break
    for index, block_begins in begins.items():
        block = scanner.blocks[index]
        block_ends = sorted(ends.get(index, ()))
        for start, header_end in block_begins:
            j = bisect_right(block_ends, header_end)
            if j < len(block_ends) and block_ends[j] - start <= block.max_len:
                found.append((start, block_ends[j], block.id))
            else:
                found.append((start, min(len(text), start + block.max_len), block.id))

    if decoded_scanner is not None and (run_starts or escapes):
        found.extend(_decoded_findings(decoded_scanner, text, data, run_starts, run_ends, escapes))
    return found


def _decoded_findings(
    scanner: _Scanner,
    text: str,
    data: bytes,
    run_starts: list[int],
    run_ends: list[int],
    escapes: dict[tuple[int, int], int],
) -> list[tuple[int, int, str]]:
    candidates: list[tuple[int, int, str, bytes]] = []
    run_ends.sort()
    for start in sorted(set(run_starts)):
        j = bisect_left(run_ends, start + MIN_RUN)
        if j == len(run_ends):
            continue
        end = run_ends[j]
        while end < len(text) and end - run_ends[j] < 2 and text[end] == "=":
            end += 1
        if end - start > DECODE_CAP:
            continue
        for encoding, decoded in _decodings(text[start:end], data[start:end]):
            candidates.append((start, end, encoding, decoded))
    for (kind, start), end in escapes.items():
        if end - start > DECODE_CAP:
            continue
        run = text[start:end]
        if kind == _PERCENT:
            candidates.append((start, end, "percent", unquote_to_bytes(run)))
        else:
            unescaped = run.encode("ascii").decode("unicode_escape", "replace")
            candidates.append((start, end, "unicode", scan_bytes(unescaped)))
    found = []
    for start, end, encoding, decoded in candidates:
        inner = _detect(scanner, None, decoded.decode("latin-1"), decoded)
        if inner:
            rule = max(inner, key=lambda f: (f[1] - f[0], not f[2].startswith("generic")))[2]
            found.append((start, end, f"{rule}:{encoding}"))
    return found


def _merge(found: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Union of overlapping spans; each named after its longest finding (a specific rule
    before the generic one on a tie, then the earliest)."""
    if not found:
        return []

    def weight(start: int, end: int, rule: str) -> tuple[int, bool]:
        return end - start, not rule.startswith("generic")

    found.sort(key=lambda f: (f[0], f[0] - f[1], f[2].startswith("generic")))
    merged: list[list] = []
    for start, end, rule in found:
        if merged and start < merged[-1][1]:
            current = merged[-1]
            if weight(start, end, rule) > current[3]:
                current[2], current[3] = rule, weight(start, end, rule)
            current[1] = max(current[1], end)
        else:
            merged.append([start, end, rule, weight(start, end, rule)])
    return [(s, e, r) for s, e, r, _w in merged]
