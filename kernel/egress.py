"""The jail's end of the egress proxy: a loopback forwarder, and ``%pip``'s words.

When the kernel's profile allows network, the warden sets ``CELLBLOCK_EGRESS`` to
``<unix socket>:<port>`` and ``HTTP(S)_PROXY`` to ``http://127.0.0.1:<port>``. This
forwarder listens on that loopback port (the jail's network namespace has ``lo`` only) and
copies each connection to the warden's unix socket, byte for byte. It enforces nothing:
everything in the jail is hostile, and the proxy behind the socket decides.

``%pip`` runs pip through pipes; without network it says so instead of letting pip fail
on a missing resolver.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

__all__ = ["EGRESS_ENV", "NO_NETWORK", "Forwarder", "install_pip_magic", "start_from_env"]

EGRESS_ENV = "CELLBLOCK_EGRESS"
CHUNK = 64 * 1024
NO_NETWORK = ("cellblock: this kernel has no network: its profile's [profiles.NAME.network] "
              "allow list is empty, so pip cannot reach a package index. Ask the operator "
              "for a profile that allows the index (docs/network.md).")


def _copy(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(CHUNK)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for sock, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
            try:
                sock.shutdown(how)
            except OSError:
                pass


class Forwarder:
    """127.0.0.1:``port`` to the unix socket ``path``, two threads a connection."""

    def __init__(self, path: str, port: int) -> None:
        self.path = path
        self.listener = socket.create_server(("127.0.0.1", port), backlog=64)

    def serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(client,), daemon=True).start()

    def _one(self, client: socket.socket) -> None:
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.connect(self.path)
        except OSError:
            client.close()
            upstream.close()
            return
        back = threading.Thread(target=_copy, args=(upstream, client), daemon=True)
        back.start()
        _copy(client, upstream)
        back.join()
        client.close()
        upstream.close()


def start_from_env(env: dict[str, str] | None = None) -> Forwarder | None:
    """Start the forwarder ``$CELLBLOCK_EGRESS`` names (None without network)."""
    spec = (os.environ if env is None else env).get(EGRESS_ENV, "")
    if not spec:
        return None
    path, _, port = spec.rpartition(":")
    forwarder = Forwarder(path, int(port))
    threading.Thread(target=forwarder.serve, name="cellblock-egress", daemon=True).start()
    target = os.environ.get("PIP_TARGET")
    if target:  # on sys.path from the start (PYTHONPATH): made now, so imports see it
        os.makedirs(target, exist_ok=True)
    return forwarder


def install_pip_magic(shell: Any) -> None:
    """``%pip``: without network it prints :data:`NO_NETWORK` on stderr and runs nothing;
    with network it runs ``python -m pip`` through pipes (IPython's own ``%pip`` needs a
    pty, and the jail has none), its output streamed into the cell."""
    import importlib
    import shlex
    import subprocess
    import sys

    def pip(line: str = "") -> None:
        if not os.environ.get(EGRESS_ENV):
            print(NO_NETWORK, file=sys.stderr)
            return
        proc = subprocess.Popen([sys.executable, "-m", "pip", *shlex.split(line)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, text=True, errors="replace")
        assert proc.stdout is not None
        for out in proc.stdout:
            print(out, end="", flush=True)
        if proc.wait():
            print(f"cellblock: pip exited with status {proc.returncode}", file=sys.stderr)
        importlib.invalidate_caches()  # what pip just installed is importable at once

    shell.register_magic_function(pip, "line", "pip")
