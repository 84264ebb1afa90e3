"""The operator's side of the proxy's control socket: ``cellblock net lock KERNEL`` and
``Sandbox.lock_network()``. The socket is ``<run dir>/egress.ctl`` (mode 0600, the
warden's user, never mounted in the jail)."""

from __future__ import annotations

import socket

from ..errors import PolicyError

__all__ = ["lock_network"]

CONTROL_NAME = "egress.ctl"  # cellblock.egress.proxy.CONTROL_NAME


def lock_network(kernel: str, timeout: float = 10.0) -> str:
    """Close the allowlist of the running kernel ``kernel`` (an id or a unique prefix) and
    every connection it has open. Returns the warden's answer; PolicyError if the kernel
    is not running or its profile has no network."""
    from ..grants import find_kernel
    from ..rundir import RunDir

    run = find_kernel(kernel)
    record = RunDir(run.parent, run.name).read_record()
    name = record.kernel_id if record is not None else run.name
    path = run / CONTROL_NAME
    if not path.exists():
        raise PolicyError(f"kernel {name}: its profile has no network to lock")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(b"lock\n")
            reply = sock.recv(200).decode("ascii", "replace").strip()
    except OSError as exc:
        raise PolicyError(f"kernel {name}: cannot reach its warden: {exc}") from None
    if not reply.startswith("ok "):
        raise PolicyError(f"kernel {name}: {reply or 'no answer from the warden'}")
    return f"kernel {name}: {reply[3:]}"
