"""Unit tests of the gate's pure parts: wire format, tracker state machine, replay window,
rule seam. Exact values in tables; hypothesis fuzzes the kernel-side validator."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jupyter_client.session import Session

import cellblock.gate
from cellblock.gate import GateLimits
from cellblock.gate.replay import ReplayWindow
from cellblock.gate.rules import WITHHOLD, Withheld, apply_rules
from cellblock.gate.tracker import (
    FORWARD,
    FORWARD_AND_CLOSE,
    HOLD,
    KERNEL_TYPES,
    RequestTable,
)
from cellblock.gate.wire import (
    DELIM,
    Dropped,
    Signer,
    check,
    load_object,
    parse_header,
    parse_parent,
    split,
)

KEY = b"kernel-key"
SIGNER = Signer(KEY)


def header(msg_type: str = "stream", msg_id: str = "m1", session: str = "s1", **extra) -> bytes:
    fields = {"msg_id": msg_id, "msg_type": msg_type, "session": session, "version": "5.3"}
    fields.update(extra)
    return json.dumps(fields).encode()


def signed(parts: list[bytes], key: bytes = KEY, idents=(), buffers=()) -> list[bytes]:
    sig = hmac.new(key, b"".join(parts), hashlib.sha256).hexdigest().encode()
    return [*idents, DELIM, sig, *parts, *buffers]


# ------------------------------------------------------------------ Signer


@pytest.mark.parametrize(
    ("key", "parts", "expected"),
    [
        (b"key", [b"{}"] * 4, b"ca767b02c5bc061ed184a9a029e7f93a7f2f7ed4e8fe74120fc1212f0b008fa3"),
        (
            "secret",
            [b'{"msg_id":"a"}', b"{}", b"{}", b'{"x":1}'],
            b"6659855b95d9166b2c6d27b39412408d6bdc6856dfc510a3cc6d38cfb91c199f",
        ),
    ],
)
def test_sign_exact_values(key, parts, expected):
    assert Signer(key).sign(parts) == expected
    assert Signer(key).verify(expected, parts)


def test_sign_matches_jupyter_client_session():
    parts = [header("execute_request"), b"{}", b"{}", b'{"code": "1+1"}']
    assert SIGNER.sign(parts) == Session(key=KEY).sign(parts)


@pytest.mark.parametrize(
    "signature",
    [
        b"",
        b"0" * 64,
        b"CA767B02C5BC061ED184A9A029E7F93A7F2F7ED4E8FE74120FC1212F0B008FA3",  # upper case
        b"ca767b02c5bc061ed184a9a029e7f93a7f2f7ed4e8fe74120fc1212f0b008fa3" + b"00",
        b"ca767b02c5bc061ed184a9a029e7f93a7f2f7ed4e8fe74120fc1212f0b008f",
    ],
)
def test_verify_rejects(signature):
    assert not Signer(b"key").verify(signature, [b"{}"] * 4)


def test_empty_key_refused():
    with pytest.raises(ValueError, match="empty HMAC key"):
        Signer(b"")


# ------------------------------------------------------------------ split


@pytest.mark.parametrize(
    ("frames", "idents", "buffers"),
    [
        ([DELIM, b"s", b"h", b"p", b"m", b"c"], [], []),
        ([b"id1", b"id2", DELIM, b"s", b"h", b"p", b"m", b"c"], [b"id1", b"id2"], []),
        ([DELIM, b"s", b"h", b"p", b"m", b"c", b"b1", DELIM], [], [b"b1", DELIM]),
    ],
)
def test_split_layouts(frames, idents, buffers):
    msg = split(frames, 64)
    assert msg.idents == idents
    assert msg.signature == b"s"
    assert msg.parts == [b"h", b"p", b"m", b"c"]
    assert msg.buffers == buffers


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ([b"s", b"h", b"p", b"m", b"c"], "no_delimiter"),
        ([], "no_delimiter"),
        ([DELIM, b"s", b"h", b"p", b"m"], "short_message"),
        ([DELIM, DELIM, b"s", b"h", b"p", b"m", b"c"], "delimiter_as_ident"),
        ([b"id", DELIM, b"s", b"h", DELIM, b"m", b"c"], "delimiter_as_ident"),
        ([DELIM, b"s", b"h", b"p", b"m", b"c"] + [b"b"] * 59, "too_many_frames"),
    ],
)
def test_split_refuses(frames, reason):
    with pytest.raises(Dropped) as info:
        split(frames, 64)
    assert info.value.reason == reason


# ------------------------------------------------------------------ JSON


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"{}", {}),
        (b' {"a": [1, 2.5, "\xc3\xa9", null, true]} ', {"a": [1, 2.5, "é", None, True]}),
        (b'{"e": "\\ud83d\\ude00"}', {"e": "\U0001f600"}),  # an escaped surrogate *pair* is fine
    ],
)
def test_load_object_accepts(raw, expected):
    assert load_object(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        b"[]",
        b'"str"',
        b"1",
        b"",
        b"{",
        b"{} {}",
        b'{"a": "\xff"}',  # invalid UTF-8
        b'{"a": "\xed\xa0\x80"}',  # a UTF-8-encoded surrogate
        b'{"a": "\\ud800"}',  # a lone escaped surrogate
        b'{"a": "x\\udfff"}',
        b'{"a": NaN}',
        b'{"a": -Infinity}',
        b'{"a": 1e999}',
        b'{"a": 1, "a": 2}',  # duplicate keys
        b'{"a": {"b": 1, "b": 1}}',
        b'{"a": ' + b"9" * 5000 + b"}",  # over int_max_str_digits
        b'{"a": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",  # deeper than the recursion limit
        '{"a": 1}'.encode("utf-16"),  # json.loads(bytes) would sniff UTF-16
    ],
)
def test_load_object_refuses(raw):
    with pytest.raises(Dropped) as info:
        load_object(raw, "header")
    assert info.value.reason == "bad_header"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (header(), None),
        (header(version="5.4"), None),
        (header(msg_id=""), "bad_header"),
        (header(msg_id=7), "bad_header"),
        (header(msg_type=None), "bad_header"),
        (header(session="x" * 513), "bad_header"),
        (b'{"msg_id": "m", "msg_type": "stream", "session": "s"}', "bad_version"),
        (header(version="99.0"), "bad_version"),
        (header(version=5.3), "bad_version"),
        (header(date="2" * 70_000), "oversized_header"),
    ],
)
def test_parse_header_table(raw, reason):
    if reason is None:
        assert parse_header(raw, 65536)["msg_type"] == "stream"
    else:
        with pytest.raises(Dropped) as info:
            parse_header(raw, 65536)
        assert info.value.reason == reason


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{}", None),
        (header("execute_request"), None),
        (b'{"msg_id": "m"}', "bad_parent"),
        (b'{"session": "s"}', "bad_parent"),
        (b"[]", "bad_parent"),
        (b"{" + b" " * 70_000 + b"}", "oversized_parent"),
    ],
)
def test_parse_parent_table(raw, reason):
    if reason is None:
        parse_parent(raw, 65536)
    else:
        with pytest.raises(Dropped) as info:
            parse_parent(raw, 65536)
        assert info.value.reason == reason


def test_check_verifies_before_parsing():
    good = signed([header(), b"{}", b"{}", b"{}"])
    assert check(good, SIGNER, 64, 65536).msg_type == "stream"
    # Not JSON at all, but the signature is checked first, so the reason is the signature.
    forged = [DELIM, b"0" * 64, b"\xff", b"{}", b"{}", b"{}"]
    with pytest.raises(Dropped, match="bad_signature"):
        check(forged, SIGNER, 64, 65536)
    with pytest.raises(Dropped, match="bad_signature"):
        check(signed([header(), b"{}", b"{}", b"{}"], key=b"other"), SIGNER, 64, 65536)


# ------------------------------------------------------------------ replay window


def test_replay_window_forgets_in_order():
    window = ReplayWindow(3)
    assert [window.seen(x) for x in ["a", "b", "a", "c", "d"]] == [False, False, True, False, False]
    assert len(window) == 3
    # "a" was the oldest and left the window: {d, b, c} -> {d, a, c}
    assert window.seen("a") is False
    assert window.seen("b") is False  # -> {d, a, b}
    assert [window.seen(x) for x in ["d", "a", "b", "c"]] == [True, True, True, False]


def test_replay_window_size_checked():
    with pytest.raises(ValueError, match="replay_window"):
        ReplayWindow(0)


# ------------------------------------------------------------------ tracker


def parent_of(msg_id: str, session: str = "s1") -> dict:
    return {"msg_id": msg_id, "session": session, "msg_type": "x"}


def test_tracker_reply_then_idle():
    table = RequestTable(8)
    table.add("r1", "shell", "execute_request", "s1", (b"client",), b"{}")
    assert table.bind_iopub("stream", parent_of("r1"), idle=False)[0] == FORWARD
    request = table.bind_reply("shell", "execute_reply", parent_of("r1"))
    assert request.idents == (b"client",)
    assert table.replied(request) is None
    assert table.bind_iopub("status", parent_of("r1"), idle=True)[0] == FORWARD_AND_CLOSE
    assert len(table) == 0
    with pytest.raises(Dropped, match="unknown_parent"):
        table.bind_iopub("stream", parent_of("r1"), idle=False)


def test_tracker_early_idle_is_held():
    table = RequestTable(8)
    table.add("r1", "shell", "execute_request", "s1", (b"client",), b"{}")
    verdict, request = table.bind_iopub("status", parent_of("r1"), idle=True)
    assert verdict == HOLD
    request.held_idle = [b"idle-frames"]
    with pytest.raises(Dropped, match="duplicate_idle"):
        table.bind_iopub("status", parent_of("r1"), idle=True)
    assert table.bind_iopub("stream", parent_of("r1"), idle=False)[0] == FORWARD
    request = table.bind_reply("shell", "execute_reply", parent_of("r1"))
    assert table.replied(request) == [b"idle-frames"]
    assert len(table) == 0


@pytest.mark.parametrize(
    ("channel", "msg_type", "parent", "reason"),
    [
        ("shell", "execute_reply", {}, "no_parent"),
        ("shell", "execute_reply", parent_of("nope"), "unknown_parent"),
        ("shell", "execute_reply", parent_of("r1", "other-session"), "session_mismatch"),
        ("control", "execute_reply", parent_of("r1"), "wrong_channel"),
        ("shell", "inspect_reply", parent_of("r1"), "reply_mismatch"),
    ],
)
def test_tracker_refuses_replies(channel, msg_type, parent, reason):
    table = RequestTable(8)
    table.add("r1", "shell", "execute_request", "s1", (b"client",), b"{}")
    with pytest.raises(Dropped) as info:
        table.bind_reply(channel, msg_type, parent)
    assert info.value.reason == reason


def test_tracker_duplicates_and_eviction():
    table = RequestTable(2)
    assert table.add("r1", "shell", "execute_request", "s", (b"c",), b"{}") is None
    with pytest.raises(Dropped, match="duplicate_msg_id"):
        table.add("r1", "shell", "execute_request", "s", (b"c",), b"{}")
    table.add("r2", "shell", "comm_msg", "s", (b"c",), b"{}")
    evicted = table.add("r3", "control", "kernel_info_request", "s", (b"c",), b"{}")
    assert evicted is not None and evicted.msg_id == "r1"
    # comm_msg expects no reply, so its idle closes it at once
    assert table.bind_iopub("status", parent_of("r2", "s"), idle=True)[0] == FORWARD_AND_CLOSE
    request = table.bind_reply("control", "kernel_info_reply", parent_of("r3", "s"))
    table.replied(request)
    with pytest.raises(Dropped, match="duplicate_reply"):
        table.bind_reply("control", "kernel_info_reply", parent_of("r3", "s"))


def test_tracker_input_request():
    table = RequestTable(8)
    table.add("r1", "shell", "execute_request", "s1", (b"client",), b"{}")
    table.add("r2", "shell", "complete_request", "s1", (b"client",), b"{}")
    assert table.bind_input_request(parent_of("r1")).msg_id == "r1"
    with pytest.raises(Dropped, match="unexpected_input_request"):
        table.bind_input_request(parent_of("r2"))


def test_kernel_type_tables():
    assert KERNEL_TYPES["shell"] == {
        "execute_reply",
        "inspect_reply",
        "complete_reply",
        "history_reply",
        "is_complete_reply",
        "kernel_info_reply",
        "comm_info_reply",
    }
    assert KERNEL_TYPES["control"] == {
        "shutdown_reply",
        "interrupt_reply",
        "kernel_info_reply",
        "debug_reply",
        "usage_reply",
    }
    assert "execute_reply" not in KERNEL_TYPES["iopub"]
    assert "input_request" not in KERNEL_TYPES["iopub"]


# ------------------------------------------------------------------ rules


class Upper:
    name = "upper"

    def apply(self, channel, msg_type, header, parent, content_bytes, metadata_bytes):
        return content_bytes.upper()


class Same:
    def apply(self, channel, msg_type, header, parent, content_bytes, metadata_bytes):
        return content_bytes


class DropAll:
    name = "drop-all"

    def apply(self, channel, msg_type, header, parent, content_bytes, metadata_bytes):
        return None


class Broken:
    def apply(self, channel, msg_type, header, parent, content_bytes, metadata_bytes):
        raise RuntimeError("boom")


class Both:
    def apply(self, channel, msg_type, header, parent, content_bytes, metadata_bytes):
        return content_bytes, b'{"m": 1}'


class Hold:
    def apply(self, channel, msg_type, header, parent, content_bytes, metadata_bytes):
        return WITHHOLD


def test_apply_rules():
    content = b'{"text": "hi"}'
    meta = b"{}"
    assert apply_rules((), "iopub", "stream", {}, {}, content, meta)[0] is content
    got = apply_rules((Same(),), "iopub", "stream", {}, {}, content, meta)
    assert got[0] is content and got[1] is meta
    assert apply_rules((Same(), Upper()), "iopub", "stream", {}, {}, content, meta) == (
        b'{"TEXT": "HI"}', meta)
    assert apply_rules((Both(),), "iopub", "stream", {}, {}, content, meta) == (
        content, b'{"m": 1}')
    with pytest.raises(Withheld):
        apply_rules((Hold(),), "iopub", "stream", {}, {}, content, meta)
    with pytest.raises(Dropped, match="rule:drop-all"):
        apply_rules((Upper(), DropAll()), "iopub", "stream", {}, {}, content)
    with pytest.raises(Dropped, match="rule_error:Broken"):
        apply_rules((Broken(),), "iopub", "stream", {}, {}, content)


# ------------------------------------------------------------------ interface


def test_public_interface():
    """What the warden and the output rules may use; nothing outside the gate imports its
    modules (output/ used to import ``WITHHOLD`` and ``load_object`` from them)."""
    assert cellblock.gate.__all__ == [
        "ALLOW", "WITHHOLD", "Gate", "GateLimits", "Observed", "OutputRule", "Verdict",
        "load_object", "refuse",
    ]
    output = Path(cellblock.gate.__file__).parent.parent / "output"
    for path in output.glob("*.py"):
        deep = re.findall(r"^\s*(?:from|import) (?:\.\.|cellblock\.)gate\.", path.read_text(),
                          re.MULTILINE)
        assert not deep, f"{path.name} imports a gate module, not the gate's interface"


@pytest.mark.parametrize(
    "limits", [{"max_frames": 5}, {"replay_window": 0}, {"max_frame_bytes": -1}, {"linger_ms": 1.5}]
)
def test_limits_are_checked(limits):
    with pytest.raises(ValueError, match="GateLimits"):
        GateLimits(**limits)


# ------------------------------------------------------------------ fuzzing

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
header_dicts = st.fixed_dictionaries(
    {},
    optional={
        "msg_id": st.one_of(st.text(max_size=10), json_values),
        "msg_type": st.sampled_from(["stream", "status", "execute_reply", ""]) | json_values,
        "session": st.text(max_size=10),
        "version": st.sampled_from(["5.3", "99.0", ""]) | json_values,
    },
)
json_frames = st.one_of(
    st.binary(max_size=64),
    json_values.map(lambda v: json.dumps(v).encode()),
    header_dicts.map(lambda v: json.dumps(v).encode()),
)
frame = st.one_of(st.just(DELIM), st.binary(max_size=80), json_frames)


@st.composite
def kernel_frames(draw):
    """Random multiparts, about half of them correctly signed with the kernel key."""
    if draw(st.booleans()):
        return draw(st.lists(frame, max_size=12))
    parts = [draw(json_frames) for _ in range(4)]
    idents = draw(st.lists(st.binary(max_size=8) | st.just(DELIM), max_size=2))
    buffers = draw(st.lists(st.binary(max_size=8), max_size=2))
    return signed(parts, key=draw(st.sampled_from([KEY, KEY, b"other"])), idents=idents,
                  buffers=buffers)  # fmt: skip


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kernel_frames())
def test_fuzz_check_never_raises_and_only_passes_signed(frames):
    try:
        msg = check(frames, SIGNER, 16, 4096)
    except Dropped as dropped:
        assert dropped.reason
        return
    i = frames.index(DELIM)
    assert SIGNER.verify(frames[i + 1], frames[i + 2 : i + 6])
    assert isinstance(msg.header["msg_id"], str) and isinstance(msg.header["msg_type"], str)
    assert isinstance(msg.parent, dict)
