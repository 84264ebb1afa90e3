"""Protocol attacks against the gate, raw ZMQ sockets on both sides (THREATS P1-P4, P6-P10,
P12, P15): forged and unsigned messages, replays, the delimiter as an ident, malformed JSON,
wrong channels and directions, unsigned buffers, identity spoofing between two clients.

Each test tries one attack on every channel it applies to, from the kernel and from a
client, and asserts that it failed (see ``gate_harness.py``: the drop reason, no canary in
any frame any client received, a legit exchange afterwards). ``test_gate_relay.py`` has the
basics and a real ipykernel behind the gate; ``test_gate_pressure.py`` floods and sizes,
``test_gate_content.py`` what the output policy lets through, ``test_gate_fuzz.py``
hypothesis.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid

import pytest
import zmq

from cellblock.gate import GateLimits
from cellblock.gate.tracker import CLIENT_TYPES, KERNEL_TYPES, KNOWN_TYPES, NO_REPLY
from cellblock.gate.wire import DELIM

from gate_harness import (
    AGENT_REQUESTS,
    CANARY,
    CHANNELS,
    LEGIT,
    ROUTED,
    agent_gate,
    dumps,
    new_header,
    opener,
    past_markers,
    sign,
    text_is,
    wait_until,
)

pytestmark = pytest.mark.nonroot


# ====================================================================== P1 forged signatures


def forgeries(key: bytes, good: list[bytes], bad: list[bytes], other_key: bytes) -> list[bytes]:
    """Signatures that must not verify ``bad`` (the parts actually sent)."""
    right = sign(key, bad)
    return [
        sign(b"not-the-key", bad),  # wrong key
        sign(other_key, bad),  # the other side's key
        b"",  # unsigned
        right[:-1],  # truncated
        right[:32],
        right + b"0",  # one hex digit too many
        right.upper(),  # the right digest, upper case
        sign(key, good),  # a valid signature over different frames
        sign(key, [bad[3], bad[0], bad[1], bad[2]]),  # the right frames in another order
        sign(key, bad[:3]),  # over fewer frames
        hmac.new(key, b"".join(bad), hashlib.sha512).hexdigest()[:64].encode(),
    ]


# The legit kernel message on each channel, for an open request on that channel.

@pytest.mark.parametrize("channel", CHANNELS)
def test_p1_forged_kernel_messages_dropped(make_world, channel):
    """A kernel message whose signature does not verify with the kernel key, over exactly
    its four frames, is dropped on every channel; the request it names stays open."""
    w = make_world()
    k = w.kernel
    parent = w.open(w.a, *opener(channel))
    msg_type, content = LEGIT[channel]
    bad_content = {**content, "text": CANARY, "prompt": CANARY}
    topic = (msg_type.encode(),) if channel == "iopub" else ()
    mark = w.audit.mark()
    attacks = 0
    for _ in range(2):  # with a fresh msg_id each time: not a replay drop
        bad = k.parts(msg_type, parent, bad_content)
        good = k.parts(msg_type, parent, content)
        for signature in forgeries(k.key, good, bad, w.a.key):
            k.send(channel, [*topic, DELIM, signature, *bad])
            attacks += 1
    assert w.audit.wait_drops(attacks, mark) == [(channel, "bad_signature")] * attacks
    k.say(channel, msg_type, parent, content)  # the legit one still passes: nothing consumed
    got = w.a.recv(channel)
    assert got is not None and got.msg_type == msg_type and got.content == content
    assert got.parent["msg_id"] == parent["msg_id"]
    if channel == "stdin":
        w.a.request("stdin", "input_reply", {"value": "bob"})
        assert k.recv("stdin")[1]["msg_type"] == "input_reply"
    w.check()


@pytest.mark.parametrize("channel", ROUTED)
def test_p1_forged_client_messages_never_reach_the_kernel(make_world, channel):
    """A client message that does not verify with the client key (the kernel key included)
    never reaches the kernel."""
    w = make_world()
    k = w.kernel
    if channel == "stdin":  # an input_reply is only forwarded while one is asked for
        parent = w.open()
        k.say("stdin", "input_request", parent, {"prompt": "? ", "password": False})
        assert w.a.recv("stdin") is not None
    msg_type = {"shell": "execute_request", "control": "interrupt_request",
                "stdin": "input_reply"}[channel]
    content = {"code": CANARY, "value": CANARY}
    mark = w.audit.mark()
    attacks = 0
    for _ in range(2):
        bad = w.a.parts(msg_type, content)
        good = w.a.parts(msg_type, {})
        for signature in forgeries(w.a.key, good, bad, k.key):
            w.a.sockets[channel].send_multipart([DELIM, signature, *bad])
            attacks += 1
    assert w.audit.wait_drops(attacks, mark) == [(channel, "bad_signature")] * attacks
    sent = w.a.request(channel, msg_type, {"code": "legit", "value": "legit"})
    _idents, header = k.recv(channel)
    assert header["msg_id"] == sent["msg_id"]  # the first thing the kernel got is the legit one
    assert k.quiet(channel)
    w.check()

# ====================================================================== P2, P4 replays


@pytest.mark.parametrize("channel", CHANNELS)
def test_p4_exact_replay_dropped(make_world, channel):
    """A captured kernel message sent again, byte for byte, is dropped (same msg_id)."""
    w = make_world()
    k = w.kernel
    parent = w.open(w.a, *opener(channel))
    msg_type, content = LEGIT[channel]
    frames = k.say(channel, msg_type, parent, content)
    assert w.a.recv(channel).content == content
    mark = w.audit.mark()
    for _ in range(3):
        k.send(channel, frames)
    if channel == "iopub":  # also with another topic (the topic frame is not signed)
        k.send(channel, [CANARY.encode(), *frames[1:]])
    expected = 4 if channel == "iopub" else 3
    assert w.audit.wait_drops(expected, mark) == [(channel, "replay")] * expected
    assert not w.a.pending(channel)
    w.check()


def test_p2_p4_fresh_messages_naming_a_completed_request(make_world):
    """Once a request has its reply and its idle, anything naming it as parent is dropped,
    whatever the channel and however freshly signed: late output, a second reply, an
    input_request, another idle."""
    w = make_world(clients=2)
    k = w.kernel
    old = w.open(w.a)
    w.finish(old)
    ctl = w.open(w.a, "control", "kernel_info_request")
    w.finish(ctl, channel="control")
    mark = w.audit.mark()
    canary = {"name": "stdout", "text": CANARY}
    bundle = {"data": {"text/plain": CANARY}, "metadata": {}}
    attacks = [
        ("iopub", "stream", old, canary),
        ("iopub", "execute_result", old, {**bundle, "execution_count": 1}),
        ("iopub", "display_data", old, bundle),
        ("iopub", "update_display_data", old, {**bundle, "transient": {"display_id": "d"}}),
        ("iopub", "error", old, {"ename": CANARY, "evalue": CANARY, "traceback": []}),
        ("iopub", "clear_output", old, {"wait": False}),
        ("iopub", "execute_input", old, {"code": CANARY, "execution_count": 1}),
        ("iopub", "status", old, {"execution_state": "idle"}),
        ("iopub", "status", old, {"execution_state": "busy"}),
        ("shell", "execute_reply", old, {"status": "ok", "note": CANARY}),
        ("stdin", "input_request", old, {"prompt": CANARY, "password": False}),
        ("control", "kernel_info_reply", ctl, {"status": "ok", "banner": CANARY}),
        ("iopub", "stream", ctl, canary),
    ]
    for channel, msg_type, parent, content in attacks:
        k.say(channel, msg_type, parent, content)
    drops = w.audit.wait_drops(len(attacks), mark)
    assert sorted(drops) == sorted((c, "unknown_parent") for c, *_ in attacks)
    w.check()


def test_p4_replay_across_a_rekey(make_world):
    """After ``Gate.rekey`` (the jail restarted in place with a fresh key): messages signed
    with the old key are dropped, and so is a message already seen re-signed with the new
    key (the replay window outlives the key); a ping forwarded before the rekey gets no
    echo after it. Client requests are signed with the new key from then on."""
    w = make_world()
    k = w.kernel
    parent = w.open()
    before = k.say("iopub", "stream", parent, {"name": "stdout", "text": "before"})
    w.a.until("iopub", text_is("before"))
    w.a.sockets["hb"].send_multipart([b"", b"ping-before"])
    ping = wait_until(lambda: k.sockets["hb"].poll(10) and k.sockets["hb"].recv_multipart(),
                      "the ping to reach the kernel")
    old_key = k.key
    k.key = uuid.uuid4().hex.encode()
    assert w.gate.rekey(k.key.decode()) is True
    resume = getattr(w.gate, "resume", None)  # the warden's next call, where the gate has it:
    if resume is not None:  # client requests wait for the restarted kernel until then
        resume()
    mark = w.audit.mark()
    k.send("iopub", before)  # old key, old msg_id
    resigned = k.frames(before[3:7], before[:1])  # new key, old msg_id
    k.send("iopub", resigned)
    stale = k.parts("stream", parent, {"name": "stdout", "text": CANARY})
    k.send("iopub", k.frames(stale, (b"stream",), key=old_key))  # old key, fresh msg_id
    k.send("shell", k.frames(k.parts("execute_reply", parent, {"status": CANARY}),
                             key=old_key))
    k.sockets["hb"].send_multipart(ping)  # the echo of a ping from before the rekey
    assert sorted(w.audit.wait_drops(5, mark)) == sorted([
        ("iopub", "bad_signature"), ("iopub", "replay"), ("iopub", "bad_signature"),
        ("shell", "bad_signature"), ("hb", "unsolicited_heartbeat"),
    ])
    # The new key works both ways.
    k.say("iopub", "stream", parent, {"name": "stdout", "text": "after"})
    w.a.until("iopub", text_is("after"))
    sent = w.a.request("control", "kernel_info_request")
    assert k.recv("control")[1]["msg_id"] == sent["msg_id"]  # verified with the new key
    assert not w.a.pending("hb")
    w.finish(parent)
    w.check()

def test_p1_forged_requests_are_not_held_during_a_restart(make_world):
    """While the jail restarts in place (between ``rekey`` and ``resume``) the gate holds
    client requests for the new kernel: only those that verify. A forged one is dropped at
    once (nobody without the key can fill the warden's memory then), a legit one is held
    and reaches the new kernel after ``resume``, the forged one never."""
    w = make_world()
    k = w.kernel
    k.key = uuid.uuid4().hex.encode()
    assert w.gate.rekey(k.key.decode()) is True
    mark = w.audit.mark()
    bad = w.a.parts("execute_request", {"code": CANARY})
    w.a.sockets["shell"].send_multipart(w.a.frames(bad, key=k.key))  # the kernel's key
    w.a.sockets["shell"].send_multipart([DELIM, b"0" * 64, *bad])
    assert w.audit.wait_drops(2, mark) == [("shell", "bad_signature")] * 2
    sent = w.a.request("shell", "execute_request", {"code": "legit"})
    assert not k.sockets["shell"].poll(200)  # held, not forwarded, until resume()
    w.gate.resume()
    _idents, header = k.recv("shell")
    assert header["msg_id"] == sent["msg_id"]
    assert not k.sockets["shell"].poll(200)  # nothing else was held
    w.finish(header)
    w.check()


# ====================================================================== P3 forged idles


def test_p3_forged_idles_never_end_a_request_early(make_world):
    """A forged early ``status: idle`` (so a client stops collecting) is held until the
    request's reply, on shell and on control, for one client while another's request runs;
    a second idle while one is held, and any idle after the real one, are dropped."""
    w = make_world(clients=2)
    k = w.kernel
    pa = w.open(w.a)
    ca = w.open(w.a, "control", "kernel_info_request")
    pb = w.open(w.b)
    mark = w.audit.mark()
    for parent in (pa, ca, pb):
        k.say("iopub", "status", parent, {"execution_state": "idle"})
        k.say("iopub", "status", parent, {"execution_state": "idle"})  # a second one
    assert w.audit.wait_drops(3, mark) == [("iopub", "duplicate_idle")] * 3
    k.say("iopub", "stream", pa, {"name": "stdout", "text": "still running"})
    seen = w.a.until("iopub", text_is("still running"))
    assert [g.msg_type for g in seen] == ["stream"]  # no idle reached A (nor B) yet
    seen = w.b.until("iopub", text_is("still running"))  # B gets A's output too (iopub)
    assert [g.msg_type for g in seen] == ["stream"]
    for client, parent, channel in ((w.a, ca, "control"), (w.b, pb, "shell"), (w.a, pa, "shell")):
        k.say(channel, parent["msg_type"].replace("_request", "_reply"), parent, {"status": "ok"})
        assert client.recv(channel).parent == parent
        idle = client.until("iopub", lambda g, p=parent: g.msg_type == "status"
                            and g.parent == p)[-1]  # released right after its reply
        assert idle.content == {"execution_state": "idle"}
    mark = w.audit.mark()
    k.say("iopub", "status", pa, {"execution_state": "idle"})
    k.say("iopub", "stream", pa, {"name": "stdout", "text": CANARY})
    assert w.audit.wait_drops(2, mark) == [("iopub", "unknown_parent")] * 2
    w.check()

# ====================================================================== P7 the delimiter


@pytest.mark.parametrize("channel", CHANNELS)
def test_p7_delimiter_as_an_ident_from_the_kernel(make_world, channel):
    """``<IDS|MSG>`` where an ident, the signature or a JSON frame should be: refused by the
    strict layout check (jupyter_client's parser would shift the frames)."""
    w = make_world()
    k = w.kernel
    parent = w.open(w.a, *opener(channel))
    msg_type, content = LEGIT[channel]
    bad = {**content, "text": CANARY, "prompt": CANARY}
    parts = k.parts(msg_type, parent, bad)
    mark = w.audit.mark()
    attacks = [
        [DELIM, *k.frames(k.parts(msg_type, parent, bad))],  # DELIM as the ident
        [b"id", DELIM, *k.frames(k.parts(msg_type, parent, bad))],
        [DELIM, DELIM, *parts],  # DELIM as the signature
        [DELIM, sign(k.key, [DELIM, *parts[1:]]), DELIM, *parts[1:]],  # as the header
        [DELIM, sign(k.key, [*parts[:3], DELIM]), *parts[:3], DELIM],  # as the content
    ]
    for frames in attacks:
        k.send(channel, frames)
    reasons = [r for _c, r in w.audit.wait_drops(len(attacks), mark)]
    assert reasons == ["delimiter_as_ident"] * len(attacks)
    # A delimiter among the buffers is only a buffer: stripped from a non-comm message.
    k.say(channel, msg_type, parent, content, buffers=(DELIM, CANARY.encode()))
    got, _markers = past_markers(w.a, channel)
    assert got.content == content and got.buffers == []
    if channel == "stdin":
        w.a.request("stdin", "input_reply", {"value": "v"})
    w.check()


@pytest.mark.parametrize("channel", ROUTED)
def test_p7_delimiter_as_a_client_identity(make_world, channel):
    """A client whose ZMQ identity is ``<IDS|MSG>``, or that sends the delimiter as an extra
    ident: refused before the kernel sees anything."""
    w = make_world()
    k = w.kernel
    evil = w.client(identity=DELIM)
    mark = w.audit.mark()
    parts = evil.parts("execute_request", {"code": CANARY})
    evil.sockets[channel].send_multipart(evil.frames(parts))
    w.a.sockets[channel].send_multipart([DELIM, *w.a.frames(w.a.parts("x", {"c": CANARY}))])
    assert w.audit.wait_drops(2, mark) == [(channel, "delimiter_as_ident")] * 2
    assert k.quiet(channel)
    w.check()

# ====================================================================== P8 malformed JSON

HEADER_KEYS = b'"msg_id": "m-%s", "msg_type": "stream", "session": "s", "version": "5.3"'


def malformed_objects(limits: GateLimits) -> list[tuple[bytes, str]]:
    """(raw JSON frame, why it is bad): every one must be refused by the strict parser."""
    def obj(extra: bytes) -> bytes:
        return b"{" + HEADER_KEYS % uuid.uuid4().hex.encode() + b", " + extra + b"}"

    c = CANARY.encode()
    return [
        (obj(b'"t": "' + c + b'\xff"'), "invalid UTF-8"),
        (obj(b'"t": "' + c + b'\xed\xa0\x80"'), "UTF-8-encoded surrogate"),
        (obj(b'"t": "' + c + b'\\ud800"'), "lone escaped surrogate"),
        (obj(b'"t": "\\udc00' + c + b'"'), "lone low surrogate"),
        (obj(b'"n": NaN, "t": "' + c + b'"'), "NaN"),
        (obj(b'"n": -Infinity'), "-Infinity"),
        (obj(b'"n": 1e400'), "a float that overflows"),
        (obj(b'"t": "' + c + b'", "t": "x"'), "duplicate keys"),
        (obj(b'"msg_id": "again"'), "a duplicate msg_id"),
        (obj(b'"n": ' + b"9" * 100_000), "a 10**5-digit int"),
        (obj(b'"d": ' + b"[" * 100_000 + b"]" * 100_000), "10**5 deep"),
        (obj(b'"d": ' + b'{"a":' * 50_000 + b"1" + b"}" * 50_000), "5*10**4 deep objects"),
        (b"[" + HEADER_KEYS + b"]", "not an object"),
        (b'"' + c + b'"', "a string"),
        ('{"t": "' + CANARY + '"}', "UTF-16"),
        (b"\xef\xbb\xbf{}", "a BOM"),
        (obj(b'"t": "' + c + b'"} {"x": 1'), "two objects"),
        (obj(b'"date": "' + b"2" * (limits.max_header_bytes + 1) + b'"'), "oversized"),
    ]


def utf16(raw: bytes | str) -> bytes:
    return raw.encode("utf-16") if isinstance(raw, str) else raw


@pytest.mark.parametrize("channel", CHANNELS)
def test_p8_malformed_header_and_parent_from_the_kernel(make_world, channel):
    """Correctly signed kernel messages whose header or parent_header is not strict JSON
    (THREATS P8): dropped with a reason, never an exception. The header limit is raised to
    4 MiB so that the parser itself meets 10**5 nesting levels and digits."""
    limits = GateLimits(max_header_bytes=4 << 20)
    w = make_world(limits=limits)
    k = w.kernel
    parent = w.open(w.a, *opener(channel))
    msg_type, content = LEGIT[channel]
    cases = malformed_objects(limits)
    mark = w.audit.mark()
    for raw, _why in cases:
        raw = utf16(raw)
        k.send(channel, k.frames([raw, dumps(parent), b"{}", dumps(content)], (b"t",)))
        good_header = dumps(new_header(msg_type, k.session))
        k.send(channel, k.frames([good_header, raw, b"{}", dumps(content)], (b"t",)))
    drops = w.audit.wait_drops(2 * len(cases), mark)
    expected = []
    for _raw, why in cases:
        expected.append((channel, "oversized_header" if why == "oversized" else "bad_header"))
        expected.append((channel, "oversized_parent" if why == "oversized" else "bad_parent"))
    assert drops == expected
    k.say(channel, msg_type, parent, content)
    assert w.a.recv(channel).content == content
    if channel == "stdin":
        w.a.request("stdin", "input_reply", {"value": "v"})
    w.check()


@pytest.mark.parametrize("channel", ROUTED)
def test_p8_malformed_header_from_a_client(make_world, channel):
    """The same strictness for client headers: nothing malformed reaches the kernel."""
    limits = GateLimits(max_header_bytes=4 << 20)
    w = make_world(limits=limits)
    cases = malformed_objects(limits)
    mark = w.audit.mark()
    for raw, _why in cases:
        w.a.sockets[channel].send_multipart(w.a.frames([utf16(raw), b"{}", b"{}", b"{}"]))
    drops = w.audit.wait_drops(len(cases), mark)
    assert [r for _c, r in drops] == [
        "oversized_header" if why == "oversized" else "bad_header" for _raw, why in cases]
    assert w.kernel.quiet(channel)
    w.check()

# ====================================================================== P9 channel, direction


@pytest.mark.parametrize("channel", CHANNELS)
def test_p9_every_msg_type_on_the_wrong_channel_from_the_kernel(make_world, channel):
    """Every msg_type the gate knows, sent by the kernel on a channel that does not carry
    it (replies on iopub, output on shell, input_request on iopub, requests such as
    shutdown_request from the kernel, comms on shell...), plus unknown types: dropped, each
    bound to an open request so that only the channel is wrong."""
    w = make_world()
    k = w.kernel
    parent = w.open(w.a, *opener(channel))
    wrong = [*sorted(KNOWN_TYPES - KERNEL_TYPES[channel]),
             "bogus_type", "Execute_Reply", "execute_reply ", "stream\x00", CANARY]
    mark = w.audit.mark()
    for msg_type in wrong:
        k.say(channel, msg_type, parent, {"text": CANARY, "status": "ok",
                                          "execution_state": "idle", "restart": False})
    drops = w.audit.wait_drops(len(wrong), mark)
    assert drops == [(channel, "unexpected_msg_type")] * len(wrong)
    assert {"execute_reply", "input_request", "shutdown_request", "execute_request",
            "input_reply", "stream", "status", "comm_open"} & set(wrong)
    msg_type, content = LEGIT[channel]
    k.say(channel, msg_type, parent, content)
    assert w.a.recv(channel).content == content
    if channel == "stdin":
        w.a.request("stdin", "input_reply", {"value": "v"})
    w.check()


def test_p9_replies_bound_to_the_channel_and_type_of_their_request(make_world):
    """A reply type the channel does carry, but for a request on the other channel or of
    another type, is dropped; kernel_info_reply (allowed on both) goes only where asked."""
    w = make_world()
    k = w.kernel
    shell = w.open()
    control = w.open(w.a, "control", "kernel_info_request")
    info = w.open(w.a, "shell", "kernel_info_request")
    mark = w.audit.mark()
    bad = {"status": "ok", "banner": CANARY}
    attacks = [
        ("control", "kernel_info_reply", shell, "wrong_channel"),
        ("control", "kernel_info_reply", info, "wrong_channel"),
        ("shell", "kernel_info_reply", control, "wrong_channel"),
        ("shell", "kernel_info_reply", shell, "reply_mismatch"),
        ("shell", "complete_reply", shell, "reply_mismatch"),
        ("control", "interrupt_reply", control, "reply_mismatch"),
        ("control", "shutdown_reply", control, "reply_mismatch"),
        ("stdin", "input_request", control, "unexpected_input_request"),
        ("stdin", "input_request", info, "unexpected_input_request"),
    ]
    for channel, msg_type, parent, _reason in attacks:
        k.say(channel, msg_type, parent, bad)
    drops = w.audit.wait_drops(len(attacks), mark)
    assert sorted(drops) == sorted((c, r) for c, _t, _p, r in attacks)
    w.finish(control, channel="control")
    w.finish(info)
    w.finish(shell)
    w.check()


def test_p9_p15_client_requests_on_the_wrong_channel_or_outside_the_profile(make_world):
    """Client messages: a type on a channel that does not carry it (kernel-only types
    included) is dropped; one outside the agent profile's allowlist (debug, history, comms,
    usage) never reaches the kernel either, but is answered, as a kernel answers what it
    cannot serve: an error reply naming the profile (never silence: JupyterLab waits for
    the reply of its start-up history_request). An input_reply nobody asked for is dropped."""
    w = make_world(**agent_gate())
    k = w.kernel
    every = sorted(KNOWN_TYPES | {"bogus_request"})
    mark = w.audit.mark()
    dropped, refused = 0, []
    for channel in ROUTED:
        for msg_type in every:
            if msg_type in CLIENT_TYPES[channel] and msg_type in AGENT_REQUESTS:
                continue
            w.a.request(channel, msg_type, {"code": CANARY})
            if msg_type in CLIENT_TYPES[channel] and channel != "stdin":
                refused.append((channel, msg_type))
            else:
                dropped += 1
    drops = w.audit.wait_drops(dropped, mark)
    assert {r for _c, r in drops} == {"msg_type_not_allowed"} and len(drops) == dropped
    assert [(f["channel"], f["msg_type"]) for f in w.audit.of("gate.refuse", mark)] == refused
    for channel, msg_type in refused:
        if msg_type in NO_REPLY:
            continue
        reply = w.a.recv(channel)
        assert reply is not None and reply.msg_type == msg_type.replace("_request", "_reply")
        assert reply.content["status"] == "error"
        assert "is not allowed by this kernel's profile" in reply.content["evalue"]
    assert {"debug_request", "history_request", "comm_open", "comm_msg", "comm_info_request",
            "usage_request", "input_reply"} <= set(every) - AGENT_REQUESTS
    for channel in ROUTED:
        assert k.quiet(channel)
    w.check()

# ====================================================================== P10 buffers, versions


def test_p10_unsigned_buffers_stripped_from_everything_but_comms(make_world):
    """Buffers are not covered by the signature: the gate strips them from every message
    but comm_open/comm_msg, and caps those in total."""
    w = make_world(limits=GateLimits(max_buffer_bytes=1 << 20))
    k = w.kernel
    shell = w.open()
    control = w.open(w.a, "control", "kernel_info_request")
    canary = (CANARY.encode(), b"\x80\x04" + CANARY.encode())  # and a pickle-looking one
    bundle = {"data": {"text/plain": "ok"}, "metadata": {}}
    stripped = [
        ("iopub", "stream", shell, {"name": "stdout", "text": "s"}),
        ("iopub", "display_data", shell, bundle),
        ("iopub", "update_display_data", shell, {**bundle, "transient": {"display_id": "d"}}),
        ("iopub", "execute_result", shell, {**bundle, "execution_count": 1}),
        ("iopub", "error", shell, {"ename": "E", "evalue": "v", "traceback": []}),
        ("iopub", "comm_close", shell, {"comm_id": "c", "data": {}}),
        ("stdin", "input_request", shell, {"prompt": "p", "password": False}),
        ("control", "kernel_info_reply", control, {"status": "ok"}),
        ("shell", "execute_reply", shell, {"status": "ok"}),
    ]
    mark = w.audit.mark()
    for channel, msg_type, parent, content in stripped:
        k.say(channel, msg_type, parent, content, buffers=canary)
        got, markers = past_markers(w.a, channel)
        assert got.msg_type == msg_type and got.buffers == [] and got.content == content
        if channel != "iopub":  # the marker went to the request's output, on iopub
            markers = [w.a.recv("iopub")]
        assert [m.content["text"].split(" bytes ")[1] for m in markers] == [
            f"of binary buffers on a {msg_type} message were removed: only comm messages may "
            "carry them, where the profile allows comms]\n"]  # never silent
    strips = w.audit.of("gate.strip", mark)
    assert [(f["channel"], f["msg_type"]) for f in strips] == [(c, t) for c, t, *_ in stripped]
    assert {f["reason"] for f in strips} == {"unsigned_buffers"}
    # Comm buffers pass (widgets need them), up to the cap in total.
    k.say("iopub", "comm_msg", shell, {"comm_id": "c", "data": {}}, buffers=(b"a" * 1000,))
    assert w.a.recv("iopub").buffers == [b"a" * 1000]
    mark = w.audit.mark()
    k.say("iopub", "comm_msg", shell, {"comm_id": "c", "data": {}},
          buffers=(CANARY.encode() * 40_000, CANARY.encode() * 40_000))
    k.say("iopub", "comm_open", shell, {"comm_id": "c", "target_name": "t", "data": {}},
          buffers=tuple([CANARY.encode() * 2000] * 50))
    assert w.audit.wait_drops(2, mark) == [("iopub", "buffers_too_large")] * 2
    w.check()


def test_p10_unknown_protocol_versions(make_world):
    """Headers claiming another protocol major version, or none, are dropped on every
    channel and from clients."""
    w = make_world()
    k = w.kernel
    shell = w.open()
    versions = ["99.0", "4.1", "5", "5.3.1", "", "5.3 ", "v5.3", "\uff15.\uff13"]
    mark = w.audit.mark()
    for version in versions:
        k.say("iopub", "stream", shell, {"name": "stdout", "text": CANARY}, version=version)
        k.say("shell", "execute_reply", shell, {"status": CANARY}, version=version)
        w.a.request("shell", "execute_request", {"code": CANARY}, version=version)
    drops = w.audit.wait_drops(3 * len(versions), mark)
    assert sorted(drops) == sorted([("iopub", "bad_version"), ("shell", "bad_version"),
                                    ("shell", "bad_version")] * len(versions))
    assert k.quiet("shell")
    w.finish(shell)
    w.check()

# ====================================================================== two clients, stdin (P12)


def test_replies_never_reach_another_client_whatever_the_kernel_names(make_world):
    """Two clients, each with its own session and identity. Whatever idents the kernel puts
    in front of a reply, and whichever session it copies into the parent, a reply or an
    input_request goes only to the client whose request it answers, or nowhere."""
    w = make_world(clients=2)
    k = w.kernel
    a, b = w.a, w.b
    pa = w.open(a)
    pb = w.open(b)
    ca = w.open(a, "control", "kernel_info_request")
    mark = w.audit.mark()
    to_b = (b.identity,)
    forged = [  # the right msg_id, another session: dropped
        ("shell", "execute_reply", {**pa, "session": b.session}),
        ("stdin", "input_request", {**pa, "session": b.session}),
        ("control", "kernel_info_reply", {**ca, "session": b.session}),
        ("iopub", "stream", {**pa, "session": b.session}),
    ]
    for channel, msg_type, parent in forged:
        k.say(channel, msg_type, parent, {"text": CANARY, "prompt": CANARY, "status": CANARY},
              idents=to_b if channel != "iopub" else ())
    assert sorted(w.audit.wait_drops(len(forged), mark)) == sorted(
        (c, "session_mismatch") for c, *_ in forged)
    # The real ones, addressed by the kernel to B's identity: routed to A by the gate's table.
    k.say("stdin", "input_request", pa, {"prompt": "a? ", "password": False}, idents=to_b)
    assert a.recv("stdin").parent["msg_id"] == pa["msg_id"]
    a.request("stdin", "input_reply", {"value": "a"})
    assert k.recv("stdin")[0] == [a.identity]
    k.say("control", "kernel_info_reply", ca, {"status": "ok"}, idents=to_b)
    assert a.recv("control").parent["msg_id"] == ca["msg_id"]
    k.say("shell", "execute_reply", pa, {"status": "ok"}, idents=(*to_b, b"x", b"y"))
    assert a.recv("shell").parent["msg_id"] == pa["msg_id"]
    k.say("shell", "execute_reply", pb, {"status": "ok"}, idents=(a.identity,))
    assert b.recv("shell").parent["msg_id"] == pb["msg_id"]
    for channel in ROUTED:
        assert not b.pending(channel) and not a.pending(channel)
    assert [g.parent["msg_id"] for g in b.got if g.channel != "iopub"] == [pb["msg_id"]]
    w.check()


def test_a_client_naming_another_in_its_idents_or_session_gets_only_its_own(make_world):
    """A client cannot make the gate send it another client's replies: not by putting B's
    identity among its own ident frames, not by writing B's session into its header, not
    by re-using one of B's open msg_ids."""
    w = make_world(clients=2)
    k = w.kernel
    a, b = w.a, w.b
    pb = w.open(b)
    mark = w.audit.mark()
    # A re-uses B's open msg_id: refused while B's request is open.
    a.request("shell", "execute_request", {"code": CANARY}, msg_id=pb["msg_id"])
    assert w.audit.wait_drops(1, mark) == [("shell", "duplicate_msg_id")]
    # A sends with B's identity as an extra ident, and B's session in its header.
    parts = a.parts("execute_request", {"code": "x"}, session=b.session)
    a.sockets["shell"].send_multipart([b.identity, *a.frames(parts)])
    idents, pa = k.recv("shell")
    assert idents == [a.identity] and pa["session"] == b.session
    k.say("shell", "execute_reply", pa, {"status": "ok", "execution_count": 1})
    got = a.recv("shell")  # A gets it, with its extra ident frame in front
    assert got.idents == [b.identity] and got.content == {"status": "ok", "execution_count": 1}
    assert not b.pending("shell")
    k.say("shell", "execute_reply", pb, {"status": "ok", "execution_count": 2})
    assert b.recv("shell").content == {"status": "ok", "execution_count": 2}
    assert not a.pending("shell")
    w.check()


def test_only_the_asked_client_may_answer_an_input_request(make_world):
    """Client B cannot answer A's input_request, A cannot answer twice, and nobody can
    answer when nothing was asked: ipykernel would take any input_reply on its stdin socket
    as the answer, so the gate forwards one reply, from the client that was asked."""
    w = make_world(clients=2)
    k = w.kernel
    a, b = w.a, w.b
    pa = w.open(a)
    mark = w.audit.mark()
    b.request("stdin", "input_reply", {"value": CANARY})  # nothing asked yet
    a.request("stdin", "input_reply", {"value": CANARY})
    assert w.audit.wait_drops(2, mark) == [("stdin", "unexpected_input_reply")] * 2
    k.say("stdin", "input_request", pa, {"prompt": "password: ", "password": True})
    assert a.recv("stdin").content["prompt"] == "password: "
    assert not b.pending("stdin")
    mark = w.audit.mark()
    b.request("stdin", "input_reply", {"value": CANARY})  # B answers A's question
    assert w.audit.wait_drops(1, mark) == [("stdin", "unexpected_input_reply")]
    a.request("stdin", "input_reply", {"value": "hunter2"})
    idents, reply = k.recv("stdin")
    assert idents == [a.identity] and reply["msg_type"] == "input_reply"
    mark = w.audit.mark()
    a.request("stdin", "input_reply", {"value": CANARY})  # a second answer to one question
    assert w.audit.wait_drops(1, mark) == [("stdin", "unexpected_input_reply")]
    # A question asked after the request's reply is not forwarded, nor can it be answered.
    k.say("stdin", "input_request", pa, {"prompt": "again? ", "password": False})
    assert a.recv("stdin").content["prompt"] == "again? "
    w.finish(pa)
    mark = w.audit.mark()
    k.say("stdin", "input_request", pa, {"prompt": CANARY, "password": False})
    a.request("stdin", "input_reply", {"value": CANARY})  # the question before the reply
    assert sorted(w.audit.wait_drops(2, mark)) == [
        ("stdin", "unexpected_input_reply"), ("stdin", "unknown_parent")]
    assert k.quiet("stdin")
    w.check()


def test_p12_no_stdin_profile_neither_asks_nor_answers(make_world):
    """The agent profile has no stdin (no input_reply in its allowlist): a kernel's
    input_request (``input('AWS secret key: ')``) never reaches the client, and an
    input_reply never reaches the kernel."""
    w = make_world(**agent_gate())
    k = w.kernel
    parent = w.open()
    mark = w.audit.mark()
    k.say("stdin", "input_request", parent, {"prompt": CANARY, "password": False})
    w.a.request("stdin", "input_reply", {"value": CANARY})
    assert sorted(w.audit.wait_drops(2, mark)) == [
        ("stdin", "msg_type_not_allowed"), ("stdin", "stdin_not_allowed")]
    assert k.quiet("stdin")
    w.finish(parent)
    w.check()

# ====================================================================== handover


def test_a_client_claiming_another_clients_identity(make_world):
    """Client-facing ROUTERs use ROUTER_HANDOVER, as ipykernel's own shell, stdin and
    control sockets do (ipykernel's kernelapp.py: "to workaround zeromq reconnect
    problems"): a new connection with an identity already in use takes it over, and the
    old connection is left open but dead. So a client holding the client key that connects
    with A's session id as its identity (any client sees it in iopub parent headers) gets
    what is routed to that identity from then on, as it would from a plain ipykernel; A
    must reconnect. What the gate adds: replies go to the identity of the request, never
    to whoever the kernel names; a client with its own identity never gets A's messages."""
    w = make_world(clients=2)
    k = w.kernel
    a, b = w.a, w.b
    pa = w.open(a)
    thief = w.client(identity=a.identity)
    sent = thief.request("shell", "kernel_info_request")
    idents, pt = k.recv("shell")  # it arrives with A's identity: the handover has happened
    assert idents == [a.identity] and pt["msg_id"] == sent["msg_id"]
    k.say("shell", "execute_reply", pa, {"status": "ok", "secret": CANARY}, idents=(b"x",))
    k.say("shell", "kernel_info_reply", pt, {"status": "ok"})
    got = [thief.recv("shell"), thief.recv("shell")]
    assert [g.parent["msg_id"] for g in got] == [pa["msg_id"], pt["msg_id"]]  # as ipykernel
    assert not a.pending("shell") and not b.pending("shell")
    # A reconnects (a new socket, the same identity) and is served again.
    thief.close()
    w._extra.remove(thief)
    a.sockets["shell"].close(linger=0)
    a.sockets["shell"] = a.ctx.socket(zmq.DEALER)
    a.sockets["shell"].setsockopt(zmq.IDENTITY, a.identity)
    a.sockets["shell"].setsockopt(zmq.LINGER, 0)
    a.sockets["shell"].connect(f"tcp://127.0.0.1:{w.conn['shell_port']}")
    assert all(CANARY.encode() not in f for c, fs in a.raw + b.raw for f in fs)
    w.check()
