"""Addresses the proxy never connects to, whatever name led there.

Checked on every address a name resolved to, after resolution (a public name that
resolves to 127.0.0.1 is the rebinding attack), and on IP literals. IPv4-mapped,
IPv4-compatible, IPv4-translated, 6to4, NAT64 and Teredo IPv6 addresses are checked as the
IPv4 address they carry as well; a local-use NAT64 prefix is refused whole. An address of
the host itself (a public address on one of its interfaces, where services bound to 0.0.0.0
answer) is refused too (:func:`host_owns`).
"""

from __future__ import annotations

import errno
import ipaddress
import socket

__all__ = ["FORBIDDEN", "forbidden_reason", "host_owns"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: (network, why) — the why goes into the audit event and the refusal
FORBIDDEN: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.ip_network(net), why) for net, why in (
        ("0.0.0.0/8", "this-network (0.0.0.0/8)"),
        ("10.0.0.0/8", "private (10/8)"),
        ("100.64.0.0/10", "carrier-grade NAT (100.64/10)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.169.254/32", "cloud metadata"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private (172.16/12)"),
        ("192.0.0.0/24", "IETF protocol assignments"),
        ("192.168.0.0/16", "private (192.168/16)"),
        ("198.18.0.0/15", "benchmarking (198.18/15)"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved (240/4)"),
        ("255.255.255.255/32", "broadcast"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("fd00:ec2::254/128", "cloud metadata"),
        ("fc00::/7", "unique local (fc00::/7)"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),
        ("ff00::/8", "multicast"),
        ("100::/64", "discard-only"),
        # RFC 8215: a network's own NAT64 prefix; where the IPv4 sits in it depends on the
        # operator's prefix length, and what it reaches is that network's IPv4 (in a
        # cluster: its metadata and private addresses). Refused whole (found from the jail)
        ("64:ff9b:1::/48", "local-use NAT64 (64:ff9b:1::/48)"),
    ))


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries, for the forms that reach it."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr.teredo is not None:
        return addr.teredo[1]
    packed = addr.packed
    if packed[:12] == bytes(12) and addr != ipaddress.IPv6Address("::1"):  # ::a.b.c.d
        return ipaddress.IPv4Address(packed[12:])
    if packed[:12] == bytes.fromhex("0064ff9b0000000000000000"):  # NAT64 64:ff9b::/96
        return ipaddress.IPv4Address(packed[12:])
    if packed[:12] == bytes.fromhex("0000000000000000ffff0000"):
        return ipaddress.IPv4Address(packed[12:])  # IPv4-translated ::ffff:0:a.b.c.d (SIIT)
    return None


def forbidden_reason(addr: IPAddress) -> str | None:
    """Why ``addr`` may not be connected to, or None if it may."""
    for net, why in FORBIDDEN:
        if addr.version == net.version and addr in net:
            return f"{why} address {addr}"
    if isinstance(addr, ipaddress.IPv6Address):
        inner = _embedded_ipv4(addr)
        if inner is not None:
            why4 = forbidden_reason(inner)
            if why4 is not None:
                return f"{why4} (inside {addr})"
    return None


def host_owns(addr: IPAddress) -> bool:
    """Whether ``addr`` is an address of this host: binding a socket to it succeeds only
    then (EADDRNOTAVAIL otherwise). With ``net.ipv4.ip_nonlocal_bind`` set every bind
    succeeds, and every address counts as the host's: the proxy then refuses everything,
    which is the safe failure."""
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((str(addr), 0))
        except OSError as exc:
            return exc.errno != errno.EADDRNOTAVAIL
    return True
