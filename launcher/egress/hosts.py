"""Host names and the allowlist: parse, normalise, match.

A rule is ``HOST``, ``HOST:PORT``, ``*.DOMAIN`` or ``*.DOMAIN:PORT``; HOST may be an IP
literal (IPv6 in brackets). Without a port a rule allows 80 and 443 only. Names are
compared after :func:`normalise_host`: lower case, no trailing dot, IDNA (punycode), and
only letters, digits, ``-`` and ``.`` in the result, so ``PyPI.org.``, ``pypi.org`` and
their unicode lookalikes either compare equal or are refused. ``*.example.com`` matches
``a.example.com`` and ``a.b.example.com``, never ``example.com`` itself.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

__all__ = ["DEFAULT_PORTS", "AllowRule", "HostError", "match", "normalise_host", "parse_rule",
           "split_authority"]

DEFAULT_PORTS = (80, 443)
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
MAX_HOST = 253

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class HostError(ValueError):
    """A host, port or rule that cannot be used; the message names it."""


def ip_literal(host: str) -> IPAddress | None:
    """The address if ``host`` is an IP literal (IPv6 without brackets), else None.
    Only the canonical dotted quad counts as IPv4; the other forms ``inet_aton`` takes
    (``127.1``, ``0x7f.0.0.1``, ``2130706433``) are refused by :func:`normalise_host`."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def normalise_host(raw: str) -> str:
    """The comparable form of a host name or IP literal (see the module docstring).
    Raises HostError naming the value."""
    host = raw
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        addr = ip_literal(host)
        if not isinstance(addr, ipaddress.IPv6Address) or "%" in host:
            raise HostError(f"host {raw!r}: brackets hold an IPv6 address (no zone)")
        return str(addr)
    addr = ip_literal(host)
    if addr is not None:
        if "%" in host:
            raise HostError(f"host {raw!r}: a zoned IPv6 address")
        return str(addr)
    if not host or len(host) > MAX_HOST + 1:
        raise HostError(f"host {raw!r}: empty or longer than {MAX_HOST} characters")
    if host.endswith("."):
        host = host[:-1]
    try:
        ascii_host = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise HostError(f"host {raw!r} is not a valid (IDNA) host name") from None
    labels = ascii_host.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels) or len(ascii_host) > MAX_HOST:
        raise HostError(f"host {raw!r}: only letters, digits, '-' and '.' are allowed")
    if labels[-1].isdigit() or re.fullmatch(r"0x[0-9a-f]*", labels[-1]):
        raise HostError(f"host {raw!r} looks like a numeric address; write it as a.b.c.d")
    return ascii_host


def _port(text: str, raw: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise HostError(f"port {text!r} in {raw!r}: a number from 1 to 65535")
    return int(text)


def split_authority(raw: str, default_port: int | None = None) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) from a CONNECT target or a URL authority, normalised.
    No userinfo (``user@host``): refused, since the part before ``@`` is the one a reader
    takes for the host. Raises HostError."""
    if any(c in raw for c in "@/\\?#% \t\r\n"):
        raise HostError(f"authority {raw!r}: only host:port (no userinfo, path or spaces)")
    if raw.startswith("["):
        end = raw.find("]")
        if end < 0:
            raise HostError(f"authority {raw!r}: an unclosed '['")
        host, rest = raw[:end + 1], raw[end + 1:]
        if rest and not rest.startswith(":"):
            raise HostError(f"authority {raw!r}: ':' must follow ']'")
        port_text = rest[1:] if rest else None
    elif raw.count(":") == 1:
        host, port_text = raw.split(":")
    elif ":" in raw:
        raise HostError(f"authority {raw!r}: an IPv6 address needs brackets")
    else:
        host, port_text = raw, None
    if port_text is None:
        if default_port is None:
            raise HostError(f"authority {raw!r} names no port")
        return normalise_host(host), default_port
    return normalise_host(host), _port(port_text, raw)


@dataclass(frozen=True)
class AllowRule:
    """One allowlist entry: a host (or ``*.`` suffix) and the ports it allows."""

    host: str  # normalised; for a wildcard, the suffix without "*."
    wildcard: bool
    ports: tuple[int, ...]

    def allows(self, host: str, port: int) -> bool:
        """``host`` must be normalised already (:func:`normalise_host`)."""
        if port not in self.ports:
            return False
        if self.wildcard:
            return host.endswith("." + self.host) and ip_literal(host) is None
        return host == self.host


def parse_rule(raw: str) -> AllowRule:
    """An allowlist entry from the policy. Raises HostError naming it."""
    text = raw.strip()
    wildcard = text.startswith("*.")
    if wildcard:
        text = text[2:]
    if "*" in text:
        raise HostError(f"allow entry {raw!r}: '*' only as a whole first label ('*.example.com')")
    host, port = split_authority(text, default_port=0)
    if wildcard and (ip_literal(host) is not None or "." not in host):
        raise HostError(f"allow entry {raw!r}: a wildcard needs a domain of two labels or more")
    return AllowRule(host=host, wildcard=wildcard, ports=DEFAULT_PORTS if port == 0 else (port,))


def match(rules: tuple[AllowRule, ...], host: str, port: int) -> bool:
    """Whether any rule allows the normalised ``host`` on ``port``."""
    return any(rule.allows(host, port) for rule in rules)
