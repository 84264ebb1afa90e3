"""Property-based fuzzing of the gate (hypothesis): the wire parser alone, and the whole
relay path in both directions, on random edits (bit flips, truncations, frame swaps,
insertions, deletions) of validly signed messages. Properties: nothing but ``Dropped`` is
ever raised, and nothing is forwarded that the sender did not sign, over exactly the frames
forwarded. The default example counts keep the suite fast; ``CELLBLOCK_FUZZ_EXAMPLES=N`` runs
N per property (a nightly fuzz run).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cellblock.gate.schema import CONTENT, METADATA
from cellblock.gate.wire import DELIM, Dropped, Signer, check, load_object

from gate_harness import (
    CANARY,
    CHANNELS,
    LEGIT,
    World,
    dumps,
    examples,
    is_marker,
    opener,
    past_markers,
    sign,
)

pytestmark = pytest.mark.nonroot


# ====================================================================== hypothesis

KEY = b"fuzz-kernel-key"
SIGNER = Signer(KEY)
OPS = ("flip", "truncate", "extend", "swap", "insert", "delete", "replace", "duplicate")


@st.composite
def mutations(draw: st.DrawFn, frames: list[bytes]) -> list[bytes]:
    """1-4 random edits of a multipart: bit flips, truncations, extensions, frame swaps,
    insertions (random bytes, the delimiter, or a copy of a frame), deletions."""
    frames = list(frames)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(OPS))
        i = draw(st.integers(0, max(len(frames) - 1, 0)))
        if not frames:
            op = "insert"
        if op == "flip" and frames[i]:
            j = draw(st.integers(0, len(frames[i]) - 1))
            bit = 1 << draw(st.integers(0, 7))
            frames[i] = frames[i][:j] + bytes([frames[i][j] ^ bit]) + frames[i][j + 1 :]
        elif op == "truncate":
            frames[i] = frames[i][: draw(st.integers(0, max(len(frames[i]) - 1, 0)))]
        elif op == "extend":
            frames[i] += draw(st.binary(min_size=1, max_size=8))
        elif op == "swap":
            j = draw(st.integers(0, len(frames) - 1))
            frames[i], frames[j] = frames[j], frames[i]
        elif op == "insert":
            new = draw(st.one_of(st.binary(max_size=16), st.just(DELIM),
                                 st.sampled_from(frames or [b""])))
            frames.insert(i, new)
        elif op == "delete":
            del frames[i]
        elif op == "replace":
            frames[i] = draw(st.binary(max_size=64))
        elif op == "duplicate":
            frames.insert(i, frames[i])
    return frames


@st.composite
def signed_and_mutated(draw: st.DrawFn) -> tuple[list[bytes], list[bytes]]:
    header = {"msg_id": draw(st.text(min_size=1, max_size=12)),
              "msg_type": draw(st.sampled_from(["stream", "execute_reply", "status"])),
              "session": "s", "version": "5.3"}
    parent = draw(st.sampled_from([{}, {"msg_id": "p", "session": "s"}]))
    content = draw(st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=8),
                                   max_size=3))
    parts = [dumps(header), dumps(parent), b"{}", dumps(content)]
    idents = draw(st.lists(st.binary(max_size=6), max_size=2))
    buffers = draw(st.lists(st.binary(max_size=6), max_size=2))
    frames = [*idents, DELIM, sign(KEY, parts), *parts, *buffers]
    return parts, draw(mutations(frames))


@settings(max_examples=examples(1000), deadline=None)
@given(signed_and_mutated())
def test_fuzz_wire_never_passes_a_mutated_message(case):
    """``wire.check`` on random edits of a validly signed message: it raises nothing but
    Dropped, and whatever it passes are exactly the four frames that were signed."""
    parts, frames = case
    try:
        msg = check(frames, SIGNER, 16, 4096)
    except Dropped as dropped:
        assert dropped.reason
        event(dropped.reason)
        return
    event("passed")
    assert msg.parts == parts  # an edit survived only outside the signed frames
    i = frames.index(DELIM)
    assert frames[i + 1] == SIGNER.sign(parts)


json_text = st.recursive(
    st.one_of(st.sampled_from(["null", "true", "1", "-0", "1e999", "NaN", "-Infinity",
                               '"\\ud800"', '"\\udc00\\ud800"', '"\\ud83d\\ude00"', '"x"',
                               "9" * 5000, '"\\u0000"']),
              st.text(max_size=6).map(json.dumps)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda xs: "[" + ",".join(xs) + "]"),
        st.lists(st.tuples(st.sampled_from(['"a"', '"b"', '"\\u0061"']), inner), max_size=3)
        .map(lambda kv: "{" + ",".join(f"{k}:{v}" for k, v in kv) + "}"),
    ),
    max_leaves=8,
)


@settings(max_examples=examples(1000), deadline=None)
@given(st.one_of(json_text.map(str.encode), st.binary(max_size=64),
                 json_text.map(lambda t: t.encode("utf-16"))))
def test_fuzz_load_object_is_strict_and_total(raw):
    """The strict parser returns a dict that round-trips through a strict re-encoding, or
    raises Dropped: never another exception, never NaN, a lone surrogate or a lost key."""
    try:
        obj = load_object(raw, "fuzz")
    except Dropped as dropped:
        assert dropped.reason == "bad_fuzz"
        event("dropped")
        return
    event("parsed")
    assert type(obj) is dict
    again = json.dumps(obj, ensure_ascii=False, allow_nan=False).encode("utf-8")
    assert load_object(again) == obj == json.loads(raw)


@pytest.fixture
def fuzz_world(make_world) -> World:
    return make_world()


def kernel_original(w: World, channel: str, parent: dict[str, Any], token: str,
                    comm: bool) -> tuple[str, list[bytes]]:
    """A validly signed kernel message on ``channel`` for ``parent``, with one buffer:
    (msg_type, frames without the ident or topic)."""
    msg_type, content = LEGIT[channel]
    if comm:
        msg_type, content = "comm_msg", {"comm_id": "c", "data": {}}
    content = {**content, "token": token}
    buffers = (b"buf-" + token.encode(),) if comm else (b"stripped",)
    parts = w.kernel.parts(msg_type, parent, content)
    return msg_type, [DELIM, sign(w.kernel.key, parts), *parts, *buffers]


@settings(max_examples=examples(500), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(channel=st.sampled_from(CHANNELS), comm=st.booleans(), data=st.data(),
       original_too=st.booleans())
def test_fuzz_relay_forwards_only_what_the_kernel_signed(fuzz_world, channel, comm, data,
                                                        original_too):
    """The whole relay path, kernel side: random edits of a validly signed kernel message,
    sent on its channel (with or without the original). Whatever the client receives
    verifies with the client key over exactly the frames forwarded, and its four frames are
    the original's, at most once; buffers only on a comm message (where they are unsigned,
    per spec); no internal error; and a legit message behind them is relayed."""
    w = fuzz_world
    comm = comm and channel == "iopub"
    parent = w.open(w.a, *opener(channel))
    token = uuid.uuid4().hex
    msg_type, frames = kernel_original(w, channel, parent, token, comm)
    variants = data.draw(st.lists(mutations(frames), min_size=1, max_size=3))
    if original_too:
        variants.insert(data.draw(st.integers(0, len(variants))), frames)
    topic = (msg_type.encode(),) if channel == "iopub" else ()
    for variant in variants:
        w.kernel.send(channel, [*topic, *variant])
    end = w.open(w.a, *opener(channel))  # a legit message behind them, same socket
    end_type, end_content = LEGIT[channel]
    w.kernel.say(channel, end_type, end, end_content)
    seen = w.a.until(channel, lambda g: g.parent.get("msg_id") == end["msg_id"])[:-1]
    seen = [g for g in seen if not (g.msg_type == "status" and g.channel == "iopub")
            and not is_marker(g)]
    original = json.loads(frames[5])
    for g in seen:  # rebuilt from the original (the token, no spec field, dropped)
        assert g.msg_type == msg_type and g.parts[1] == raw_request(w, parent)
        assert g.content == {k: v for k, v in original.items() if k != "token"}
        assert g.header["msg_id"] != json.loads(frames[2])["msg_id"]
    assert len(seen) <= 1
    event(f"{channel}: {len(seen)} forwarded of {len(variants)}")
    for g in seen:  # comm buffers are not signed (per spec): they pass as they came
        assert comm or g.buffers == []
    assert w.audit.of("gate.error") == []
    if channel == "stdin":  # answer the questions, so the next example's may be answered
        w.a.request("stdin", "input_reply", {"value": "v"})


@settings(max_examples=examples(300), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(channel=st.sampled_from(["shell", "control"]), data=st.data(),
       original_too=st.booleans())
def test_fuzz_relay_forwards_only_what_the_client_signed(fuzz_world, channel, data,
                                                        original_too):
    """The relay path, client side: random edits of a validly signed client request. The
    kernel receives only messages that verify with the kernel key whose four frames are
    the original's, at most once, with the client's identity as the one ident."""
    w = fuzz_world
    c = w.a
    msg_type = "execute_request" if channel == "shell" else "kernel_info_request"
    parts = c.parts(msg_type, {"code": uuid.uuid4().hex})
    frames = c.frames(parts)
    variants = data.draw(st.lists(mutations(frames), min_size=1, max_size=3))
    if original_too:
        variants.insert(data.draw(st.integers(0, len(variants))), frames)
    for variant in variants:
        c.sockets[channel].send_multipart(variant)
    end = c.request(channel, msg_type, {"code": "end"})
    got = []
    while True:
        idents, header = w.kernel.recv(channel)  # asserts the kernel-key signature
        if header["msg_id"] == end["msg_id"]:
            break
        got.append((idents, header))
    assert all(h == json.loads(parts[0]) and i == [c.identity] for i, h in got)
    assert len(got) <= 1
    event(f"{channel}: {len(got)} forwarded of {len(variants)}")
    assert w.audit.of("gate.error") == []


def raw_request(w: World, parent: dict[str, Any]) -> bytes:
    """The raw header bytes the client sent for the request ``parent`` (the kernel got them
    re-signed, byte for byte)."""
    for _channel, frames in w.a.sent:
        if json.loads(frames[2])["msg_id"] == parent["msg_id"]:
            return frames[2]
    raise AssertionError("the client never sent that request")


HEADER_KEYS = ["msg_id", "msg_type", "username", "session", "date", "version"]
_junk = st.dictionaries(st.sampled_from(["leak", "x", "data", "name", "version", "started",
                                         "engine", "status", "transient", "msg_id"]),
                        st.just(CANARY) | st.integers() | st.dictionaries(
                            st.just("leak"), st.just(CANARY), max_size=1), max_size=3)
REBUILT = {
    "iopub": [("stream", {"name": "stdout", "text": "t"}),
              ("display_data", {"data": {"text/plain": "d"}, "metadata": {},
                                "transient": {"display_id": "i"}}),
              ("execute_result", {"data": {"text/plain": "r"}, "metadata": {},
                                  "execution_count": 1}),
              ("error", {"ename": "E", "evalue": "v", "traceback": ["t"]}),
              ("comm_msg", {"comm_id": "c", "data": {}}),
              ("clear_output", {"wait": False})],
    "shell": [("execute_reply", {"status": "ok", "execution_count": 1, "payload": [],
                                 "user_expressions": {}})],
    "control": [("kernel_info_reply", {"status": "ok", "protocol_version": "5.3"})],
}


@settings(max_examples=examples(150), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(channel=st.sampled_from(["iopub", "shell", "control"]), data=st.data(),
       header_extra=_junk, parent_extra=_junk, metadata=_junk, content_extra=_junk,
       buffers=st.lists(st.sampled_from([CANARY.encode(), b"\x00\x01"]), max_size=2))
def test_fuzz_rebuild_headers_parents_metadata_buffers(
        fuzz_world, channel, data, header_extra, parent_extra, metadata, content_extra,
        buffers):
    """A validly signed kernel message with junk (a canary among it) in extra header keys, its
    parent, the metadata frame, extra content keys and buffers: what the client gets is the
    gate's own header (the six keys, the gate's msg_id and session), the client's request
    header as parent byte for byte, metadata and content keys of the spec only, and buffers
    only on a comm message. (The canary in spec fields is the output policy's business.)"""
    w = fuzz_world
    parent = w.open(w.a, *opener(channel))
    msg_type, content = data.draw(st.sampled_from(REBUILT[channel]))
    header_extra = {k: v for k, v in header_extra.items() if k not in HEADER_KEYS}
    kernel_parent = {**parent, **{k: v for k, v in parent_extra.items()
                                  if k not in ("msg_id", "session")}}
    content_extra = {k: v for k, v in content_extra.items() if k not in content}
    k = w.kernel
    parts = [dumps({**json.loads(k.parts(msg_type, {}, {})[0]), **header_extra}),
             dumps(kernel_parent), dumps(metadata), dumps({**content, **content_extra})]
    topic = (msg_type.encode(),) if channel == "iopub" else ()
    k.send(channel, [*topic, *k.frames(parts, buffers=tuple(buffers))])
    got, _markers = past_markers(w.a, channel)
    assert got is not None and got.msg_type == msg_type
    assert list(got.header) == HEADER_KEYS
    assert got.header["session"] != k.session and got.header["username"] == "kernel"
    assert got.parts[1] == raw_request(w, parent)
    allowed_meta = METADATA.get(msg_type, {})
    assert set(json.loads(got.parts[2])) <= set(allowed_meta)
    assert set(got.content) <= CONTENT[msg_type]
    assert got.buffers == (buffers if msg_type == "comm_msg" else [])
    for frame in (got.parts[0], got.parts[1], got.parts[2]):
        assert CANARY.encode() not in frame
    if channel == "iopub":
        w.kernel.say("shell", "execute_reply", parent, {"status": "ok"})
        w.a.recv("shell")
    w.kernel.say("iopub", "status", parent, {"execution_state": "idle"})
    w.a.until("iopub", lambda g: g.msg_type == "status" and g.parent == parent)
    event(msg_type)
