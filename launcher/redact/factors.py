"""Required literals of a detector pattern, and their base64 and hex forms (used by decode.py).

Every match of ``\\bghp_[A-Za-z0-9]{36}\\b`` contains ``ghp_``; every match of the generic rule
contains one of ``password``, ``pwd``, ``secret``, ``token``... (any case). So a base64 or hex run
can only decode to text holding a finding if the run contains the *encoding* of one of those
literals: its hex (either case), or the base64 characters fully determined by it at one of the
three byte alignments (standard or URL-safe alphabet, as exact.py does for operator secrets).
Those encodings are plain literals, which hyperscan finds at the speed of its literal matcher,
whereas any pattern that follows runs of base64 characters costs a nanosecond per byte.

`required` reads a pattern with Python's own regex parser (hyperscan syntax is a subset here) and
picks, for the whole pattern, a set of alternative byte sequences of which every match contains
one; each position of a sequence is a set of bytes (``[Pp]`` for a caseless ``p``). A sequence
is trimmed to a window of at most `MAX_WINDOW` positions whose byte combinations number at most
`MAX_COMBOS`, keeping the most informative one. Patterns with no usable literal (the Discord bot
token: a class, 23-27 characters, a dot...) give None: the engine reports which, and a test pins
that list.
"""

from __future__ import annotations

import base64
import itertools
import math
from collections.abc import Sequence
from typing import Any

#: A required byte sequence: one set of possible bytes per position.
Seq = list[frozenset[int]]

MAX_WINDOW = 10
MAX_COMBOS = 64
#: Bits of information a sequence needs to be worth using (3 literal characters is 21).
MIN_BITS = 15.0
#: Shortest base64 core registered (2 characters would fire everywhere).
MIN_CORE = 3


def required(pattern: str, caseless: bool = False) -> list[Seq] | None:
    """Alternatives of which every match of `pattern` contains one, or None."""
    try:
        from re import _parser  # type: ignore[attr-defined]

        parsed = _parser.parse(pattern.replace(r"\z", r"\Z"))
    except Exception:
        return None
    best = _best(list(parsed), caseless)
    if best is None or _score(best) < MIN_BITS:
        return None
    return best


def _byte_set(op: Any, av: Any, caseless: bool) -> frozenset[int] | None:
    from re import _constants as c  # type: ignore[attr-defined]

    out: set[int] = set()
    if op is c.LITERAL:
        out.add(av)
    elif op is c.IN:
        for item_op, item in av:
            if item_op is c.LITERAL:
                out.add(item)
            elif item_op is c.RANGE:
                out.update(range(item[0], item[1] + 1))
            else:
                return None  # negated classes, categories: too wide to be a literal
    else:
        return None
    if caseless:
        out |= {ord(chr(b).swapcase()) for b in out if chr(b).isascii() and chr(b).isalpha()}
    if not out or max(out) > 127:
        return None
    return frozenset(out)


def _flatten(items: Sequence[Any]) -> list[Any]:
    from re import _constants as c  # type: ignore[attr-defined]

    out: list[Any] = []
    for op, av in items:
        if op is c.SUBPATTERN:
            out.extend(_flatten(list(av[-1])))
        else:
            out.append((op, av))
    return out


def _lead(items: Sequence[Any], caseless: bool) -> Seq:
    """The fixed positions a sequence of items starts with."""
    from re import _constants as c  # type: ignore[attr-defined]

    out: Seq = []
    for op, av in _flatten(items):
        s = _byte_set(op, av, caseless)
        if s is not None:
            out.append(s)
            continue
        if op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT):
            low, high, sub = av
            sub = _flatten(list(sub))
            inner = _byte_set(sub[0][0], sub[0][1], caseless) if len(sub) == 1 else None
            if inner is not None and low >= 1:
                out.extend([inner] * low)
                if high == low:
                    continue
        if op is c.AT:
            continue
        break
    return out


def _best(items: Sequence[Any], caseless: bool) -> list[Seq] | None:
    """The best alternatives for a sequence of parsed items (see the module doc)."""
    from re import _constants as c  # type: ignore[attr-defined]

    candidates: list[list[Seq]] = []
    run: Seq = []

    def flush() -> None:
        if run:
            candidates.append([list(run)])
        run.clear()

    for op, av in _flatten(items):
        s = _byte_set(op, av, caseless)
        if s is not None:
            run.append(s)
        elif op is c.AT:
            continue  # zero width: the run goes on
        elif op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT):
            low, high, sub = av
            sub = _flatten(list(sub))
            inner = _byte_set(sub[0][0], sub[0][1], caseless) if len(sub) == 1 else None
            if inner is not None:
                run.extend([inner] * low)
                if high != low:
                    flush()
            else:
                flush()
                if low >= 1:
                    found = _best(sub, caseless)
                    if found:
                        candidates.append(found)
        elif op is c.BRANCH:
            branches = [list(b) for b in av[1]]
            leads = [_lead(b, caseless) for b in branches]
            if run and all(leads):
                candidates.append([list(run) + lead for lead in leads])
            if run:
                candidates.append([list(run)])
            per_branch = [_best(b, caseless) for b in branches]
            if all(per_branch):
                candidates.append([seq for found in per_branch if found for seq in found])
            run.clear()
        else:
            flush()
    flush()
    trimmed = [[_window(seq) for seq in cand] for cand in candidates]
    trimmed = [cand for cand in trimmed if all(cand)]
    return max(trimmed, key=_score) if trimmed else None


def _bits(s: frozenset[int]) -> float:
    return math.log2(128 / len(s))


def _window(seq: Seq) -> Seq:
    """The most informative window of `seq` within MAX_WINDOW positions and MAX_COMBOS,
    using only near-literal positions (a letter in either case) when that is enough."""
    for widest in (4, 16, 128):
        best: Seq = []
        best_bits = -1.0
        for i in range(len(seq)):
            combos, bits = 1, 0.0
            for j in range(i, min(len(seq), i + MAX_WINDOW)):
                combos *= len(seq[j])
                if combos > MAX_COMBOS or len(seq[j]) > widest:
                    break
                bits += _bits(seq[j])
                if bits > best_bits:
                    best, best_bits = seq[i:j + 1], bits
        if best_bits >= MIN_BITS:
            return best
    return best


def _score(alternatives: list[Seq]) -> float:
    return min(sum(_bits(s) for s in seq) for seq in alternatives)


def alphabet(pattern: str, caseless: bool = False) -> frozenset[int] | None:
    """Every byte a match of `pattern` can contain, or None when that is not a small known
    set (a negated class, a category such as ``\\s``, ``.``, or a pattern Python cannot read)."""
    try:
        from re import _parser  # type: ignore[attr-defined]

        parsed = _parser.parse(pattern.replace(r"\z", r"\Z"))
    except Exception:
        return None
    out: set[int] = set()
    return frozenset(out) if _collect(list(parsed), caseless, out) else None


def _collect(items: Sequence[Any], caseless: bool, out: set[int]) -> bool:
    from re import _constants as c  # type: ignore[attr-defined]

    for op, av in items:
        s = _byte_set(op, av, caseless)
        if s is not None:
            out |= s
        elif op is c.AT:
            continue
        elif op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT):
            if not _collect(list(av[2]), caseless, out):
                return False
        elif op is c.SUBPATTERN:
            if not _collect(list(av[-1]), caseless, out):
                return False
        elif op is c.BRANCH:
            if not all(_collect(list(b), caseless, out) for b in av[1]):
                return False
        else:
            return False
    return True


def combos(seq: Seq) -> list[bytes]:
    """Every byte string `seq` stands for."""
    return [bytes(c) for c in itertools.product(*[sorted(s) for s in seq])]


def base64_cores(data: bytes) -> set[str]:
    """The base64 characters fully determined by `data` at each of the three alignments, in
    both alphabets; cores shorter than MIN_CORE are left out."""
    cores = set()
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + data).decode()
        first = -(-8 * shift // 6)
        last = (8 * (shift + len(data)) - 6) // 6
        core = encoded[first:last + 1]
        if len(core) >= MIN_CORE:
            cores.add(core)
            cores.add(core.replace("+", "-").replace("/", "_"))
    return cores


def hyperscan_literal(text: str) -> str:
    """`text` as a hyperscan pattern that matches exactly it."""
    return "".join(c if c.isalnum() else f"\\x{ord(c):02x}" for c in text)
