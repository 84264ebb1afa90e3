"""Pressure on the gate from a hostile kernel (THREATS P6, P13, R8-R10): frames over
MAXMSGSIZE on every channel, 10**5 frames, iopub floods of small and big messages from a
process of its own (memory, the client's output, control during the flood), a kernel that
never answers, heartbeat spoofs. See ``gate_harness.py`` for what every test asserts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
import zmq

from cellblock.gate import GateLimits

from gate_harness import (
    AGENT_OUTPUT,
    CANARY,
    CHANNELS,
    LEGIT,
    WAIT,
    Kernel,
    agent_gate,
    opener,
    rss_kib,
    wait_until,
)

pytestmark = pytest.mark.nonroot


# ====================================================================== P6, R10 sizes


def test_p6_r10_oversized_frames_on_every_kernel_channel(make_world):
    """A frame over MAXMSGSIZE makes libzmq drop that connection; the gate connects again,
    every channel carries legit messages afterwards, and nothing of the big one got out."""
    w = make_world(limits=GateLimits(max_frame_bytes=1 << 20))
    k = w.kernel
    shell = w.open()
    control = w.open(w.a, "control", "kernel_info_request")
    mark = w.audit.mark()
    big = CANARY * ((2 << 20) // len(CANARY))
    k.say("iopub", "stream", shell, {"name": "stdout", "text": big})
    k.say("shell", "execute_reply", shell, {"status": "ok", "pad": big})
    k.say("control", "kernel_info_reply", control, {"status": "ok", "banner": big})
    k.say("stdin", "input_request", shell, {"prompt": big, "password": False})
    w.a.sockets["hb"].send_multipart([b"", b"ping"])  # the kernel echoes 8 KiB instead
    hb = k.sockets["hb"]
    assert hb.poll(WAIT * 1000)
    gate_id, *ping = hb.recv_multipart()
    hb.send_multipart([gate_id, *ping[:-1], CANARY.encode() * 1024])
    for channel in (*CHANNELS, "hb"):
        w.audit.wait(lambda e, f, ch=channel: e == "gate.reconnect" and f["channel"] == ch, mark)
    # Each channel works again (the kernel's ROUTERs see the gate reconnect).
    # The SUB subscribes again after its reconnect: publish until something gets through.
    wait_until(lambda: k.say("iopub", "stream", shell, {"name": "stdout", "text": "again"})
               and w.a.recv("iopub", 0.05), "iopub to work again")
    # The kernel's ROUTER may still hold the dropped connection's pipe under the gate's
    # identity for a moment (a send into it is lost, not refused): send until one arrives.
    got = wait_until(
        lambda: k.say("stdin", "input_request", shell, {"prompt": "again? ", "password": False})
        and w.a.recv("stdin", 0.5), "stdin to work again")
    assert got.content["prompt"] == "again? "
    got = wait_until(lambda: k.say("control", "kernel_info_reply", control, {"status": "ok"})
                     and w.a.recv("control", 0.5), "control to work again")
    assert got.content == {"status": "ok"}
    w.a.sockets["hb"].send_multipart([b"", b"ping-2"])
    assert hb.poll(WAIT * 1000)
    hb.send_multipart(hb.recv_multipart())
    assert w.a.recv("hb").parts == [b"", b"ping-2"]
    w.finish(shell)
    w.check()


def test_p6_oversized_client_frame_costs_only_that_connection(make_world):
    """A client frame over MAXMSGSIZE: libzmq drops that client's connection, the kernel
    never sees the message, other clients are served, and the client's DEALER connects
    again by itself (the gate's ROUTER hands its identity over to the new connection)."""
    w = make_world(clients=2, limits=GateLimits(max_frame_bytes=1 << 20))
    k = w.kernel
    w.open(w.b)  # B is synced and has a request open
    w.a.request("shell", "execute_request", {"code": CANARY * ((2 << 20) // len(CANARY))})
    w.relays(w.b)
    # A's next request arrives once its DEALER has reconnected; nothing before it.
    sent = w.a.request("shell", "execute_request", {"code": "after"})
    idents, header = k.recv("shell")
    assert header["msg_id"] == sent["msg_id"] and idents == [w.a.identity]
    w.finish(header)
    w.check()


@pytest.mark.parametrize("channel", CHANNELS)
def test_p6_too_many_frames(make_world, channel):
    """10**5 frames in one multipart (a legit message with 99,994 buffers, or with as many
    idents), from the kernel and from a client: dropped by the frame-count cap."""
    w = make_world()
    k = w.kernel
    parent = w.open(w.a, *opener(channel))
    msg_type, content = LEGIT[channel]
    mark = w.audit.mark()
    parts = k.parts(msg_type, parent, {**content, "text": CANARY, "prompt": CANARY})
    many = [CANARY.encode()] * 100_000
    k.send(channel, k.frames(parts, buffers=tuple(many)))
    k.send(channel, k.frames(k.parts(msg_type, parent, content), idents=tuple(many)))
    assert w.audit.wait_drops(2, mark) == [(channel, "too_many_frames")] * 2
    if channel != "iopub":
        mark = w.audit.mark()
        w.a.sockets[channel].send_multipart([*many, *w.a.frames(w.a.parts("x_request"))])
        assert w.audit.wait_drops(1, mark) == [(channel, "too_many_frames")]
    k.say(channel, msg_type, parent, content)
    assert w.a.recv(channel).content == content
    if channel == "stdin":
        w.a.request("stdin", "input_reply", {"value": "v"})
    w.check()

# ====================================================================== P13 heartbeat, silence


def echo_once(kernel: Kernel) -> list[bytes]:
    """The kernel's heartbeat receives one ping (through the gate) and echoes it."""
    hb = kernel.sockets["hb"]
    assert hb.poll(WAIT * 1000), "no ping reached the kernel"
    frames = hb.recv_multipart()
    hb.send_multipart(frames)
    return frames[1:]


def test_p13_heartbeat_echoes_only_what_was_pinged(make_world):
    """The gate never answers a ping itself and never passes unsolicited bytes: an echo
    reaches a client only for a ping it forwarded, once; the kernel's own heartbeat
    messages, altered echoes and repeated echoes are dropped."""
    w = make_world()
    k = w.kernel
    hb = k.sockets["hb"]
    mark = w.audit.mark()
    for i in range(300):  # unsolicited: the kernel pings the client
        k.send("hb", [b"", f"{CANARY}-{i}".encode()])
    assert w.audit.wait_drops(300, mark) == [("hb", "unsolicited_heartbeat")] * 300
    w.a.sockets["hb"].send_multipart([b"", b"ping-1"])
    assert hb.poll(WAIT * 1000)
    gate_id, *ping = hb.recv_multipart()
    mark = w.audit.mark()
    hb.send_multipart([gate_id, *ping[:-1], CANARY.encode()])  # altered
    hb.send_multipart([gate_id, *ping])
    hb.send_multipart([gate_id, *ping])  # the same echo again
    hb.send_multipart([gate_id, *ping[1:]])  # without the client's identity
    assert w.a.recv("hb").parts == [b"", b"ping-1"]
    assert w.audit.wait_drops(3, mark) == [("hb", "unsolicited_heartbeat")] * 3
    assert not w.a.pending("hb")
    w.check()


def test_p13_a_kernel_that_never_answers(make_world):
    """A kernel that answers its heartbeat but never its shell (or nothing at all): the
    request stays pending; the gate stays responsive on every other channel, forges no
    echo and no reply, and a shutdown_request still goes through. Liveness is judged by
    the warden's cell clock, not the heartbeat (test_budgets.py)."""
    w = make_world()
    k = w.kernel
    hung = w.open()
    # The heartbeat thread is alive (a spoof, or a real hung shell): echoes are relayed.
    w.a.sockets["hb"].send_multipart([b"", b"alive?"])
    assert echo_once(k)[-2:] == [b"", b"alive?"]
    assert w.a.recv("hb").parts == [b"", b"alive?"]
    # Now the kernel says nothing at all: no echo comes from the gate.
    w.a.sockets["hb"].send_multipart([b"", b"anyone?"])
    assert k.sockets["hb"].poll(WAIT * 1000)  # the gate forwarded the ping...
    k.sockets["hb"].recv_multipart()  # ...and the kernel swallows it
    info = w.open(w.a, "control", "kernel_info_request")  # control still relayed both ways
    w.finish(info, channel="control")
    assert not w.a.pending("hb") and not w.a.pending("shell")
    assert all(g.parent.get("msg_id") != hung["msg_id"] for g in w.a.got if g.channel == "shell")
    w.check()
    down = w.a.request("control", "shutdown_request", {"restart": False})
    assert k.recv("control")[1]["msg_id"] == down["msg_id"]
    wait_until(lambda: w.gate.shutdown_requested, "the gate to record the shutdown_request")
    closed = threading.Event()
    threading.Thread(target=lambda: (w.gate.close(), closed.set()), daemon=True).start()
    assert closed.wait(WAIT), "close() hung on a silent kernel"


# ====================================================================== R8, R9 floods

FLOODER = r"""
import hashlib, hmac, json, select, sys, zmq
endpoint, key, parent = sys.argv[1], sys.argv[2].encode(), sys.argv[3]
size, minimum, end = int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
ctx = zmq.Context()
pub = ctx.socket(zmq.PUB)
pub.connect(endpoint)  # the gate binds, the kernel connects
proto = hmac.new(key, digestmod=hashlib.sha256)
head = b'{"msg_id": "flood-%d", "msg_type": "%s", "session": "k", "version": "5.3"}'
content = json.dumps({"name": "stdout", "text": "x" * (size - len(end)) + end}).encode()
idle = b'{"execution_state": "idle"}'
def send(i, msg_type, body):
    parts = [head % (i, msg_type), parent.encode(), b"{}", body]
    h = proto.copy()
    for p in parts:
        h.update(p)
    pub.send_multipart([msg_type, b"<IDS|MSG>", h.hexdigest().encode(), *parts])
i = 0
while i < minimum or not select.select([sys.stdin], [], [], 0)[0]:  # until "stop"
    for _ in range(500):
        send(i, b"stream", content)
        i += 1
sys.stdin.readline()
print(i, flush=True)
while not select.select([sys.stdin], [], [], 0.01)[0]:  # then idles until stdin closes
    send(i, b"status", idle)
    i += 1
"""

@pytest.mark.parametrize(("size", "minimum", "end"), [
    (64, 200_000, "\n"), (1024, 100_000, ""), (1 << 20, 300, "\n")])
def test_r8_r9_iopub_flood_memory_bounded_control_still_answered(make_world, size, minimum,
                                                                 end):
    """A kernel floods iopub (hundreds of thousands of small messages, 1 KiB pieces of one
    line that never ends (R19: the carry-over stays bounded), or hundreds of 1 MiB
    messages) in a process of its own. While it runs, a control request still goes through
    both ways; the gate's memory stays bounded (ZMQ high-water marks, a fixed replay
    window, the stream budget), and the client receives the profile's stream budget, not
    the flood."""
    w = make_world(kernel_iopub=False, **agent_gate())
    k = w.kernel
    w.synced.add(id(w.a))  # the flooder owns iopub: nothing to sync with yet
    # ...but the client's own subscription must be live before the head of the flood goes
    # by (an XPUB drops what no subscriber is there for): the gate welcomes it (JEP 65)
    assert w.a.sockets["iopub"].poll(int(WAIT * 1000)), "the gate never welcomed the client"
    parent = w.open()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = rss_kib("VmRSS")
    with subprocess.Popen(
        [sys.executable, "-c", FLOODER, k.endpoint("iopub"), k.key.decode(),
         json.dumps(parent), str(size), str(minimum), end],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    ) as flood:
        assert flood.stdin is not None and flood.stdout is not None
        first = w.a.until("iopub", lambda g: g.msg_type == "stream")[-1]
        assert first.parent["msg_id"] == parent["msg_id"]
        for _ in range(3):  # while the flood runs (it runs until told to stop)
            t = time.monotonic()
            info = w.open(w.a, "control", "kernel_info_request")
            w.kernel.say("control", "kernel_info_reply", info, {"status": "ok"})
            assert w.a.recv("control").parent["msg_id"] == info["msg_id"]
            stop = w.a.request("control", "interrupt_request")
            assert k.recv("control")[1]["msg_id"] == stop["msg_id"]
            print(f"control round trips during the flood: {time.monotonic() - t:.3f} s")
        assert flood.poll() is None  # all of the above happened during the flood
        flood.stdin.write("stop\n")
        flood.stdin.flush()
        sent = int(flood.stdout.readline())
        k.say("shell", "execute_reply", parent, {"status": "ok"})
        assert w.a.recv("shell").parent["msg_id"] == parent["msg_id"]
        w.a.until("iopub", lambda g: g.msg_type == "status" and g.parent == parent)
        flood.stdin.close()
    peak = rss_kib("VmHWM")
    text = sum(len(g.content.get("text", "")) for g in w.a.got
               if g.msg_type == "stream" and g.parent == parent)
    print(f"flood of {sent} x {size} B: client got {text} B of text, "
          f"RSS {before} KiB -> peak {peak} KiB")
    assert sent >= minimum
    budget = AGENT_OUTPUT.stream_head + AGENT_OUTPUT.stream_tail
    assert 0 < text <= budget + 1024  # head + tail, and the truncation marker
    assert len(w.gate._replay) <= GateLimits().replay_window
    assert len(w.gate._table) <= 6  # 3 interrupts and 3 kernel_infos never got their idle
    assert peak - before < 256 * 1024, "the gate's memory grew with the flood"
    k.sockets["iopub"] = k.ctx.socket(zmq.PUB)  # the kernel takes iopub back
    k.sockets["iopub"].connect(k.endpoint("iopub"))
    w.synced.clear()
    w.check()


def test_r10_one_multipart_of_many_big_frames(make_world):
    """40 frames of 4 MiB that all reference one 4 MiB buffer in the kernel: the gate drops
    the message (too many frames) and relays on. Known gap, pinned as an xfail: libzmq
    assembles a whole multipart before the gate sees any of it, and MAXMSGSIZE caps each
    frame, not the message, so the gate has buffered all 160 MiB by then. That bound must
    come from the OS (a memory cgroup or RLIMIT_AS on the warden)."""
    w = make_world(limits=GateLimits(max_frame_bytes=4 << 20, max_frames=16))
    k = w.kernel
    parent = w.open()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before = rss_kib("VmRSS")
    big = bytearray(CANARY.encode() * ((4 << 20) // len(CANARY)))
    mark = w.audit.mark()
    frames = k.frames(k.parts("stream", parent, {"name": "stdout", "text": "x"}), (b"t",))
    k.sockets["iopub"].send_multipart([*frames, *([big] * 40)], copy=False)
    assert w.audit.wait_drops(1, mark) == [("iopub", "too_many_frames")]
    peak = rss_kib("VmHWM")
    del big
    w.finish(parent)
    w.check()
    if peak - before > 64 * 1024:
        pytest.xfail(f"known gap: one multipart made the gate buffer {(peak - before) >> 10} "
                     "MiB (libzmq has no per-message limit; needs an OS bound on the warden)")
