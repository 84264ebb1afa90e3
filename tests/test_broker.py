"""The broker on a real unix socket, in this process, with real files (no jail).

Each test builds a Broker over a temp dataset tree, starts its thread, and talks to
it the way a hostile kernel would: raw frames, bad JSON, floods, slow writers,
descriptors sent the wrong way. After each abuse the broker must still serve the next
good request. THREATS.md section 8 (B1-B14) and F11-F18 name the cases.
"""

from __future__ import annotations

import array
import errno
import fcntl
import json
import os
import socket
import stat
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cellblock.broker import Broker, BrokerLimits
from cellblock.datasets import Dataset
from cellblock.errors import PolicyError
from cellblock.grants import control_request, find_kernel
from cellblock_kernel import datasets as wire

from conftest import wait_for

pytestmark = [pytest.mark.nonroot]

SALES = b"day,amount\n1,10\n2,20\n"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    (data / "weather" / "sub").mkdir(parents=True)
    (data / "sales.csv").write_bytes(SALES)
    os.chmod(data / "sales.csv", 0o666)  # world-writable: F12 must hold anyway
    (data / "weather" / "jan.csv").write_text("jan\n")
    (data / "weather" / "sub" / "feb.csv").write_text("feb\n")
    (data / "weather" / "shadow").symlink_to("/etc/shadow")
    (data / "weather" / "up").symlink_to("../sales.csv")
    (data / "leak.csv").symlink_to("/etc/shadow")
    os.mkfifo(data / "pipe.csv")
    (data / "hr.csv").write_text("salaries\n")
    return data


class Audit(list[tuple[str, dict[str, Any]]]):
    def __call__(self, event: str, **fields: Any) -> None:
        self.append((event, fields))

    def events(self, name: str) -> list[dict[str, Any]]:
        return [f for e, f in self if e == name]


@pytest.fixture
def audit() -> Audit:
    return Audit()


def make_broker(tree: Path, audit: Audit, granted: tuple[str, ...] = ("sales", "weather",
                "leak", "pipe"), limits: BrokerLimits | None = None,
                jail_uid: int | None = None) -> Broker:
    datasets = {
        "sales": Dataset(path=str(tree / "sales.csv"), description="Daily sales"),
        "weather": Dataset(path=str(tree / "weather")),
        "leak": Dataset(path=str(tree / "leak.csv")),
        "pipe": Dataset(path=str(tree / "pipe.csv")),
        "hr": Dataset(path=str(tree / "hr.csv")),
        "notes": Dataset(path=str(tree / "sales.csv")),
    }
    run = tree.parent / "run"
    run.mkdir()
    broker = Broker(run_path=run, datasets=datasets,
                    allowed=("sales", "weather", "leak", "pipe", "notes"),
                    jail_uid=os.getuid() if jail_uid is None else jail_uid, audit=audit,
                    limits=limits)
    broker.prepare(granted, mounted=("weather",))
    broker.start()
    return broker


@pytest.fixture
def broker(tree: Path, audit: Audit) -> Iterator[Broker]:
    b = make_broker(tree, audit)
    yield b
    b.close()


def connect(broker: Broker) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(broker.socket_path))
    return sock


def read_reply(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """The reply frame and any fds; (None, []) when the broker closed without one."""
    fds: list[int] = []
    buf = b""
    while True:
        try:
            data, anc, _flags, _ = sock.recvmsg(65536, socket.CMSG_SPACE(4 * 8))
        except ConnectionResetError:  # dropped with our unread bytes still queued
            break
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[: len(payload) - len(payload) % 4])
                fds.extend(got)
        if not data:
            break
        buf += data
    if len(buf) < 4:
        return None, fds
    return json.loads(buf[4:]), fds


def request(broker: Broker, obj: dict[str, Any] | bytes) -> tuple[dict[str, Any] | None,
                                                                  list[int]]:
    with connect(broker) as sock:
        if isinstance(obj, dict):
            body = json.dumps(obj).encode()
            obj = struct.pack(">I", len(body)) + body
        try:
            sock.sendall(obj)
            sock.shutdown(socket.SHUT_WR)  # a short request ends now, not at the deadline
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass  # refused at accept (busy, rate limited): the reply is already queued
        return read_reply(sock)


def open_ok(broker: Broker, name: str, member: str | None = None) -> int:
    req: dict[str, Any] = {"v": 1, "op": "open", "dataset": name}
    if member is not None:
        req["member"] = member
    reply, fds = request(broker, req)
    assert reply is not None and reply["ok"], reply
    assert len(fds) == 1
    return fds[0]


def refused(broker: Broker, obj: dict[str, Any] | bytes) -> dict[str, Any] | None:
    reply, fds = request(broker, obj)
    for fd in fds:
        os.close(fd)
    assert fds == [], "a refused request must never carry a descriptor"
    assert reply is None or reply["ok"] is False
    return reply


def still_serves(broker: Broker) -> None:
    fd = open_ok(broker, "sales")
    try:
        assert os.pread(fd, 100, 0) == SALES
    finally:
        os.close(fd)


# -- granted opens ------------------------------------------------------------------------

def test_granted_file_is_a_readonly_regular_fd(broker: Broker, tree: Path) -> None:
    fd = open_ok(broker, "sales")
    try:
        st = os.fstat(fd)
        assert stat.S_ISREG(st.st_mode)  # B9: never a directory
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        assert flags & os.O_ACCMODE == os.O_RDONLY  # B10
        assert not flags & os.O_PATH
        assert os.read(fd, 100) == SALES
        with pytest.raises(OSError) as info:  # F11
            os.write(fd, b"x")
        assert info.value.errno == errno.EBADF
        with pytest.raises(OSError) as info:  # F12: the host file is mode 0666
            open(f"/proc/self/fd/{fd}", "r+b")
        assert info.value.errno == errno.EROFS
        # the host path does not leak through the descriptor either
        assert os.readlink(f"/proc/self/fd/{fd}") == "/sales.csv"
    finally:
        os.close(fd)
    assert (tree / "sales.csv").read_bytes() == SALES


def test_directory_member_open(broker: Broker) -> None:
    fd = open_ok(broker, "weather", "sub/feb.csv")
    try:
        assert os.read(fd, 10) == b"feb\n"
    finally:
        os.close(fd)


def test_list(broker: Broker, audit: Audit) -> None:
    reply, fds = request(broker, {"v": 1, "op": "list"})
    assert fds == []
    assert reply == {"v": 1, "ok": True, "datasets": [
        {"name": "sales", "description": "Daily sales", "kind": "file", "path": None},
        {"name": "weather", "description": "", "kind": "directory", "path": "/data/weather"},
        {"name": "leak", "description": "", "kind": "file", "path": None},
        {"name": "pipe", "description": "", "kind": "file", "path": None},
    ]}
    assert audit.events("broker.list")[-1]["datasets"] == ["sales", "weather", "leak", "pipe"]


# -- refusals -----------------------------------------------------------------------------

def test_not_granted_and_unknown_look_the_same(broker: Broker, tree: Path) -> None:
    """B1: 'hr' exists in the policy, 'nosuch' does not; the kernel cannot tell."""
    a = refused(broker, {"v": 1, "op": "open", "dataset": "hr"})
    b = refused(broker, {"v": 1, "op": "open", "dataset": "nosuch"})
    assert a is not None and b is not None
    assert a["error"] == b["error"] == wire.NOT_GRANTED
    assert a["message"].replace("'hr'", "X") == b["message"].replace("'nosuch'", "X")
    assert a["granted"] == b["granted"] == ["leak", "pipe", "sales", "weather"]
    assert str(tree) not in json.dumps([a, b])
    still_serves(broker)


@pytest.mark.parametrize(("name", "member"), [
    ("leak", None),  # F17: the dataset's file is a symlink to /etc/shadow
    ("weather", "shadow"),  # F17: a symlink inside a directory dataset
    ("weather", "up"),  # a relative symlink that climbs out
    ("pipe", None),  # B11: a FIFO: refused without hanging
    ("weather", "sub"),  # B9: a directory is never passed
    ("weather", "missing.csv"),
])
def test_unavailable_files_are_refused(broker: Broker, tree: Path, audit: Audit, name: str,
                                       member: str | None) -> None:
    req: dict[str, Any] = {"v": 1, "op": "open", "dataset": name}
    if member:
        req["member"] = member
    reply = refused(broker, req)
    assert reply is not None and reply["error"] == wire.UNAVAILABLE
    assert str(tree) not in reply["message"] and "shadow" not in reply["message"].replace(
        "'shadow'", "")
    last = audit.events("broker.open")[-1]
    assert last["decision"] == "refused" and last["dataset"] == name
    still_serves(broker)


def test_directory_without_member_and_file_with_member(broker: Broker) -> None:
    a = refused(broker, {"v": 1, "op": "open", "dataset": "weather"})
    assert a is not None and "is a directory (mounted at /data/weather)" in a["message"]
    b = refused(broker, {"v": 1, "op": "open", "dataset": "sales", "member": "x.csv"})
    assert b is not None and "is a file" in b["message"]


NAMES = [
    "../../etc/shadow", "/etc/shadow", "ds1/../../root", "sales\x00", "%2e%2e",
    "sales/.", "Sales", "cafe\u0301", "caf\u00e9", "s" * 41, "", "sales ", 7, None, ["sales"],
]


@pytest.mark.parametrize("name", NAMES, ids=repr)
def test_bad_names_refused_before_any_file_system_call(broker: Broker, audit: Audit,
                                                       name: object) -> None:
    """F16, F18: requests name grants, never paths; bad names are refused by the parser."""
    reply = refused(broker, {"v": 1, "op": "open", "dataset": name})
    assert reply is not None and reply["error"] == wire.MALFORMED
    assert audit.events("broker.open")[-1]["reason"] == wire.MALFORMED
    still_serves(broker)


@pytest.mark.parametrize("member", [
    "../sales.csv", "/etc/shadow", "sub/../../x", "sub//feb.csv", "sub/./feb.csv", ".",
    "%2e%2e/x", "sub/feb.csv/", "a\x00b", "f\u0065\u0301.csv", "x" * 300, "/".join("a" * 17),
    ".hidden",
], ids=repr)
def test_bad_members_refused(broker: Broker, member: str) -> None:
    reply = refused(broker, {"v": 1, "op": "open", "dataset": "weather", "member": member})
    assert reply is not None and reply["error"] == wire.MALFORMED


@pytest.mark.parametrize("req", [
    {"v": 1, "op": "open", "dataset": "sales", "path": "x"},  # B14
    {"v": 1, "op": "open", "dataset": "sales", "flags": "O_RDWR"},  # B14
    {"v": 1, "op": "open", "dataset": "sales", "mode": 2},
    {"v": 2, "op": "open", "dataset": "sales"},
    {"v": True, "op": "open", "dataset": "sales"},
    {"op": "open", "dataset": "sales"},
    {"v": 1, "op": "open"},
    {"v": 1, "op": "read", "dataset": "sales"},
    {"v": 1, "op": "list", "dataset": "sales"},
    {"v": 1, "open": "https://evil/x"},  # N15: the broker never resolves URLs
], ids=lambda r: json.dumps(r))
def test_unknown_fields_and_ops_rejected(broker: Broker, req: dict[str, Any]) -> None:
    reply = refused(broker, req)
    assert reply is not None and reply["error"] == wire.MALFORMED
    still_serves(broker)


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize("raw", [
    b"\xff\xff\xff\xff",  # B7: a 4 GB length prefix
    struct.pack(">I", 64 * 1024) + b"x" * 100,  # oversized (64 KB)
    b"\x00\x00\x00\x00",  # empty frame
    frame(b"not json"),
    frame(b"[1, 2]"),
    frame(b'{"v": 1, "op": "list", "op": "open"}'),  # duplicate keys
    frame(b'{"v": NaN, "op": "list"}'),
    frame("{\"v\": 1, \"op\": \"list\", \"x\": \"\u00e9\"}".encode()),  # not ASCII
    frame(b"[" * 500 + b"]" * 500),
    frame(b"\xc3\x28"),
], ids=lambda r: repr(r[:12]))
def test_malformed_frames(broker: Broker, raw: bytes) -> None:
    reply = refused(broker, raw)
    assert reply is not None and reply["error"] in (wire.MALFORMED, wire.TOO_LARGE)
    still_serves(broker)


def test_fuzzed_frames_never_hurt_the_broker(broker: Broker) -> None:
    """B7: random bytes after a valid header; the broker answers or drops, never crashes."""
    rnd = __import__("random").Random(4)
    for _ in range(200):
        body = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 60)))
        refused(broker, frame(body) if rnd.random() < 0.7 else body)
        broker._tokens = float(broker.limits.burst)  # this test is about parsing, not rate
    still_serves(broker)


def test_descriptors_sent_to_the_broker_are_closed(broker: Broker, tree: Path) -> None:
    """B8: SCM_RIGHTS *to* the broker, 253 fds including a socket, a FIFO and a pipe."""
    r, w = os.pipe()
    a, b = socket.socketpair()
    fifo = os.open(tree / "pipe.csv", os.O_RDONLY | os.O_NONBLOCK)
    null = [os.open(os.devnull, os.O_RDONLY) for _ in range(250)]
    before = len(os.listdir("/proc/self/fd"))
    try:
        with connect(broker) as sock:
            body = json.dumps({"v": 1, "op": "open", "dataset": "sales"}).encode()
            fds = [r, a.fileno(), fifo, *null]
            sock.sendmsg([frame(body)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                          array.array("i", fds).tobytes())])
            reply, got = read_reply(sock)
        assert got == [] and reply is not None and reply["error"] == wire.MALFORMED
        assert "descriptors are not accepted" in reply["message"]
        # the broker shares this process: nothing it received is still open
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        for fd in (r, w, fifo, *null):
            os.close(fd)
        a.close()
        b.close()
    still_serves(broker)


# -- floods, slow and silent clients ------------------------------------------------------

def test_flood_is_rate_limited_then_recovers(tree: Path, audit: Audit) -> None:
    """B6: more requests than the bucket holds get 'rate_limited'; later ones succeed."""
    broker = make_broker(tree, audit, limits=BrokerLimits(rate=20.0, burst=10))
    try:
        errors = []
        for _ in range(60):
            reply, _ = request(broker, {"v": 1, "op": "list"})
            errors.append(reply["error"] if reply and not reply["ok"] else "ok")
        assert errors.count(wire.RATE_LIMITED) >= 40
        assert errors[:10] == ["ok"] * 10
        # the bucket refills: a good open succeeds again (polled, no fixed sleep)
        def serves() -> bool:
            reply, fds = request(broker, {"v": 1, "op": "open", "dataset": "sales"})
            for fd in fds:
                os.close(fd)
            return bool(reply and reply["ok"])

        assert wait_for(serves, 10)
    finally:
        broker.close()
    assert any(f["reason"] == wire.RATE_LIMITED for f in audit.events("broker.open"))


def test_concurrency_cap_and_slowloris(tree: Path, audit: Audit) -> None:
    """B6/B7: idle connections count against the cap until their deadline drops them."""
    broker = make_broker(tree, audit, limits=BrokerLimits(max_connections=4, deadline=0.5))
    idle = [connect(broker) for _ in range(4)]
    try:
        for s in idle:
            s.sendall(b"\x00")  # one byte of a header, then nothing (slowloris)
        wait_for(lambda: len(broker._conns) == 4, 5)
        busy = refused(broker, {"v": 1, "op": "list"})
        assert busy is not None and busy["error"] == wire.BUSY
        for s in idle:  # the deadline drops each one
            reply, fds = read_reply(s)
            assert fds == [] and reply is not None and reply["error"] == "timeout"
        still_serves(broker)
    finally:
        for s in idle:
            s.close()
        broker.close()
    reasons = [f["reason"] for f in audit.events("broker.open")]
    assert "busy" in reasons and "timeout" in reasons


def test_a_client_that_never_reads_does_not_block(broker: Broker) -> None:
    silent = []
    for _ in range(5):
        s = connect(broker)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        s.sendall(frame(json.dumps({"v": 1, "op": "list"}).encode()))
        silent.append(s)
    try:
        still_serves(broker)
    finally:
        for s in silent:
            s.close()


# -- the socket is the capability ----------------------------------------------------------

@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
def test_another_uid_is_refused(tree: Path, audit: Audit) -> None:
    """B2: only the kernel's own uid may use its socket (SO_PEERCRED); as root every
    kernel has its own host uid, so another kernel cannot use this one's grants."""
    broker = make_broker(tree, audit, jail_uid=0x40000123)
    try:
        os.chmod(broker.socket_dir, 0o711)
        os.chmod(broker.socket_path, 0o666)  # so only SO_PEERCRED stands in the way
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            os.close(r)
            try:
                os.chdir(broker.socket_dir)  # so no ancestor needs to be traversable
                os.setgid(0x40000124)
                os.setuid(0x40000124)
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(10)
                    sock.connect("broker.sock")
                    body = json.dumps({"v": 1, "op": "open", "dataset": "sales"}).encode()
                    try:
                        sock.sendall(frame(body))
                    except BrokenPipeError:
                        pass
                    reply, fds = read_reply(sock)
                os.write(w, json.dumps([reply, len(fds)]).encode())
            except BaseException as exc:
                os.write(w, json.dumps([{"error": repr(exc)}, 0]).encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            reply, nfds = json.loads(f.read())
        os.waitpid(pid, 0)
        assert nfds == 0 and reply["error"] == wire.PEER
        assert audit.events("broker.open")[-1]["reason"] == "peer"
    finally:
        broker.close()


def test_socket_modes(broker: Broker) -> None:
    assert stat.S_IMODE(os.stat(broker.control_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(broker.socket_path).st_mode) == 0o600


# -- grant and revoke -----------------------------------------------------------------------

def test_grant_and_revoke_through_the_control_socket(broker: Broker, audit: Audit) -> None:
    run = broker.run_path
    assert refused(broker, {"v": 1, "op": "open", "dataset": "notes"})["error"] == \
        wire.NOT_GRANTED
    assert control_request(run, "grant", "notes")["ok"]
    kept = open_ok(broker, "notes")
    try:
        assert control_request(run, "revoke", "notes")["ok"]
        after = refused(broker, {"v": 1, "op": "open", "dataset": "notes"})
        assert after is not None and after["error"] == wire.NOT_GRANTED
        assert os.pread(kept, 100, 0) == SALES  # B13: a passed fd stays readable
    finally:
        os.close(kept)
    not_allowed = control_request(run, "grant", "hr")
    assert not not_allowed["ok"] and "not allowed by this kernel's profile" in \
        not_allowed["message"]
    assert not control_request(run, "revoke", "nosuch")["ok"]
    assert control_request(run, "grants")["granted"] == ["leak", "pipe", "sales", "weather"]
    events = [(e, f["dataset"], f["decision"]) for e, f in audit if e.startswith("broker.g")
              or e == "broker.revoke"]
    assert events == [("broker.grant", "notes", "done"), ("broker.revoke", "notes", "done"),
                      ("broker.grant", "hr", "refused"), ("broker.revoke", "nosuch", "refused")]


def test_find_kernel_by_prefix(tmp_path: Path) -> None:
    from cellblock.rundir import RunDir, WardenRecord

    def make(slot: str, kernel_id: str, control: bool = True) -> None:
        (tmp_path / slot).mkdir()
        if control:
            (tmp_path / slot / "control.sock").touch()
        RunDir(tmp_path, slot).write_record(WardenRecord(
            kernel_id=kernel_id, profile="agent", warden_pid=1, jail_uid=1,
            cgroup_version=None, cgroup_parent="cellblock", started=0.0, client_ports={},
            slot=slot))

    for kid in ("abc123", "abd456", "zzz"):
        make(kid, kid)
    make("pool-77aa", "qqq789")  # adopted from the warm pool: found by its kernel id
    make("abx", "abx", control=False)  # no control socket: not a running kernel
    (tmp_path / "abz").mkdir()  # no record: not a kernel
    (tmp_path / "abz" / "control.sock").touch()
    assert find_kernel("abc", tmp_path) == tmp_path / "abc123"
    assert find_kernel("zzz", tmp_path) == tmp_path / "zzz"
    assert find_kernel("qqq", tmp_path) == tmp_path / "pool-77aa"
    with pytest.raises(PolicyError, match="ambiguous: abc123, abd456"):
        find_kernel("ab", tmp_path)
    for bad in ("abx", "abz", "pool-77aa", "nope", "", "../x"):
        with pytest.raises(PolicyError):
            find_kernel(bad, tmp_path)


# -- audit ----------------------------------------------------------------------------------

def test_every_request_is_audited_without_contents(broker: Broker, audit: Audit) -> None:
    os.close(open_ok(broker, "sales"))
    refused(broker, {"v": 1, "op": "open", "dataset": "hr"})
    refused(broker, {"v": 1, "op": "open", "dataset": "leak"})
    refused(broker, b"\xff\xff\xff\xff")
    opens = audit.events("broker.open")
    assert [(f["dataset"], f["decision"], f["reason"]) for f in opens] == [
        ("sales", "granted", "granted"), ("hr", "refused", "not granted"),
        ("leak", "refused", "ELOOP"), (None, "refused", wire.TOO_LARGE)]
    assert all(f["peer_pid"] == os.getpid() for f in opens)
    assert "day,amount" not in json.dumps(list(audit))


def test_close_is_idempotent_and_releases_everything(tree: Path, audit: Audit) -> None:
    before = len(os.listdir("/proc/self/fd"))
    broker = make_broker(tree, audit)
    still_serves(broker)
    broker.close()
    broker.close()
    assert len(os.listdir("/proc/self/fd")) == before
    assert broker._thread is not None and not broker._thread.is_alive()
