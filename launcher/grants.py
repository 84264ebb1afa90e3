"""The operator's side of the broker's control socket: ``cellblock grant`` and ``revoke``.

Who calls it: the CLI (:func:`operator_request`) and tests (:func:`control_request`,
:func:`find_kernel`). The socket is ``<run dir>/control.sock`` (mode 0600, never mounted in
the jail); the wire format is the broker's (``cellblock_kernel.datasets``).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from cellblock_kernel import datasets as wire

from .broker import CONTROL_SOCKET
from .errors import PolicyError
from .names import KERNEL_ID

__all__ = ["control_request", "find_kernel", "operator_request"]


def control_request(run_path: Path, op: str, dataset: str | None = None,
                    timeout: float = 15.0) -> dict[str, Any]:
    """Send one control request to a running kernel's broker (``cellblock grant``)."""
    req: dict[str, Any] = {"v": 1, "op": op}
    if dataset is not None:
        req["dataset"] = dataset
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(run_path / CONTROL_SOCKET))
        sock.sendall(wire.encode_frame(req, 4096))
        header = _recv_exact(sock, wire.HEADER.size)
        body = _recv_exact(sock, wire.decode_frame_length(header, wire.MAX_REPLY_BYTES))
    return wire.parse_reply(body)


def find_kernel(prefix: str, base: Path | None = None) -> Path:
    """The run dir of the running kernel whose id is ``prefix`` or starts with it (ids come
    from each run dir's ``warden.json``: a kernel adopted from the warm pool keeps the run
    dir it was started in)."""
    from .rundir import RunDir, runtime_base

    base = runtime_base() if base is None else base
    if not prefix or "/" in prefix or prefix.startswith("."):
        raise PolicyError(f"kernel {prefix!r}: give a kernel id or a unique prefix of one")
    ids: dict[str, Path] = {}
    for entry in sorted(base.iterdir()) if base.is_dir() else []:
        if not KERNEL_ID.fullmatch(entry.name):
            continue  # not a run dir (nothing else belongs here, but never fail on it)
        record = RunDir(base, entry.name).read_record()
        if record is not None and (entry / CONTROL_SOCKET).exists():
            ids[record.kernel_id] = entry
    matches = [k for k in ids if k == prefix] or [k for k in ids if k.startswith(prefix)]
    if not matches:
        raise PolicyError(f"no running kernel with id {prefix!r} under {base} (is "
                          f"$CELLBLOCK_RUNTIME_DIR the same as the kernel's?)")
    if len(matches) > 1:
        raise PolicyError(f"kernel id prefix {prefix!r} is ambiguous: {', '.join(matches)}")
    return ids[matches[0]]


def operator_request(kernel: str, op: str, dataset: str) -> str:
    """``cellblock grant|revoke KERNEL NAME``: the warden's answer, or PolicyError."""
    from .rundir import RunDir

    run = find_kernel(kernel)
    record = RunDir(run.parent, run.name).read_record()
    name = record.kernel_id if record is not None else run.name
    try:
        reply = control_request(run, op, dataset)
    except (OSError, wire.WireError) as exc:
        raise PolicyError(f"kernel {name}: cannot reach its warden: {exc}") from None
    if not reply.get("ok"):
        raise PolicyError(f"kernel {name}: {reply.get('message')}")
    return f"kernel {name}: {reply.get('message')}"


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the kernel's warden closed the control connection")
        buf += chunk
    return bytes(buf)
