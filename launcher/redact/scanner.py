"""The compiled hyperscan databases of one detector configuration, and the scan that reports
candidates (called by engine.detect).

Speed comes from not asking hyperscan for what it is slow at. Tracking the start of a match
(``HS_FLAG_SOM_LEFTMOST``) is cheap for a pattern that opens with an assertion and a literal
(``\\bghp_``), but costs 5-10x for one that can start at any character: ``password=...``,
``scheme://user:pass@``, connection strings, email, phone. So there are two databases:

- **main**, scanned over every text: patterns that open with an assertion, and PEM begin/end
  markers, with start of match; patterns that can start anywhere ("windowed") *without* it, so
  for them the scan only says where a match ends; the decode-candidate patterns (decode.py)
  without it too.
- **window**: the windowed patterns again, with start of match. For each end the main scan
  reported, the window database scans the ``2 * max_len`` characters before it (windows that
  overlap are merged) and gives the leftmost start. A windowed pattern has no assertion at its
  start (checked when compiling: `context_free_start`), so a match that starts inside the window
  is a match in the whole text, and only (pattern, end) pairs the main scan reported are kept, so
  the window's edges change nothing. In ordinary output these patterns rarely match and the
  windows cost nothing; in a flood the windows merge into one span that is scanned once.

Reports for one pattern come at most once per end offset, so a scan reports at most
(patterns x length) hits, linear in the input.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import hyperscan

from cellblock.redact.rule import Block, Rule

#: Held around every scan: a compiled database carries one scratch space and a Scanner one
#: list of hits, and both are shared by every Redactor of a process (they are cached per
#: configuration). A warden redacts on the gate's thread and, for outbox downloads, on the
#: file service's threads: unguarded, a download during a cell made hyperscan raise
#: ScratchInUseError, failing the download and making the gate drop stream output (found
#: from the jail). Uncontended, it costs well under a microsecond per scan.
SCAN_LOCK = threading.RLock()

# What a pattern id of a compiled scanner stands for (the last three: decode.triggers).
RULE, BEGIN, END, RUN_HINT, PERCENT_ANY, UESCAPE_ANY, PLAIN_LIT, PERCENT_LIT, UESCAPE_LIT = \
    range(9)

#: A scan hit: (pattern id, start, end); start is 0 for patterns scanned without start of match.
Hit = tuple[int, int, int]


def escaped_boundary(rule: Rule) -> str | None:
    """A second pattern for a rule that opens with ``\\b``: the same after an escaped tab,
    newline or carriage return (``\\t`` as two characters, as pandas' reprs and JSON write
    them), where the word boundary fails between the ``t`` and the token. It opens with a
    literal backslash, so it is scanned without start of match; the finding starts after the
    escape (`escape_skip`). None for other rules, and for prefiltered ones."""
    if rule.pattern.startswith(r"\b") and rule.prefilter is None:
        return r"\\[nrt]" + rule.pattern[2:]
    return None


def context_free_start(pattern: str) -> bool:
    """True when no match of `pattern` can depend on the character before the match: it does
    not open with an assertion (``\\b``, ``^``, ``(?:^|x)``), possibly after optional parts.
    Patterns that Python's parser cannot read count as not context-free (the safe answer)."""
    try:
        from re import _parser  # type: ignore[attr-defined]

        parsed = _parser.parse(pattern.replace(r"\z", r"\Z"))
    except Exception:
        return False
    return _first_is_plain(list(parsed))


def max_width(pattern: str) -> int:
    """The most characters a match of `pattern` can have (huge when unbounded or unknown)."""
    try:
        from re import _parser  # type: ignore[attr-defined]

        return int(_parser.parse(pattern.replace(r"\z", r"\Z")).getwidth()[1])
    except Exception:
        return 1 << 62


def min_width(pattern: str) -> int:
    """The fewest characters a match of `pattern` can have (0 when Python cannot parse it)."""
    try:
        from re import _parser  # type: ignore[attr-defined]

        return int(_parser.parse(pattern.replace(r"\z", r"\Z")).getwidth()[0])
    except Exception:
        return 0


def _first_is_plain(items: Sequence[tuple[Any, Any]]) -> bool:
    from re import _constants as c  # type: ignore[attr-defined]

    for op, av in items:
        if op in (c.LITERAL, c.NOT_LITERAL, c.IN, c.ANY):
            return True
        if op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT):
            low, _high, sub = av
            if not _first_is_plain(list(sub)):
                return False
            if low > 0 and sub.getwidth()[0] > 0:
                return True
        elif op is c.SUBPATTERN:
            sub = av[-1]
            if not _first_is_plain(list(sub)):
                return False
            if sub.getwidth()[0] > 0:
                return True
        elif op is c.BRANCH:
            branches = av[1]
            if not all(_first_is_plain(list(b)) for b in branches):
                return False
            if min(b.getwidth()[0] for b in branches) > 0:
                return True
        else:
            return False  # an assertion, a backreference, a lookaround: needs context
    return True


class Scanner:
    """One configuration's databases: `rules` and `blocks`, plus the decode-candidate patterns
    when `decoders` is given (a list of (kind, pattern, flags) from decode.py).

    ``cacheable=False`` keeps the compiled databases off the disk (they hold operator secrets).
    """

    def __init__(self, rules: Iterable[Rule], blocks: Iterable[Block],
                 decoders: Sequence[tuple[int, str, int]] = (), cacheable: bool = True) -> None:
        self.rules: list[Rule] = list(rules)
        self.blocks: list[Block] = list(blocks)
        self.kinds: list[tuple[int, int]] = []
        #: pattern id -> (characters before the reported end, characters after) to rescan
        self.windowed: dict[int, tuple[int, int]] = {}
        #: pattern id -> the pattern scanned in the window (a rule's, or its escaped variant)
        self.window_patterns: dict[int, str] = {}
        main: list[tuple[bytes, int]] = []
        window: list[tuple[int, bytes, int]] = []
        som = hyperscan.HS_FLAG_SOM_LEFTMOST
        for index, rule in enumerate(self.rules):
            flags = hyperscan.HS_FLAG_CASELESS if rule.caseless else 0
            back, slack = 2 * rule.max_len + 1, rule.prefilter_slack
            for pattern in (rule.pattern, escaped_boundary(rule)):
                if pattern is None:
                    continue
                pid = len(self.kinds)
                prefilter = rule.prefilter if pattern is rule.pattern else None
                # In a window, a match is found with its true start if nothing before the
                # window can matter: the pattern opens without an assertion, or (for a
                # prefiltered rule) no match is long enough to reach the window's first
                # character.
                bounded = prefilter is not None and max_width(pattern) + slack + 1 < back
                if context_free_start(pattern) or bounded:
                    main.append(((prefilter or pattern).encode(), flags))
                    window.append((pid, pattern.encode(), flags | som))
                    self.windowed[pid] = (back, slack if prefilter else 0)
                    self.window_patterns[pid] = pattern
                else:
                    if prefilter:
                        raise ValueError(f"rule {rule.id}: a prefilter needs a pattern that "
                                         "opens without an assertion or is shorter than "
                                         "2 * max_len")
                    main.append((pattern.encode(), flags | som))
                self.kinds.append((RULE, index))
        for index, block in enumerate(self.blocks):
            for kind, pattern in ((BEGIN, block.begin), (END, block.end)):
                main.append((pattern.encode(), som))
                self.kinds.append((kind, index))
        for kind, pattern, flags in decoders:
            main.append((pattern.encode(), flags))
            self.kinds.append((kind, 0))
        #: whether the escape views can be skipped when no trigger fired (decode.wanted)
        self.gated = any(kind == PERCENT_LIT for kind, _p, _f in decoders)
        self.db = compiled([p for p, _ in main], [f for _, f in main],
                           list(range(len(main))), cacheable)
        self.window_db = compiled([p for _, p, _ in window], [f for _, _, f in window],
                                  [i for i, _, _ in window], cacheable) if window else None
        self.max_len = max([r.max_len for r in self.rules] + [b.max_len for b in self.blocks])
        #: how far every window reaches back from a reported end, and forward
        self._reach = (max([b for b, _ in self.windowed.values()] or [0]),
                       max([f for _, f in self.windowed.values()] or [0]))
        #: No finding is shorter than this: a shorter text need not be scanned.
        self.min_len = min([min_width(r.pattern) for r in self.rules]
                           + [min_width(b.begin) for b in self.blocks] or [0])
        self._hits: list[Hit] = []
        self._collect = _Collector(self._hits)

    def scan(self, data: bytes) -> list[Hit]:
        """Every hit of the main database in `data`, windowed rules resolved to their starts.

        Hits of windowed rules whose start is not within their window are left out (their
        candidate would be longer than twice the rule's ``max_len``)."""
        with SCAN_LOCK:
            collected = self._hits
            self.db.scan(data, match_event_handler=self._collect)
            if not collected:
                return []
            hits = collected[:]
            collected.clear()
            if not self.windowed:
                return hits
            windowed = self.windowed
            ends = [(pid, end) for pid, _s, end in hits if pid in windowed]
            if not ends:
                return hits
            out = [hit for hit in hits if hit[0] not in windowed]
            self._resolve(data, ends, out)
            return out

    def quiet(self, data: bytes, ignore: frozenset[int] = frozenset()) -> set[int] | None:
        """None if the main database reports any hit whose kind is not in `ignore` (the scan
        stops at the first), else the set of ignored kinds that were reported."""
        kinds = self.kinds
        seen: set[int] = set()

        def handler(pid: int, _start: int, _end: int, _flags: int, _ctx: object) -> bool:
            kind = kinds[pid][0]
            seen.add(kind)
            return kind not in ignore

        try:
            with SCAN_LOCK:
                self.db.scan(data, match_event_handler=handler)
        except hyperscan.ScanTerminated:
            return None
        return seen

    def ends(self, data: bytes) -> list[int]:
        """The end offset of every hit of the main database in `data`, unchecked: a superset
        of where a finding can end (used on decoded views, decode.py)."""
        with SCAN_LOCK:
            collected = self._hits
            self.db.scan(data, match_event_handler=self._collect)
            out = [end for _pid, _start, end in collected]
            collected.clear()
            return out

    def _resolve(self, data: bytes, ends: list[tuple[int, int]], out: list[Hit]) -> None:
        """Append (pid, leftmost start, end) for each match of a windowed rule that the main
        scan reported (at its end, or up to the rule's prefilter slack before it).

        Every window reaches back and forward as far as the widest rule needs (a wider window
        finds the same starts; see the module doc), so windows in end order merge in one pass.
        In a merged window, the matches to keep are those ending at least one reach after its
        start (every reported end is, and such a match has all the context it depends on) and
        before its end (the character after the match is in the window)."""
        back, forward = self._reach
        size = len(data)
        merged: list[list[int]] = []
        for end in sorted({end for _pid, end in ends}):
            start, stop = max(0, end - back), min(size, end + forward + 1)
            if merged and start <= merged[-1][1]:
                merged[-1][1] = stop
            else:
                merged.append([start, stop])
        assert self.window_db is not None
        for start, stop in merged:
            first = start + back if start else 0
            handler = _Shifted(out, start, first, stop if stop < size else stop + 1)
            self.window_db.scan(data[start:stop], match_event_handler=handler)


class Joined:
    """Two scanners scanned as one (engine.detect cannot tell the difference): `first`, the
    built-in detectors (compiled once, cached on disk, shared copy-on-write by every warden a
    spawner forks), and `second`, a launch's operator-registered exact secrets (a few dozen
    literals: compiled in milliseconds, never written to disk).

    Rules, blocks and pattern kinds are concatenated; the second scanner's pattern ids, rule
    and block indexes come after the first's. A hit of either is a hit of the pattern alone,
    so the union of their hits is what one database of both would report.
    """

    def __init__(self, first: Scanner, second: Scanner) -> None:
        self.first, self.second = first, second
        self.rules: list[Rule] = first.rules + second.rules
        self.blocks: list[Block] = first.blocks + second.blocks
        shift = {RULE: len(first.rules), BEGIN: len(first.blocks), END: len(first.blocks)}
        self.kinds: list[tuple[int, int]] = first.kinds + [
            (kind, index + shift.get(kind, 0)) for kind, index in second.kinds]
        self._offset = len(first.kinds)
        self.max_len = max(first.max_len, second.max_len)
        self.min_len = min(first.min_len, second.min_len)

    def scan(self, data: bytes) -> list[Hit]:
        """`Scanner.scan` of both, the second's pattern ids shifted."""
        hits = self.first.scan(data)
        more = self.second.scan(data)
        if more:
            offset = self._offset
            hits = hits + [(pid + offset, start, end) for pid, start, end in more]
        return hits

    def quiet(self, data: bytes, ignore: frozenset[int] = frozenset()) -> set[int] | None:
        """`Scanner.quiet` of both: None if either reports a hit not in `ignore`."""
        seen = self.first.quiet(data, ignore)
        if seen is None:
            return None
        more = self.second.quiet(data, ignore)
        return None if more is None else seen | more

    def ends(self, data: bytes) -> list[int]:
        """`Scanner.ends` of both."""
        return self.first.ends(data) + self.second.ends(data)


#: What engine.detect scans with.
AnyScanner = Scanner | Joined


class _Collector:
    """Hyperscan match handler that appends (id, start, end); returning None goes on."""

    __slots__ = ("append",)

    def __init__(self, hits: list[Hit]) -> None:
        self.append = hits.append

    def __call__(self, pid: int, start: int, end: int, _flags: int, _ctx: object) -> None:
        self.append((pid, start, end))


class _Shifted:
    """Match handler for a window starting at `offset`: keeps matches ending in
    [first, limit), shifted to offsets in the whole text."""

    __slots__ = ("append", "first", "limit", "offset")

    def __init__(self, hits: list[Hit], offset: int, first: int, limit: int) -> None:
        self.append = hits.append
        self.offset = offset
        self.first = first
        self.limit = limit

    def __call__(self, pid: int, start: int, end: int, _flags: int, _ctx: object) -> None:
        end += self.offset
        if self.first <= end < self.limit:
            self.append((pid, start + self.offset, end))


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cellblock" / "hyperscan"


def compiled(expressions: list[bytes] | Callable[[], list[bytes]], flags: list[int],
             ids: list[int], cacheable: bool, key: object = None) -> hyperscan.Database:
    """A compiled block-mode database, from the on-disk cache when possible.

    Compiling the built-in rules takes about a second, and every kernel's warden is a new
    process: the serialised database is cached in ``~/.cache/cellblock/hyperscan`` (mode 0700),
    keyed by the hyperscan version and the exact patterns, flags and ids (or by `key`, when the
    expressions are a function that is costly to call). A database holding operator-registered
    exact secrets is never written to disk (``cacheable=False``).
    """
    if key is None:
        assert not callable(expressions)
        key = (expressions, flags, ids)
    digest = hashlib.sha256(repr((getattr(hyperscan, "__version__", ""), key))
                            .encode()).hexdigest()[:32]
    path = _cache_dir() / f"{digest}.hsdb"
    if cacheable:
        try:
            db = hyperscan.loadb(path.read_bytes(), hyperscan.HS_MODE_BLOCK)
            db.scratch = hyperscan.Scratch(db)
            return db
        except Exception:  # noqa: S110 - missing, stale or torn: compile anew
            pass
    if callable(expressions):
        expressions = expressions()
    db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    db.compile(expressions=expressions, ids=ids, elements=len(expressions), flags=flags)
    if cacheable:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(hyperscan.dumpb(db))
            os.replace(tmp, path)
    return db
