"""The remote kernel launcher protocol of Jupyter Enterprise Gateway and gateway_provisioners,
as cellblock's launcher (:mod:`cellblock.eg_launcher`) speaks it.

Enterprise Gateway 3 (its process proxies) and gateway_provisioners (its remote provisioners,
for Jupyter Server 2 and Kernel Gateway 3) start a kernel elsewhere (a pod, a container, a
host) by running a *launcher* there. Launcher version 1 (``kernel-launchers/shared/scripts/
server_listener.py`` in gateway_provisioners, ``launch_ipykernel.py`` in Enterprise Gateway):

1. The launcher gets ``--kernel-id``, ``--response-address IP:PORT``, ``--public-key``
   (the server's RSA public key, the PEM body without its header lines) and
   ``--port-range LOW..HIGH`` (``0..0``: any port), or the same as ``KERNEL_ID``,
   ``RESPONSE_ADDRESS``, ``PUBLIC_KEY``, ``PORT_RANGE`` in its environment (a container's
   launch passes them so).
2. It picks the kernel's five ports and a *comm port* and starts the kernel on them.
3. It connects to the response address, sends one payload and closes: base64 of the JSON
   ``{"version": 1, "key": b64(RSA-PKCS#1 v1.5(aes key)), "conn_info":
   b64(AES-128-ECB(PKCS#7(connection info JSON)))}``; the connection info is the kernel's
   connection file plus ``kernel_id``, ``comm_port``, ``pid`` and ``pgid``. The server
   replaces ``ip`` with the address it knows the pod by.
4. On the comm port each connection carries one JSON object: ``{"signum": N}`` (0 is a
   liveness poll, every few seconds) or ``{"shutdown": 1}``; the server closes its end
   when done sending.

This module is the pure part: parsing and checking the arguments (every bad value named),
the payload, and a comm request. Nothing here reads the network.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from .errors import PolicyError
from .names import check_kernel_id

__all__ = [
    "LAUNCHER_VERSION",
    "MAX_REQUEST",
    "LaunchArgs",
    "PortRange",
    "decrypt_payload",
    "encrypt_payload",
    "parse_request",
    "parse_response_address",
]

LAUNCHER_VERSION = 1
MAX_REQUEST = 4096  # a comm request is a few bytes of JSON; more is not one
MIN_RANGE = 1000  # gateway_provisioners' MIN_PORT_RANGE_SIZE default

_HOST = re.compile(r"[A-Za-z0-9.:_-]{1,253}")


@dataclass(frozen=True)
class PortRange:
    """``LOW..HIGH``; ``0..0`` lets the kernel take any free port."""

    low: int = 0
    high: int = 0

    @classmethod
    def parse(cls, text: str | None) -> PortRange:
        if not text or text in ("0..0", "{port_range}"):  # unset, or a placeholder left
            return cls()
        m = re.fullmatch(r"(\d{1,5})\.\.(\d{1,5})", text.strip())
        if not m:
            raise PolicyError(f"port range {text!r} is not LOW..HIGH (e.g. 40000..41000, "
                              "or 0..0 for any port)")
        low, high = int(m[1]), int(m[2])
        if not 1024 <= low < high <= 65535 or high - low < MIN_RANGE:
            raise PolicyError(f"port range {text!r}: need 1024 <= LOW < HIGH <= 65535 and at "
                              f"least {MIN_RANGE} ports (gateway_provisioners' minimum)")
        return cls(low, high)

    @property
    def any(self) -> bool:
        return self.low == 0 and self.high == 0


def parse_response_address(text: str) -> tuple[str, int]:
    """``IP:PORT`` (an IPv6 address in brackets) -> (host, port); PolicyError naming it."""
    host, sep, port = text.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not _HOST.fullmatch(host) or not port.isdigit() or not 0 < int(port) < 65536:
        raise PolicyError(f"response address {text!r} is not IP:PORT (the server's "
                          "--response-address, e.g. 10.0.0.5:8877)")
    return host, int(port)


def _public_key(text: str) -> Any:
    from Cryptodome.PublicKey import RSA

    try:
        key = RSA.import_key(base64.b64decode(text, validate=True))
    except (ValueError, IndexError, TypeError, binascii.Error):
        raise PolicyError("public key: not a base64 RSA public key (the server's "
                          "--public-key, the PEM body without its header lines)") from None
    if key.has_private() or key.size_in_bits() < 1024:
        raise PolicyError(f"public key: an RSA public key of at least 1024 bits is needed "
                          f"(got {key.size_in_bits()} bits"
                          f"{', and a private key' if key.has_private() else ''})")
    return key


@dataclass(frozen=True)
class LaunchArgs:
    """The launch as the server asked for it, checked."""

    kernel_id: str
    response_address: tuple[str, int]
    public_key: str
    port_range: PortRange

    @classmethod
    def check(cls, kernel_id: str | None, response_address: str | None,
              public_key: str | None, port_range: str | None) -> LaunchArgs:
        missing = [name for name, value in (("--kernel-id", kernel_id),
                                            ("--response-address", response_address),
                                            ("--public-key", public_key)) if not value]
        if missing:
            raise PolicyError(f"{', '.join(missing)} missing: the gateway passes them as "
                              "arguments, or KERNEL_ID, RESPONSE_ADDRESS and PUBLIC_KEY in "
                              "the environment")
        assert kernel_id and response_address and public_key  # for mypy
        check_kernel_id(kernel_id)
        _public_key(public_key)
        return cls(kernel_id, parse_response_address(response_address), public_key,
                   PortRange.parse(port_range))


def encrypt_payload(info: dict[str, Any], public_key: str) -> bytes:
    """The response payload (launcher version 1) carrying ``info``."""
    from Cryptodome.Cipher import AES, PKCS1_v1_5
    from Cryptodome.Random import get_random_bytes
    from Cryptodome.Util.Padding import pad

    aes_key = get_random_bytes(16)
    # AES-ECB is the protocol's (server_listener.py); the payload is one connection file.
    body = AES.new(aes_key, AES.MODE_ECB).encrypt(pad(json.dumps(info).encode(), 16))
    wrapped = PKCS1_v1_5.new(_public_key(public_key)).encrypt(aes_key)
    payload = {"version": LAUNCHER_VERSION, "key": base64.b64encode(wrapped).decode(),
               "conn_info": base64.b64encode(body).decode()}
    return base64.b64encode(json.dumps(payload).encode())


def decrypt_payload(data: bytes, private_key: Any) -> dict[str, Any]:
    """What the server does with a payload (for tests and the kube play script)."""
    from Cryptodome.Cipher import AES, PKCS1_v1_5
    from Cryptodome.Util.Padding import unpad

    payload = json.loads(base64.b64decode(data))
    if payload.get("version") != LAUNCHER_VERSION:
        raise ValueError(f"payload version {payload.get('version')!r}, expected 1")
    aes_key = PKCS1_v1_5.new(private_key).decrypt(base64.b64decode(payload["key"]), None)
    if aes_key is None:
        raise ValueError("the payload's key does not decrypt with this private key")
    body = AES.new(aes_key, AES.MODE_ECB).decrypt(base64.b64decode(payload["conn_info"]))
    info: dict[str, Any] = json.loads(unpad(body, 16))
    return info


def parse_request(data: bytes) -> tuple[int | None, bool]:
    """A comm port request -> (signal number or None, shutdown asked). ValueError if it is
    not one (the caller logs its size, never its text)."""
    if len(data) > MAX_REQUEST:
        raise ValueError(f"a comm request of {len(data)} bytes (at most {MAX_REQUEST})")
    request = json.loads(data)
    if not isinstance(request, dict) or not set(request) <= {"signum", "shutdown"}:
        raise ValueError("a comm request is an object with 'signum' and/or 'shutdown'")
    signum = request.get("signum")
    if signum is not None and (isinstance(signum, bool) or not isinstance(signum, int)
                               or not 0 <= signum < 65):
        raise ValueError(f"signum {signum!r} is not a signal number 0-64")
    return signum, bool(request.get("shutdown"))
