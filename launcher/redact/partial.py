"""A plausible partial token at the end of held-back stream text (issue 14).

A stream holds back what a later message could still complete into a finding, for at most
200 ms (output/streams.py). When the wait is over, the held text goes out; if it ends with the
first half of a secret (``AKIAQWERT``, ``token = "e5t3l``), the second half arriving later is
harmless alone and the first was sent in clear. So when held text is released on the timer,
the token-character run it ends with is masked if it is plausibly the start of a secret, and
the stream then masks the token-character run the next message starts with (its continuation).

Plausible: the run follows a secret keyword and an assignment (``password=``, ``"token": "``);
or it opens with the literal prefix of a token format (``ghp_``, ``AKIA``, ``sk-``, ``eyJ``...);
or it is at least `MIN_RANDOM` characters of upper and lower case letters and digits with the
entropy of a random string. Text that ends at a line end, a space or punctuation has no such
run: ordinary ``print`` output that waits for the timer (a progress line) goes out as it is.
"""

from __future__ import annotations

import re

from cellblock.redact.generic import shannon_entropy

MARKER = "[REDACTED:partial-token]"
#: A run with neither a keyword before it nor a known prefix needs this many characters.
MIN_RANDOM = 12
_RUN = re.compile(r"[A-Za-z0-9+/=_.~-]+\Z")
_LEAD = re.compile(r"[A-Za-z0-9+/=_.~-]+")
_ASSIGNED = re.compile(
    r"(?i)(?:(?:pass(?:word|wd)?|pwd|secret|token|api[_.-]?key|apikey|access[_.-]?key"
    r"|auth[_.-]?(?:key|token)|credentials?|private[_.-]?key)[\w.-]{0,30}[\"']?\s{0,4}"
    r"(?::{1,3}=|\?=|\.=|=>|[:=,])\s{0,4}[\"'`]?|(?:bearer|basic)\s{1,4})\Z")
#: Literal openings of token formats (redact/*.py, redact/rules.toml), at least 3 characters.
PREFIXES = (
    "AKIA", "ASIA", "AIza", "GOCSPX-", "ya29.", "ghp_", "gho_", "ghu_", "ghs_", "ghr_",
    "github_pat_", "glpat-", "glptt-", "glrt-", "gldt-", "glft-", "glimt-", "glsoat-",
    "ATBB", "ATATT", "npm_", "pypi-", "dckr_", "xox", "xapp-", "sk_live_", "sk_test_",
    "rk_live_", "whsec_", "sk-", "hf_", "gsk_", "r8_", "xai-", "eyJ", "SG.", "key-",
    "shpat_", "shpss_", "shpca_", "shppa_", "dop_v1_", "doo_v1_", "dapi", "AGE-SECRET-KEY-",
    "sq0", "EAAA", "dp.pt.", "lin_api_", "pul-", "pscale_", "PMAK-", "xkeysib-", "SK",
)


def partial_start(text: str) -> int | None:
    """Where a plausible partial token at the end of `text` starts, or None (`len(text)`
    when `text` ends with a keyword and an assignment: nothing to mask, but what comes next
    is the value)."""
    match = _RUN.search(text, max(0, len(text) - 8192))
    if match is None:  # a keyword and an assignment at the very end: the value is to come
        return len(text) if _ASSIGNED.search(text, max(0, len(text) - 80)) else None
    start = match.start()
    run = match.group()
    if _ASSIGNED.search(text, max(0, start - 80), start):
        return start
    if len(run) >= 4 and run.startswith(PREFIXES):
        return start
    if len(run) >= MIN_RANDOM and _mixed(run) and shannon_entropy(run) >= 3.0:
        return start
    return None


def continuation(text: str) -> int:
    """How many characters at the start of `text` continue a token (0 if none)."""
    match = _LEAD.match(text)
    return match.end() if match else 0


def _mixed(run: str) -> bool:
    """Upper case, lower case and digits: a random string, not a word or a number."""
    return (any(c.isdigit() for c in run) and any(c.isupper() for c in run)
            and any(c.islower() for c in run))
