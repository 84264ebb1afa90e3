"""The life of one warden process, from the spawner's ``fork()`` to its exit.

Called by :mod:`cellblock.warden.spawner` in the forked child (:func:`run_forked`); never by
people. It caps the process (address space, no core file), names it in ``ps``, catches
the stop signals, runs the :class:`~cellblock.warden.warden.Warden` (cold, or pooled and then
adopted), reports ready or the error on the launch's socket, and always cleans up.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import select
import signal
import socket
from typing import Any

from ..errors import CellblockError
from ..policy import Policy
from .channel import LineBuffer, recv_fds
from .process import STOP_SIGNALS, set_title
from .request import LaunchRequest
from .warden import Warden

__all__ = ["WARDEN_ADDRESS_SPACE", "run_forked", "wait_for_adoption"]

log = logging.getLogger("cellblock.warden")

# The warden's address space (RLIMIT_AS, soft; nsjail raises it again for the jail): an
# idle warden maps ~370 MiB, one printing a 50 MB message peaks at ~530 MiB.
WARDEN_ADDRESS_SPACE = 2 * 1024**3


def zmq_error() -> type[Exception]:
    import zmq

    return zmq.ZMQError


def _report(fd: int | None, payload: dict[str, Any]) -> None:
    """One status line to the provisioner. The socket stays open: the provisioner learns
    that the warden ended from the spawner's exit line, or from EOF."""
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(fd, (json.dumps(payload) + "\n").encode())


def _start_error(exc: Exception) -> str:
    message = str(exc) if isinstance(exc, CellblockError) else f"{type(exc).__name__}: {exc}"
    if isinstance(exc, zmq_error()) and "Address already in use" in str(exc):
        message += (" (a client-facing port was taken between jupyter_client choosing it "
                    "and the gate binding it; start the kernel again)")
    return message


def run_forked(req: LaunchRequest, channel: int, client_pidfd: int, *, pooled: bool,
               policy: Policy | None = None) -> int:
    """The warden's life, in a process the spawner forked (:mod:`cellblock.warden.spawner`).

    ``req`` is the launch request (kernel id, profile, the client's connection info, the
    datasets); ``channel`` is the launch's socket (a cold launch), or the socket to the
    spawner on which a pooled warden says it is ready and waits to be adopted. Returns the
    exit status."""
    # A kernel can make libzmq buffer one multipart of any number of frames (MAXMSGSIZE
    # caps each frame, not the message) before the gate sees it: the address space cap
    # makes such a warden fail (and its jail with it) instead of the host. No core file.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard == resource.RLIM_INFINITY or hard > WARDEN_ADDRESS_SPACE:
        resource.setrlimit(resource.RLIMIT_AS, (WARDEN_ADDRESS_SPACE, hard))
    handler = logging.getLogger().handlers[:1]
    for h in handler:
        h.setFormatter(logging.Formatter("[cellblock warden %(asctime)s] %(message)s"))
    set_title(f"cellblock-warden {req.kernel_id}".encode())
    warden: Warden | None = None
    status: int | None = None if pooled else channel
    try:
        warden = Warden(req.kernel_id, req.profile, req.client_conn, datasets=req.datasets,
                        pooled=pooled, policy=policy)
        warden.client_pidfd = client_pidfd
        warden._signal_fd()  # a stop signal during the start ends it cleanly
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked since the fork
        if not pooled:
            warden.start()
        else:
            warden.start_pooled()
            _report(channel, {"ok": True, "pid": os.getpid()})
            handed = wait_for_adoption(warden, channel)
            if handed is None:
                return 0
            req, status = handed
            set_title(f"cellblock-warden {req.kernel_id}".encode())
            assert req.client_conn is not None
            warden.adopt(req.kernel_id, req.client_conn, req.datasets)
    except Exception as exc:  # every failure is reported and cleaned up
        message = _start_error(exc)
        if warden is not None:
            with contextlib.suppress(Exception):
                warden.audit.write("kernel.start_failed", error=message)
        _report(status if status is not None else channel,
                {"ok": False, "error": message, "type": type(exc).__name__})
        retired = pooled and status is None and warden is not None and warden._stop_reason
        (log.info if retired else log.error)("kernel %s failed to start: %s",
                                             req.kernel_id, message)
        return 2
    finally:
        if warden is not None and (warden.clock is None):
            warden.close()  # failed, or pooled and never adopted
    _report(status, {"ok": True, "pid": os.getpid()})
    try:
        return warden.wait()
    finally:
        warden.close()


def wait_for_adoption(warden: Warden, pool: int) -> tuple[LaunchRequest, int] | None:
    """Pooled, in the warden's main thread: block until the spawner hands over a launch
    (its request and socket), or return None when this kernel should go (its jail ended,
    a stop signal, the client or the spawner is gone)."""
    assert warden.proc is not None
    sigfd = warden._signal_fd()
    pidfd = os.pidfd_open(warden.proc.pid)
    sock = socket.socket(fileno=os.dup(pool))
    try:
        lines = LineBuffer(limit=1 << 24)
        fds: list[int] = []
        watched = [pidfd, sigfd, pool] + ([warden.client_pidfd] if warden.client_pidfd >= 0
                                           else [])
        while warden._stop_reason is None:
            ready, _, _ = select.select(watched, [], [])
            if warden._client_gone(ready) or pidfd in ready:
                return None
            if sigfd in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(sigfd, 4096)
                continue
            data, got = recv_fds(sock, 1 << 20, 2)
            fds += got
            if not data:
                return None  # the spawner is gone: nobody can adopt this kernel now
            lines.feed(data)
            if lines and fds:
                return LaunchRequest.model_validate(next(lines.lines(), {})), fds[0]
        return None
    finally:
        sock.close()
        os.close(pidfd)
