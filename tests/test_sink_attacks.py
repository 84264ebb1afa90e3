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

from cellblock.egress import sink as sink_mod
from cellblock.egress.sink import NetSink

from conftest import wait_for


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
