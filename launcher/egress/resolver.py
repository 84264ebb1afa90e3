"""The proxy's own name resolution: the jail has no resolver and no DNS leaves it.

:class:`SystemResolver` asks the host's resolver (``getaddrinfo``, in a thread). For tests,
``$CELLBLOCK_EGRESS_RESOLVER`` in the warden's environment names a JSON file read by
:class:`FileResolver`::

    {"names": {"pypi.test": ["203.0.113.10"], "evil.test": ["127.0.0.1"]},
     "routes": {"203.0.113.10": "127.0.0.1"}}

``names`` answers lookups (anything else: no such name); ``routes`` sends a connection
to an address that passed every check to another one (a loopback server standing in for
the internet). Only the warden's environment sets it, never the jail or the policy.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
from typing import Protocol

__all__ = ["RESOLVER_ENV", "FileResolver", "Resolver", "SystemResolver", "resolver_from_env"]

RESOLVER_ENV = "CELLBLOCK_EGRESS_RESOLVER"
MAX_ADDRESSES = 16  # a name's addresses beyond these are not looked at (nor connected to)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Resolver(Protocol):
    """Resolves a normalised host name; raises OSError if it cannot."""

    async def resolve(self, host: str, port: int) -> list[IPAddress]: ...

    def route(self, addr: IPAddress) -> IPAddress:
        """Where a connection to a checked ``addr`` really goes (itself, but in tests)."""
        ...


class SystemResolver:
    """The host's resolver."""

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       proto=socket.IPPROTO_TCP)
        out: list[IPAddress] = []
        for _family, _type, _proto, _name, sockaddr in infos:
            addr = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
            if addr not in out:
                out.append(addr)
        return out[:MAX_ADDRESSES]

    def route(self, addr: IPAddress) -> IPAddress:
        return addr


class FileResolver:
    """A fixed table (tests; see the module docstring)."""

    def __init__(self, names: dict[str, list[str]], routes: dict[str, str]) -> None:
        self.names = {k: [ipaddress.ip_address(a) for a in v] for k, v in names.items()}
        self.routes = {ipaddress.ip_address(k): ipaddress.ip_address(v)
                       for k, v in routes.items()}

    @classmethod
    def load(cls, path: str) -> FileResolver:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return cls(dict(data.get("names", {})), dict(data.get("routes", {})))

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        found = self.names.get(host)
        if not found:
            raise OSError(f"no such name {host!r}")
        return found[:MAX_ADDRESSES]

    def route(self, addr: IPAddress) -> IPAddress:
        return self.routes.get(addr, addr)


def resolver_from_env(env: dict[str, str] | None = None) -> Resolver:
    """The test file of ``$CELLBLOCK_EGRESS_RESOLVER`` if set, else the host's resolver."""
    path = (os.environ if env is None else env).get(RESOLVER_ENV)
    return FileResolver.load(path) if path else SystemResolver()
