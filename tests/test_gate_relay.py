"""Component tests of the gate: real ZMQ sockets on both sides, no mocks.

Two kinds of kernel side:

- a real, plain ipykernel started by jupyter_client's KernelManager on ipc (outside any
  jail), with jupyter_client's BlockingKernelClient as the client: the protocol works;
- a hostile kernel made of raw ZMQ sockets in the test, holding the kernel key, with a raw
  client that verifies every message with the client key: the gate forwards exactly what it
  should and nothing else, and keeps relaying after each attack.

No fixed sleeps: every wait polls a socket, or the audit log's condition, with a deadline.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jupyter_client import BlockingKernelClient
from jupyter_client.session import Session

from cellblock.gate import Gate, GateLimits
from cellblock.gate.wire import DELIM

from gate_harness import Kernel, sign

WAIT = 15.0  # seconds: the deadline of any single wait


class AuditLog:
    """The gate's audit callback, with a condition to wait on."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._cond = threading.Condition()

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        with self._cond:
            self.events.append((event, dict(fields)))
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[str, dict[str, Any]], bool], start: int = 0) -> None:
        """Wait until an event at index >= start matches pred."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: any(pred(e, f) for e, f in self.events[start:]), timeout=WAIT
            )
            assert ok, f"no matching audit event; got {self.events[start:]}"

    def wait_drops(self, count: int, start: int = 0) -> list[tuple[str, str]]:
        """Wait until ``count`` drops were audited since ``start``; return them."""
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.drops(start)) >= count, timeout=WAIT)
            assert ok, f"expected {count} drops; got {self.drops(start)}"
            return self.drops(start)

    def drops(self, start: int = 0) -> list[tuple[str, str]]:
        with self._cond:
            return [
                (f["channel"], f["reason"])
                for e, f in self.events[start:]
                if e == "gate.drop" and f.get("msg_type") != "iopub_welcome"
            ]


def client_conn() -> dict[str, Any]:
    conn: dict[str, Any] = {f"{c}_port": 0 for c in ("shell", "iopub", "stdin", "control", "hb")}
    conn.update(transport="tcp", ip="127.0.0.1", key=uuid.uuid4().hex)
    conn["signature_scheme"] = "hmac-sha256"
    return conn


@pytest.fixture
def rundir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="cbg-", dir="/tmp")  # short: unix socket paths < 107 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def audit() -> AuditLog:
    return AuditLog()


@pytest.fixture
def make_gate(audit: AuditLog) -> Iterator[Callable[..., Gate]]:
    gates: list[Gate] = []

    def make(kernel: dict[str, Any], **kwargs: Any) -> Gate:
        gate = Gate(client=client_conn(), kernel=kernel, audit=audit, **kwargs)
        gates.append(gate)
        gate.start()
        assert gate.wait_kernel_connected(WAIT), "the kernel never connected"
        return gate

    yield make
    for gate in gates:
        gate.close()


# ====================================================================== interface


@pytest.mark.parametrize(
    ("client_changes", "match"),
    [
        ({"signature_scheme": "hmac-md5"}, "signature_scheme"),
        ({"key": ""}, "empty HMAC key"),
        ({"transport": "udp", "shell_port": 5}, "transport"),
    ],
)
def test_gate_refuses_bad_config(client_changes, match, rundir):
    kernel = {**client_conn(), "transport": "ipc", "ip": os.path.join(rundir, "k")}
    with pytest.raises(ValueError, match=match):
        # the scheme and key are checked by the constructor, the transport when binding
        gate = Gate(client={**client_conn(), **client_changes}, kernel=kernel)
        try:
            gate.start()
        finally:
            gate.close()


def test_lifecycle_without_start_and_failed_start(rundir):
    kernel = {**client_conn(), "transport": "ipc", "ip": os.path.join(rundir, "k")}
    gate = Gate(client=client_conn(), kernel=kernel)
    gate.announce("cellblock", "nothing to say")  # before start: a no-op
    gate.close()
    gate.close()
    with pytest.raises(RuntimeError, match="once"):
        gate.start()

    ctx = zmq.Context()
    taken = ctx.socket(zmq.ROUTER)
    try:
        port = taken.bind_to_random_port("tcp://127.0.0.1")
        threads = threading.active_count()
        gate = Gate(client={**client_conn(), "iopub_port": port}, kernel=kernel)
        with pytest.raises(zmq.ZMQError):
            gate.start()
        assert threading.active_count() == threads  # no loop thread was left behind
        gate.close()
    finally:
        taken.close(linger=0)
        ctx.term()


# ====================================================================== real ipykernel


class RealKernel:
    """A real ipykernel (unjailed), started as cellblock starts it in the jail: ``python -m
    cellblock_kernel -f FILE``, which connects to the gate's bound sockets (libzmq retries
    until the gate has bound them)."""

    def __init__(self, rundir: str) -> None:
        self.conn: dict[str, Any] = {
            "transport": "ipc", "ip": os.path.join(rundir, "k"), "key": uuid.uuid4().hex,
            "signature_scheme": "hmac-sha256", "kernel_name": "", "shell_port": 1,
            "iopub_port": 2, "stdin_port": 3, "control_port": 4, "hb_port": 5,
        }
        path = os.path.join(rundir, "kernel.json")
        with open(path, "w") as f:
            json.dump(self.conn, f)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cellblock_kernel", "-f", path],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def get_connection_info(self) -> dict[str, Any]:
        return dict(self.conn)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@pytest.fixture
def real_kernel(rundir: str) -> Iterator[RealKernel]:
    kernel = RealKernel(rundir)
    yield kernel
    kernel.close()


@pytest.fixture
def make_client() -> Iterator[Callable[[Gate], BlockingKernelClient]]:
    clients: list[BlockingKernelClient] = []

    def make(gate: Gate) -> BlockingKernelClient:
        # as the warden does before it reports ready: a standalone client judges liveness
        # by its heartbeat, whose first ping is lost if the kernel's hb has not connected
        assert gate.wait_kernel_ready(60)
        kc = BlockingKernelClient()
        kc.load_connection_info(gate.client_connection_info)
        clients.append(kc)
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        return kc

    yield make
    for kc in clients:
        kc.stop_channels()


def iopub_until(kc: BlockingKernelClient, pred: Callable[[dict], bool]) -> list[dict]:
    """Read kc's iopub until a message matches pred; return all read, the match last."""
    seen = []
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        msg = kc.get_iopub_msg(timeout=WAIT)
        seen.append(msg)
        if pred(msg):
            return seen
    raise AssertionError(f"no matching iopub message in {[m['msg_type'] for m in seen]}")


def reply_to(get: Callable[..., dict], msg_id: str) -> dict:
    """The first message from get() whose parent is msg_id (others are skipped)."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        msg = get(timeout=WAIT)
        if msg["parent_header"].get("msg_id") == msg_id:
            return msg
    raise AssertionError(f"no reply to {msg_id}")


def test_kernel_info_execute_and_heartbeat(real_kernel, make_gate, make_client, audit):
    gate = make_gate(real_kernel.get_connection_info())
    kc = make_client(gate)
    assert gate.client_connection_info["key"] != real_kernel.conn["key"]
    # At boot, ipykernel may print debugpy's "frozen modules" warning to stderr with an
    # empty parent: the gate drops that (no request to bind it to). After that, nothing.
    mark = len(audit.events)

    info = kc.kernel_info(reply=True, timeout=WAIT)
    assert info["msg_type"] == "kernel_info_reply"
    assert info["content"]["status"] == "ok"
    assert info["content"]["implementation"] == "ipython"

    outputs: list[dict] = []
    reply = kc.execute_interactive("print('hi'); 1+1", output_hook=outputs.append, timeout=WAIT)
    assert reply["content"]["status"] == "ok"
    assert [m["msg_type"] for m in outputs] == [
        "status",
        "execute_input",
        "stream",
        "execute_result",
        "status",
    ]
    assert outputs[2]["content"] == {"name": "stdout", "text": "hi\n"}
    assert outputs[3]["content"]["data"] == {"text/plain": "2"}
    assert outputs[-1]["content"]["execution_state"] == "idle"

    # The heartbeat goes through to the kernel and comes back.
    req = kc.context.socket(zmq.REQ)
    try:
        req.connect(f"tcp://127.0.0.1:{gate.client_connection_info['hb_port']}")
        req.send(b"ping-1")
        assert req.poll(WAIT * 1000)
        assert req.recv() == b"ping-1"
    finally:
        req.close(linger=0)
    assert audit.drops(mark) == []  # a real kernel says nothing the gate refuses


def test_input_over_stdin(real_kernel, make_gate, make_client):
    kc = make_client(make_gate(real_kernel.get_connection_info()))
    msg_id = kc.execute("name = input('who? ')", allow_stdin=True)
    request = kc.get_stdin_msg(timeout=WAIT)
    assert request["msg_type"] == "input_request"
    assert request["content"]["prompt"] == "who? "
    assert request["parent_header"]["msg_id"] == msg_id
    kc.input("bob")
    assert reply_to(kc.get_shell_msg, msg_id)["content"]["status"] == "ok"
    msg_id = kc.execute("", user_expressions={"n": "name"})
    reply = reply_to(kc.get_shell_msg, msg_id)
    assert reply["content"]["user_expressions"]["n"]["data"] == {"text/plain": "'bob'"}


def test_interrupt_via_control(real_kernel, make_gate, make_client):
    kc = make_client(make_gate(real_kernel.get_connection_info()))
    msg_id = kc.execute("while True: pass")
    iopub_until(
        kc,
        lambda m: m["msg_type"] == "execute_input" and m["parent_header"]["msg_id"] == msg_id,
    )
    interrupt = kc.session.msg("interrupt_request", {})
    kc.control_channel.send(interrupt)
    control_reply = reply_to(kc.get_control_msg, interrupt["header"]["msg_id"])
    assert control_reply["msg_type"] == "interrupt_reply"
    reply = reply_to(kc.get_shell_msg, msg_id)
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"


def test_two_clients_share_iopub_and_get_their_own_replies(real_kernel, make_gate, make_client):
    gate = make_gate(real_kernel.get_connection_info())
    a, b = make_client(gate), make_client(gate)
    msg_id = a.execute("print('from A')")
    for kc in (a, b):
        iopub_until(
            kc,
            lambda m: (
                m["msg_type"] == "stream"
                and m["parent_header"]["msg_id"] == msg_id
                and m["content"]["text"] == "from A\n"
            ),
        )
    assert a.get_shell_msg(timeout=WAIT)["parent_header"]["msg_id"] == msg_id
    b_id = b.execute("1+1")
    assert b.get_shell_msg(timeout=WAIT)["parent_header"]["msg_id"] == b_id
    a_id = a.execute("2+2")  # A's next shell message is its own reply, never B's
    assert a.get_shell_msg(timeout=WAIT)["parent_header"]["msg_id"] == a_id


def test_shutdown_request_is_recorded(real_kernel, make_gate, make_client):
    gate = make_gate(real_kernel.get_connection_info())
    kc = make_client(gate)
    assert gate.shutdown_requested is False
    msg_id = kc.shutdown()
    reply = reply_to(kc.get_control_msg, msg_id)
    assert reply["msg_type"] == "shutdown_reply"
    assert gate.shutdown_requested is True
    assert real_kernel.process.wait(timeout=WAIT) == 0


def test_announce_names_the_running_request(real_kernel, make_gate, make_client):
    gate = make_gate(real_kernel.get_connection_info())
    kc = make_client(gate)
    msg_id = kc.execute("import time; time.sleep(120)")
    iopub_until(
        kc,
        lambda m: m["msg_type"] == "execute_input" and m["parent_header"]["msg_id"] == msg_id,
    )
    text = "cellblock: kernel stopped, memory limit 1 GiB exceeded"
    gate.announce("cellblock", text)
    error, idle = kc.get_iopub_msg(timeout=WAIT), kc.get_iopub_msg(timeout=WAIT)
    assert error["msg_type"] == "error"
    assert error["parent_header"]["msg_id"] == msg_id
    assert error["content"] == {"ename": "cellblock", "evalue": text, "traceback": [text]}
    assert idle["msg_type"] == "status"
    assert idle["content"] == {"execution_state": "idle"}
    assert idle["parent_header"]["msg_id"] == msg_id

    # Nothing running now: one error with an empty parent, flushed before close() returns.
    gate.announce("cellblock", "kernel stopped")
    gate.close()
    error = kc.get_iopub_msg(timeout=WAIT)
    assert error["msg_type"] == "error"
    assert error["parent_header"] == {}
    assert error["content"]["evalue"] == "kernel stopped"
    gate.close()  # idempotent


# ====================================================================== hostile kernel


class HostileKernel(Kernel):
    """gate_harness's raw kernel (it holds the kernel key and lies); ``recv_raw`` gives the
    frames the gate sent as they came, after its routing id."""

    def recv_raw(self, channel: str) -> list[bytes]:
        sock = self.sockets[channel]
        assert sock.poll(WAIT * 1000), f"the kernel got nothing on {channel}"
        frames = sock.recv_multipart()
        self.gate_id = frames[0]
        return frames[1:]


class RawClient:
    """A client on raw sockets; Session.recv verifies every message with the client key."""

    def __init__(self, conn: dict[str, Any]) -> None:
        self.session = Session(key=conn["key"].encode())
        self.ctx = zmq.Context()
        self.sockets: dict[str, zmq.Socket] = {}
        for name in ("shell", "control", "stdin", "iopub"):
            sock = self.ctx.socket(zmq.SUB if name == "iopub" else zmq.DEALER)
            if name == "iopub":
                sock.setsockopt(zmq.SUBSCRIBE, b"")
            else:
                sock.setsockopt(zmq.IDENTITY, self.session.bsession)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://127.0.0.1:{conn[f'{name}_port']}")
            self.sockets[name] = sock

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close(linger=0)
        self.ctx.term()

    def request(self, channel: str, msg_type: str, content: dict) -> dict:
        return self.session.send(self.sockets[channel], msg_type, content)

    def recv(self, channel: str, timeout: float = WAIT) -> dict | None:
        sock = self.sockets[channel]
        if not sock.poll(int(timeout * 1000)):
            return None
        _idents, msg = self.session.recv(sock, mode=0)
        return msg

    def pending(self, channel: str) -> bool:
        return bool(self.sockets[channel].poll(0))


@pytest.fixture
def hostile(rundir: str) -> Iterator[HostileKernel]:
    kernel = HostileKernel(rundir)
    yield kernel
    kernel.close()


@pytest.fixture
def make_raw_client() -> Iterator[Callable[[Gate], RawClient]]:
    clients: list[RawClient] = []

    def make(gate: Gate) -> RawClient:
        client = RawClient(gate.client_connection_info)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def execute(client: RawClient, kernel: HostileKernel, code: str = "x") -> dict:
    """Client sends execute_request; the kernel receives it (checking the gate re-signed it
    with the kernel key) and both iopub hops are synced. Returns the request header."""
    sent = client.request("shell", "execute_request", {"code": code, "silent": False})
    frames = kernel.recv_raw("shell")
    i = frames.index(DELIM)
    assert frames[:i] == [client.session.bsession]  # the client's identity as the one ident
    assert frames[i + 1] == sign(kernel.key, frames[i + 2 : i + 6])
    header = json.loads(frames[i + 2])
    assert header["msg_id"] == sent["header"]["msg_id"]
    # Sync the two PUB/SUB hops (slow joiners): publish busy until the client sees one,
    # then a marker, and read up to it.
    deadline = time.monotonic() + WAIT
    while True:
        busy = kernel.parts("status", header, {"execution_state": "busy"})
        kernel.send("iopub", kernel.frames(busy))
        if client.recv("iopub", timeout=0.05) is not None:
            break
        assert time.monotonic() < deadline, "iopub never connected"
    kernel.send("iopub", kernel.frames(stream(kernel, header, "synced")))
    iopub_until_text(client, "synced")
    return header


def stream(kernel: HostileKernel, parent: dict, text: str, **header: Any) -> list[bytes]:
    return kernel.parts("stream", parent, {"name": "stdout", "text": text}, **header)


def iopub_until_text(client: RawClient, text: str) -> list[dict]:
    seen = []
    while True:
        msg = client.recv("iopub")
        assert msg is not None, f"no stream {text!r}; got {[m['msg_type'] for m in seen]}"
        seen.append(msg)
        if msg["msg_type"] == "stream" and msg["content"]["text"] == text:
            return seen


def test_hostile_iopub_gets_nothing_past_the_gate(hostile, make_gate, make_raw_client, audit):
    gate = make_gate(hostile.conn)
    client = make_raw_client(gate)
    parent = execute(client, hostile)
    start = len(audit.events)
    k = hostile
    good = k.frames(stream(k, parent, "ok1"))
    bad_json = [
        b'{"msg_id": "\xff", "msg_type": "stream", "session": "s", "version": "5.3"}',
        b'{"msg_id": "\\ud800", "msg_type": "stream", "session": "s", "version": "5.3"}',
        b'{"msg_id": "m", "msg_type": "stream", "session": "s", "version": "5.3", "n": NaN}',
        b'{"msg_id": "m", "msg_id": "n", "msg_type": "stream", "session": "s", "version": "5.3"}',
        b'{"msg_id": "m", "msg_type": "stream", "session": "s", "version": "5.3", "d": '
        + b"[" * 30_000
        + b"]" * 30_000
        + b"}",
        b'{"msg_id": "m", "msg_type": "stream", "session": "s", "version": "5.3", "n": '
        + b"7" * 10_000
        + b"}",
    ]
    forged_sig = k.frames(stream(k, parent, "forged"))
    forged_sig[1] = b"0" * 64
    attacks = [
        forged_sig,
        k.frames(stream(k, parent, "wrong key"), key=b"not-the-kernel-key"),
        good,
        good,  # replay
        k.frames(stream(k, {"msg_id": "never-sent", "session": parent["session"]}, "forged")),
        k.frames(stream(k, {**parent, "session": "another-client"}, "other session")),
        k.frames(stream(k, {}, "no parent")),
        k.frames(k.parts("bogus_type", parent, {})),
        k.frames(k.parts("execute_reply", parent, {"status": "ok"})),
        k.frames(k.parts("input_request", parent, {"prompt": "key?"})),
        k.frames(k.parts("status", parent, {"execution_state": "exploding"})),
        k.frames(k.parts("status", {}, {"execution_state": "idle"})),
        k.frames(stream(k, parent, "v99", version="99.0")),
        k.frames(stream(k, parent, "huge date", date="2" * 100_000)),
        [b"stream", DELIM, *k.frames(stream(k, parent, "delim as ident"))],
        k.frames(stream(k, parent, "frames"), buffers=[b"b"] * 64),
        [b"stream", *k.frames(stream(k, parent, "x"))[:-1]],  # a frame short
        *([DELIM, sign(k.key, [h, b"{}", b"{}", b"{}"]), h, b"{}", b"{}", b"{}"] for h in bad_json),
        k.frames(stream(k, parent, "ok2"), buffers=[b"unsigned", b"bytes"]),
        k.frames(stream(k, parent, "end")),
    ]
    for frames in attacks:
        k.send("iopub", frames)
    received = iopub_until_text(client, "end")
    stripped = ("[cellblock: 13 bytes of binary buffers on a stream message were removed: only "
                "comm messages may carry them, where the profile allows comms]\n")
    assert [(m["msg_type"], m["content"].get("text")) for m in received] == [
        ("stream", "ok1"),
        ("stream", stripped),  # never silent
        ("stream", "ok2"),
        ("stream", "end"),
    ]
    assert [m["buffers"] for m in received] == [[], [], [], []]  # unsigned buffers stripped
    assert audit.drops(start) == [
        ("iopub", reason)
        for reason in [
            "bad_signature",
            "bad_signature",
            "replay",
            "unknown_parent",
            "session_mismatch",
            "no_parent",
            "unexpected_msg_type",
            "unexpected_msg_type",
            "unexpected_msg_type",
            "bad_status",
            "no_parent",
            "bad_version",
            "oversized_header",
            "delimiter_as_ident",
            "too_many_frames",
            "short_message",
            *["bad_header"] * len(bad_json),
        ]
    ]
    strips = [f for e, f in audit.events[start:] if e == "gate.strip"]
    assert strips == [{"channel": "iopub", "msg_type": "stream", "reason": "unsigned_buffers"}]
    for _event, fields in audit.events:  # never any content in the audit log
        assert set(fields) <= {"direction", "channel", "msg_type", "reason"}
        assert "bogus_type" not in fields.values()


def test_early_fake_idle_is_held_until_the_reply(hostile, make_gate, make_raw_client, audit):
    gate = make_gate(hostile.conn)
    client = make_raw_client(gate)
    k = hostile
    parent = execute(client, k)
    k.send("iopub", k.frames(k.parts("status", parent, {"execution_state": "idle"})))
    k.send("iopub", k.frames(stream(k, parent, "after the fake idle")))
    received = iopub_until_text(client, "after the fake idle")
    assert [m["msg_type"] for m in received] == ["stream"]  # the idle was held back
    assert not client.pending("iopub")

    # The reply is routed by the gate's table, whatever idents the kernel names.
    k.send("shell", k.frames(k.parts("execute_reply", parent, {"status": "ok"}), [b"someone"]))
    reply = client.recv("shell")
    assert reply is not None and reply["msg_type"] == "execute_reply"
    assert reply["parent_header"]["msg_id"] == parent["msg_id"]
    idle = client.recv("iopub")
    assert idle is not None and idle["content"] == {"execution_state": "idle"}

    # The real idle and any late output are now dropped: exactly one idle reached the client.
    mark = len(audit.events)
    k.send("iopub", k.frames(k.parts("status", parent, {"execution_state": "idle"})))
    k.send("iopub", k.frames(stream(k, parent, "late")))
    audit.wait_for(lambda e, f: f.get("msg_type") == "stream", mark)
    assert audit.drops(mark) == [("iopub", "unknown_parent"), ("iopub", "unknown_parent")]
    assert not client.pending("iopub")
    # ...and the next request relays normally.
    second = execute(client, k)
    k.send("shell", k.frames(k.parts("execute_reply", second, {"status": "ok"})))
    assert client.recv("shell")["parent_header"]["msg_id"] == second["msg_id"]


def test_hostile_replies_are_bound_to_requests(hostile, make_gate, make_raw_client, audit):
    gate = make_gate(hostile.conn)
    a, b = make_raw_client(gate), make_raw_client(gate)
    k = hostile
    parent = execute(a, k)
    b_parent = execute(b, k)
    mark = len(audit.events)
    attacks = [
        ("shell", k.frames(stream(k, parent, "stream on shell"))),
        ("control", k.frames(k.parts("kernel_info_reply", parent, {"status": "ok"}))),
        ("control", k.frames(k.parts("execute_reply", parent, {"status": "ok"}))),
        ("control", k.frames(k.parts("shutdown_request", {}, {"restart": False}))),
        ("shell", k.frames(k.parts("inspect_reply", parent, {"status": "ok"}))),
        ("shell", k.frames(k.parts("execute_reply", {**parent, "msg_id": "nope"}, {}))),
        ("stdin", k.frames(k.parts("input_request", {**parent, "msg_id": "nope"}, {}))),
        ("shell", [DELIM, *k.frames(k.parts("execute_reply", parent, {}))]),
    ]
    for channel, frames in attacks:
        k.send(channel, frames)
    assert sorted(audit.wait_drops(len(attacks), mark)) == sorted(
        [
            ("shell", "unexpected_msg_type"),
            ("control", "wrong_channel"),
            ("control", "unexpected_msg_type"),
            ("control", "unexpected_msg_type"),
            ("shell", "reply_mismatch"),
            ("shell", "unknown_parent"),
            ("stdin", "unknown_parent"),
            ("shell", "delimiter_as_ident"),
        ]
    )
    # Good messages, addressed by the kernel to client B's identity, still reach A only.
    lie = [b.session.bsession]
    k.send("stdin", k.frames(k.parts("input_request", parent, {"prompt": "p"}), lie))
    assert a.recv("stdin")["msg_type"] == "input_request"  # before the reply, as in ipykernel
    k.send("shell", k.frames(k.parts("execute_reply", parent, {"status": "ok"}), lie))
    assert a.recv("shell")["msg_type"] == "execute_reply"
    mark = len(audit.events)
    k.send("shell", k.frames(k.parts("execute_reply", parent, {"status": "ok"}), lie))
    audit.wait_for(lambda e, f: f.get("reason") == "duplicate_reply", mark)
    k.send("shell", k.frames(k.parts("execute_reply", b_parent, {"status": "ok"})))
    assert b.recv("shell")["parent_header"]["msg_id"] == b_parent["msg_id"]
    assert not a.pending("shell") and not a.pending("stdin") and not b.pending("stdin")


def test_client_messages_are_checked(hostile, make_gate, make_raw_client, audit):
    allowed = frozenset({"execute_request", "kernel_info_request", "interrupt_request"})
    gate = make_gate(hostile.conn, allowed_client_msg_types=allowed)
    client = make_raw_client(gate)
    k = hostile
    mark = len(audit.events)
    client.request("shell", "complete_request", {"code": "x", "cursor_pos": 1})  # not allowed
    client.request("control", "execute_request", {"code": "x"})  # wrong channel
    forged = client.session.msg("execute_request", {"code": "evil"})
    parts = [client.session.pack(forged["header"]), b"{}", b"{}", b"{}"]
    client.sockets["shell"].send_multipart([DELIM, sign(b"wrong", parts), *parts])
    assert sorted(audit.wait_drops(2, mark)) == [
        ("control", "msg_type_not_allowed"),
        ("shell", "bad_signature"),
    ]
    # the one the profile does not allow is answered, not dropped in silence
    reply = client.recv("shell")
    assert reply is not None and reply["msg_type"] == "complete_reply"
    assert reply["content"]["status"] == "error"
    assert [f["msg_type"] for e, f in audit.events[mark:] if e == "gate.refuse"] == [
        "complete_request"]
    # The kernel saw none of them: the next thing it receives is the good request.
    sent = client.request("shell", "execute_request", {"code": "good"})
    assert json.loads(k.recv_raw("shell")[3])["msg_id"] == sent["header"]["msg_id"]
    assert not k.sockets["shell"].poll(0) and not k.sockets["control"].poll(0)
    assert gate.shutdown_requested is False


def test_oversized_frame_disconnects_and_the_gate_recovers(
    hostile, make_gate, make_raw_client, audit
):
    gate = make_gate(hostile.conn, limits=GateLimits(max_frame_bytes=1 << 20))
    client = make_raw_client(gate)
    k = hostile
    parent = execute(client, k)
    mark = len(audit.events)
    k.send("iopub", k.frames(stream(k, parent, "x" * (2 << 20))))
    k.send("shell", k.frames(k.parts("execute_reply", parent, {"pad": "y" * (2 << 20)})))
    for channel in ("iopub", "shell"):
        audit.wait_for(lambda e, f, ch=channel: e == "gate.reconnect" and f["channel"] == ch, mark)
    # The SUB and DEALER reconnect by themselves; resync and carry on.
    parent = execute(client, k)
    k.send("iopub", k.frames(stream(k, parent, "after")))
    assert [m["content"]["text"] for m in iopub_until_text(client, "after")] == ["after"]
    k.send("shell", k.frames(k.parts("execute_reply", parent, {"status": "ok"})))
    reply = client.recv("shell")
    assert reply["parent_header"]["msg_id"] == parent["msg_id"]
    assert reply["content"] == {"status": "ok"}  # not the oversized one


class Shout:
    name = "shout"

    def apply(self, channel, msg_type, header, parent, content_bytes, metadata_bytes):
        if msg_type != "stream":
            return content_bytes
        content = json.loads(content_bytes)
        if content["text"] == "drop me":
            return None
        if not content["text"].startswith("shout:"):
            return content_bytes  # unchanged: the relay re-signs the original bytes
        content["text"] = content["text"].upper()
        return json.dumps(content).encode()


def test_output_rules_rewrite_and_drop(hostile, make_gate, make_raw_client, audit):
    gate = make_gate(hostile.conn, rules=[Shout()])
    client = make_raw_client(gate)
    k = hostile
    parent = execute(client, k, "x")
    mark = len(audit.events)
    for text in ("shout:hello", "drop me", "end"):
        k.send("iopub", k.frames(stream(k, parent, text)))
    received = iopub_until_text(client, "end")
    assert [m["content"]["text"] for m in received] == ["SHOUT:HELLO", "end"]
    assert audit.drops(mark) == [("iopub", "rule:shout")]


@pytest.fixture
def hostile_session(rundir, audit) -> Iterator[tuple[HostileKernel, RawClient, dict]]:
    kernel = HostileKernel(rundir)
    gate = Gate(client=client_conn(), kernel=kernel.conn, audit=audit)
    gate.start()
    assert gate.wait_kernel_connected(WAIT), "the kernel never connected"
    client = RawClient(gate.client_connection_info)
    try:
        yield kernel, client, execute(client, kernel)
    finally:
        client.close()
        gate.close()
        kernel.close()


fuzz_frame = st.one_of(
    st.just(DELIM),
    st.binary(max_size=40),
    st.sampled_from([b"{}", b'{"msg_id": "a"}', b"[]", b"null", b"\xff"]),
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    channel=st.sampled_from(["iopub", "shell", "control", "stdin"]),
    frames=st.lists(fuzz_frame, min_size=1, max_size=10),
    sign_it=st.booleans(),
)
def test_fuzz_live_gate_forwards_only_verified(hostile_session, audit, channel, frames, sign_it):
    kernel, client, parent = hostile_session
    mark = len(audit.events)
    if sign_it and DELIM in frames:  # a correct signature over whatever follows the delimiter
        i = frames.index(DELIM)
        body = (frames[i + 1 :] + [b"{}"] * 5)[1:5]
        frames = [*frames[: i + 1], sign(kernel.key, body), *body]
    kernel.send(channel, frames)
    assert audit.wait_drops(1, mark) == [(channel, audit.drops(mark)[0][1])]
    end = uuid.uuid4().hex
    kernel.send("iopub", kernel.frames(stream(kernel, parent, end)))
    received = iopub_until_text(client, end)
    assert len(received) == 1
    assert not client.pending("shell") and not client.pending("control")
    assert not client.pending("stdin")
