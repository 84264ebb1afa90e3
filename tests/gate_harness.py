"""The harness of the gate attack suites (``test_gate_attacks.py``, ``test_gate_pressure.py``,
``test_gate_content.py``, ``test_gate_fuzz.py``): real ZMQ sockets on both sides of a real
:class:`~cellblock.gate.Gate`, no mocks.

A :class:`World` is a gate between a hostile :class:`Kernel` (raw ROUTER and PUB sockets
bound where the kernel would be, holding the kernel key) and one or two raw :class:`Client`
objects (DEALER and SUB sockets holding the client key, with their session id as ZMQ
identity, as jupyter_client's). Every attack test ends with :meth:`World.check`:

- the gate never failed internally (no ``gate.error`` audit event), and no audit event
  carries content;
- every message any client received verified with the client key over exactly the frames
  forwarded (:meth:`Client.recv` asserts it), and no frame of any of them carries
  :data:`CANARY`, which every attack puts in its payload;
- the gate still relays a legitimate request, its output, reply and idle, for each client.

No fixed sleeps: every wait polls a socket or the audit log with a deadline.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import tempfile
import threading
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import zmq

from cellblock.gate import Gate
from cellblock.gate.wire import DELIM
from cellblock.output import build_output_rules
from cellblock.policy import OutputPolicy

WAIT = 15.0  # seconds: the deadline of any single wait
CANARY = "CANARY-b1e55ed"  # in every attack's payload; must never reach a client
FUZZ_EXAMPLES = int(os.environ.get("CELLBLOCK_FUZZ_EXAMPLES", "0"))
ROUTED = ("shell", "control", "stdin")
CHANNELS = (*ROUTED, "iopub")

_BUILTIN = tomllib.loads(resources.files("cellblock").joinpath("builtin.toml").read_text())
AGENT = _BUILTIN["profiles"]["agent"]  # the LLM-facing profile, as shipped
AGENT_OUTPUT = OutputPolicy.model_validate(AGENT["output"])
AGENT_REQUESTS = frozenset(AGENT["allowed_requests"])


def examples(default: int) -> int:
    """Hypothesis examples for one property: ``default``, or $CELLBLOCK_FUZZ_EXAMPLES."""
    return FUZZ_EXAMPLES or default


def sign(key: bytes, parts: list[bytes]) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha256).hexdigest().encode()


def dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def new_header(msg_type: str, session: str, **extra: Any) -> dict[str, Any]:
    fields = {
        "msg_id": uuid.uuid4().hex,
        "msg_type": msg_type,
        "session": session,
        "username": "u",
        "date": "2025-01-01T00:00:00Z",
        "version": "5.3",
    }
    fields.update(extra)
    return fields


def wait_until(condition: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)  # poll interval for a condition


# ====================================================================== the audit log


class Audit:
    """The gate's audit callback, with conditions to wait on."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._cond = threading.Condition()

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        with self._cond:
            self.events.append((event, dict(fields)))
            self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self.events)

    def drops(self, start: int = 0) -> list[tuple[str, str]]:
        """(channel, reason) of every drop since ``start``."""
        with self._cond:
            return [(f["channel"], f["reason"]) for e, f in self.events[start:] if e == "gate.drop"]

    def wait_drops(self, count: int, start: int) -> list[tuple[str, str]]:
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.drops(start)) >= count, timeout=WAIT)
            assert ok, f"expected {count} drops; got {self.drops(start)}"
            return self.drops(start)

    def wait(self, pred: Callable[[str, dict[str, Any]], bool], start: int) -> None:
        with self._cond:
            ok = self._cond.wait_for(
                lambda: any(pred(e, f) for e, f in self.events[start:]), timeout=WAIT
            )
            assert ok, f"no matching audit event; got {self.events[start:]}"

    def of(self, event: str, start: int = 0) -> list[dict[str, Any]]:
        with self._cond:
            return [f for e, f in self.events[start:] if e == event]


# ====================================================================== the two sides


@dataclass
class Got:
    """One message a client received; its signature was verified before it was parsed."""

    channel: str
    idents: list[bytes]
    parts: list[bytes]  # header, parent, metadata, content: exactly the frames signed
    buffers: list[bytes]
    header: dict[str, Any] = field(default_factory=dict)
    parent: dict[str, Any] = field(default_factory=dict)
    content: Any = None

    @property
    def msg_type(self) -> str:
        return str(self.header["msg_type"])


class Kernel:
    """Raw sockets connected where the kernel would connect; it holds the kernel key and lies.

    ``iopub=False`` leaves the iopub endpoint to another process (the flood tests).
    """

    def __init__(self, rundir: str, iopub: bool = True) -> None:
        self.key = uuid.uuid4().hex.encode()
        self.session = uuid.uuid4().hex
        self.conn: dict[str, Any] = {
            "transport": "ipc",
            "ip": os.path.join(rundir, "k"),
            "key": self.key.decode(),
            "signature_scheme": "hmac-sha256",
            "shell_port": 1,
            "iopub_port": 2,
            "stdin_port": 3,
            "control_port": 4,
            "hb_port": 5,
        }
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.sockets: dict[str, zmq.Socket[bytes]] = {}
        for name in ("shell", "control", "stdin", "hb", "iopub"):
            if name == "iopub" and not iopub:
                continue
            sock = self.ctx.socket(zmq.PUB if name == "iopub" else zmq.ROUTER)
            if name != "iopub":
                sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
                sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # as ipykernel's
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RECONNECT_IVL, 5)  # the gate may bind after this connects
            # The gate binds, the kernel connects (cellblock_kernel does the same); libzmq
            # retries until the gate's socket exists, so the order does not matter.
            sock.connect(self.endpoint(name))
            self.sockets[name] = sock
        self.gate_id = b""  # the routing id of the gate's DEALERs (all four share it)

    def endpoint(self, channel: str) -> str:
        return f"ipc://{self.conn['ip']}-{self.conn[f'{channel}_port']}"

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close(linger=0)
        self.ctx.term()

    def parts(
        self, msg_type: str, parent: dict[str, Any] | bytes, content: Any, **header: Any
    ) -> list[bytes]:
        return [
            dumps(new_header(msg_type, self.session, **header)),
            parent if isinstance(parent, bytes) else dumps(parent),
            b"{}",
            content if isinstance(content, bytes) else dumps(content),
        ]

    def frames(
        self, parts: list[bytes], idents: tuple[bytes, ...] = (), buffers: tuple[bytes, ...] = (),
        key: bytes | None = None,
    ) -> list[bytes]:
        return [*idents, DELIM, sign(key or self.key, parts), *parts, *buffers]

    def send(self, channel: str, frames: list[bytes]) -> None:
        sock = self.sockets[channel]
        if channel == "iopub":
            sock.send_multipart(frames)
            return
        deadline = time.monotonic() + WAIT
        while True:  # ROUTER_MANDATORY: retry until the gate's DEALER has connected
            try:
                sock.send_multipart([self.gate_id, *frames])
                return
            except zmq.ZMQError as e:
                if e.errno != zmq.EHOSTUNREACH or time.monotonic() > deadline:
                    raise
                sock.poll(10, zmq.POLLOUT)

    def say(
        self, channel: str, msg_type: str, parent: dict[str, Any] | bytes, content: Any,
        buffers: tuple[bytes, ...] = (), idents: tuple[bytes, ...] = (), **header: Any,
    ) -> list[bytes]:
        """Send one correctly signed message; return its frames (for a replay)."""
        topic = (msg_type.encode(),) if channel == "iopub" and not idents else idents
        frames = self.frames(self.parts(msg_type, parent, content, **header), topic, buffers)
        self.send(channel, frames)
        return frames

    def recv(self, channel: str, key: bytes | None = None) -> tuple[list[bytes], dict[str, Any]]:
        """The next message the gate sent on ``channel``, verified with the kernel key:
        (idents after the gate's routing id, header)."""
        sock = self.sockets[channel]
        assert sock.poll(WAIT * 1000), f"the kernel got nothing on {channel}"
        frames = sock.recv_multipart()
        self.gate_id = frames[0]
        frames = frames[1:]
        i = frames.index(DELIM)
        assert frames[i + 1] == sign(key or self.key, frames[i + 2 : i + 6])
        return frames[:i], json.loads(frames[i + 2])

    def quiet(self, channel: str) -> bool:
        return not self.sockets[channel].poll(0)


class Client:
    """A client on raw sockets, identified like jupyter_client (session id = ZMQ identity).

    Every multipart it receives is kept in ``raw`` and must verify with the client key
    over exactly the four frames after the signature; ``recv`` asserts that.
    """

    def __init__(self, conn: dict[str, Any], identity: bytes | None = None,
                 iopub_rcvhwm: int | None = None) -> None:
        self.key = conn["key"].encode()
        self.session = uuid.uuid4().hex
        self.identity = identity if identity is not None else self.session.encode()
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.sockets: dict[str, zmq.Socket[bytes]] = {}
        for name in (*ROUTED, "iopub", "hb"):
            sock = self.ctx.socket(zmq.SUB if name == "iopub" else zmq.DEALER)
            if name == "iopub":
                sock.setsockopt(zmq.SUBSCRIBE, b"")
                if iopub_rcvhwm is not None:  # a client that reads slowly, in libzmq too
                    sock.setsockopt(zmq.RCVHWM, iopub_rcvhwm)
                    sock.setsockopt(zmq.RCVBUF, 65536)
            elif name != "hb":
                sock.setsockopt(zmq.IDENTITY, self.identity)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://127.0.0.1:{conn[f'{name}_port']}")
            self.sockets[name] = sock
        self.raw: list[tuple[str, list[bytes]]] = []
        self.got: list[Got] = []
        self.sent: list[tuple[str, list[bytes]]] = []  # what request() sent

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close(linger=0)
        self.ctx.term()

    def parts(self, msg_type: str, content: Any = None, parent: bytes = b"{}",
              **header: Any) -> list[bytes]:
        session = header.pop("session", self.session)
        return [
            dumps(new_header(msg_type, session, **header)),
            parent,
            b"{}",
            dumps({} if content is None else content),
        ]

    def frames(self, parts: list[bytes], key: bytes | None = None) -> list[bytes]:
        return [DELIM, sign(key or self.key, parts), *parts]

    def request(self, channel: str, msg_type: str, content: Any = None,
                **header: Any) -> dict[str, Any]:
        """Send a correctly signed request; return its header."""
        parts = self.parts(msg_type, content, **header)
        frames = self.frames(parts)
        self.sockets[channel].send_multipart(frames)
        self.sent.append((channel, frames))
        return json.loads(parts[0])

    def recv(self, channel: str, timeout: float = WAIT) -> Got | None:
        """The next message on ``channel`` (None after ``timeout``), its signature checked.
        The gate's own ``iopub_welcome`` (if its iopub is an XPUB) is checked and skipped."""
        got = self._recv(channel, timeout)
        while got is not None and channel == "iopub" and got.msg_type == "iopub_welcome":
            got = self._recv(channel, timeout)
        return got

    def _recv(self, channel: str, timeout: float) -> Got | None:
        sock = self.sockets[channel]
        if not sock.poll(int(timeout * 1000)):
            return None
        frames = sock.recv_multipart()
        self.raw.append((channel, frames))
        if channel == "hb":
            return Got(channel, [], frames, [])
        assert DELIM in frames, f"a message without delimiter on {channel}: {frames[:3]}"
        i = frames.index(DELIM)
        parts = frames[i + 2 : i + 6]
        assert frames[i + 1] == sign(self.key, parts), f"bad client signature on {channel}"
        got = Got(channel, frames[:i], parts, frames[i + 6 :])
        got.header, got.parent = json.loads(parts[0]), json.loads(parts[1])
        got.content = json.loads(parts[3])
        self.got.append(got)
        return got

    def drain_for(self, msg_type: str, timeout: float) -> bool:
        """Read iopub until it is quiet for ``timeout``; whether a ``msg_type`` came."""
        seen = False
        while (got := self.recv("iopub", timeout=timeout)) is not None:
            seen = seen or got.msg_type == msg_type
        return seen

    def until(self, channel: str, pred: Callable[[Got], bool]) -> list[Got]:
        """Read ``channel`` until a message matches ``pred``; return all read, the match last."""
        seen: list[Got] = []
        while True:
            got = self.recv(channel)
            assert got is not None, f"nothing matching on {channel}; got {self.summary(seen)}"
            seen.append(got)
            if pred(got):
                return seen

    def pending(self, channel: str) -> bool:
        return bool(self.sockets[channel].poll(0))

    def drain(self) -> None:
        for name in self.sockets:
            while self.recv(name, timeout=0) is not None:
                pass

    @staticmethod
    def summary(seen: list[Got]) -> list[tuple[str, Any]]:
        return [(g.msg_type, g.content) for g in seen]

    def assert_clean(self) -> None:
        """No frame of anything this client ever received carries the canary."""
        self.drain()
        for channel, frames in self.raw:
            for frame in frames:
                assert CANARY.encode() not in frame, f"the canary reached a client on {channel}"


def is_marker(got: Got) -> bool:
    """A marker the gate itself wrote into a cell's output (stderr, ``[cellblock: ...``)."""
    return got.msg_type == "stream" and str(got.content.get("text", "")).startswith(
        "[cellblock: ")


def past_markers(client: Client, channel: str) -> tuple[Got | None, list[Got]]:
    """The next message on ``channel`` that is not a gate marker, and the markers before it."""
    markers: list[Got] = []
    got = client.recv(channel)
    while got is not None and is_marker(got):
        markers.append(got)
        got = client.recv(channel)
    return got, markers


def text_is(text: str) -> Callable[[Got], bool]:
    return lambda g: g.msg_type == "stream" and g.content.get("text") == text


# ====================================================================== the world


class World:
    """A gate between a hostile kernel and raw clients, with helpers for a legit exchange."""

    def __init__(self, rundir: str, clients: int = 1, kernel_iopub: bool = True,
                 iopub_rcvhwm: int | None = None, **gate_kwargs: Any) -> None:
        self.audit = Audit()
        self.kernel = Kernel(rundir, iopub=kernel_iopub)
        client_conn: dict[str, Any] = {f"{c}_port": 0 for c in (*CHANNELS, "hb")}
        client_conn.update(transport="tcp", ip="127.0.0.1", key=uuid.uuid4().hex,
                           signature_scheme="hmac-sha256")
        self.gate = Gate(client=client_conn, kernel=self.kernel.conn, audit=self.audit,
                         **gate_kwargs)
        self.gate.start()
        if kernel_iopub:
            assert self.gate.wait_kernel_connected(WAIT), "the kernel never connected"
        else:  # iopub is left to another process: wait for the other four
            deadline = time.monotonic() + WAIT
            while not {"shell", "control", "stdin", "hb"} <= self.gate._up:
                assert time.monotonic() < deadline, "the kernel never connected"
                time.sleep(0.005)  # polling a condition the gate's thread sets
        self.kernel.gate_id = self.gate._identity  # ipykernel learns it from the first request
        self.conn = self.gate.client_connection_info
        self.clients = [Client(self.conn, None, iopub_rcvhwm) for _ in range(clients)]
        self._extra: list[Client] = []
        self.synced: set[int] = set()

    @property
    def a(self) -> Client:
        return self.clients[0]

    @property
    def b(self) -> Client:
        return self.clients[1]

    def client(self, identity: bytes | None = None) -> Client:
        client = Client(self.conn, identity)
        if hasattr(self, "clients"):
            self._extra.append(client)
        return client

    def close(self) -> None:
        for client in (*self.clients, *self._extra):
            client.close()
        self.gate.close()
        self.kernel.close()

    def open(self, client: Client | None = None, channel: str = "shell",
             msg_type: str = "execute_request", content: Any = None) -> dict[str, Any]:
        """A client request the kernel received (re-signed with the kernel key); its header.
        The client's iopub is synced with the gate the first time."""
        client = client or self.a
        if content is None and msg_type == "execute_request":
            content = {"code": "x", "silent": False, "allow_stdin": True}
        sent = client.request(channel, msg_type, content)
        idents, header = self.kernel.recv(channel)
        assert idents == [client.identity]  # the client's identity is the one ident
        assert header["msg_id"] == sent["msg_id"]
        if id(client) not in self.synced:
            self.sync(client, header)
        return header

    def sync(self, client: Client, parent: dict[str, Any]) -> None:
        """Sync the two PUB/SUB hops (slow joiners): publish busy until every client saw
        one, then a marker, and read up to it."""
        k = self.kernel
        deadline = time.monotonic() + WAIT
        waiting = [c for c in self.clients if id(c) not in self.synced]
        while waiting:  # (clear_output: the gate forwards one busy per request)
            k.say("iopub", "clear_output", parent, {"wait": True})
            # only a clear_output proves the kernel's PUB is connected: anything else read
            # here (the gate's own busy, what was left of an earlier flood) went another way
            waiting = [c for c in waiting if not c.drain_for("clear_output", 0.05)]
            assert time.monotonic() < deadline, "iopub never connected"
        marker = f"synced-{uuid.uuid4().hex}"
        k.say("iopub", "stream", parent, {"name": "stdout", "text": marker})
        for other in self.clients:
            other.until("iopub", text_is(marker))
        self.synced.update(id(c) for c in self.clients)

    def finish(self, parent: dict[str, Any], client: Client | None = None,
               channel: str = "shell") -> None:
        """The kernel answers ``parent`` (reply, then idle); the client gets both."""
        client = client or self.a
        reply_type = parent["msg_type"].removesuffix("_request") + "_reply"
        self.kernel.say(channel, reply_type, parent, {"status": "ok"})
        reply = client.recv(channel)
        assert reply is not None and reply.parent["msg_id"] == parent["msg_id"], "no reply"
        self.kernel.say("iopub", "status", parent, {"execution_state": "idle"})
        client.until("iopub", lambda g: g.msg_type == "status" and g.parent == parent)

    def relays(self, client: Client | None = None) -> None:
        """A legit exchange still works: request, output, reply, idle."""
        client = client or self.a
        parent = self.open(client)
        text = f"alive-{uuid.uuid4().hex}"
        self.kernel.say("iopub", "stream", parent, {"name": "stdout", "text": text})
        client.until("iopub", text_is(text))
        self.finish(parent, client)

    def check(self) -> None:
        """The end of every attack: the gate still relays, no client ever saw the canary,
        and the gate never failed internally."""
        for client in self.clients:
            self.relays(client)
        for client in (*self.clients, *self._extra):
            client.assert_clean()
        assert self.audit.of("gate.error") == []
        assert self.gate.audit_errors == 0
        for _event, fields in self.audit.events:  # never any content in the audit log
            assert CANARY not in json.dumps(fields)


# ====================================================================== shared pieces

SECRET = "AKIAZ7Q3RT5WX2MN4PLK"  # shaped like an AWS access key id: the redactor's to find

LEGIT = {
    "shell": ("execute_reply", {"status": "ok", "execution_count": 1}),
    "control": ("kernel_info_reply", {"status": "ok"}),
    "stdin": ("input_request", {"prompt": "name? ", "password": False}),
    "iopub": ("stream", {"name": "stdout", "text": "legit"}),
}


def opener(channel: str) -> tuple[str, str]:
    """The (channel, msg_type) of a client request that a kernel message on ``channel``
    may answer."""
    return ("control", "kernel_info_request") if channel == "control" else (
        "shell", "execute_request")


def agent_gate(**kwargs: Any) -> dict[str, Any]:
    """Gate arguments as the warden builds them for the shipped ``agent`` profile."""
    return {
        "rules": build_output_rules(AGENT_OUTPUT, env={}),
        "allowed_client_msg_types": AGENT_REQUESTS,  # allow_stdin = false: no input_reply
        **kwargs,
    }


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(field)


@contextmanager
def worlds() -> Iterator[Callable[..., World]]:
    """``make(**gate_kwargs) -> World``; every world made is closed, its files removed."""
    rundir = tempfile.mkdtemp(prefix="cba-", dir="/tmp")  # short: unix socket paths < 107 B
    made: list[World] = []

    def make(**kwargs: Any) -> World:
        world = World(tempfile.mkdtemp(prefix="w", dir=rundir), **kwargs)
        made.append(world)
        return world

    try:
        yield make
    finally:
        for world in made:
            world.close()
        shutil.rmtree(rundir, ignore_errors=True)
