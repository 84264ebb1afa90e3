"""Provider token formats loaded from rules.toml (issue 14): data, one entry per provider.

Each rule of the file becomes a `Rule`; ``secret`` is compiled with Python's `re` (it only ever
runs on a bounded candidate), ``min_entropy`` becomes a validator. The file is read once, at
import; a malformed entry is an error that names it.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cellblock.redact.rule import Rule
from cellblock.redact.values import shannon_entropy

RULES_FILE = Path(__file__).with_name("rules.toml")
_FIELDS = {"id", "pattern", "max_len", "caseless", "secret", "min_entropy", "mixed"}


def _check(bits: float | None, mixed: bool) -> Callable[[str], bool] | None:
    if bits is None and not mixed:
        return None

    def validate(token: str) -> bool:
        if mixed and not (any(c.isdigit() for c in token) and any(c.isalpha() for c in token)):
            return False
        return bits is None or shannon_entropy(token) >= bits
    return validate


def _rule(provider: str, entry: dict[str, Any]) -> Rule:
    unknown = set(entry) - _FIELDS
    missing = {"id", "pattern", "max_len"} - set(entry)
    if unknown or missing:
        raise ValueError(f"{RULES_FILE.name}: provider {provider!r}, rule {entry.get('id')!r}: "
                         f"unknown fields {sorted(unknown)}, missing {sorted(missing)}; "
                         f"allowed: {sorted(_FIELDS)}")
    secret = re.compile(entry["secret"]) if "secret" in entry else None
    bits = entry.get("min_entropy")
    return Rule(str(entry["id"]), str(entry["pattern"]), int(entry["max_len"]),
                caseless=bool(entry.get("caseless", False)), secret=secret,
                validate=_check(None if bits is None else float(bits),
                                bool(entry.get("mixed", False))))


def load(path: Path = RULES_FILE) -> tuple[tuple[tuple[str, str], ...], tuple[Rule, ...]]:
    """((provider, source) per provider, rules) from `path`."""
    data = tomllib.loads(path.read_text())
    providers: list[tuple[str, str]] = []
    rules: list[Rule] = []
    for provider in data.get("provider", []):
        name = provider.get("name")
        if not name or "source" not in provider:
            raise ValueError(f"{path.name}: every provider needs a name and a source: {provider}")
        providers.append((str(name), str(provider["source"])))
        rules.extend(_rule(name, entry) for entry in provider.get("rules", []))
    return tuple(providers), tuple(rules)


PROVIDERS, RULES = load()
