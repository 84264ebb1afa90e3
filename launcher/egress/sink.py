"""The jail's network sink: what the jail sends past the proxy, seen and audited by the host.

Who calls it: the warden, once per jail, after the kernel answered and before any cell
runs (:meth:`cellblock.warden.warden.Warden._open_sink`); it closes the sink with the jail.

Why. The jail has its own network namespace with loopback only, so nothing it sends leaves
the machine. But a packet with no route never becomes a packet: a raw UDP packet or a DNS
query failed inside the jail (``ENETUNREACH``, a resolver error) and the host never knew.
So the warden makes every address local in that namespace for UDP, and only for UDP
(``ip rule add ipproto udp lookup 203``; ``ip route add local 0.0.0.0/0 dev lo src
127.0.0.1 table 203``, and ``::/0``). A datagram to any address is then delivered to the
jail's own loopback, where nothing listens (the sender gets no answer, as from a host that
drops it), and two raw UDP sockets that the warden holds in that namespace get a copy.
Each copy is one ``net.denied`` audit event with its reason; a DNS query (port 53) is
decoded to its name and type. TCP keeps the main table, with no route: a connection to any
address fails with ``ENETUNREACH`` as before, and is not audited here.

How. The jail's first process is named for sure (:func:`cellblock.jailproc.jail_proc_dir`),
its ``ns/user`` and ``ns/net`` are opened, and a forked helper enters them (``setns``: it
then has the capabilities of the namespace's owner, which is this warden's user), adds the
rule and the route over netlink, opens the raw sockets, passes them back over a socketpair and
exits. The helper runs only this module's code; it reads nothing from the jail. It enters
the jail's user namespace first, and the sink refuses a jail that shares the host's own
network or user namespace: routes there would steer the host.

What the jail controls here: every byte of the datagrams, and their rate. Datagrams are
parsed with bounds; names are escaped to printable ASCII; at most :data:`MAX_EVENTS` events
are written one by one, the rest only counted (``net.denied_count`` at close). The one
reader thread reads at most :data:`READS_PER_SECOND` datagrams a second, so a flood costs
the warden (whose CPU is not the jail's cgroup's) a bounded share of a core, however fast
the jail sends: the rest fills the sockets' receive buffers, the kernel drops it and the
sink counts what it dropped. Datagrams between the jail's own loopback addresses
(127.0.0.0/8, ::1) are the jail's own business and are skipped, except DNS.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from ..jailproc import jail_proc_dir

__all__ = ["MAX_EVENTS", "NetSink", "SinkUnavailable", "describe", "dns_question"]

log = logging.getLogger("cellblock.warden")

MAX_EVENTS = 200  #: net.denied events the sink writes one by one; later ones only counted
#: datagrams the sink reads per second at most: a faster sender's excess waits in the
#: sockets' buffers, where the kernel drops it (counted: ``dropped`` of net.denied_count)
READS_PER_SECOND = 2000
SO_MEMINFO = 55  # socket.h: a socket's memory counters; SK_MEMINFO_DROPS is the ninth
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
HELPER_TIMEOUT = 10.0  # seconds the forked helper may take to hand over its sockets
RECV = 65536 + 128

# netlink (linux/netlink.h, linux/rtnetlink.h)
NLMSG_ERROR = 2
RTM_NEWROUTE = 24
RTM_NEWRULE = 32
FR_ACT_TO_TBL = 1
FRA_PRIORITY = 6
FRA_IP_PROTO = 22  # linux/fib_rules.h, Linux 4.17+
SINK_TABLE = 203  # a routing table of the jail's own namespace, for UDP only
SINK_RULE_PRIORITY = 100  # after the local table's rule (0), before main's (32766)
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
RTPROT_STATIC = 4
RT_SCOPE_HOST = 254
RTN_LOCAL = 2
RTA_OIF = 4
RTA_PREFSRC = 7
LOOPBACK_IFINDEX = 1  # lo is always interface 1 in a new network namespace

DNS_TYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT",
             28: "AAAA", 33: "SRV", 65: "HTTPS", 255: "ANY"}

Audit = Callable[..., Any]

_libc = ctypes.CDLL(None, use_errno=True)


class SinkUnavailable(Exception):
    """The sink could not be set up (the jail is gone, or this host refuses the namespace
    entry); the jail is as closed as before, only its attempts go unaudited."""


def _printable(raw: bytes, limit: int = 253) -> str:
    out = []
    for b in raw[:limit]:
        c = chr(b)
        out.append(c if c.isascii() and (c.isalnum() or c in "-_.*") else f"\\x{b:02x}")
    return "".join(out)


def dns_question(payload: bytes) -> tuple[str, str] | None:
    """The first question of a DNS query (name, type), or None if ``payload`` is not one.
    Bounded: at most 128 labels of at most 63 bytes; a compression pointer ends it."""
    if len(payload) < 17 or payload[2] & 0x80:  # too short, or a response (QR set)
        return None
    qdcount = struct.unpack_from("!H", payload, 4)[0]
    if qdcount == 0:
        return None
    labels: list[str] = []
    i = 12
    for _ in range(128):
        if i >= len(payload):
            return None
        n = payload[i]
        if n == 0:
            i += 1
            break
        if n > 63 or i + 1 + n > len(payload):
            return None
        labels.append(_printable(payload[i + 1:i + 1 + n], 63))
        i += 1 + n
    else:
        return None
    if i + 2 > len(payload):
        return None
    qtype = struct.unpack_from("!H", payload, i)[0]
    return ".".join(labels)[:253] or ".", DNS_TYPES.get(qtype, str(qtype))


def describe(address: str, port: int, payload: bytes) -> dict[str, Any] | None:
    """The audit fields of one datagram from the jail to ``address``:``port`` (None: one
    between the jail's own loopback addresses, not a network attempt)."""
    ip = ipaddress.ip_address(address)
    question = dns_question(payload) if port == 53 else None
    if question is not None:
        name, qtype = question
        return {"verdict": "denied", "via": "dns", "host": name, "query_type": qtype,
                "address": address, "port": port, "bytes": len(payload),
                "reason": f"a DNS query from the jail ({name} {qtype}): the jail has no "
                          "resolver; the egress proxy resolves the hosts a profile allows"}
    if ip.is_loopback:
        return None
    return {"verdict": "denied", "via": "udp", "host": "", "address": address, "port": port,
            "bytes": len(payload),
            "reason": f"a UDP packet from the jail to {address} port {port}: the jail has "
                      "no network but the egress proxy (HTTP and HTTPS, allowed hosts)"}


def _netlink(kind: int, body: bytes) -> None:
    """Send one netlink route request in the current network namespace; raise its error."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0) as nl:
        nl.bind((0, 0))
        flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        nl.send(struct.pack("IHHII", 16 + len(body), kind, flags, 1, 0) + body)
        reply = nl.recv(4096)
        if len(reply) >= 20 and struct.unpack_from("H", reply, 4)[0] == NLMSG_ERROR:
            code = -struct.unpack_from("i", reply, 16)[0]
            if code not in (0, errno.EEXIST):
                raise OSError(code, f"netlink request {kind}: {os.strerror(code)}")


def _route_udp_to_loopback(family: int) -> None:
    """Make every address local for UDP, and only for UDP: ``ip rule add ipproto udp
    lookup 203`` and ``ip route add local <any>/0 dev lo src <loopback> table 203``. The
    source is the loopback address (a datagram's replies and ICMP errors come back through
    the local table, and a connected socket's source must be an address of the local
    table). TCP keeps the main table, where there is no route: a connection to any address
    still fails with ENETUNREACH, as it always did."""
    loop = socket.inet_pton(family, "127.0.0.1" if family == socket.AF_INET else "::1")
    _netlink(RTM_NEWROUTE, struct.pack("BBBBBBBBI", family, 0, 0, 0, SINK_TABLE,
                                       RTPROT_STATIC, RT_SCOPE_HOST, RTN_LOCAL, 0)
             + struct.pack("HHi", 8, RTA_OIF, LOOPBACK_IFINDEX)
             + struct.pack("HH", 4 + len(loop), RTA_PREFSRC) + loop)
    _netlink(RTM_NEWRULE, struct.pack("BBBBBBBBI", family, 0, 0, 0, SINK_TABLE, 0, 0,
                                      FR_ACT_TO_TBL, 0)
             + struct.pack("HHI", 8, FRA_PRIORITY, SINK_RULE_PRIORITY)
             + struct.pack("HHBxxx", 5, FRA_IP_PROTO, socket.IPPROTO_UDP))


def _helper(user_fd: int, net_fd: int, chan: socket.socket) -> None:
    """In the forked helper: enter the jail's namespaces, route, open, hand over. Never
    returns."""
    code = 1
    try:
        for fd, kind in ((user_fd, CLONE_NEWUSER), (net_fd, CLONE_NEWNET)):
            if _libc.setns(fd, kind) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns: {os.strerror(err)}")
        _route_udp_to_loopback(socket.AF_INET)
        socks = [socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)]
        try:
            _route_udp_to_loopback(socket.AF_INET6)
            v6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_UDP)
            v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            socks.append(v6)
        except OSError:
            pass  # no IPv6 in the jail: it has no route there at all, as before
        socket.send_fds(chan, [b"ok"], [s.fileno() for s in socks])
        code = 0
    except BaseException as exc:  # the warden reports it; the helper only exits
        with contextlib.suppress(BaseException):
            chan.send(b"error " + str(exc).encode("utf-8", "replace")[:300])
    finally:
        os._exit(code)


class NetSink:
    """The raw sockets in one jail's network namespace and the thread that audits what
    arrives on them. :meth:`open` it; :meth:`close` is idempotent."""

    def __init__(self, socks: list[socket.socket], audit: Audit) -> None:
        self.socks = socks
        self.audit = audit
        self.seen = 0  #: datagrams from the jail that were network attempts
        self.dropped = 0  #: datagrams the kernel dropped unread (known at close)
        self.throttled = threading.Event()  #: set while the sink waits out its read budget
        self._wake_r, self._wake_w = os.pipe()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="net-sink", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, nsjail_pid: int, nsjail_pidfd: int, audit: Audit) -> NetSink:
        """Set up the sink for nsjail ``nsjail_pid``'s jail. Raises SinkUnavailable."""
        proc = jail_proc_dir(nsjail_pid, nsjail_pidfd)
        if proc is None:
            raise SinkUnavailable("the kernel's jail is not running")
        try:
            user_fd = os.open("ns/user", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc)
            try:
                net_fd = os.open("ns/net", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc)
            except OSError:
                os.close(user_fd)
                raise
        except OSError as exc:
            raise SinkUnavailable(f"cannot open the jail's namespaces: {exc}") from None
        finally:
            os.close(proc)
        # Never the host's own: routes added there would steer the host's traffic. (The
        # helper enters the jail's user namespace first, so it would lack the rights
        # anyway; this says why, before anything is tried.)
        for fd, own in ((net_fd, "/proc/self/ns/net"), (user_fd, "/proc/self/ns/user")):
            st, mine = os.fstat(fd), os.stat(own)
            if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                os.close(user_fd)
                os.close(net_fd)
                kind = own.rsplit("/", 1)[1]
                raise SinkUnavailable(f"the jail shares this host's {kind} namespace "
                                      "(its nsjail config has no clone_new" + kind + ")")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the helper; it exits in _helper
                ours.close()
                _helper(user_fd, net_fd, theirs)
            theirs.close()
            try:
                ready, _, _ = select.select([ours], [], [], HELPER_TIMEOUT)
                if not ready:
                    os.kill(pid, 9)
                    raise SinkUnavailable("the namespace helper did not answer")
                msg, fds, _, _ = socket.recv_fds(ours, 512, 2)
            finally:
                os.waitpid(pid, 0)
        finally:
            ours.close()
            with contextlib.suppress(OSError):
                theirs.close()
            os.close(user_fd)
            os.close(net_fd)
        if msg != b"ok" or not fds:
            for fd in fds:
                os.close(fd)
            raise SinkUnavailable(msg.decode("utf-8", "replace").removeprefix("error ")
                                  or "the namespace helper failed")
        socks = [socket.socket(fileno=fd) for fd in fds]
        for s in socks:
            s.setblocking(False)
        return cls(socks, audit)

    def _serve(self) -> None:
        window, reads = time.monotonic(), 0
        try:
            while not self._closed:
                now = time.monotonic()
                if now >= window + 1:
                    window, reads = now, 0
                ready: list[Any]
                if reads >= READS_PER_SECOND:  # the jail's excess waits, then is dropped
                    self.throttled.set()
                    ready, _, _ = select.select([self._wake_r], [], [], window + 1 - now)
                    self.throttled.clear()
                else:
                    ready, _, _ = select.select([*self.socks, self._wake_r], [], [])
                if self._wake_r in ready:  # closing: what already arrived is still audited
                    for s in self.socks:
                        self._drain(s)
                    return
                for s in self.socks:
                    if s in ready:
                        reads += self._drain(s, READS_PER_SECOND - reads)
        except (OSError, ValueError):  # closed under us
            return

    def _drain(self, s: socket.socket, limit: int = 256) -> int:
        """Read and audit what waits on ``s``, at most ``limit`` (and 256) datagrams; how
        many were read."""
        space = socket.CMSG_SPACE(20)
        limit = max(0, min(limit, 256))
        for n in range(limit):  # then back to select: close() is noticed under a flood
            try:
                data, anc, _, _ = s.recvmsg(RECV, space)
            except (BlockingIOError, InterruptedError):
                return n
            fields = self._v4(data) if s.family == socket.AF_INET else self._v6(data, anc)
            if fields is not None:
                self._report(fields)
        return limit

    @staticmethod
    def _v4(data: bytes) -> dict[str, Any] | None:
        if len(data) < 20 or data[0] >> 4 != 4:
            return None
        ihl = (data[0] & 0x0F) * 4
        if ihl < 20 or len(data) < ihl + 8:
            return None
        dst = socket.inet_ntop(socket.AF_INET, data[16:20])
        port = struct.unpack_from("!H", data, ihl + 2)[0]
        return describe(dst, port, data[ihl + 8:])

    @staticmethod
    def _v6(data: bytes, anc: list[tuple[int, int, bytes]]) -> dict[str, Any] | None:
        if len(data) < 8:
            return None
        dst = None
        for level, kind, value in anc:
            if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and \
                    len(value) >= 16:
                dst = socket.inet_ntop(socket.AF_INET6, value[:16])
        if dst is None:
            return None
        port = struct.unpack_from("!H", data, 2)[0]
        return describe(dst, port, data[8:])

    def _report(self, fields: dict[str, Any]) -> None:
        self.seen += 1
        if self.seen <= MAX_EVENTS:
            with contextlib.suppress(Exception):
                self.audit("net.denied", **fields)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self._thread.join(5)
        for s in self.socks:
            with contextlib.suppress(OSError, struct.error):
                self.dropped += struct.unpack_from(
                    "9I", s.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 36))[8]
            s.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        dropped = self.dropped
        if self.seen > MAX_EVENTS or dropped:
            with contextlib.suppress(Exception):
                self.audit("net.denied_count", denied=self.seen,
                           not_written=max(0, self.seen - MAX_EVENTS), dropped=dropped,
                           via="sink")
