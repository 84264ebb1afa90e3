"""Escape views scanned only when they can hold a finding (decode.triggers, decode.wanted).

The main scan reports whether a literal some secret rule requires occurs as it is (in URL
characters), and whether some percent or ``\\u`` escape stands for a byte such a literal can
hold; a view of escapes is decoded and scanned only then. These tests compare every result
with the same redactor scanning every view whenever an escape occurs (the behaviour before).
"""

from __future__ import annotations

import random
import re
import urllib.parse

import pytest

from cellblock.redact import Redactor, decode, engine
from tests.test_redact import SECRETS, TOKEN

_PAYLOADS = [p for rule, p in SECRETS if rule in {
    "aws-access-key-id", "github-pat", "slack-bot-token", "stripe-secret-key",
    "discord-bot-token", "openai-api-key", "generic-secret", "jwt", "private-key",
    "url-password", "telegram-bot-token", "connection-string-password",
    "azure-sas-signature"}] + [TOKEN, "password=Xk9#mQ2$vL7pR4tW"]
_URL_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._~+/=-")


def _percent_all(text: str) -> str:
    return "".join(f"%{b:02X}" for b in text.encode())


def _unicode_all(text: str) -> str:
    return "".join(f"\\u{ord(c):04x}" for c in text)


def _forms(secret: str) -> list[str]:
    """A secret as it is, escaped whole (every character, or as urllib quotes it), half
    escaped (either half, either kind), and with only its characters that are not URL
    characters escaped."""
    half = len(secret) // 2
    return [secret, urllib.parse.quote(secret, safe=""), _percent_all(secret),
            _unicode_all(secret), secret[:half] + _percent_all(secret[half:]),
            _percent_all(secret[:half]) + secret[half:],
            secret[:half] + _unicode_all(secret[half:]),
            _unicode_all(secret[:half]) + secret[half:],
            "%20" + secret, "\\u00e9" + secret, secret + "%20", "\\u0020" + secret,
            # only what is not a URL character escaped (telegram's ``:AA``: ``%3AAA``)
            "".join(c if c in _URL_CHARS else f"%{ord(c):02X}" for c in secret),
            "".join(c if c in _URL_CHARS else f"\\u{ord(c):04x}" for c in secret)]


_ORDINARY = ["q=hello%20world", "&page=2", "filter%5Bstatus%5D=open", "name=Jos%C3%A9",
             '{"user": "Chlo\\u00e9 Garc\\u00eda"}', "\\u00e9", "%41", "\\u0041", "100%",
             " ", "\n", "x", "key", "monkey", "://", "https://api.example.com/v2?", "\\",
             "u0041", "%", "\\u4e2d"]


def _ungated(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every view scanned whenever its kind of escape occurs, as before the triggers."""
    def every(_hints: object, _scanner: object, _decoded: object,
              data: bytes) -> tuple[bool, bool]:
        return (re.search(rb"%[0-9A-Fa-f]{2}", data) is not None,
                re.search(rb"\\u[0-9A-Fa-f]{4}", data) is not None)

    monkeypatch.setattr(decode, "wanted", every)


def _results(red: Redactor, texts: list[str]) -> list[object]:
    out: list[object] = []
    for text in texts:
        result = red.redact(text)
        out.append((result.text, [(f.rule, f.start, f.end) for f in result.findings]))
        out.append(red.survey([text]))
        out.append(red.release(text, "held ", ()))
    return out


def _texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    forms = [f for secret in _PAYLOADS for f in _forms(secret)]
    texts = []
    for _ in range(n):
        pieces = [rng.choice(_ORDINARY) for _ in range(rng.randint(0, 6))]
        if rng.random() < 0.7:
            pieces.insert(rng.randint(0, len(pieces)), rng.choice(forms))
        if rng.random() < 0.3:  # far apart, at the start or the end of a long text
            filler = "processed batch 7 in 0.125s\n" * rng.randint(50, 400)
            pieces.insert(rng.choice([0, len(pieces)]), filler)
        texts.append("".join(pieces))
    return texts


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_skipping_views_changes_no_result(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    red = Redactor()
    assert decode.gated(red._scanner, red._decoded)
    texts = _texts(seed, 300)
    gated = _results(red, texts)
    _ungated(monkeypatch)
    assert _results(red, texts) == gated
    assert sum("[REDACTED:" in str(r) for r in gated) > 100  # the texts do hold secrets


@pytest.mark.parametrize("secret", _PAYLOADS, ids=[p[:12] for p in _PAYLOADS])
def test_escaped_secrets_at_either_end_of_a_long_text(monkeypatch: pytest.MonkeyPatch,
                                                       secret: str) -> None:
    """A secret escaped whole is found at the start, the end or the middle of a long text whose
    other escapes need no view; every form (half escaped too) as with every view scanned."""
    red = Redactor()
    filler = '{"user": "Jos\\u00e9", "q": "hello%20world"}\n' * 300
    texts = []
    for form in _forms(secret):
        texts += [form + "\n" + filler, filler + form, filler + form + filler]
    gated = _results(red, texts)
    for form in _forms(secret)[1:4]:  # escaped whole
        for text in (form + "\n" + filler, filler + form, filler + form + filler):
            result = red.redact(text)
            assert form not in result.text and "[REDACTED:" in result.text, form
    _ungated(monkeypatch)
    assert _results(red, texts) == gated


def test_two_escape_runs_far_apart_each_found() -> None:
    red = Redactor()
    first, second = _percent_all(TOKEN), _unicode_all(SECRETS[0][1])
    text = first + " " + "x = 1\n" * 5000 + " " + second
    result = red.redact(text)
    assert first not in result.text and second not in result.text
    assert result.text.startswith("[REDACTED:github-pat:percent]")
    assert result.text.endswith(":unicode]")


def test_ordinary_escapes_build_no_view(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the views are skipped for: JSON lines with accented names, URL-encoded UTF-8."""
    red = Redactor()
    views: list[str] = []
    build = decode.escape_view
    monkeypatch.setattr(decode, "escape_view",
                        lambda data, kind: views.append(kind) or build(data, kind))
    text = '{"user": "Chlo\\u00e9 M\\u00fcller", "city": "M\\u00fcnchen"}\n' * 50
    assert red.redact(text).text == text and red.survey([text]) == (True, True)
    assert views == []
    url = "GET /v2/items?q=hello%20world&name=Jos%C3%A9&filter%5Bstatus%5D=open\n" * 50
    assert red.redact(url).text == url and views == []
    # an escape of a URL character, a literal as it is or with its other characters escaped
    red.redact(url + "q=%41")
    assert views == ["percent"]
    red.redact(text + url + " api_key ")
    assert views == ["percent", "percent", "unicode"]
    red.redact(text + "Authorization: bearer\\u0020x")
    assert views[3:] == ["unicode"]


def test_exact_secrets_keep_their_escapes_found(monkeypatch: pytest.MonkeyPatch) -> None:
    """An operator's exact secret, alone or beside the built-in rules, is found through any
    escape: its scanner has no triggers, so every view is scanned when an escape occurs."""
    for red in (Redactor(secrets=False, exact=("k9#xQ-hunter",)),
                Redactor(exact=("k9#xQ-hunter",))):
        texts = [f"{pre}{form}{post}" for form in _forms("k9#xQ-hunter")
                 for pre, post in (("", ""), ("caf\\u00e9 ", " q=a%20b"))]
        for form in _forms("k9#xQ-hunter")[1:4]:  # escaped whole
            assert "[REDACTED:" in red.redact(f"caf\\u00e9 {form} end").text, form
        gated = _results(red, texts + _texts(5, 100))
        with monkeypatch.context() as m:
            _ungated(m)
            assert _results(red, texts + _texts(5, 100)) == gated
    for red in (Redactor(exact=("k9#xQ-hunter",)), Redactor(secrets=False, exact=("k9#xQ",))):
        assert not decode.gated(red._scanner, red._decoded)


def test_triggers_cover_every_required_literal() -> None:
    """Every rule has a literal (or, without one, a prefilter): otherwise no triggers at all."""
    red = Redactor()
    scanner = red._scanner
    assert isinstance(scanner, engine.Scanner) and scanner.gated
    kinds = {kind for kind, _index in scanner.kinds}
    assert {decode.PLAIN_LIT, decode.PERCENT_LIT, decode.UESCAPE_LIT} <= kinds
    assert decode.undecodable(scanner.rules) == ["discord-bot-token"]
    no_prefilter = engine.Rule(id="bare", pattern=r"\b[a-z]{30}\b", max_len=30)
    assert decode.triggers([no_prefilter], []) == []
