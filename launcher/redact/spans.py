"""Finding spans: merging overlaps, every other occurrence of a found value, and the id that
goes with a found secret (issue 14).

A span is ``(start, end, rule)`` in the normalised text. `merge` unions overlapping spans;
`repeats` adds the other places a found value appears, so a secret caught once (after
``token =``) is not left bare a few characters later (after ``|``, in a log line that echoes it),
and `known` values found earlier in the same cell are redacted wherever they come back.
`pairs` adds the other half of a two-part credential next to a generic finding: the
``client_id`` beside a ``client_secret``, the ``access_key_id`` beside its key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

Span = tuple[int, int, str]

#: A found value shorter than this is not looked for elsewhere (a short value, ``8080``,
#: would redact ordinary text that happens to hold it).
MIN_REPEAT = 8
#: At most this many distinct values are looked for in one text (each costs a ``str.find``
#: pass over the text: linear, with a constant factor this bounds).
MAX_VALUES = 64
REPEAT_RULE = "repeat"
PAIR_RULE = "credential-id"
#: How far `token_end` follows a value past its rule's candidate (the longest encoded run
#: that is decoded, and what a stream holds back of a run of token characters: engine.py).
TOKEN_CAP = 8192
_TOKEN_RUN = re.compile(r"[A-Za-z0-9+/=_.~%-]*")


def merge(found: list[Span]) -> list[Span]:
    """Union of overlapping spans; each named after its longest finding (a specific rule
    before the generic one on a tie, then the earliest)."""
    if not found:
        return []

    def weight(start: int, end: int, rule: str) -> tuple[int, bool]:
        return end - start, not rule.startswith(("generic", REPEAT_RULE))

    found.sort(key=lambda f: (f[0], f[0] - f[1], f[2].startswith("generic")))
    merged: list[list[Any]] = []  # [start, end, rule, weight], updated in place
    for start, end, rule in found:
        if merged and start < merged[-1][1]:
            current = merged[-1]
            if weight(start, end, rule) > current[3]:
                current[2], current[3] = rule, weight(start, end, rule)
            current[1] = max(current[1], end)
        else:
            merged.append([start, end, rule, weight(start, end, rule)])
    return [(s, e, r) for s, e, r, _w in merged]


def values(text: str, spans: Iterable[Span]) -> list[str]:
    """The distinct found values worth looking for elsewhere (never a redaction marker)."""
    out: dict[str, None] = {}
    for start, end, _rule in spans:
        if end - start >= MIN_REPEAT:
            out.setdefault(text[start:end])
    return list(out)[:MAX_VALUES]


def repeats(text: str, spans: list[Span], known: Iterable[str] = ()) -> list[Span]:
    """`spans` plus every other occurrence in `text` of a value they cover, or of a `known`
    value (found earlier in the cell), named after the first finding of that value."""
    names = {text[s:e]: rule for s, e, rule in spans if e - s >= MIN_REPEAT}
    for value in known:
        names.setdefault(value, REPEAT_RULE)
    if not names:
        return spans
    extra: list[Span] = []
    for value in list(names)[:MAX_VALUES]:
        pos = text.find(value)
        while pos >= 0:
            extra.append((pos, pos + len(value), names[value]))
            pos = text.find(value, pos + len(value))
    return merge(spans + extra) if extra else spans


def token_end(text: str, end: int) -> int:
    """Where the run of token characters that continues at `end` ends (at most `TOKEN_CAP`
    characters on): a value longer than its rule's candidate is redacted whole."""
    match = _TOKEN_RUN.match(text, end, min(len(text), end + TOKEN_CAP))
    return match.end() if match else end


#: How far from a generic finding the id of the same credential is looked for.
PAIR_REACH = 300
#: An id assignment that is half of a credential with the secret next to it.
_PAIR_ID = re.compile(
    r"(?i)(?<![A-Za-z0-9])[A-Za-z_]{0,20}(?:client|app|application|consumer|access[_-]?key"
    r"|api[_-]?key|secret|key)[_-]?id[\"']?[ \t]*(?::=|=>|[:=])[ \t]*[\"']?"
    r"(?P<v>[A-Za-z0-9_.~+/-]{8,128})")


#: Findings that are not secrets (personal data): no credential id goes with them.
_NOT_SECRETS = frozenset({"email", "phone", "card", "iban", "ssn", REPEAT_RULE, PAIR_RULE})


def pairs(text: str, spans: list[Span]) -> list[Span]:
    """`spans` plus the id assigned within `PAIR_REACH` characters of each secret finding
    (the first `MAX_VALUES` of them), named `PAIR_RULE`."""
    extra: list[Span] = []
    for start, end, _rule in [s for s in spans if s[2] not in _NOT_SECRETS][:MAX_VALUES]:
        # before and after the finding (not inside it: a merged span can be long)
        for lo, hi in ((max(0, start - PAIR_REACH), start),
                       (end, min(len(text), end + PAIR_REACH))):
            for match in _PAIR_ID.finditer(text, lo, hi):
                extra.append((match.start("v"), match.end("v"), PAIR_RULE))
    return merge(spans + extra) if extra else spans
