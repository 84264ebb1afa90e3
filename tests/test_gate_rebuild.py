"""The gate forwards only what it rebuilt (issue 13, DESIGN decision 4): status, headers,
parents and metadata carry nothing the kernel added; every byte forwarded is charged; what
the gate drops is bounded; what it queues for a client is bounded; nothing is dropped
silently. Raw ZMQ on both sides (``gate_harness.py``); every test ends with ``World.check``.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from cellblock.gate import GateLimits
from cellblock.gate.observe import Observed

from gate_harness import CANARY, SECRET, agent_gate, is_marker, wait_until

pytestmark = pytest.mark.nonroot


def no_canary(w: Any) -> None:
    for _channel, frames in w.a.raw:
        for frame in frames:
            assert CANARY.encode() not in frame and SECRET.encode() not in frame


def test_status_carries_execution_state_only(make_world):
    """Finding 1: extra status content and metadata (a secret) never reach the client:
    the client gets ``{"execution_state": ...}`` and an empty metadata frame."""
    w = make_world(**agent_gate())
    k = w.kernel
    parent = w.open()
    parts = k.parts("status", parent, {"execution_state": "busy", "leak": SECRET + CANARY})
    parts[2] = json.dumps({"leak": SECRET + CANARY}).encode()
    k.send("iopub", k.frames(parts, (b"status",)))
    got = w.a.recv("iopub")
    assert got.msg_type == "status"
    assert got.content == {"execution_state": "busy"} and got.parts[2] == b"{}"
    w.finish(parent)
    no_canary(w)
    w.check()


def test_header_and_parent_are_the_gates(make_world):
    """Finding 2: extra keys in the kernel's header and parent (a secret) never reach the
    client: the header is the gate's six keys, the parent the client's own request header
    byte for byte, the metadata frame keeps only the spec's keys, content only the spec's."""
    w = make_world(**agent_gate())
    k = w.kernel
    parent = w.open()
    kernel_parent = {**parent, "leak": CANARY}
    parts = k.parts("stream", kernel_parent, {"name": "stdout", "text": "hi", "leak": CANARY},
                    leak=CANARY, username=CANARY)
    parts[2] = json.dumps({"leak": CANARY}).encode()
    k.send("iopub", k.frames(parts, (b"stream",)))
    got = w.a.recv("iopub")
    assert got.content == {"name": "stdout", "text": "hi"}
    assert list(got.header) == ["msg_id", "msg_type", "username", "session", "date", "version"]
    assert got.parts[1] == w.a.sent[-1][1][2] and got.parts[2] == b"{}"
    meta = {"started": "2026-01-01T00:00:00.000001Z", "dependencies_met": True,
            "engine": "0" * 32, "status": "ok", "leak": CANARY}
    parts = k.parts("execute_reply", kernel_parent, {"status": "ok", "execution_count": 1,
                                                     "user_expressions": {}, "payload": [],
                                                     "leak": CANARY})
    parts[2] = json.dumps(meta).encode()
    k.send("shell", k.frames(parts))
    reply = w.a.recv("shell")
    assert json.loads(reply.parts[2]) == {k: v for k, v in meta.items() if k != "leak"}
    assert reply.content == {"status": "ok", "execution_count": 1, "user_expressions": {},
                             "payload": []}
    k.say("iopub", "status", parent, {"execution_state": "idle"})
    w.a.until("iopub", lambda g: g.msg_type == "status")
    no_canary(w)
    w.check()


def test_one_starting_per_boot_and_nothing_after_idle(make_world):
    """Finding 3 and 5: a ``status: starting`` with an empty parent passes once (the boot);
    one sent from a thread after the cell's idle is dropped, as is any message naming the
    closed request (big ones too), and a second busy or a starting with a parent."""
    w = make_world(**agent_gate(limits=GateLimits(max_frame_bytes=64 << 20)))
    k = w.kernel
    parent = w.open()
    k.say("iopub", "status", {}, {"execution_state": "starting"})
    got = w.a.recv("iopub")
    assert (got.msg_type, got.content, got.parent) == ("status", {"execution_state":
                                                                  "starting"}, {})
    k.say("iopub", "status", parent, {"execution_state": "busy"})
    assert w.a.recv("iopub").content == {"execution_state": "busy"}
    w.finish(parent)
    mark = w.audit.mark()
    k.say("iopub", "status", parent, {"execution_state": "busy"})  # after the idle
    k.say("iopub", "status", {}, {"execution_state": "starting", "x": CANARY})
    big = CANARY * (8_000_000 // len(CANARY))
    k.say("iopub", "stream", parent, {"name": "stdout", "text": big})
    k.say("iopub", "display_data", parent, {"data": {"text/plain": big}, "metadata": {}})
    drops = w.audit.wait_drops(4, mark)
    assert sorted(r for _c, r in drops) == ["no_parent", "unknown_parent", "unknown_parent",
                                            "unknown_parent"]
    second = w.open()
    k.say("iopub", "status", second, {"execution_state": "busy"})
    k.say("iopub", "status", second, {"execution_state": "busy"})
    k.say("iopub", "status", second, {"execution_state": "starting"})
    assert w.a.recv("iopub").content == {"execution_state": "busy"}
    drops = w.audit.wait_drops(6, mark)
    assert [r for _c, r in drops][4:] == ["duplicate_status", "bad_status"]
    w.finish(second)
    no_canary(w)
    w.check()


class Charges:
    """An observer that records what it is asked and allows everything."""

    def __init__(self) -> None:
        self.seen: list[Observed] = []
        self.lock = threading.Lock()

    def __call__(self, observed: Observed) -> None:
        with self.lock:
            self.seen.append(observed)

    def out(self, msg_id: str) -> int:
        with self.lock:
            return sum(o.bytes_out for o in self.seen if o.kind == "output"
                       and o.msg_id == msg_id)


def test_every_byte_forwarded_is_charged(make_world):
    """Finding 4: status, execute_input, metadata, comm buffers and the reply all count
    toward ``output_bytes``: the observer's ``bytes_out`` for a request is every byte of
    every frame its client was sent (but the gate's own markers and welcomes)."""
    charges = Charges()
    w = make_world(observer=charges)
    k = w.kernel
    parent = w.open()
    k.say("iopub", "status", parent, {"execution_state": "busy"})
    k.say("iopub", "execute_input", parent, {"code": "x", "execution_count": 1})
    k.say("iopub", "comm_msg", parent, {"comm_id": "c", "data": {}},
          buffers=(b"\x00" * 100_000,))
    parts = k.parts("execute_reply", parent, {"status": "ok", "execution_count": 1})
    parts[2] = json.dumps({"started": "2026-01-01T00:00:00Z", "status": "ok"}).encode()
    k.send("shell", k.frames(parts))
    w.a.recv("shell")
    k.say("iopub", "status", parent, {"execution_state": "idle"})
    w.a.until("iopub", lambda g: g.msg_type == "status" and g.content["execution_state"]
              == "idle")
    sent = 0
    for channel, frames in w.a.raw:
        i = frames.index(b"<IDS|MSG>") if b"<IDS|MSG>" in frames else -1
        if i < 0 or json.loads(frames[i + 3]).get("msg_id") != parent["msg_id"]:
            continue
        if channel == "iopub" and json.loads(frames[i + 2])["msg_type"] == "stream":
            continue  # the harness's sync marker
        sent += sum(map(len, frames)) - (len(frames[0]) if channel == "shell" and i else 0)
    wait_until(lambda: charges.out(parent["msg_id"]) > 100_000, "charged")
    assert charges.out(parent["msg_id"]) >= sent - 200  # (the client's ROUTER identity)
    w.check()


def test_a_kernel_flooding_the_gate_with_drops_is_stopped(make_world):
    """Finding 4: what the kernel sends and the gate drops fills a bounded bucket; past it
    ``on_fault`` asks the warden to stop the kernel, once."""
    faults: list[str] = []
    limits = GateLimits(max_dropped_bytes=1 << 20, dropped_bytes_per_second=1)
    w = make_world(limits=limits, on_fault=faults.append)
    k = w.kernel
    parent = w.open()
    w.finish(parent)
    for _ in range(6):  # 6 x 256 KiB bound to a closed request: all dropped
        k.say("iopub", "stream", parent, {"name": "stdout", "text": "x" * (256 << 10)})
    wait_until(lambda: faults, "on_fault")
    assert len(faults) == 1 and "MiB the gate had to drop" in faults[0]
    assert [f["reason"] for f in w.audit.of("gate.fault")] == ["dropped_bytes"]


def test_what_the_gate_queues_for_a_client_is_bounded(make_world):
    """Finding 5 and 8: a client that does not read gets at most ``client_iopub_hwm``
    messages queued; the rest is dropped and a marker says how much, before the idle."""
    w = make_world(limits=GateLimits(client_iopub_hwm=4, max_frame_bytes=64 << 20),
                   iopub_rcvhwm=2)
    k = w.kernel
    parent = w.open()
    text = "y" * (4 << 20)
    for _ in range(40):  # 160 MB: more than the kernel's and the client's socket buffers
        k.say("iopub", "stream", parent, {"name": "stdout", "text": text})
    wait_until(lambda: w.audit.drops(), "a drop")
    k.say("shell", "execute_reply", parent, {"status": "ok"})
    assert w.a.recv("shell") is not None
    k.say("iopub", "status", parent, {"execution_state": "idle"})
    seen = w.a.until("iopub", lambda g: g.msg_type == "status")
    streams = [g for g in seen if g.msg_type == "stream" and not is_marker(g)]
    markers = [g.content["text"] for g in seen if is_marker(g)]
    assert 0 < len(streams) < 40
    assert len(markers) == 1 and f"{40 - len(streams)} message(s) of this cell's output" \
        in markers[0] and "dropped" in markers[0]
    assert {r for _c, r in w.audit.drops()} == {"client_queue_full"}
    w.check()


def test_comm_messages_after_idle_only_for_comms_opened_in_a_request(make_world):
    """Finding 5, the exception: on a profile with comms, a message of a comm opened in a
    request (a widget a thread updates after the cell) still reaches the client after the
    idle, with that request as parent, and is charged; an unknown or closed comm's is not."""
    charges = Charges()
    w = make_world(observer=charges)
    k = w.kernel
    parent = w.open()
    k.say("iopub", "comm_open", parent, {"comm_id": "c1", "target_name": "jupyter.widget",
                                         "data": {}})
    assert w.a.recv("iopub").msg_type == "comm_open"
    w.finish(parent)
    before = charges.out(parent["msg_id"])
    mark = w.audit.mark()
    k.say("iopub", "comm_msg", {}, {"comm_id": "c1", "data": {"value": 1}})
    k.say("iopub", "comm_msg", parent, {"comm_id": "c1", "data": {"value": 2}})
    k.say("iopub", "comm_msg", parent, {"comm_id": CANARY, "data": {}})
    k.say("iopub", "comm_close", {}, {"comm_id": "c1", "data": {}})
    k.say("iopub", "comm_msg", {}, {"comm_id": "c1", "data": {"value": CANARY}})
    got = [w.a.recv("iopub") for _ in range(3)]
    assert [(g.msg_type, g.content.get("data")) for g in got] == [
        ("comm_msg", {"value": 1}), ("comm_msg", {"value": 2}), ("comm_close", {})]
    assert all(g.parts[1] == w.a.sent[0][1][2] for g in got)  # the cell's own request
    assert sorted(r for _c, r in w.audit.wait_drops(2, mark)) == ["no_parent",
                                                                  "unknown_parent"]
    assert charges.out(parent["msg_id"]) > before
    w.check()


def test_comm_buffers_that_are_text_are_scanned(make_world):
    """Finding 2 and 4: a comm buffer holding a secret arrives redacted; a binary buffer
    arrives as it was; buffers on a profile without comms never arrive (test_gate_content)."""
    from cellblock.output import build_output_rules
    from cellblock.policy import OutputPolicy

    w = make_world(rules=build_output_rules(OutputPolicy(allow_comms=True), env={}))
    k = w.kernel
    parent = w.open()
    binary = bytes(range(256))
    k.say("iopub", "comm_open", parent, {"comm_id": "c", "target_name": "t", "data": {}},
          buffers=(f"key {SECRET} end".encode(), binary))
    got = w.a.recv("iopub")
    assert got.msg_type == "comm_open" and got.buffers[1] == binary
    assert SECRET.encode() not in got.buffers[0] and b"[REDACTED" in got.buffers[0]
    w.finish(parent)
    w.check()


def test_a_request_answered_but_never_idle_gets_its_idle_when_the_kernel_stops(make_world):
    """The kernel answered (its reply may be the message that crossed the output budget)
    and died before its idle: the client, which waits for that idle, gets it from the
    gate's announcement. Before, only unanswered requests were closed, and a client
    waited for ever (test_budgets.py::test_output_budget_stops_the_kernel, half the runs)."""
    w = make_world()
    k = w.kernel
    parent = w.open()
    k.say("shell", "execute_reply", parent, {"status": "ok", "execution_count": 1,
                                              "user_expressions": {}, "payload": []})
    assert w.a.recv("shell").parent["msg_id"] == parent["msg_id"]
    w.gate.announce("CellblockKernelStopped", "cellblock: kernel stopped", replies=True)
    got = w.a.until("iopub", lambda g: g.msg_type == "status"
                    and g.content == {"execution_state": "idle"})
    assert got[-1].parent["msg_id"] == parent["msg_id"]
