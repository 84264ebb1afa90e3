"""The redaction engine: one hyperscan pass, candidate checks, one level of decoding, merge.

How a call to `Redactor.redact` runs, and why it is linear in the input whatever it holds:

1. `normalise` (linear; see normalise.py). The result is what is scanned *and* what is returned.
2. One hyperscan block-mode scan of every pattern at once (scanner.py): rules that open with an
   assertion report their leftmost start; rules that can start anywhere only their end, and a
   second scan of a bounded window before each such end finds the start. Hyperscan is an
   automaton: no backtracking. It reports at most one match per pattern per end offset, so the
   reports are at most (patterns x length), and in practice a handful. Ordinary output with no
   candidate at all costs the scan and nothing else.
3. Per rule, per start: the longest end, clipped to the rule's ``max_len``; the rule's bounded
   `re` and validator (Luhn, mod-97, entropy, JWT header) run on that candidate only.
4. Encoded text found by the same scan (base64/URL-safe base64 and hex runs of 20 to
   `DECODE_CAP` characters that hold the encoding of a literal some secret rule requires,
   percent-encoded runs, ``\\uXXXX`` runs) is decoded one level and scanned again with the
   secret rules (decode.py); a finding there redacts the whole encoded run as
   ``[REDACTED:<rule>:<encoding>]``.
5. Overlapping findings merge into one span, named after the longest (then earliest) finding.

Reversal, ROT13, XOR, HTML entities, gzip, Cyrillic homoglyphs and text interleaved with
separators (``"-".join(s)``) are *not* caught, by design (THREATS conclusion 1, O11): redaction
is a net for accidents, and the boundary is that secrets never enter the jail.

Threads: a hyperscan database carries one scratch space, shared by every Redactor of the
same configuration in a process; every scan holds `scanner.SCAN_LOCK`, so Redactors may be
used from several threads (the gate's, and a warden's file service), one scan at a time.
"""

from __future__ import annotations

import functools
import hashlib
import re
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass, field

from cellblock.redact import (
    chat,
    cloud,
    decode,
    exact,
    factors,
    generic,
    jwt,
    keys,
    llm,
    payment,
    pii,
    providers,
    registry,
    urls,
    vcs,
)
from cellblock.redact.normalise import normalise, scan_bytes
from cellblock.redact.rule import Block, Rule, check
from cellblock.redact.scanner import (
    BEGIN,
    END,
    PERCENT_ANY,
    PERCENT_LIT,
    PLAIN_LIT,
    RULE,
    RUN_HINT,
    UESCAPE_ANY,
    UESCAPE_LIT,
    AnyScanner,
    Joined,
    Scanner,
)
from cellblock.redact.spans import merge, pairs, repeats, values
from cellblock.redact.values import no_placeholder

#: Secret detector modules, each a declarative RULES tuple.
SECRET_MODULES = (cloud, vcs, registry, chat, payment, llm, urls, generic, jwt, providers)
#: The longest encoded run that is decoded and rescanned (covers base64 of a PEM key).
DECODE_CAP = decode.DECODE_CAP
#: A BEGIN/END pair with a shorter body is not a key (``BEGIN...\nanything\nEND``).
MIN_BODY = 32
#: The shortest base64/hex run that is decoded.
MIN_RUN = decode.MIN_RUN
_ESCAPE_KINDS = frozenset({PERCENT_ANY, UESCAPE_ANY, PLAIN_LIT, PERCENT_LIT, UESCAPE_LIT})
#: The characters of token-shaped findings (JWTs, OAuth tokens and the like) and of the
#: encoded runs that are decoded (base64, hex, percent and \\u escapes).
_TOKEN_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                         b"+/=_.~%\\-")
_TOKEN_TAIL = re.compile(rb"[A-Za-z0-9+/=_.~%\\-]*")
_BLOCK_START = "-----BEGIN"
#: Texts joined by this and then normalised give each text normalised, joined by a line feed:
#: no ANSI sequence starts with ESC LF, an OSC stops at ESC and then wants BEL or ESC
#: backslash (so one left open stays open, as it would alone), NFKC composes nothing across
#: a starter, CR and backspace rendering stop at a line feed, and the ESC itself is dropped.
JOIN_FOR_NORMALISE = "\x1b\n"


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
    #: the distinct values redacted (at least `spans.MIN_REPEAT` characters): a caller that
    #: passes them back as ``known`` has them redacted wherever they come back in its cell.
    #: They stay in memory; never log them.
    secrets: tuple[str, ...] = ()


Scanners = tuple[AnyScanner, AnyScanner | None]


@functools.lru_cache(maxsize=16)
def _scanners(
    secrets: bool, pii_kinds: tuple[str, ...], exact_secrets: tuple[str, ...]
) -> Scanners:
    """The main scanner and the scanner for decoded runs of one configuration.

    The built-in detectors and the operator's exact secrets are separate databases, scanned
    as one (`Joined`): the first is compiled once per configuration (and cached on disk), the
    second, which holds the secrets and so is never written to disk, has only literals and
    compiles in milliseconds. A spawner builds every profile's built-in databases before it
    forks its wardens; a launch with exact secrets then only compiles those."""
    builtin = _builtin_scanners(secrets, pii_kinds) if secrets or pii_kinds else None
    if not exact_secrets:
        if builtin is None:
            raise ValueError("a Redactor needs something to redact: secrets, pii or exact")
        return builtin
    # The escape hints, unless the built-in scan reports them (with triggers, for its own rules).
    escapes = builtin is None or builtin[1] is None or builtin[0].gated
    own_main, own_decoded = _exact_scanners(exact_secrets, escapes)
    if builtin is None:
        return own_main, own_decoded
    main, decoded = builtin
    return Joined(main, own_main), (own_decoded if decoded is None
                                    else Joined(decoded, own_decoded))


@functools.lru_cache(maxsize=16)
def _builtin_scanners(
    secrets: bool, pii_kinds: tuple[str, ...]
) -> tuple[Scanner, Scanner | None]:
    """The built-in detectors' scanners (main, decoded runs), compiled once per process per
    configuration, from the on-disk cache when it has them."""
    secret_rules: list[Rule] = []
    blocks: list[Block] = []
    if secrets:
        for module in SECRET_MODULES:
            secret_rules.extend(no_placeholder(rule) for rule in module.RULES)
        blocks.extend(keys.BLOCKS)
    pii_rules = [rule for kind in pii_kinds for rule in pii.RULES[kind]]
    decoding = bool(secret_rules or blocks)
    main = Scanner(secret_rules + pii_rules, blocks,
                   decode.patterns(secret_rules, blocks) if decoding else ())
    if not decoding:
        return main, None
    main.max_len = max(main.max_len, DECODE_CAP)
    return main, Scanner(secret_rules, blocks)


@functools.lru_cache(maxsize=16)
def _exact_scanners(exact_secrets: tuple[str, ...], escapes: bool) -> tuple[Scanner, Scanner]:
    """The scanners of operator-registered exact secrets (exact.py): their forms, and the
    decode hints of their literals (and, with `escapes`, the percent and ``\\u`` escape
    patterns, when no built-in scanner reports those; never triggers, so that the same
    scanners serve with built-in rules and without). Never cached on disk."""
    rules = list(exact.rules_for(exact_secrets))
    main = Scanner(rules, [], decode.patterns(rules, [], escapes, gate=False), cacheable=False)
    main.max_len = max(main.max_len, DECODE_CAP)
    return main, Scanner(rules, [], cacheable=False)


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
        self._hold = _hold_window(self._scanner)

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

    def redact(self, text: str, known: Iterable[str] = ()) -> RedactResult:
        """Replace each finding with ``[REDACTED:<rule>]`` (and every other occurrence of a
        value found, or of a `known` one) in `text` as it is (what the bytes say: a secret a
        terminal would hide or half hide behind ``\b``, ``\r`` or an OSC title) and then in
        it normalised (what a terminal shows); return the normalised text. Findings of the
        first scan have offsets in `text`, of the second in the result."""
        first = self._seen(text, known)
        if not first.text:
            return first
        result = self._replace(first.text, self._find(first.text, known))
        return RedactResult(result.text, first.findings + result.findings) if first.findings \
            else result

    def _seen(self, text: str, known: Iterable[str] = ()) -> RedactResult:
        """`text` normalised, after its own findings were replaced when normalising changes
        it (one scan of the original, only then)."""
        shown = normalise(text)
        if shown is text or shown == text or len(text) < self._scanner.min_len:
            return RedactResult(shown, [])
        raw = self._replace(text, self._find(text, known))
        return RedactResult(normalise(raw.text), raw.findings) if raw.findings else \
            RedactResult(shown, [])

    def _replace(self, text: str, spans: list[tuple[int, int, str]]) -> RedactResult:
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
        return RedactResult("".join(out), findings, tuple(values(text, spans)))

    def untouched(self, texts: list[str], normalised: bool = True) -> bool:
        """True when `redact` would find nothing in any of `texts`, as one scan of them all
        can tell (no candidate at all, nor in the decoded view of percent or ``\\u``
        escapes), and, with `normalised`, when each is already normalised too. False does not
        mean a finding. `survey` says both apart.
        """
        if normalised and _may_change(texts):
            return False  # normalising removes ESC, CR and BS: the text would change
        clean, same = self.survey(texts)
        return clean and (same or not normalised)

    def survey(self, texts: list[str]) -> tuple[bool, bool]:
        """(``clean``, ``normalised``): ``clean`` when `redact` would find nothing in any of
        `texts`, as one scan of them all can tell (no candidate at all, nor in the decoded
        view of percent or ``\\u`` escapes, in the texts as they are nor normalised; False
        does not mean a finding), and ``normalised`` when each is already normalised. The
        output filter calls this once per message instead of `redact` once per string: a
        clean message is sent as it is, or (if the profile sends normalised text) each string
        normalised, never scanned again.

        The texts are scanned joined by line feeds: a line feed is a boundary for every pattern
        (not a word character, not base64, not a URL character), so a hit in any one of them
        is a hit in the joined text. When they need normalising, they are joined by ESC LF and
        normalised together, which gives the same as normalising each (`JOIN_FOR_NORMALISE`).
        """
        text = original = "\n".join(texts)
        if _may_change(texts, text):
            same = False  # normalising removes each of ESC, CR, BS: the text changes
            text = normalise(JOIN_FOR_NORMALISE.join(texts))
        else:  # only NFKC and Cf removal can change it, which a line feed stops as ESC LF does
            folded = normalise(text)
            same = folded is text
            text = folded
        # What the bytes say too: a secret normalising hides (`redact` scans both).
        return self._quiet(text) and (same or self._quiet(original)), same

    def _quiet(self, text: str) -> bool:
        """True when one scan of `text` (and of its escapes' decoded views) finds nothing."""
        if len(text) < self._scanner.min_len:
            return True
        data = scan_bytes(text)
        escapes = self._scanner.quiet(data, _ESCAPE_KINDS)
        if escapes is None:
            return False
        if not escapes or self._decoded is None:
            return True
        return decode.views_quiet(self._decoded.ends, data,
                                  *decode.wanted(escapes, self._scanner, self._decoded, data))

    def release(self, text: str, held: str = "",
                known: Iterable[str] = ()) -> tuple[RedactResult, str]:
        """Normalise `text`, append it to `held` (what the last call kept back, normalised
        already: normalising it again would render a ``\r`` of `text` over the part of
        its line that was held back but not over the part already sent), redact what can
        be released now and return it with the rest.

        What is released is ``text[:cut]`` with ``cut`` as `scan_end_safe` chooses it, and the
        rest is what a stream keeps back for the next piece; one scan of `text` serves both
        (findings in the released part see the text after them, as they will when it comes).
        The cut never falls between a finding and the context its rule needed to see it (the
        ``token = `` before a generic value): the rest would no longer be a finding alone.
        `known` values (found earlier in the cell) are redacted wherever they occur.
        """
        seen = self._seen(text, known)  # the piece's own hidden findings, replaced
        text = held + seen.text
        if not text:  # an empty message, or one normalising removed entirely
            return RedactResult("", seen.findings), ""
        cut = self._hold_from(text)
        if cut <= 0:
            return RedactResult("", seen.findings), text
        contexts: list[tuple[int, int]] = []
        spans = self._find(text, known, contexts)
        for start, end in sorted(contexts + [(s, e) for s, e, _r in spans], reverse=True):
            if start < cut < end:
                cut = start
        result = self._replace(text[:cut], [s for s in spans if s[1] <= cut])
        if seen.findings:
            result = RedactResult(result.text, seen.findings + result.findings)
        return result, text[cut:]

    def _hold_from(self, text: str) -> int:
        """Where the part of `text` that a later piece could still complete into a finding
        starts: the last `_hold_window` characters (the longest finding of any rule that can
        hold more than token characters), the run of token characters `text` ends with (any
        longer finding is such a run: a JWT, an OAuth token, a base64/hex/percent run), and the
        first ``-----BEGIN`` in reach, whichever starts first; at most `max_match_len` back."""
        limit = self.max_match_len
        end = len(text)
        cut = end - self._hold
        if ord(text[-1]) in _TOKEN_CHARS:
            tail = scan_bytes(text[max(0, end - limit - 1):])[::-1]
            cut = min(cut, end - _TOKEN_TAIL.match(tail).end())  # type: ignore[union-attr]
        if self._scanner.blocks:
            begin = text.find(_BLOCK_START, max(0, end - limit))
            if begin >= 0:
                cut = min(cut, begin)
        return max(cut, end - limit)

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

    def _find(self, text: str, known: Iterable[str] = (),
              contexts: list[tuple[int, int]] | None = None) -> list[tuple[int, int, str]]:
        """Merged findings; with `contexts`, (start of the rule's match, end of its finding)
        of each is appended there."""
        found = []
        if len(text) >= self._scanner.min_len:
            found = merge(_detect(self._scanner, self._decoded, text, scan_bytes(text),
                                  contexts))
        return repeats(text, pairs(text, found), known)


def _may_change(texts: list[str], joined: str | None = None) -> bool:
    """True when normalising changes some text for sure: it holds ESC, CR, BS or CSI."""
    text = "\n".join(texts) if joined is None else joined
    return "\x1b" in text or "\r" in text or "\b" in text or "\x9b" in text


@functools.lru_cache(maxsize=16)
def _hold_window(scanner: AnyScanner) -> int:
    """The longest finding of a rule whose matches are not all token characters (the window a
    stream holds back whatever it ends with), and the longest block start marker."""
    longest = [len(_BLOCK_START) + 64]
    for rule in scanner.rules:
        chars = factors.alphabet(rule.pattern, rule.caseless)
        if chars is None or not chars <= _TOKEN_CHARS:
            longest.append(rule.max_len)
    for block in scanner.blocks:
        assert block.begin.startswith(_BLOCK_START), block.id
    return min(max(longest), scanner.max_len)


@functools.cache
def _pii_kinds() -> tuple[str, ...]:
    return pii.KINDS


def _detect(
    scanner: AnyScanner, decoded_scanner: AnyScanner | None, text: str, data: bytes,
    contexts: list[tuple[int, int]] | None = None,
) -> list[tuple[int, int, str]]:
    """Every finding (unmerged) of `scanner` in `text` (whose one-byte form is `data`)."""
    hits = scanner.scan(data)
    if not hits:
        return []
    longest: dict[int, dict[int, int]] = {}
    every_end: dict[int, dict[int, list[int]]] = {}
    begins: dict[int, list[tuple[int, int]]] = {}
    ends: dict[int, list[int]] = {}
    run_ends: list[int] = []
    hints: set[int] = set()
    kinds = scanner.kinds
    rules = scanner.rules
    for pid, start, end in hits:
        kind, index = kinds[pid]
        if kind == RULE:
            if rules[index].all_ends:
                every_end.setdefault(pid, {}).setdefault(start, []).append(end)
            else:
                per_start = longest.setdefault(pid, {})
                if end > per_start.get(start, -1):
                    per_start[start] = end
        elif kind == BEGIN:
            begins.setdefault(index, []).append((start, end))
        elif kind == END:
            ends.setdefault(index, []).append(end)
        elif kind == RUN_HINT:
            run_ends.append(end)
        else:
            hints.add(kind)

    found: list[tuple[int, int, str]] = []
    for pid, per_start in longest.items():
        rule = rules[kinds[pid][1]]
        for start, end in per_start.items():
            span = check(rule, text, start, end)
            if span is not None and span[1] > span[0]:
                found.append((span[0], span[1], rule.id))
                if contexts is not None and start < span[0]:
                    contexts.append((start, span[1]))
    for pid, per_start_ends in every_end.items():
        rule = rules[kinds[pid][1]]
        for start, candidate_ends in per_start_ends.items():
            for end in sorted(candidate_ends, reverse=True):
                span = check(rule, text, start, end)
                if span is not None:
                    found.append((span[0], span[1], rule.id))
                    break
    for index, block_begins in begins.items():
        block = scanner.blocks[index]
        block_ends = sorted(ends.get(index, ()))
        for start, header_end in block_begins:
            j = bisect_right(block_ends, header_end)
            if j < len(block_ends) and block_ends[j] - start <= block.max_len:
                if text.rfind("-----END", header_end, block_ends[j]) - header_end >= MIN_BODY:
                    found.append((start, block_ends[j], block.id))  # else not a key
            else:
                found.append((start, min(len(text), start + block.max_len), block.id))

    percent, uescape = decode.wanted(hints, scanner, decoded_scanner, data)
    if decoded_scanner is not None and (run_ends or percent or uescape):
        inner = functools.partial(_inner, decoded_scanner)
        found.extend(decode.findings(inner, decoded_scanner.ends, text, data, run_ends,
                                     percent, uescape))
    return found


def _inner(scanner: AnyScanner, decoded: bytes) -> str | None:
    """The name of the finding in decoded bytes (the longest; a specific rule before the
    generic one), or None."""
    inner = _detect(scanner, None, decoded.decode("latin-1"), decoded)
    if not inner:
        return None
    return max(inner, key=lambda f: (f[1] - f[0], not f[2].startswith("generic")))[2]
