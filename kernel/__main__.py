"""Entry point inside the jail: ``python -m cellblock_kernel -f CONNECTION_FILE ...``.

The warden writes the connection file (ipc transport, the kernel's own HMAC key) and binds
the five sockets it names; the kernel connects to them (:mod:`cellblock_kernel.app`). The
warden passes ``--transport=ipc --ip=...`` as well, since ipykernel takes the transport
from its command line.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> None:
    """Start ipykernel with the given arguments (called by nsjail inside the jail)."""
    # Inside a pid namespace the launching process is invisible: with this set,
    # ipykernel's parent poller would see "no parent" and exit at once.
    os.environ.pop("JPY_PARENT_PID", None)
    os.umask(0o077)
    # No debugger: every cellblock kernelspec says "debugger": false and the gate never
    # forwards debug_request to an agent. Without debugpy (pydevd) the kernel has no debug
    # server inside the jail, boots ~0.1 s faster and holds ~8 MiB less (docs/benchmarks.md).
    sys.modules["debugpy"] = None  # type: ignore[assignment]
    # first: pip's target dir exists before any import caches its absence (see there)
    from cellblock_kernel.egress import start_from_env

    start_from_env()
    from cellblock_kernel.app import CellblockKernelApp

    CellblockKernelApp.launch_instance(argv=sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
