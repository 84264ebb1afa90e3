"""The file socket's wire: a client (Sandbox, CLI, MCP, REST) and a kernel's warden.

One request per connection on ``<run dir>/files.sock`` (mode 0600, the warden's uid; never
mounted in the jail)::

    request = JSON line: {"op": "upload", "name": N, "size": S}; once the warden answers
              {"ok": true, "send": S} (the caps allow it), S bytes of the file
            | {"op": "inbox"} | {"op": "outbox"} | {"op": "download", "name": N}
    reply   = JSON line: {"ok": true, ...[, "size": S, "body": true]} [+ S bytes]
            | {"ok": false, "code": CODE, "message": TEXT}

Both sides are on the host and trusted; the lines are still bounded, and a reply's body is
read to exactly its declared size.
"""

from __future__ import annotations

import json
import socket
from typing import Any

__all__ = ["CODES", "FILES_SOCKET", "MAX_LINE", "read_body", "read_json_line", "send_json"]

FILES_SOCKET = "files.sock"
MAX_LINE = 1 << 20
#: why a file was refused; REST maps each to an HTTP status
CODES = {
    "bad_name": 400, "bad_request": 400, "incomplete": 400, "disabled": 403,
    "not_found": 404, "not_regular": 422, "not_text": 422, "type": 415, "too_large": 413,
    "too_many": 409, "busy": 409, "not_running": 409, "no_outbox": 403, "refused": 403,
    "internal": 500,
}


def send_json(sock: socket.socket, obj: dict[str, Any]) -> None:
    sock.sendall(json.dumps(obj).encode() + b"\n")


def read_json_line(sock: socket.socket, pending: bytearray) -> dict[str, Any]:
    """One JSON object line from ``sock``; bytes after it stay in ``pending``."""
    while b"\n" not in pending:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the peer closed the socket before a full line")
        pending += chunk
        if len(pending) > MAX_LINE and b"\n" not in pending:
            raise ValueError(f"line longer than {MAX_LINE} bytes")
    line, _, rest = bytes(pending).partition(b"\n")
    pending[:] = rest
    obj = json.loads(line)
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    return obj


def read_body(sock: socket.socket, pending: bytearray, size: int,
              chunk: int = 1 << 16) -> Any:
    """Yield exactly ``size`` bytes: those in ``pending``, then from ``sock``."""
    left = size
    if pending:
        head = bytes(pending[:left])
        del pending[:left]
        left -= len(head)
        yield head
    while left > 0:
        data = sock.recv(min(chunk, left))
        if not data:
            raise ConnectionError(f"the peer closed the socket {left} bytes before the end")
        left -= len(data)
        yield data
