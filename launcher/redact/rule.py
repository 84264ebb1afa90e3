"""The declarative shape of a detector: a `Rule` (one pattern) or a `Block` (begin/end pair).

Detector modules hold tuples of these and nothing else but small validators. The engine
compiles every `pattern` into one hyperscan database (block mode, ``HS_FLAG_SOM_LEFTMOST``), so
patterns use hyperscan syntax: no lookaround, no backreferences, and no large bounded repeats
(hyperscan refuses ``{8,200}`` with leftmost start-of-match: write ``{8,}`` and let ``max_len``
cap the candidate instead).

A hyperscan report gives the leftmost start for each end offset. For each rule the engine keeps,
per start, the longest end, clips the candidate to ``max_len`` characters from its start, then:

- ``secret``: an optional Python `re` pattern *matched* (``re.match``) against that bounded
  candidate, whose group ``v`` narrows the finding to the secret itself (``password=`` stays
  visible, the value goes); or a function returning the ``(start, end)`` of the secret in the
  candidate. Python `re` only ever runs on these bounded candidates.
- ``validate``: an optional check on the final secret text (checksum, entropy, placeholder
  list); a candidate it rejects is not a finding.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from cellblock.redact.spans import token_end


@dataclass(frozen=True)
class Rule:
    """One detector pattern. ``id`` becomes the ``<rule>`` in ``[REDACTED:<rule>]``."""

    id: str
    pattern: str
    max_len: int
    caseless: bool = False
    secret: re.Pattern[str] | Callable[[str], tuple[int, int] | None] | None = None
    validate: Callable[[str], bool] | None = None
    #: try every reported end of a start, longest first, until one validates (IBAN, card).
    all_ends: bool = False
    #: clip an over-long candidate to its last ``max_len`` characters, not its first (for
    #: patterns whose distinctive part is at the end, like the ``@domain`` of an email).
    clip_end: bool = False
    #: a cheaper pattern for the main scan (scanner.py), when `pattern` would keep hyperscan
    #: busy on every byte: every match of `pattern` must hold a match of `prefilter` that ends
    #: at most `prefilter_slack` characters before it (a suffix of `pattern` from its first
    #: literal, say). `pattern` itself then only runs in a window around each prefilter end.
    prefilter: str | None = None
    prefilter_slack: int = 0
    #: a finding that reaches the end of a clipped candidate goes on over the token
    #: characters after it (spans.token_end): a generic value longer than ``max_len``.
    extend: bool = False
    #: characters that, right before a candidate, rule it out (a card number's 16 digits
    #: after a "." are the fraction of a float: 2.4111111111111111 is a CPU time)
    not_after: str = ""


@dataclass(frozen=True)
class Block:
    """A delimited secret (a PEM private key): ``begin`` paired with the next ``end``.

    The finding runs from the start of ``begin`` to the end of ``end`` when that is at most
    ``max_len`` characters; otherwise (no end marker yet, or a body longer than the cap) it runs
    from ``begin`` for ``max_len`` characters or to the end of the text. Only two reports per
    block, whatever the body holds, so a flood of headers stays linear.
    """

    id: str
    begin: str
    end: str
    max_len: int


def escape_skip(pattern: str, text: str, start: int) -> int:
    """Where a candidate of `pattern` starting at `start` really starts (after the escape
    that `escaped_boundary` lets stand for a word boundary)."""
    if text.startswith("\\", start) and pattern.startswith(r"\b"):
        return start + 2
    return start


def check(rule: Rule, text: str, start: int, end: int) -> tuple[int, int] | None:
    """The secret's span for one candidate of `rule`, or None if the candidate fails."""
    start = escape_skip(rule.pattern, text, start)
    if rule.not_after and start > 0 and text[start - 1] in rule.not_after:
        return None
    cap = -1
    if end - start > rule.max_len:
        if rule.clip_end:
            start = end - rule.max_len
        else:
            end = cap = start + rule.max_len
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
    if end == cap and rule.extend:  # a value longer than the candidate: all of it
        end = token_end(text, end)
    if rule.validate is not None and not rule.validate(text[start:end]):
        return None
    return start, end
