"""The redaction engine (issue 3): detectors, benign corpus, streaming, encodings, limits.

Every token here is FAKE: built from a fixed-seed generator to the published shape of its
format, never copied from anywhere.
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import json
import random
import string
import urllib.parse
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellblock.redact import Finding, Redactor, RedactResult, normalise

_rng = random.Random(20240611)
UP = string.ascii_uppercase
LO = string.ascii_lowercase
DIG = string.digits
ALNUM = UP + LO + DIG
B64URL = ALNUM + "_-"
HEX = "0123456789abcdef"


def fake(alphabet: str, n: int) -> str:
    return "".join(_rng.choice(alphabet) for _ in range(n))


def b64url(obj: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")


FAKE_JWT = ".".join(
    [b64url({"alg": "HS256", "typ": "JWT"}), b64url({"sub": "1234", "name": "x"}), fake(B64URL, 43)]
)
FAKE_PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\n"
    + "\n".join(fake(ALNUM + "+/", 64) for _ in range(20))
    + "\n-----END RSA PRIVATE KEY-----"
)

# (rule id, fake token or text containing it)
SECRETS = [
    ("aws-access-key-id", "AKIA" + fake(UP + "234567", 16)),
    ("aws-access-key-id", "ASIA" + fake(UP + "234567", 16)),
    ("aws-secret-access-key", "aws_secret_access_key = " + fake(ALNUM + "/+", 40)),
    ("gcp-api-key", "AIza" + fake(B64URL, 35)),
    ("gcp-service-account-key-id", '"private_key_id": "' + fake(HEX, 40) + '"'),
    ("google-oauth-client-secret", "GOCSPX-" + fake(B64URL, 28)),
    ("google-oauth-access-token", "ya29." + fake(B64URL, 120)),
    ("azure-storage-account-key", "AccountKey=" + fake(ALNUM + "+/", 86) + "=="),
    (  # a connection string with a key is redacted whole (issue 14)
        "connection-string",
        "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey="
        + fake(ALNUM + "+/", 86)
        + "==",
    ),
    (
        "azure-sas-signature",
        "https://a.blob.core.windows.net/c?sv=2021-06-08&sig=" + fake(ALNUM, 43) + "%3D",
    ),
    ("azure-ad-client-secret", "abc8Q~" + fake(ALNUM + "_~.", 34)),
    ("github-pat", "ghp_" + fake(ALNUM, 36)),
    ("github-oauth-token", "gho_" + fake(ALNUM, 36)),
    ("github-app-token", "ghs_" + fake(ALNUM, 36)),
    ("github-app-token", "ghu_" + fake(ALNUM, 36)),
    ("github-fine-grained-pat", "github_pat_" + fake(ALNUM, 22) + "_" + fake(ALNUM, 59)),
    ("gitlab-pat", "glpat-" + fake(B64URL, 20)),
    ("gitlab-pipeline-trigger-token", "glptt-" + fake(HEX, 40)),
    ("bitbucket-app-password", "ATBB" + fake(ALNUM, 32)),
    ("atlassian-api-token", "ATATT3xFfGF0" + fake(B64URL, 180)),
    ("npm-token", "npm_" + fake(ALNUM, 36)),
    ("pypi-token", "pypi-AgEIcHlwaS5vcmc" + fake(B64URL, 150)),
    ("dockerhub-token", "dckr_pat_" + fake(B64URL, 27)),
    ("slack-bot-token", f"xoxb-{fake(DIG, 12)}-{fake(DIG, 13)}-{fake(ALNUM, 24)}"),
    ("slack-user-token", f"xoxp-{fake(DIG, 12)}-{fake(DIG, 12)}-{fake(DIG, 13)}-{fake(HEX, 32)}"),
    (
        "slack-webhook-url",
        f"https://hooks.slack.com/services/T{fake(UP + DIG, 10)}/B{fake(UP + DIG, 10)}/"
        + fake(ALNUM, 24),
    ),
    ("discord-bot-token", "M" + fake(B64URL, 25) + "." + fake(B64URL, 6) + "." + fake(B64URL, 38)),
    ("discord-webhook-url", f"https://discord.com/api/webhooks/{fake(DIG, 18)}/{fake(B64URL, 68)}"),
    ("telegram-bot-token", fake(DIG, 10) + ":AA" + fake(B64URL, 33)),
    ("twilio-api-key", "SK" + fake(HEX, 32)),
    ("sendgrid-api-key", "SG." + fake(B64URL, 22) + "." + fake(B64URL, 43)),
    ("mailgun-api-key", "key-" + fake(HEX, 32)),
    ("stripe-secret-key", "sk_live_" + fake(ALNUM, 24)),
    ("stripe-secret-key", "sk_test_" + fake(ALNUM, 99)),
    ("stripe-restricted-key", "rk_live_" + fake(ALNUM, 24)),
    ("square-access-token", "EAAA" + fake(B64URL, 60)),
    ("square-oauth-secret", "sq0csp-" + fake(B64URL, 43)),
    ("openai-api-key", "sk-proj-" + fake(B64URL, 156)),
    ("openai-api-key", "sk-" + fake(ALNUM, 20) + "T3BlbkFJ" + fake(ALNUM, 20)),
    ("anthropic-api-key", "sk-ant-api03-" + fake(B64URL, 93) + "AA"),
    ("huggingface-token", "hf_" + fake(UP + LO, 34)),
    ("groq-api-key", "gsk_" + fake(ALNUM, 52)),
    ("replicate-api-token", "r8_" + fake(ALNUM, 37)),
    ("jwt", FAKE_JWT),
    ("private-key", FAKE_PEM),
    (
        "openssh-private-key",
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjE"
        + fake(ALNUM, 300)
        + "\n-----END OPENSSH PRIVATE KEY-----",
    ),
    (
        "pgp-private-key",
        "-----BEGIN PGP PRIVATE KEY BLOCK-----\n\nlQOYBF"
        + fake(ALNUM, 500)
        + "\n=ab12\n-----END PGP PRIVATE KEY BLOCK-----",
    ),
    ("url-password", "postgresql://app:" + fake(ALNUM, 16) + "@db.internal:5432/prod"),
    ("url-password", "redis://:" + fake(ALNUM, 20) + "@cache:6379/0"),
    (
        "connection-string-password",
        "Server=tcp:db,1433;Database=prod;User ID=app;Password=" + fake(ALNUM, 14) + ";",
    ),
    ("generic-secret", "api_key = '" + fake(ALNUM, 32) + "'"),
    ("generic-secret", "DB_PASSWORD=" + fake(ALNUM + "!#%", 20)),
    ("generic-secret", '{"token": "' + fake(B64URL, 43) + '"}'),
]

# Look alike, must not flag.
NEAR_MISSES = [
    "AKIA" + "X" * 15,  # one character short
    "AKIA" + fake(UP + "234567", 16) + "X",  # glued to more letters
    "ghp_" + fake(ALNUM, 35),
    "ghp_" + fake(ALNUM, 30) + "-" + fake(ALNUM, 5),
    "sk_live_short",
    "xoxb-123-456-abc",
    "password=changeme",
    "password = '${DB_PASSWORD}'",
    "token: {{ secrets.TOKEN }}",
    "api_key=xxxxxxxxxxxxxxxxxxxx",
    "password=hunter2",
    "token=self.tokenizer.pad_token",
    "secret_key=os.environ",
    "postgres://user:password@localhost/db",  # documentation placeholder
    "postgres://app@db/x",  # no password
    "https://example.com:8443/path?q=1",
    "eyJhbGciOi.not-a-jwt",
    "eyJub3RoaW5nIjoxfQ.eyJzdWIiOiIxMjM0In0.sig",  # header without "alg"
    "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----",
    "-----BEGIN CERTIFICATE-----",
    "hf_hub_download",
]


@pytest.fixture(scope="module")
def red() -> Redactor:
    return Redactor()


@pytest.mark.parametrize(
    ("rule", "payload"), SECRETS, ids=[f"{r}-{i}" for i, (r, _) in enumerate(SECRETS)]
)
def test_secret_formats_flag(red: Redactor, rule: str, payload: str) -> None:
    text = f"config dump:\n  {payload}\nend"
    result = red.redact(text)
    assert f"[REDACTED:{rule}]" in result.text, result.text
    assert [f.rule for f in result.findings] == [rule]
    assert result.text.startswith("config dump:\n  ") and result.text.endswith("\nend")


def test_at_least_25_formats() -> None:
    assert len({rule for rule, _ in SECRETS}) >= 25


@pytest.mark.parametrize("payload", NEAR_MISSES)
def test_near_misses_do_not_flag(red: Redactor, payload: str) -> None:
    result = red.redact(payload)
    assert result.findings == [] and result.text == payload


def test_value_only_redacted_in_assignments(red: Redactor) -> None:
    value = fake(ALNUM, 32)
    assert red.redact(f"api_key = '{value}'").text == "api_key = '[REDACTED:generic-secret]'"
    assert (
        red.redact(f"mysql://root:{value}@h/db").text == "mysql://root:[REDACTED:url-password]@h/db"
    )


def test_finding_holds_hash_not_secret(red: Redactor) -> None:
    token = "ghp_" + fake(ALNUM, 36)
    text = f"x {token} y"
    (finding,) = red.redact(text).findings
    assert isinstance(finding, Finding)
    assert (finding.rule, finding.start, finding.end) == ("github-pat", 2, 2 + len(token))
    assert finding.sha256_prefix == hashlib.sha256(token.encode()).hexdigest()[:12]
    assert token not in repr(finding)
    assert set(vars(finding)) == {"rule", "start", "end", "sha256_prefix"}


def test_overlapping_findings_merge(red: Redactor) -> None:
    # The AWS key id sits inside a generic assignment: one marker, the longer rule's name.
    token = fake(ALNUM, 12) + "AKIA" + fake(UP + "234567", 16)
    result = red.redact(f"secret={token}")
    assert len(result.findings) == 1
    assert result.text == "secret=[REDACTED:generic-secret]"


BENIGN = [
    "42\n3.14159\n-1e-10\n1,234,567.89\n",
    "2024-06-11 12:34:56.789+00:00  2024-06-11T12:34:56Z  11/06/2024",
    str(uuid.UUID(int=_rng.getrandbits(128))) + " " + str(uuid.UUID(int=_rng.getrandbits(128))),
    hashlib.sha256(b"data").hexdigest() + "  data.csv",
    hashlib.md5(b"data").hexdigest(),
    "commit " + hashlib.sha1(b"c").hexdigest() + "\nAuthor: A <a@example.com>",
    base64.b64encode(b"The quick brown fox jumps over the lazy dog, again and again.").decode(),
    "id,name,amount,date\n1,alice,12.50,2024-01-02\n2,bob,7.00,2024-01-03\n",
    "   user_id  amount       date\n0        1   12.50 2024-01-02\n1        2    7.00 2024-01-03\n"
    "[2 rows x 3 columns]",
    "/home/user/.local/lib/python3.11/site-packages/pandas/core/frame.py",
    "https://docs.python.org/3/library/base64.html?highlight=b64#base64.b64encode",
    'Traceback (most recent call last):\n  File "<ipython-input-1>", line 1, in <module>\n'
    "    1/0\nZeroDivisionError: division by zero",
    "KeyError: 'password'",
    "model.config.pad_token_id = 50256; tokenizer.eos_token = '</s>'",
    "Epoch 3/10 - loss: 0.2341 - accuracy: 0.9123 - val_loss: 0.3012",
    "array([[0.1, 0.2],\n       [0.3, 0.4]], dtype=float32)",
    "sk-learn is spelled scikit-learn; pip install scikit-learn==1.5.0",
    "Order 1234567890123 shipped; tracking 9400111899223197428490",
]


@pytest.mark.parametrize("text", BENIGN)
def test_benign_corpus_unchanged(text: str) -> None:
    r = Redactor(secrets=True, exact=("s3cr3t-value",))
    result = r.redact(text)
    assert result.findings == [] and result.text == text


# -- streaming -------------------------------------------------------------------------------


def stream(r: Redactor, pieces: list[str]) -> str:
    out, carry = [], ""
    for piece in pieces:
        buf = carry + r.normalise(piece)
        i = r.scan_end_safe(buf)
        assert 0 <= i <= len(buf)
        out.append(r.redact(buf[:i]).text)
        carry = buf[i:]
        assert len(carry) <= 2 * r.max_match_len
    out.append(r.redact(carry).text)
    return "".join(out)


@pytest.mark.parametrize("rule_payload", [SECRETS[0], SECRETS[10], SECRETS[42], SECRETS[43]])
def test_split_in_two(red: Redactor, rule_payload: tuple[str, str]) -> None:
    _rule, secret = rule_payload
    filler = "log line\n" * 2000
    text = filler + "value: " + secret + "\n" + filler
    for cut in (len(filler) + 9, len(filler) + 7 + len(secret) // 2, len(text) - 3):
        emitted = stream(red, [text[:cut], text[cut:]])
        assert secret not in emitted
        assert emitted.count("[REDACTED:") == 1


def test_split_one_char_at_a_time(red: Redactor) -> None:
    secret = "sk_live_" + fake(ALNUM, 24)
    text = "x " * (red.max_match_len // 2 + 50) + secret + " done" + " y" * 100
    emitted = stream(red, list(text))
    assert secret not in emitted and "[REDACTED:stripe-secret-key]" in emitted


def test_scan_end_safe_backs_off_a_straddling_finding(red: Redactor) -> None:
    token = "ghp_" + fake(ALNUM, 36)
    n = red.max_match_len
    text = "a " * n + token + " b" * (n // 2)
    start = text.index(token)
    text = text[: start + len(token) // 2 + n]  # the plain cut would fall inside the token
    assert start < len(text) - n < start + len(token)
    i = red.scan_end_safe(text)
    assert not (start < i < start + len(token))
    assert red.scan_end_safe("short") == 0


# -- encodings -------------------------------------------------------------------------------

TOKEN = "ghp_" + fake(ALNUM, 36)


@pytest.mark.parametrize(
    ("encoded", "suffix"),
    [
        (base64.b64encode(f"GITHUB_TOKEN={TOKEN}".encode()).decode(), ":base64"),
        (base64.urlsafe_b64encode(f"{TOKEN}\xff\xfe>".encode("latin-1")).decode(), ":base64"),
        (TOKEN.encode().hex(), ":hex"),
        (TOKEN.encode().hex().upper(), ":hex"),
        ("".join(f"%{b:02X}" for b in TOKEN.encode()), ":percent"),
        ("".join(f"\\u{ord(c):04x}" for c in TOKEN), ":unicode"),
    ],
)
def test_encoded_secret_caught(red: Redactor, encoded: str, suffix: str) -> None:
    result = red.redact(f"out: {encoded} .")
    assert result.text == f"out: [REDACTED:github-pat{suffix}] ."


@pytest.mark.parametrize(
    "obfuscated",
    [
        "\u200b".join(TOKEN),
        "\u00ad".join(TOKEN),
        "\ufeff" + TOKEN,
        "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in TOKEN),  # fullwidth
        "".join(f"\x1b[3{i % 7}m{c}" for i, c in enumerate(TOKEN)) + "\x1b[0m",
        "\x1b]0;title\x07" + TOKEN,
        "decoy\r" + TOKEN,
        TOKEN[:10] + "Q\b" + TOKEN[10:],
    ],
)
def test_normalisation_defeats_obfuscation(red: Redactor, obfuscated: str) -> None:
    result = red.redact(obfuscated)
    assert TOKEN not in result.text
    assert "[REDACTED:github-pat]" in result.text


def test_output_is_normalised_text(red: Redactor) -> None:
    assert red.redact("\x1b[31mred\x1b[0m plain").text == "red plain"
    assert normalise("10%\r20%\r30%") == "30%"
    assert normalise("abc\bd") == "abd"
    assert normalise("\uff46\uff55\uff4c\uff4c") == "full"
    assert normalise(normalise("a\u200bb\r\nc")) == "ab\nc"


@pytest.mark.parametrize(
    "transformed",
    [
        TOKEN[::-1],
        codecs.encode(TOKEN, "rot13"),
        "-".join(TOKEN),
        "".join(f"&#{ord(c)};" for c in TOKEN),
    ],
)
def test_reversal_rot13_separators_entities_pass_by_design(red: Redactor, transformed: str) -> None:
    """THREATS O11: not caught, by design; the control is that secrets never enter the jail."""
    assert red.redact(transformed).text == transformed


# -- exact secrets ---------------------------------------------------------------------------

EXACT = "s3cr3t-value/with+odd=chars!"


@pytest.mark.parametrize(
    "form",
    [
        EXACT,
        base64.b64encode(EXACT.encode()).decode(),
        base64.b64encode(b"x" + EXACT.encode()).decode(),
        base64.b64encode(b"xy" + EXACT.encode()).decode(),
        base64.urlsafe_b64encode(b"x" + EXACT.encode()).decode(),
        EXACT.encode().hex(),
        EXACT.encode().hex().upper(),
        urllib.parse.quote(EXACT, safe=""),
        urllib.parse.quote_plus(EXACT),
    ],
)
def test_exact_secret_forms(form: str) -> None:
    r = Redactor(secrets=False, exact=(EXACT,))
    result = r.redact(f"[{form}]")
    assert result.findings, form
    assert EXACT not in result.text and form not in result.text
    assert all(f.rule.startswith("operator-secret") for f in result.findings)


def test_exact_secret_too_short_is_refused() -> None:
    with pytest.raises(ValueError, match="#0 is 3 characters"):
        Redactor(exact=("abc",))


def test_exact_secrets_are_a_small_database_beside_the_shared_one() -> None:
    """A launch's exact secrets must not recompile the built-in detectors: its Redactor scans
    with the very databases a Redactor without them has (built by the spawner before it forks,
    cached on disk), joined with a small one that holds only the exact secrets' literals."""
    from cellblock.redact.scanner import Joined

    plain = Redactor(pii=("email",))
    r = Redactor(pii=("email",), exact=(EXACT,))
    other = Redactor(pii=("email",), exact=("another-operator-secret-4711",))
    for redactor in (r, other):
        assert isinstance(redactor._scanner, Joined) and isinstance(redactor._decoded, Joined)
        assert redactor._scanner.first is plain._scanner
        assert redactor._decoded.first is plain._decoded
        small = redactor._scanner.second.rules + redactor._decoded.second.rules
        assert small and all(rule.id.startswith("operator-secret") for rule in small)
    # without built-in detectors the exact secrets' own databases are the whole scanner
    alone = Redactor(secrets=False, exact=(EXACT,))
    pii_only = Redactor(secrets=False, pii=("email",), exact=(EXACT,))
    assert isinstance(pii_only._scanner, Joined) and pii_only._scanner.second is alone._scanner
    assert pii_only._decoded is alone._decoded


def _one_database(secrets: bool, pii_kinds: tuple[str, ...],
                  exact_secrets: tuple[str, ...]) -> Redactor:
    """A Redactor whose scanners compile every rule, exact secrets included, into one
    database, as before they were split off: the reference the split must equal."""
    from cellblock.redact import decode, engine, exact, keys, pii
    from cellblock.redact.scanner import Scanner

    rules = [rule for module in engine.SECRET_MODULES for rule in module.RULES] if secrets else []
    blocks = list(keys.BLOCKS) if secrets else []
    rules += exact.rules_for(exact_secrets)
    pii_rules = [rule for kind in pii_kinds for rule in pii.RULES[kind]]
    main = Scanner(rules + pii_rules, blocks, decode.patterns(rules, blocks), cacheable=False)
    main.max_len = max(main.max_len, decode.DECODE_CAP)
    ref = Redactor.__new__(Redactor)
    ref._scanner, ref._decoded = main, Scanner(rules, blocks, cacheable=False)
    ref._hold = engine._hold_window(main)
    return ref


@pytest.mark.parametrize("secrets,pii_kinds", [
    (True, ()), (False, ()), (False, ("email",)), (True, ("email", "phone", "card", "iban")),
])
def test_exact_secrets_in_their_own_database_find_what_one_database_finds(
        secrets: bool, pii_kinds: tuple[str, ...]) -> None:
    """Same findings, spans and names, same `untouched` answers and the same stream releases as
    one database of every rule, on texts mixing exact secrets in every form (raw, base64 in
    three alignments and both alphabets inside longer blobs, hex, percent, ``\\u`` escapes)
    with built-in findings, PII and their near misses."""
    short = "k9#xQ"
    exact_secrets = (EXACT, short, "bench-env-secret-9f3k2q")
    r = Redactor(secrets=secrets, pii=pii_kinds, exact=exact_secrets)
    ref = _one_database(secrets, pii_kinds, exact_secrets)
    raw = EXACT.encode()
    pieces = [EXACT, EXACT[:9], EXACT[9:], short, "bench-env-secret-9f3k2q", TOKEN, TOKEN[:12],
              "AKIA" + fake(UP + "234567", 16), "password=Xk9#mQ2$vL7pR4tW", "a.b@example.com",
              "+44 20 7946 0958", "4111 1111 1111 1111", "GB82WEST12345698765432",
              raw.hex(), raw.hex().upper(), urllib.parse.quote(EXACT, safe=""),
              urllib.parse.quote_plus(EXACT), urllib.parse.quote(TOKEN + "&x", safe=""),
              "".join(f"\\u{ord(c):04x}" for c in EXACT), "%20", "\\u00e9", " ", "\n", "=",
              "/", "-", "_", "x", fake(ALNUM, 24), fake(ALNUM + "+/", 40)]
    for prefix in (b"", b"a", b"ab", b"user=admin pass="):
        blob = prefix + raw + b" host=db.internal"
        pieces += [base64.b64encode(blob).decode(), base64.urlsafe_b64encode(blob).decode(),
                   base64.b64encode(prefix + short.encode() + b" and more text").decode(),
                   base64.b64encode(prefix + TOKEN.encode()).decode()]
    rng = random.Random(11)
    found = 0
    for _ in range(400):
        texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
                 for _ in range(rng.randint(1, 3))]
        text = "".join(texts)
        got = r.redact(text)
        assert got == ref.redact(text), text
        assert r.untouched(texts) == ref.untouched(texts), texts
        assert r.release(text) == ref.release(text), text
        found += bool(got.findings)
    assert found > 300


def test_unknown_pii_kind_refused() -> None:
    with pytest.raises(ValueError, match="unknown pii"):
        Redactor(pii=("passport",))


# -- PII -------------------------------------------------------------------------------------

PII = [
    ("email", "contact: jane.doe+news@mail.example.co.uk.", True),
    ("email", "not an email: user@localhost", False),
    ("phone", "call +44 20 7946 0958 now", True),
    ("phone", "call (415) 555-2671 now", True),
    ("phone", "version 1.2.3", False),
    ("card", "card 4111 1111 1111 1111 exp", True),
    ("card", "card 4111-1111-1111-1111 exp", True),
    ("card", "card 5555555555554444 exp", True),
    ("card", "card 378282246310005 exp", True),
    ("card", "card 4111 1111 1111 1112 exp", False),  # Luhn fails
    ("card", "id 1700000000000000000", False),  # no issuer prefix
    ("iban", "IBAN DE89 3704 0044 0532 0130 00 ok", True),
    ("iban", "IBAN GB29NWBK60161331926819 ok", True),
    ("iban", "IBAN DE88 3704 0044 0532 0130 00 ok", False),  # checksum fails
    ("ssn", "ssn 123-45-6789 ok", True),
    ("ssn", "ssn 000-45-6789 ok", False),
    ("ssn", "ssn 666-45-6789 ok", False),
    ("ssn", "date 2024-06-11", False),
]


@pytest.mark.parametrize(("kind", "text", "should_flag"), PII)
def test_pii(kind: str, text: str, should_flag: bool) -> None:
    r = Redactor(secrets=False, pii=(kind,))
    result = r.redact(text)
    assert bool(result.findings) is should_flag, result.text
    if should_flag:
        assert {f.rule for f in result.findings} == {kind}


def test_pii_off_by_default(red: Redactor) -> None:
    assert red.redact("jane@example.com 4111 1111 1111 1111").findings == []


# -- pathological inputs (R18): must finish; the benchmark measures the time ---------------

PATHOLOGICAL = {
    "a-run": "a" * 1_000_000 + "!",
    "at-signs": "@" * 10**6,
    "a-dot": "a." * 10**6,
    "base64-looking": base64.encodebytes(random.Random(1).randbytes(750_000)).decode(),
    "password-eq": "password=" * 116_000,
    "percent": "%41" * 333_333,
    "digit-groups": "1111 " * 200_000,
    "pem-headers": "-----BEGIN RSA PRIVATE KEY-----\n" * 30_000,
    # ANSI stripping is one re.sub: every failing attempt stops at the next ESC
    "csi-starts": "\x1b[" * 500_000,
    "csi-long-parameters": ("\x1b[" + "1;" * 5_000 + " " * 5_000) * 100,
    "osc-unterminated": ("\x1b]" + "x" * 10_000) * 100,
    "osc-esc": "\x1b]x\x1b" * 250_000,
    "c1-csi": "\x9b" * 1_000_000,
    "backspaces": "ab\b" * 300_000 + "\n" + ("x" * 100 + "\b\n") * 10_000,
}


@pytest.mark.parametrize("name", sorted(PATHOLOGICAL))
def test_pathological_inputs_finish(name: str) -> None:
    r = Redactor(pii=("email", "phone", "card", "iban", "ssn"))
    result = r.redact(PATHOLOGICAL[name])
    assert isinstance(result, RedactResult)


# -- fast paths (issue 7): each one must still catch what the slow path caught -------------


def _reference_fold(text: str) -> str:
    """NFKC then every Cf character removed, the obvious way (what normalise's fast paths
    skip when they can prove it would change nothing)."""
    import unicodedata

    folded = unicodedata.normalize("NFKC", text)
    return "".join(c for c in folded if unicodedata.category(c) != "Cf")


_TRICKY = (
    "\u00a0\u00aa\u00b2\u00b5\u00bc\u00ad\u00e9\u00d7\u00ff"  # Latin-1: unstable, Cf, stable
    "\u0301\u0327\u1100\u1161\u11a8\uac00\u0b47\u0b3e\u0cd5\u3099"  # combining, composing
    "\u200b\u200d\u2060\ufeff\U000e0041\U0001d173\u2588\u0141\uff47\ufb01\u2126"
)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(list(_TRICKY) + list("ab =_-\n")), max_size=24))
def test_normalise_fast_paths_equal_the_reference(text: str) -> None:
    assert normalise(text) == _reference_fold(text)


@pytest.mark.parametrize(
    "carrier",
    [
        "caf\u00e9 \u00d7 {t}",  # Latin-1 text: the translate check
        "\u0141ukasz \u2588\u2588 {t}",  # wider text: the UTF-8 guard scan
        "\u0141ukasz " + "\u200b",  # guard path with a zero-width space before the token
        "\u00e9\u00aa {t}",  # Latin-1 with a character NFKC changes
    ],
)
def test_non_ascii_carriers_still_fold_obfuscated_tokens(red: Redactor, carrier: str) -> None:
    for disguised in ("\u200b".join(TOKEN), "\u00ad".join(TOKEN),
                      "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in TOKEN)):
        text = carrier.format(t=disguised) if "{t}" in carrier else carrier + disguised
        result = red.redact(text)
        assert "[REDACTED:github-pat]" in result.text, ascii(text)


def test_only_discord_bot_tokens_are_not_looked_for_in_base64() -> None:
    """decode.py decodes a base64/hex run only if it holds the encoding of a literal the rule
    needs; a rule without one is pinned here (and named in docs/output.md)."""
    from cellblock.redact import decode, engine, keys

    rules = [r for m in engine.SECRET_MODULES for r in m.RULES]
    assert decode.undecodable(rules, keys.BLOCKS) == ["discord-bot-token"]


DECODABLE = [(rule, payload) for rule, payload in SECRETS if rule != "discord-bot-token"]


@pytest.mark.parametrize(("rule", "payload"), DECODABLE,
                         ids=[f"{r}-{i}" for i, (r, _) in enumerate(DECODABLE)])
def test_every_format_caught_in_base64_and_hex(red: Redactor, rule: str, payload: str) -> None:
    raw = f"settings:\n{payload}\nend".encode()
    forms = {"hex": [raw.hex(), raw.hex().upper()], "base64": []}
    for prefix in (b"", b"x", b"xy"):  # the payload at each of the three byte alignments
        forms["base64"].append(base64.b64encode(prefix + raw).decode())
        forms["base64"].append(base64.urlsafe_b64encode(prefix + raw).decode().rstrip("="))
    for encoding, encoded_forms in forms.items():
        for encoded in encoded_forms:
            if len(encoded) > 8192:
                continue  # longer runs are not decoded (DECODE_CAP)
            result = red.redact(f"dump: {encoded} (done)")
            assert encoded not in result.text, (encoding, encoded[:40])
            assert f":{encoding}]" in result.text, (encoding, result.text[:80])


@pytest.mark.parametrize(("rule", "payload"), SECRETS[:12] + SECRETS[-6:],
                         ids=[r for r, _ in SECRETS[:12] + SECRETS[-6:]])
def test_percent_and_unicode_escaped_formats_caught(red: Redactor, rule: str,
                                                    payload: str) -> None:
    quoted = urllib.parse.quote(payload, safe="")
    result = red.redact(f"url: /x?v={quoted}&y=1")
    assert quoted not in result.text and "[REDACTED:" in result.text
    escaped = "".join(f"\\u{ord(c):04x}" for c in payload if c not in "\n")
    result = red.redact(f'"{escaped}"')
    assert escaped not in result.text and ":unicode]" in result.text


def test_escape_views_leave_ordinary_escapes_alone(red: Redactor) -> None:
    text = ("GET /search?q=hello%20world&filter%5Bstatus%5D=open -> 200\n"
            '{"name": "Jos\\u00e9 Garc\\u00eda", "city": "M\\u00fcnchen"}\n')
    assert red.redact(text) == RedactResult(text, [])


def test_short_exact_secret_inside_a_base64_blob() -> None:
    """A 5-character operator secret has no registered base64 form of its own (too short);
    it is still found by decoding a run that holds it."""
    r = Redactor(secrets=False, exact=("k9#xQ",))
    for prefix in (b"", b"a", b"ab"):
        blob = base64.b64encode(prefix + b"user=admin pass=k9#xQ host=db.internal").decode()
        result = r.redact(f"cfg {blob} end")
        assert blob not in result.text and "operator-secret" in result.text, prefix


def test_windowed_rules_start_where_a_full_scan_says() -> None:
    """Rules that can start anywhere are resolved in a window before each end; the spans must
    be those a start-of-match scan of the whole text reports."""
    import hyperscan

    from cellblock.redact.normalise import scan_bytes

    r = Redactor(pii=("email", "phone"))
    scanner = r._scanner
    som = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    pids = sorted(scanner.windowed)
    rules = [scanner.rules[scanner.kinds[p][1]] for p in pids]
    som.compile(expressions=[scanner.window_patterns[p].encode() for p in pids], ids=pids,
                elements=len(pids),
                flags=[hyperscan.HS_FLAG_SOM_LEFTMOST
                       | (hyperscan.HS_FLAG_CASELESS if x.caseless else 0) for x in rules])
    pieces = ["password", "pwd", " = ", "=", ":", "'", '"', "://", "app", "@", "db.x", ";",
              "Server=tcp:h;", "Password=", "x" * 40, fake(ALNUM, 30), " ", "\n", ".", "-",
              "+44 20 7946 0958", "a.b@example.com", "sig=", "?", "&", fake(ALNUM + "/+", 40),
              "aws_secret_access_key", "AccountKey=", '"private_key_id": "', fake(HEX, 40)]
    rng = random.Random(5)
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 40)))
        data = scan_bytes(text)
        want: set[tuple[int, int, int]] = set()
        som.scan(data, match_event_handler=lambda i, s, e, _f, _c, w=want: w.add((i, s, e)))
        got = {hit for hit in scanner.scan(data) if hit[0] in scanner.windowed}
        reach = scanner._reach[0]
        # every match shorter than a window's reach is found with its true start ...
        assert {h for h in want if h[2] - h[1] < reach} <= got, text
        # ... and nothing is found that does not end a match starting there or before
        assert all(any(w[0] == i and w[2] == e and w[1] <= s for w in want)
                   for i, s, e in got), text


@pytest.mark.parametrize("rule_id", ["url-password", "discord-bot-token"])
def test_prefilters_cover_every_end_of_their_rule(rule_id: str) -> None:
    """A rule's prefilter (rule.py) must end at most prefilter_slack characters before every
    end of the rule's own pattern, or the main scan would miss it."""
    import hyperscan

    from cellblock.redact import chat, urls

    (rule,) = [x for x in (*chat.RULES, *urls.RULES) if x.id == rule_id]
    assert rule.prefilter

    def ends(pattern: str, text: bytes) -> set[int]:
        db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        db.compile(expressions=[pattern.encode()], ids=[0], elements=1, flags=[0])
        out: set[int] = set()
        db.scan(text, match_event_handler=lambda _i, _s, e, _f, _c: out.add(e))
        return out

    samples = [p for r, p in SECRETS if r == rule_id]
    alphabet = ALNUM + "_-.:/@ "
    rng = random.Random(9)
    for _ in range(500):
        sample = rng.choice(samples)
        chars = list(rng.choice(["", fake(alphabet, 5)]) + sample + fake(alphabet, 5))
        for _ in range(rng.randint(0, 3)):
            chars.insert(rng.randrange(len(chars) + 1), rng.choice(alphabet))
        text = "".join(chars).encode()
        slack = range(rule.prefilter_slack + 1)
        covered = {e + k for e in ends(rule.prefilter, text) for k in slack}
        assert ends(rule.pattern, text) <= covered, text


_NORMALISE_PIECES = ["\x1b", "\x1b[31m", "\x1b]0;t", "\x07", "\x1b\\", "\r", "\r\n", "\b", "\n",
                     "\x9b", "[", "]", "0", ";", "m", "a", "\u0301", "\u00e9", "\u200b", "\uff41",
                     "\ufb01", " ", "\\"]


@settings(max_examples=600, deadline=None)
@given(st.lists(st.lists(st.sampled_from(_NORMALISE_PIECES), max_size=8), max_size=5))
def test_texts_joined_for_normalising_normalise_each(pieces: list[list[str]]) -> None:
    """Redactor.untouched normalises a message's strings together; that must equal
    normalising each: nothing may cross from one string into the next."""
    from cellblock.redact.engine import JOIN_FOR_NORMALISE

    texts = ["".join(p) for p in pieces]
    assert normalise(JOIN_FOR_NORMALISE.join(texts)) == "\n".join(normalise(t) for t in texts)


def _strip_ansi_reference(text: str) -> str:
    """Every match of each ANSI pattern, as a hyperscan scan for all of them reports them
    (leftmost start for each end), removed, then stray ESCs: how normalise did it before one
    ``re.sub`` did it."""
    import hyperscan

    from cellblock.redact.normalise import ANSI_PATTERNS, scan_bytes

    text = text.replace("\x9b", "\x1b[")
    db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    db.compile(expressions=[p.encode() for p in ANSI_PATTERNS], ids=[0, 1, 2], elements=3,
               flags=[hyperscan.HS_FLAG_SOM_LEFTMOST] * 3)
    spans: list[tuple[int, int]] = []
    db.scan(scan_bytes(text), match_event_handler=lambda _i, s, e, _f, _c: spans.append((s, e)))
    out, pos = [], 0
    for start, end in sorted(spans):
        if start > pos:
            out.append(text[pos:start])
        pos = max(pos, end)
    out.append(text[pos:])
    return "".join(out).replace("\x1b", "")


_ANSI_PIECES = ["\x1b", "\x1b", "\x1b[", "\x1b]", "\x9b", "[", "]", "0", "1", ";", "?", " ",
                "/", "!", "m", "@", "~", "A", "\x07", "\\", "\x1b\\", "x", "\n", "\u00e9",
                "\u4e2d", "\x7f", "\t"]


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(_ANSI_PIECES), max_size=30))
def test_ansi_stripping_removes_every_match_of_every_pattern(pieces: list[str]) -> None:
    from cellblock.redact.normalise import _strip_ansi

    text = "".join(pieces)
    assert _strip_ansi(text) == _strip_ansi_reference(text)


def _backspaces_reference(text: str) -> str:
    """Backspaces rendered through the whole text at once (as before only the lines holding
    one were visited)."""
    pieces = text.split("\b")
    out = list(pieces[0])
    for piece in pieces[1:]:
        if out and out[-1] != "\n":
            out.pop()
        out.extend(piece)
    return "".join(out)


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from(["\b", "\b", "\n", "a", "bc", "\u00e9", "x" * 70, "\r"]),
                max_size=40))
def test_backspaces_rendered_per_line_as_through_the_whole_text(pieces: list[str]) -> None:
    """Sparse backspaces (per line) and dense ones (the whole text) alike."""
    from cellblock.redact.normalise import _render_backspaces

    text = "".join(pieces)
    assert _render_backspaces(text) == _backspaces_reference(text)
    sparse = "y" * 64 * len(text) + text  # below the density that renders the whole text
    assert _render_backspaces(sparse) == _backspaces_reference(sparse)


@settings(max_examples=600, deadline=None)
@given(st.lists(st.lists(st.sampled_from([*_NORMALISE_PIECES, TOKEN[:20], TOKEN[20:], " "]),
                         max_size=8), max_size=5))
def test_untouched_is_only_true_when_nothing_would_change(red: Redactor,
                                                          pieces: list[list[str]]) -> None:
    texts = ["".join(p) for p in pieces]
    for normalised in (False, True):
        if red.untouched(texts, normalised):
            assert not any(red.redact(t).findings for t in texts), texts
            assert not normalised or all(normalise(t) == t for t in texts), texts


def test_untouched_sees_a_token_behind_escapes_in_any_string(red: Redactor) -> None:
    coloured = "\x1b[31m" + "\x1b[0m".join(TOKEN) + "\x1b[0m"
    assert not red.untouched(["plain", "\x1b]0;title", coloured], normalised=False)
    assert red.untouched(["plain", "\x1b[31mred\x1b[0m", "a\rb"], normalised=False)
    assert not red.untouched(["plain", "\x1b[31mred\x1b[0m"], normalised=True)


def test_escape_views_equal_a_reference_decoding() -> None:
    import re
    from urllib.parse import unquote_to_bytes

    from cellblock.redact import decode

    def unicode_reference(data: bytes) -> bytes:
        def one(m: re.Match[bytes]) -> bytes:
            c = int(m[1], 16)
            return bytes([c if c < 128 else 0x1A])
        return re.sub(rb"\\u([0-9A-Fa-f]{4})", one, data)

    pieces = [b"%", b"\\", b"u", b"0", b"0", b"4", b"1", b"e9", b"%4", b"%41", b"%e9",
              b"\\u0041", b"\\u00e9", b"\\u4e2d", b"\\u007", b"x", b" ", b"\\x", b"\\\\",
              b"%%", b"\n", b"\xe9", b"%Fg", b"%fF"]
    rng = random.Random(2)
    for _ in range(20_000):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))
        assert decode.escape_view(data, "unicode") == unicode_reference(data), data
        assert decode.escape_view(data, "percent") == unquote_to_bytes(data), data


def test_percent_view_fast_path_equals_unquote(monkeypatch: pytest.MonkeyPatch) -> None:
    """Text whose every ``%`` starts an escape is decoded without `unquote_to_bytes`
    (decode._unquote's codec path): the same bytes, backslashes and all."""
    from urllib.parse import unquote_to_bytes

    from cellblock.redact import decode

    def no_fallback(data: bytes) -> bytes:
        raise AssertionError(f"fell back to unquote_to_bytes on {data!r}")

    monkeypatch.setattr(decode, "unquote_to_bytes", no_fallback)
    pieces = [b"%41", b"%e9", b"%fF", b"%00", b"%5c", b"%5C", b"%25", b"%0a", b"\\", b"\\x",
              b"\\\\", b"\\u0041", b"x", b"4", b"1", b"\n", b"\xe9", b"\x00", b" "]
    rng = random.Random(3)
    for _ in range(20_000):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
        assert decode.escape_view(data, "percent") == unquote_to_bytes(data), data


def test_views_find_what_each_escape_run_alone_finds(red: Redactor) -> None:
    """The views of the escapes (one scan each) must send every escape run whose own decoding
    holds a finding to the exact check: compare with decoding every run on its own."""
    import functools

    from cellblock.redact import decode, engine
    from cellblock.redact.normalise import scan_bytes

    inner = functools.partial(engine._inner, red._decoded)

    def every_run(data: bytes) -> set[tuple[int, int, str]]:
        out = set()
        for encoding, (escape, forward, _back, decoder) in decode._RUNS.items():
            pos = 0
            while pos < len(data):
                m = forward.match(data, pos)
                stop = m.end() if m else pos
                if stop > pos:
                    run = data[pos:stop]
                    if stop - pos <= decode.DECODE_CAP and escape.search(run):
                        rule = inner(decoder(run))
                        if rule is not None:
                            out.add((pos, stop, f"{rule}:{encoding}"))
                    pos = stop
                else:
                    pos += 1
        return out

    token = TOKEN.encode()
    quoted = urllib.parse.quote(TOKEN, safe="").replace("_", "%5F").encode()
    uesc = "".join(f"\\u{ord(c):04x}" for c in TOKEN).encode()
    pieces = [token, quoted, uesc, quoted[:20], quoted[20:], uesc[:30], uesc[30:], b"%20",
              b"\\u00e9", b"\\u0041", b"%3D", b"password", b"=", b" ", b"&", b"?", b"\\",
              b"x", b"%", b"://", b"a%3Ab%40", fake(ALNUM, 12).encode(),
              # escapes of both kinds in one run, and a secret that only exists that way
              b"\\u0041%67", b"%41\\u0067", b"u0041", b"\\u0075" + b"0041" + quoted[:9]]
    rng = random.Random(4)
    found = 0
    for _ in range(600):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
        text = data.decode()
        got = set(decode.findings(inner, red._decoded.ends, text, scan_bytes(text), [],
                                  True, True))
        assert got == every_run(data), data
        found += bool(got)
    assert found > 50  # the inputs do hold escaped secrets


def test_a_window_start_is_not_a_word_boundary() -> None:
    """A Discord token glued to a word character is no finding, even where the window of
    another rule's end (a generic assignment's) starts right at the token, where the window's
    own data would give it a word boundary: the token's prefilter hit widens the window to the
    character before it (and windows only keep matches a full reach from their start)."""
    r = Redactor()
    token = next(p for rule, p in SECRETS if rule == "discord-bot-token")
    assignment = "password=Xk9#mQ2$vL7pR4tW"
    back = r._scanner._reach[0]
    # the generic rule first ends 8 value characters in; its window starts `back` before that
    first_end = len("password=") + 8
    filler = " " * (back - first_end - len(token))
    text = "x" + token + filler + assignment
    assert text.index(assignment) + first_end - back == 1  # where the token starts
    result = r.redact(text)
    assert token in result.text and "[REDACTED:generic-secret]" in result.text
    assert r.redact(" " + token + filler + assignment).text.count("[REDACTED:") == 2


def _carriage_returns_reference(text: str) -> str:
    """Every line's writes overlaid one after the other, as a terminal does."""
    out = []
    for line in text.replace("\r\n", "\n").split("\n"):
        segments = line.split("\r")
        shown = segments[0]
        for segment in segments[1:]:
            shown = segment if len(segment) >= len(shown) else segment + shown[len(segment):]
        out.append(shown)
    return "\n".join(out)


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.sampled_from(["\r", "\r", "\n", "\r\n", "a", "bc", "def", "ghij" * 3,
                                 "\u00e9", "\u2588"]), max_size=40))
def test_carriage_returns_rendered_as_writes_overlaid(pieces: list[str]) -> None:
    from cellblock.redact.normalise import _render_carriage_returns

    text = "".join(pieces)
    assert _render_carriage_returns(text) == _carriage_returns_reference(text)


def test_every_occurrence_of_a_found_value_is_redacted(red: Redactor) -> None:
    """Issue 14: redacted after ``token =``, the same value was left bare after ``|``."""
    value = "Zq8vN3kP0wLx5tR2"
    result = red.redact(f"token = {value} | {value} | {value[:10]}")
    assert value not in result.text and result.text.count("[REDACTED:") == 2
    assert value[:10] in result.text  # a prefix alone is not the value
    assert red.redact(f"echo {value}", known=(value,)).text == "echo [REDACTED:repeat]"
    assert result.secrets == (value,)


def test_an_escaped_tab_before_a_token_is_a_boundary(red: Redactor) -> None:
    token = "ghp_" + fake(ALNUM, 36)
    assert red.redact(f"['\\t{token}']").text == "['\\t[REDACTED:github-pat]']"
    assert red.redact(f"\\n{FAKE_JWT}").text == "\\n[REDACTED:jwt]"
    assert red.redact(f"at{token}").text == f"at{token}"  # a word before: still not a token


def test_redactors_of_one_process_scan_from_several_threads() -> None:
    """A warden redacts on the gate's thread and on its file service's threads, with
    Redactors that share the process's cached scanners (one hyperscan scratch each). Found
    from the jail: a download during a printing cell raised ScratchInUseError (the download
    failed, the gate dropped stream output). Every thread gets the single-threaded answer."""
    import threading

    from cellblock.output.filter import build_redactor
    from cellblock.policy import load_policy

    output = load_policy().profile("agent").output
    token = "ghp_" + "aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dE3fG5"
    texts = [f"row {i} key {token} end, mail a{i}@example.org é\n" * (1 + i % 7)
             for i in range(40)]
    expected = [build_redactor(output, env={}).redact(t).text for t in texts]
    failures: list[BaseException] = []
    wrong: list[int] = []

    def work() -> None:
        redactor = build_redactor(output, env={})
        try:
            for _ in range(25):
                for i, text in enumerate(texts):
                    if redactor.redact(text).text != expected[i]:
                        wrong.append(i)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == [] and wrong == []
    assert all(token not in e for e in expected)


@pytest.mark.parametrize("text", [
    "cpu 2.4111111111111111 s\n",  # a float whose fraction is a Luhn-valid Visa number
    "2.4111111111111111\n",
    "[0.5555555555554444, 1.0]\n",
])
def test_the_fraction_of_a_float_is_not_a_card(text: str) -> None:
    """Found by the CI dry run: a cell printed its CPU time (2.4…, 16 fraction digits that
    pass Luhn with a Visa prefix) and got `2.[REDACTED:card]` back."""
    from cellblock.output.filter import build_redactor
    from cellblock.policy import load_policy

    redactor = build_redactor(load_policy().profile("agent").output, env={})
    assert redactor.redact(text).text == text
    card = text.replace("2.", "card ").replace("[0.", "[card ")
    assert "[REDACTED:card]" in redactor.redact(card).text  # the same digits alone still are
