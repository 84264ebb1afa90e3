"""Cloud provider credentials: AWS, Google Cloud, Azure."""

from __future__ import annotations

import re

from cellblock.redact.rule import Rule

# Keyword, optional quote, a separator, optional quote: the shape of `key = "value"` in
# INI files, env files, JSON, YAML and Python reprs.
_ASSIGN = r"""["']?\s{0,4}(?::=|=>|[:=])\s{0,4}["']?"""

RULES: tuple[Rule, ...] = (
    # Access key ids are 4 prefix letters + 16 base32 characters (A-Z, 2-7).
    Rule("aws-access-key-id", r"\b(?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z2-7]{16}\b", 20),
    # Secret keys are 40 base64 characters with no shape of their own: only in context.
    Rule(
        "aws-secret-access-key",
        r"aws_?(?:secret_?access_?key|secret_?key)" + _ASSIGN + r"[A-Za-z0-9/+]{40}\b",
        120,
        caseless=True,
        secret=re.compile(
            r"(?i)aws_?(?:secret_?access_?key|secret_?key)" + _ASSIGN + r"(?P<v>[A-Za-z0-9/+]{40})"
        ),
    ),
    Rule("gcp-api-key", r"\bAIza[0-9A-Za-z_-]{35}\b", 39),
    # A service-account JSON: its private_key is caught by keys.py (the PEM block is there,
    # newlines escaped); the key id next to it is redacted too.
    Rule(
        "gcp-service-account-key-id",
        r"\"private_key_id\"\s{0,4}:\s{0,4}\"[0-9a-f]{40}\"",
        80,
        secret=re.compile(r"\"private_key_id\"\s{0,4}:\s{0,4}\"(?P<v>[0-9a-f]{40})\""),
    ),
    Rule("google-oauth-client-secret", r"\bGOCSPX-[A-Za-z0-9_-]{28}\b", 35),
    Rule("google-oauth-access-token", r"\bya29\.[A-Za-z0-9_-]{30,}", 2048),
    Rule(
        "azure-storage-account-key",
        r"AccountKey=[A-Za-z0-9+/]{86}==",
        100,
        caseless=True,
        secret=re.compile(r"(?i)AccountKey=(?P<v>[A-Za-z0-9+/]{86}==)"),
    ),
    Rule(
        "azure-sas-signature",
        r"[?&;]sig=[A-Za-z0-9%+/]{40,}(?:=|%3D){0,2}",
        200,
        caseless=True,
        secret=re.compile(r"(?i)[?&;]sig=(?P<v>[A-Za-z0-9%+/]{40,}(?:=|%3D){0,2})"),
    ),
    Rule(
        "azure-ad-client-secret",
        r"(?:^|[^A-Za-z0-9_~.-])[A-Za-z0-9_~.]{3}[0-9]Q~[A-Za-z0-9_~.-]{31,34}\b",
        40,
        secret=re.compile(
            r"[^A-Za-z0-9_~.-]?(?P<v>[A-Za-z0-9_~.]{3}[0-9]Q~[A-Za-z0-9_~.-]{31,34})"
        ),
    ),
)
