"""Operator-registered exact secrets, in raw and encoded forms.

Each secret becomes literal patterns for: the raw text; its base64 and URL-safe base64 at all
three byte alignments (only the characters fully determined by the secret, so the secret is
found inside a longer base64 blob whatever precedes it; up to two boundary characters, at
most 12 bits, stay visible); lowercase and uppercase hex of its UTF-8 bytes; and its
percent-encoded forms (``quote`` with and without a safe set, ``quote_plus``). Encoded forms
shorter than `MIN_ENCODED_LEN` characters are not registered (they would fire on random data).

The secrets themselves live only in this process's memory: never in a log, never in the jail.
"""

from __future__ import annotations

import base64
from urllib.parse import quote, quote_plus

from cellblock.redact.rule import Rule

RULE_ID = "operator-secret"
MIN_SECRET_LEN = 4
MIN_ENCODED_LEN = 8


def _literal(text: str) -> str:
    """A hyperscan pattern for `text` as the engine scans it (non-ASCII characters are SUB)."""
    out = []
    for c in text:
        if c.isascii() and c.isalnum():
            out.append(c)
        else:
            out.append(f"\\x{ord(c) if c.isascii() else 0x1A:02x}")
    return "".join(out)


def _base64_cores(data: bytes) -> set[str]:
    cores = set()
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + data).decode()
        first = -(-8 * shift // 6)  # first character made only of the secret's bits
        last = (8 * (shift + len(data)) - 6) // 6  # last such character
        core = encoded[first : last + 1]
        cores.add(core)
        cores.add(core.replace("+", "-").replace("/", "_"))
    return cores


def encoded_forms(secret: str) -> dict[str, set[str]]:
    """Every registered form of `secret`, by encoding name."""
    data = secret.encode("utf-8")
    forms = {
        "": {secret},
        "base64": _base64_cores(data),
        "hex": {data.hex(), data.hex().upper()},
        "percent": {quote(secret, safe=""), quote(secret), quote_plus(secret)},
    }
    for name in ("base64", "hex", "percent"):
        forms[name] = {f for f in forms[name] if len(f) >= MIN_ENCODED_LEN and f != secret}
    return forms


def rules_for(secrets: tuple[str, ...]) -> tuple[Rule, ...]:
    """Literal rules for the registered secrets; raises ValueError for a too-short one."""
    rules: list[Rule] = []
    seen: set[str] = set()
    for index, secret in enumerate(secrets):
        if len(secret) < MIN_SECRET_LEN:
            raise ValueError(
                f"exact secret #{index} is {len(secret)} characters long; at least "
                f"{MIN_SECRET_LEN} are needed to redact it without redacting ordinary text"
            )
        for encoding, forms in encoded_forms(secret).items():
            rule_id = f"{RULE_ID}:{encoding}" if encoding else RULE_ID
            for form in sorted(forms):
                if form not in seen:
                    seen.add(form)
                    rules.append(Rule(rule_id, _literal(form), len(form), validate=form.__eq__))
    return tuple(rules)
