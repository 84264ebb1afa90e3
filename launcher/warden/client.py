"""The client side of the spawner: start it once per process, ask it for wardens, and hold
each warden as a ``Popen``-like handle.

Who calls this: :class:`cellblock.provisioner.CellblockProvisioner` (``launch_kernel``) and
:func:`cellblock.warden.client.warm`. One :class:`SpawnerClient` per client process (per pid: a
forked client gets its own); it starts ``python -m cellblock.warden.spawner`` on first use, and
again if that process died. Kernels started by a spawner that died keep running: their
wardens watch the client process, not the spawner.

:class:`WardenProcess` is what jupyter_client sees as the kernel's process (the
provisioner's ``process``): ``poll``, ``wait``, ``send_signal``, ``terminate``, ``kill``
and ``pid``, like :class:`subprocess.Popen`. Signals go through a pidfd, so a recycled pid
is never signalled. The exit status comes from the spawner (which reaps the warden), or,
if the spawner is gone, is reported as -1 when the launch socket reaches EOF.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from .channel import LineBuffer, send_fds
from .request import LaunchRequest
from .spawner import POOL_FAILURES

__all__ = ["SpawnerClient", "WardenProcess", "warm"]

UNKNOWN_EXIT = -1  # the warden ended but no exit status was reported (the spawner is gone)


class WardenProcess:
    """A warden forked by the spawner, seen from the client (see the module docstring)."""

    stdin = stdout = stderr = None  # what LocalProvisioner.wait() closes on a Popen

    def __init__(self, sock: socket.socket, pid: int, pending: bytes = b"") -> None:
        self._sock = sock
        self.pid = pid
        self.returncode: int | None = None
        self._lines = LineBuffer(pending)
        try:
            self._pidfd = os.pidfd_open(pid)
        except OSError:  # already gone (and reaped): its exit line is on the socket
            self._pidfd = -1

    def _read(self, timeout: float | None) -> None:
        """Read what the socket has (waiting up to ``timeout``); set ``returncode`` on an
        exit line or EOF."""
        if self.returncode is not None:
            return
        if not self._lines:
            if not _readable(self._sock, timeout):
                return
            try:
                chunk = self._sock.recv(4096)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self._finish(UNKNOWN_EXIT)
                return
            with contextlib.suppress(ValueError):
                self._lines.feed(chunk)
        for status in self._lines.lines():
            code = status.get("exit")
            if isinstance(code, int):
                self._finish(code)
                return

    def _finish(self, code: int) -> None:
        self.returncode = code
        self._sock.close()
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1

    def poll(self) -> int | None:
        self._read(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(["cellblock-warden", str(self.pid)],
                                                timeout or 0)
            self._read(left)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None and self._pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class SpawnerClient:
    """This process's connection to its spawner. Thread-safe; use :meth:`instance`."""

    _instances: dict[int, SpawnerClient] = {}
    _class_lock = threading.Lock()

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None

    @classmethod
    def instance(cls) -> SpawnerClient:
        with cls._class_lock:
            client = cls._instances.get(os.getpid())
            if client is None:
                client = cls._instances[os.getpid()] = cls()
                atexit.register(client.close)
            return client

    def close(self, timeout: float = 5.0) -> None:
        """Let the spawner go (it stops when its control socket closes; pooled kernels are
        retired). Kernels still running stop on their own when this process exits.
        Idempotent; called at exit."""
        with self._lock:
            if self._control is not None:
                self._control.close()
                self._control = None
            proc, self._proc = self._proc, None
        if proc is not None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _ensure(self) -> socket.socket:
        """The control socket of a running spawner (started, or restarted, here)."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None and self._control:
                return self._control
            if self._control is not None:
                self._control.close()
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "cellblock.warden.spawner", "--parent-pid",
                     str(os.getpid()), "--control-fd", str(theirs.fileno())],
                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                    stdout=sys.stderr.fileno() if _has_fd(sys.stderr) else subprocess.DEVNULL,
                    start_new_session=True, close_fds=True,
                )
            finally:
                theirs.close()
            self._control = ours
            return ours

    def request(self, req: LaunchRequest) -> socket.socket:
        """Send one request; return its socket (the spawner or the warden answers on it)."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            for attempt in (1, 2):
                control = self._ensure()
                try:
                    send_fds(control, b"launch", [theirs.fileno()])
                    break
                except OSError:
                    if attempt == 2:
                        raise
                    with self._lock:  # the spawner died under us: start another
                        if self._proc is not None:
                            self._proc.kill()
                            self._proc.wait()
        finally:
            theirs.close()
        payload = req.line()
        if len(payload) > 65536:  # more than a socket buffer holds: do not block the caller
            threading.Thread(target=_send_all, args=(mine, payload), daemon=True).start()
        else:
            _send_all(mine, payload)  # a spawner gone by now shows as EOF in _ask
        return mine

    def _ask(self, req: LaunchRequest, timeout: float) -> tuple[socket.socket,
                                                                  dict[str, Any] | None, bytes]:
        """Send ``req``; return its socket, its first status line and what followed. A
        spawner that dies with the request unanswered (SIGKILLed just before, so that it
        still looked alive) is replaced and asked once more: at EOF nobody holds the
        request's other end, so no warden was started for it."""
        deadline = time.monotonic() + timeout
        sock = self.request(req)
        status, rest = _read_status(sock, timeout)
        left = deadline - time.monotonic()
        if status is None and left > 0 and self._spawner_died():  # EOF, not the timeout
            sock.close()
            sock = self.request(req)
            status, rest = _read_status(sock, left)
        return sock, status, rest

    def _spawner_died(self) -> bool:
        """True once the spawner has exited (it is given a second if it is dying)."""
        proc = self._proc
        if proc is None:
            return True
        try:
            proc.wait(1.0)
        except subprocess.TimeoutExpired:
            return False
        return True

    async def launch(self, req: LaunchRequest, timeout: float) -> tuple[WardenProcess | None,
                                                                         dict[str, Any]]:
        """Ask for a warden; wait for its first status line. Returns the handle (None if
        the warden never reported) and the status (``{"ok": bool, ...}``)."""
        sock, status, rest = await asyncio.get_running_loop().run_in_executor(
            None, self._ask, req, timeout)
        if status is None or not status.get("ok") or "pid" not in status:
            if status is not None and "exit" in status:  # it died before reporting
                status = {"ok": False, "exit": status["exit"]}
            sock.close()
            return None, status or {"ok": False}
        return WardenProcess(sock, int(status["pid"]), rest), status

    def pool(self, req: LaunchRequest, timeout: float = 30.0) -> dict[str, Any]:
        """Ask about (and fill) a warm pool: ``{"ok", "size", "ready", "starting", ...}``."""
        sock, status, _ = self._ask(req.model_copy(update={"op": "pool"}), timeout)
        sock.close()
        return status or {"ok": False, "error": "no answer"}


def _readable(sock: socket.socket, timeout: float | None) -> bool:
    """Wait until ``sock`` is readable (or ``timeout`` seconds). poll(), not select(): a
    server with a few hundred kernels holds descriptors past select()'s 1024."""
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLHUP | select.POLLERR)
    return bool(poller.poll(None if timeout is None else max(0, timeout) * 1000))


def _has_fd(stream: Any) -> bool:
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    return True


def _send_all(sock: socket.socket, payload: bytes) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(payload)


def _read_status(sock: socket.socket, timeout: float) -> tuple[dict[str, Any] | None, bytes]:
    """The first JSON line on ``sock`` within ``timeout`` (None on timeout, EOF or bad
    JSON), and whatever was read after it."""
    deadline = time.monotonic() + timeout
    buf = bytearray()
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            return None, b""
        if not _readable(sock, left):
            return None, b""
        try:
            chunk = sock.recv(65536)
        except OSError:  # ECONNRESET: the spawner died with the request unread
            chunk = b""
        if not chunk:
            return None, b""
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    try:
        status = json.loads(line)
    except ValueError:
        return None, b""
    return (status if isinstance(status, dict) else None), rest


def warm(profile: str, *, size: int | None = None, timeout: float = 60.0,
         env: dict[str, str] | None = None) -> dict[str, Any]:
    """Fill this process's warm pool for ``profile`` (``size``, default the profile's
    ``warm_pool``; 0 empties it) and wait up to ``timeout`` seconds until every pooled
    kernel is up. Returns the pool's state (``ready``, ``starting``, ``size``,
    ``failures``). Raises CellblockError for an unknown profile or a bad policy, and
    JailStartError when pooled kernels keep failing to start.

    An LLM backend calls this once at boot so that its first kernel start is warm too;
    without it the pool fills after the profile's first start."""
    from ..errors import CellblockError, JailStartError

    client = SpawnerClient.instance()
    req = LaunchRequest(op="pool", profile=profile, size=size, reset_failures=True,
                        env={str(k): str(v) for k, v in (os.environ if env is None
                                                         else env).items()})
    deadline = time.monotonic() + timeout
    while True:
        state = client.pool(req, timeout=max(1.0, deadline - time.monotonic()))
        req = req.model_copy(update={"reset_failures": False})
        if not state.get("ok"):
            raise CellblockError(f"warm pool of profile {profile!r}: {state.get('error')}")
        if state["failures"] >= POOL_FAILURES:
            raise JailStartError(
                f"warm pool of profile {profile!r}: {state['failures']} kernels in a row "
                "failed to start; start one kernel on the profile to see why")
        if state["ready"] >= state["size"] or time.monotonic() >= deadline:
            return state
        time.sleep(0.02)  # polling the pool's state, a condition
