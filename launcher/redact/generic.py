"""Generic ``password=`` / ``token:`` / ``api_key =`` assignments with a high-entropy value.

Like gitleaks' ``generic-api-key``: a keyword, an assignment, and a value of at least 8
characters whose Shannon entropy is at least `MIN_ENTROPY` bits per character. Template
variables, placeholders and plain identifiers (``token=self.pad_token``) are not findings.
Short human passwords (``password=hunter2``) fall below the entropy bar: by design, since the
rule has no other way to tell a secret from a word.
"""

from __future__ import annotations

import math
import re
from collections import Counter

from cellblock.redact.rule import Rule

MIN_ENTROPY = 3.5

_KEYWORDS = (
    r"password|passwd|pwd|secret|token|api[_.-]?key|apikey|access[_.-]?key|auth[_.-]?key"
    r"|client[_.-]?secret|private[_.-]?key|credentials?"
)
_ASSIGN = r"""["']?\s*(?::=|=>|[:=])\s*["'`]?"""
_VALUE = r"""[^\s'"`,;:<>(){}\[\]\\=&]"""

_PLACEHOLDER_PARTS = (
    "xxxx",
    "****",
    "...",
    "${",
    "{{",
    "%(",
    "<",
    ">",
    "changeme",
    "change_me",
    "example",
    "placeholder",
    "your_",
    "your-",
    "yourkey",
    "redacted",
    "dummy",
    "sample",
    "replace",
)
_IDENTIFIER = re.compile(r"[a-z_][a-z_.]*")
_PLACEHOLDER = re.compile("|".join(re.escape(part) for part in _PLACEHOLDER_PARTS))


def shannon_entropy(value: str) -> float:
    """Bits per character of `value` (0.0 for the empty string)."""
    n = len(value)
    if not n:
        return 0.0
    return -sum(c / n * math.log2(c / n) for c in Counter(value).values())


def high_entropy_value(value: str) -> bool:
    """The value looks like a random secret, not a placeholder or an identifier."""
    low = value.lower()
    if _PLACEHOLDER.search(low):
        return False
    if _IDENTIFIER.fullmatch(low) or low.isdigit():
        return False
    return shannon_entropy(value) >= MIN_ENTROPY


RULES: tuple[Rule, ...] = (
    Rule(
        "generic-secret",
        r"(?:" + _KEYWORDS + r")[A-Za-z0-9_.-]*" + _ASSIGN + _VALUE + r"{8,}={0,2}",
        300,
        caseless=True,
        secret=re.compile(
            r"(?i)(?:"
            + _KEYWORDS
            + r")[A-Za-z0-9_.-]*"
            + _ASSIGN
            + r"(?P<v>"
            + _VALUE
            + r"{8,}={0,2})"
        ),
        validate=high_entropy_value,
    ),
)
