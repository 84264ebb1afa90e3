"""JSON Web Tokens: three base64url parts, the first two JSON objects (``eyJ`` = ``{"``).

The header is decoded and must be a JSON object with an ``alg``; anything else that merely
looks like ``eyJ...`` is left alone.
"""

from __future__ import annotations

import base64
import binascii
import json

from cellblock.redact.rule import Rule


def jwt_header_ok(token: str) -> bool:
    header = token.split(".", 1)[0]
    try:
        raw = base64.urlsafe_b64decode(header + "=" * (-len(header) % 4))
        obj = json.loads(raw)
    except (binascii.Error, ValueError):
        return False
    return isinstance(obj, dict) and "alg" in obj


RULES: tuple[Rule, ...] = (
    Rule(
        "jwt",
        r"\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]*",
        4096,
        validate=jwt_header_ok,
    ),
)
