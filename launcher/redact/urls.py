"""Passwords inside URLs (``scheme://user:pass@host``) and in DB connection strings.

Only the password is redacted: ``postgres://app:[REDACTED:url-password]@db:5432/x``.
"""

from __future__ import annotations

import re

from cellblock.redact.rule import Rule

_PLACEHOLDERS = frozenset(
    {
        "password",
        "passwd",
        "pass",
        "pwd",
        "secret",
        "xxx",
        "xxxx",
        "****",
        "changeme",
        "user",
        "username",
        "redacted",
        "your_password",
        "yourpassword",
        "mypassword",
        "p",
        "x",
    }
)


def plausible_password(value: str) -> bool:
    """Not empty, not a placeholder, not a template variable."""
    low = value.strip().lower()
    if not low or low in _PLACEHOLDERS or set(low) <= {"*", "x", "."}:
        return False
    return not low.startswith(("$", "{", "<", "%(", "[redacted"))


def _connection_string_value(candidate: str) -> tuple[int, int] | None:
    """The value of the last ``password=``/``pwd=`` key in a ``k=v;k=v`` candidate."""
    low = candidate.lower()
    key = max(low.rfind("password"), low.rfind("pwd"))
    if key < 0:
        return None
    eq = low.find("=", key)
    if eq < 0:
        return None
    start = eq + 1
    while start < len(candidate) and candidate[start] in " \t":
        start += 1
    end = start
    while end < len(candidate) and candidate[end] not in ";\r\n'\"":
        end += 1
    return (start, end) if end > start else None


RULES: tuple[Rule, ...] = (
    Rule(
        "url-password",
        r"[a-zA-Z][a-zA-Z0-9+.-]{0,20}://[^\s:/?#@'\"<>]*:[^\s/?#@'\"<>]+@[A-Za-z0-9.\[]",
        420,
        prefilter=r"://[^\s:/?#@'\"<>]*:[^\s/?#@'\"<>]+@[A-Za-z0-9.\[]",
        secret=re.compile(
            r"[a-zA-Z][a-zA-Z0-9+.-]{0,20}://[^\s:/?#@'\"<>]{0,128}:(?P<v>[^\s/?#@'\"<>]{1,256})@"
        ),
        validate=plausible_password,
    ),
    # ADO.NET / ODBC / JDBC-properties style: Server=...;Database=...;Password=...;
    Rule(
        "connection-string-password",
        r"(?:server|data source|host|user id|uid|database|initial catalog)\s*=[^;\r\n]*;"
        r"[^\r\n]*(?:password|pwd)\s*=\s*[^;\r\n'\"]+",
        512,
        caseless=True,
        secret=_connection_string_value,
        validate=plausible_password,
    ),
)
