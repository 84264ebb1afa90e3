"""Issue 14's rules: the generic detector's syntaxes, provider formats as data, allowlists.

Every token here is FAKE: built from a fixed-seed generator to the published shape of its
format. benchmarks/eval_redact.py measures the same rules on third-party cases; these pin
the behaviour each rule was written for.
"""

from __future__ import annotations

import random
import string
from pathlib import Path

import pytest

from cellblock.redact import Redactor, providers
from cellblock.redact.partial import partial_start
from cellblock.redact.values import key_allowed, plausible_secret

_rng = random.Random(1414)
ALNUM = string.ascii_letters + string.digits
HEX = "0123456789abcdef"


def fake(alphabet: str, n: int) -> str:
    return "".join(_rng.choice(alphabet) for _ in range(n))


V = fake(ALNUM, 24)  # a random value

# (text, the value that must go) in the syntaxes of issue 14
ASSIGNED = [
    (f"<apiToken>\n    {V}\n</apiToken>", V),
    (f"<secret>{{jenkins AQAAABAAA {V}}}</secret>", V),
    (f'var apiToken string = "{V}"', V),
    (f"apiToken := `{V}`", V),
    (f'$apiToken .= "{V}"', V),
    (f'System.setProperty("API_TOKEN", "{V}")', V),
    (f'API_TOKEN ::= "{V}"', V),
    (f'API_TOKEN :::= "{V}"', V),
    (f'API_TOKEN ?= "{V}"', V),
    (f"api_token: {V}", V),
    (f'{{"auth": "{V}"}}', V),
    (f'  "apiToken" => "{V}"', V),
    (f"[DEBUG] Using Key={V}", V),
    (f"| api_key | {V} |", V),
    (f'd7_secret: "u@D7{V}(Lt^"', V),
    (f"Authorization: Bearer {V}", V),
    (f"Authorization: Api-Token {V}", V),
    (f"curl -s -u admin:{V} https://host", V),
    (f"curl -X POST \\\n  --user svc:{V} https://host", V),
    (f'curl -u "{V}:" https://host', V),
    (f"docker login registry.io -u bot -p {V}", V),
]


@pytest.fixture(scope="module")
def red() -> Redactor:
    return Redactor()


@pytest.mark.parametrize(("text", "value"), ASSIGNED)
def test_assigned_secret_in_each_syntax(red: Redactor, text: str, value: str) -> None:
    out = red.redact(text).text
    assert value not in out and "[REDACTED:" in out, out


def test_connection_string_with_a_key_is_redacted_whole(red: Redactor) -> None:
    text = f"Endpoint=https://acct.azconfig.io;Id=u+De;Secret={fake(ALNUM, 44)}"
    assert red.redact(text).text == "[REDACTED:connection-string]"


def test_a_value_longer_than_the_candidate_goes_whole(red: Redactor) -> None:
    value = fake(ALNUM, 1500)
    out = red.redact(f"token = '{value}'").text
    assert out == "token = '[REDACTED:generic-secret]'"


@pytest.mark.parametrize("text", [
    "secret_length = X25519.secret_length",
    "credentialsId: 'ff083f76-7804-4ef1-80e4-fe975bb9141b'",
    "token = self.tokenizer.pad_token",
    "tokenizer = AutoTokenizer.from_pretrained('bert-base-uncased')",
    "public_key = '9Cnzj4p4WGeKLs1Pt8QuKUpRKfFLfRYC9AIKjbJTWit'",
    "TOKEN_URL = 'https://oauth2.googleapis.com/token'",
    "api_key = os.getenv('API_KEY')",
    "apikey: $API_KEY",
    "password: ${DB_PASSWORD}",
    "token:\n  next_line_is_not_a_value_9f3kQ2",
    "keyword: 'Befaehigung_P2'",
    "[DEBUG] org.slf4j.slf4j-api:jar:1.7.8:compile",
    "notes = 'Maven - io.jsonwebtoken:jjwt-jackson-0.11.2'",
    "Authentication-Results: 5h.ca.iphmx.com",
    "{'key': 'user_04567', 'token_count': 2466}",
    "curl -u username:token https://host",
    "docker run -u 1000:1000 image",
    "aws_access_key_id = AKIAIOSFODNN7EXAMPLE",
    "token = 'ghp_" + "x" * 36 + "'",
    "token = 'sk_live_" + "0" * 36 + "'",
    "glpat-XXXXXXXXXXXXXXXXXXXX",
])
def test_near_miss_is_left_alone(red: Redactor, text: str) -> None:
    assert red.redact(text).text == text


@pytest.mark.parametrize(("rule", "token"), [
    ("databricks-token", "dapi" + fake(HEX, 32)),
    ("shopify-token", "shpat_" + fake(HEX, 32)),
    ("digitalocean-token", "dop_v1_" + fake(HEX, 64)),
    ("gitlab-token", "glft-" + fake(ALNUM, 20)),
    ("gitlab-token", "glimt-" + fake(ALNUM, 25)),
    ("slack-token", "xoxa-2-" + fake(ALNUM, 30)),
    ("age-secret-key", "AGE-SECRET-KEY-1" + fake("QPZRY9X8GF2TVDW0S3JN54KHCE6MUA7L", 58)),
    ("artifactory-api-key", "AKCp" + fake(ALNUM, 69)),
    ("newrelic-key", "NRAK-" + fake(string.ascii_uppercase + string.digits, 27)),
])
def test_provider_formats_from_the_data_file(red: Redactor, rule: str, token: str) -> None:
    result = red.redact(f"value: {token}")
    assert [f.rule for f in result.findings] == [rule], result.text


def test_every_provider_says_where_its_format_is_documented() -> None:
    names = [name for name, _ in providers.PROVIDERS]
    assert len(names) == len(set(names)) >= 60
    assert all(source.strip() for _, source in providers.PROVIDERS)


def test_a_malformed_rule_is_an_error_that_names_it(tmp_path: Path) -> None:
    bad = tmp_path / "rules.toml"
    bad.write_text('[[provider]]\nname = "X"\nsource = "s"\n'
                   'rules = [{ id = "x-token", pattern = "x_[a-z]{9}", maxlen = 9 }]\n')
    with pytest.raises(ValueError, match=r"'X'.*'x-token'.*maxlen"):
        providers.load(bad)


@pytest.mark.parametrize(("value", "plausible"), [
    ("Zq8vN3kP0wLx5tR2", True), ("c0fada9a20a2756e8efcc0c72926fdea", True),
    ("4jwhzisf2s7o7ool7", True), ("61210537-61c3-c4fd-3c5a-d742cb40981d", True),
    ("hunter22", False), ("user_85258", False), ("getSecretValue", False),
    ("self.pad_token", False), ("v1.2.3-rc1", False), ("/etc/ssl/key.pem", False),
])
def test_plausible_secret(value: str, plausible: bool) -> None:
    assert plausible_secret(value) is plausible


@pytest.mark.parametrize(("key", "allowed"), [
    ("api_token", True), ("confluentToken", True), ("DB_PASSWORD", True),
    ("credentialsId", False), ("secret_length", False), ("public_key", False),
    ("csrf_token", False), ("max_tokens", False),
])
def test_key_allowed(key: str, allowed: bool) -> None:
    assert key_allowed(key) is allowed


@pytest.mark.parametrize(("text", "start"), [
    ("AKIAQWERT", 0), ('confluentToken="e5t3l', 16), ("Authorization: Bearer ", 22),
    ("x = 'Zq8vN3kP0wLx5", 5), ("epoch 1 done\n", None), ("loading", None),
    ("accuracy=0.93", None), ("step 12/100 ", None),
])
def test_partial_token_at_the_end_of_held_text(text: str, start: int | None) -> None:
    assert partial_start(text) == start


def test_the_id_beside_a_secret_goes_with_it(red: Redactor) -> None:
    """Multi-part credentials are redacted whole: the client id next to its secret."""
    client_id, secret = fake(HEX, 32), fake(ALNUM, 32)
    out = red.redact(f"client_id: {client_id}\nclient_secret: {secret}\n").text
    assert client_id not in out and secret not in out
    assert "[REDACTED:credential-id]" in out
    # an id alone is not a secret
    assert red.redact(f"client_id: {client_id}\n").text == f"client_id: {client_id}\n"


@pytest.mark.parametrize("text", [
    "-----BEGIN PRIVATE KEY-----\nanything\n-----END PRIVATE KEY-----",
    "ABSKQmVkcm9ja0FQSUtleS1" + "EXAMPLE" * 20 + "=",
    "ops_eyJ" + "x" * 300,
    "curl -u <user:password> https://test.com/endpoint",
])
def test_made_up_long_tokens_and_empty_key_blocks_are_left_alone(red: Redactor,
                                                                  text: str) -> None:
    assert red.redact(text).text == text
