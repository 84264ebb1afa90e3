"""Is this assigned value a secret? Checks for the generic detectors (generic.py, issue 14).

A value next to a secret keyword is a finding unless it is one of these, each seen in the
labelled corpus of benchmarks/redact_corpus.py (the thresholds were chosen there, by
measurement: benchmarks/eval_redact.py):

- a placeholder or a documented example (``xxxx``, ``<your-token>``, ``${TOKEN}``,
  ``changeme``, ``AKIAIOSFODNN7EXAMPLE``, a run of one character);
- code, not data: a dotted name (``self.pad_token``, ``X25519.secret_length``), a call, a
  snake_case or CONSTANT_CASE name, a word;
- a URL or a path (credentials inside URLs are urls.py's);
- too regular to be random: its entropy, relative to the most its length and alphabet allow,
  below `MIN_RELATIVE_ENTROPY`.

The key it is assigned to also matters (`key_allowed`): ``credentialsId``, ``secret_length``,
``public_key``, ``csrf_token``, ``max_tokens`` name something that is not a secret.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter

from cellblock.redact.rule import Rule

#: Relative entropy (bits per character over log2 of the largest alphabet the length allows)
#: a value needs. Chosen on the corpus (docs/output.md): random tokens of 8+ characters score
#: 0.85 and up, words, ids and version strings lower.
MIN_RELATIVE_ENTROPY = 0.7
#: Fewest characters of a value.
MIN_LEN = 8

_PLACEHOLDER_PARTS = (
    "xxxx", "****", "...", "${", "{{", "%(", "<", ">", "changeme", "change_me", "change-me",
    "example", "placeholder", "your_", "your-", "yourkey", "yourtoken", "yoursecret",
    "redacted", "dummy", "sample", "replace", "insert", "enter_", "fake", "foobar",
    "123456789", "abcdefgh", "qwerty", "notreal", "not_real",
    "[redacted", "$(", "#{", "%s", "@@", "todo", "fixme", "none", "null", "undefined",
)
_PLACEHOLDER = re.compile("|".join(re.escape(part) for part in _PLACEHOLDER_PARTS))
#: Documented example keys (AWS' own documentation, gitleaks' and detect-secrets' tests).
EXAMPLES = frozenset({
    "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "je7MtGbClwBF/2Zp9Utk/h3yCo8nvbEXAMPLEKEY", "AKIAI44QH8DHBEXAMPLE",
    # yarn's public npm registry key (gitleaks' stopwords, yarnpkg/berry#6201)
    "6fe4476ee5a1832882e326b506d14126",
})
#: What a made-up token is filled with: a run of one character, a counting sequence.
_FILLER = re.compile(r"(?i)x{4}|\*{4}|([0-9])\1{5}|(?-i:([a-z])\2{7})|\.{3}|abcdefgh|12345678"
                     r"|0123456|abc123|example"
                     r"|placeholder|your[_-]|<[a-z_-]+>|\$\{|\{\{")
_LONG_FILLER = re.compile(r"(?i)example|x{8}")
_DOTTED = re.compile(r"[A-Za-z_$][\w$]*(?:\.[A-Za-z_]+\d*)+(?:\(\)?)?")
_SNAKE = re.compile(r"[A-Za-z]+(?:[_-][A-Za-z]+)+|[a-z]+|[A-Z]+")
#: A part of a name: a word, a word and a number (``CXX11``, ``P2``, ``X509``), a number.
_NAME_PART = re.compile(r"[A-Za-z]{1,20}\d*|\d+")
_SEMVER = re.compile(r"\d+\.\d+\.\d+")
_HOSTNAME = re.compile(r"(?:[A-Za-z0-9-]+\.)+(?:com|org|net|io|dev|cloud|local|internal|[a-z]{2})")
_HEX = re.compile(r"[0-9a-f]+|[0-9A-F]+")
_HUMP = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])")
_PATH = re.compile(r"(?:[~.]{0,2}/|[A-Za-z]:\\)[\w./-]*")
_VERSIONISH = re.compile(r"[A-Za-z]{0,8}\d+(?:\.\d+)+(?:[-_+.][A-Za-z0-9]{1,12}){0,3}")
#: A word and a number (``user_85258``, ``item42``, ``2ndplace``): an id, not a secret.
_WORD_NUMBER = re.compile(r"[A-Za-z]{2,}[_.:-]?\d+|\d+[_.:-]?[A-Za-z]{2,}")
_UUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
#: Words of a key that make it name something else than a secret (a length, an id, a URL).
_KEY_WORDS_NOT_SECRET = frozenset({
    "id", "ids", "name", "names", "length", "len", "size", "type", "types", "url", "uri",
    "urls", "endpoint", "file", "filename", "path", "dir", "count", "version", "expires",
    "expiry", "expiration", "ttl", "format", "header", "field", "prefix", "suffix", "policy",
    "limit", "timeout", "index", "max", "min", "num", "enabled", "required", "provider",
    "class", "method", "mode", "kind", "label", "scope", "scopes", "usage", "store", "manager",
    "location", "region", "ref", "arn", "alias", "public", "pub", "primary", "foreign", "csrf",
    "xsrf", "pad", "eos", "bos", "unk", "sep", "cls", "mask", "sort", "partition", "cache",
    "row", "idx", "lookup", "sequence", "schema", "bucket", "keyboard", "hotkey", "monkey",
    "turkey", "total", "tokens", "tokenizer", "tokenize", "tokenized", "author", "authors",
    "authority", "accessibility", "accessor", "hash", "algorithm", "algo", "bits", "strength",
    "rotation", "hint", "question", "vault", "var", "env", "variable", "param",
    "template", "placeholder", "example", "description", "desc", "help", "title",
    "attr", "attribute", "property", "properties", "col", "column", "frame", "press",
    "pressed", "code", "up", "down", "left", "right", "selector", "word", "stone", "ring",
    "board", "mesh", "pair", "tab", "storetype", "keystore", "keytab", "jar", "input",
    "output", "level", "state", "status", "issuer", "subject", "audience",
    "authenticity", "results", "keyword", "keywords",
})
_KEY_WORD = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")


def shannon_entropy(value: str) -> float:
    """Bits per character of `value` (0.0 for the empty string)."""
    n = len(value)
    if not n:
        return 0.0
    return -sum(c / n * math.log2(c / n) for c in Counter(value).values())


def relative_entropy(value: str) -> float:
    """Entropy over the most a string of this length and character classes could have."""
    classes = 0
    if _HEX.fullmatch(value.replace("-", "")):
        classes = 16 + ("-" in value)
    elif any(c.isdigit() for c in value):
        classes += 10
    if classes != 16:
        if any(c.islower() for c in value):
            classes += 26
        if any(c.isupper() for c in value):
            classes += 26
        classes += len({c for c in value if not c.isalnum()})
    ceiling = math.log2(max(2, min(len(value), classes)))
    return shannon_entropy(value) / ceiling


def plausible_secret(value: str) -> bool:
    """`value` (assigned to a secret keyword) looks like a secret: see the module doc."""
    if len(value) < MIN_LEN or value in EXAMPLES or not not_placeholder(value):
        return False
    low = value.lower()
    if _PLACEHOLDER.search(low) or "://" in value or len(set(low)) <= 2:
        return False
    if value.startswith("$") or _SEMVER.search(value) or _HOSTNAME.fullmatch(value):
        return False  # a shell variable, a version, a host name
    if _name(value) or any(p.isalpha() and p.islower() and 3 <= len(p) <= 8
                           for p in re.split(r"[:=]", value)[1:]):
        return False  # CONSTANT_NAME_2, struct_X509_st; jar:1.7.8:compile, x64-uwp=fail
    if _DOTTED.fullmatch(value) or _SNAKE.fullmatch(value) or _wordy(value):
        return False
    if _PATH.fullmatch(value) or _VERSIONISH.fullmatch(value) or _WORD_NUMBER.fullmatch(value):
        return False
    if _UUID.fullmatch(value):
        return True  # many providers' keys are UUIDs; the key said it is a secret
    if value.isdigit():
        return len(value) >= 10 and relative_entropy(value) >= MIN_RELATIVE_ENTROPY
    return relative_entropy(value) >= MIN_RELATIVE_ENTROPY


def not_placeholder(token: str) -> bool:
    """`token` is not a made-up filler (``ghp_xxxx...``, ``sk_live_000...``) nor a documented
    example (checked on every finding of the built-in secret rules)."""
    if token in EXAMPLES or _LONG_FILLER.search(token):
        return False
    # the other fillers are looked for in short tokens; a long one (a JWT) is random enough
    # to hold a short run or sequence by chance
    return len(token) > 128 or _FILLER.search(token) is None


def no_placeholder(rule: Rule) -> Rule:
    """`rule`, its findings also checked not to be a filler or a documented example."""
    check = rule.validate

    def validate(token: str) -> bool:
        return not_placeholder(token) and (check is None or check(token))
    return dataclasses.replace(rule, validate=validate)


def _name(value: str) -> bool:
    """Parts joined by ``_``, ``-`` or ``.``, each a word, a word and a number, or a number,
    at least one a word of four letters: a name (``_LIBCPP_AFTER_CXX11``, ``Befaehigung_P2``)."""
    parts = [p for p in re.split(r"[_.-]", value) if p]
    return (len(parts) >= 2 and all(_NAME_PART.fullmatch(p) for p in parts)
            and any(len(p) >= 4 and p.isalpha() for p in parts)
            and sum(not p.isdigit() for p in parts) >= 2)


def _wordy(value: str) -> bool:
    """Letters only, in humps of three or more (``getSecretValue``, ``NotTheKey``)."""
    return value.isalpha() and all(len(h) >= 3 for h in _HUMP.findall(value))


def key_allowed(key: str) -> bool:
    """The key names a secret (not ``credentialsId``, ``secret_length``, ``public_key``)."""
    words = {w.lower() for w in _KEY_WORD.findall(key)}
    return not (words & _KEY_WORDS_NOT_SECRET)
