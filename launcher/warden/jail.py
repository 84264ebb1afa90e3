"""The jail process: one nsjail running one kernel, and why it ended.

Who calls it: the warden (:mod:`cellblock.warden.warden`) starts a :class:`JailProcess`
for each jail (a restart in place starts another on the same run dir), reads its output
tail for start failures, stops it, and asks :func:`death_reason` why it ended.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..cgroups import KernelCgroup
from ..egress.sink import NetSink, SinkUnavailable
from ..policy import Limits, human_bytes
from .process import set_pdeathsig

if TYPE_CHECKING:
    from ..staging import DatasetSetup

__all__ = ["OUTPUT_TAIL", "STOP_GRACE", "JailProcess", "death_reason"]

log = logging.getLogger("cellblock.warden")

STOP_GRACE = 3.0  # seconds nsjail gets after SIGTERM before SIGKILL
OUTPUT_TAIL = 64 * 1024  # bytes of nsjail/kernel process output kept for diagnosis

# What a signal that ended the kernel means here (nsjail exits with 128 + the signal).
_SIGNAL_REASONS = {
    signal.SIGSYS: "killed by the seccomp policy (signal SIGSYS: a forbidden system call)",
    signal.SIGXFSZ: "file size limit {file_size} exceeded (signal SIGXFSZ)",
    signal.SIGXCPU: "CPU time limit exceeded (signal SIGXCPU)",
}


class JailProcess:
    """One nsjail process. :meth:`start` it in the kernel's cgroup (``cgroup``) with the
    dataset views attached (``datasets``: a :class:`cellblock.staging.DatasetSetup`);
    :meth:`stop` is idempotent."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        # Taken while nsjail is surely our unreaped child: names it for good (cellblock.files
        # checks it is still alive before trusting nsjail's pid to name its jail).
        self._pidfd = os.pidfd_open(proc.pid)
        self._pidfd_lock = threading.Lock()
        self.tail: deque[bytes] = deque()
        self.tail_bytes = 0
        self.sink: NetSink | None = None  # what this jail sends past the proxy, audited
        threading.Thread(target=self._drain, name="nsjail-output", daemon=True).start()

    @classmethod
    def start(cls, argv: list[str], cgroup: KernelCgroup | None,
              datasets: DatasetSetup | None) -> JailProcess:
        def in_child() -> None:  # runs between fork and exec: async-signal-safe work only
            set_pdeathsig(signal.SIGTERM)  # nsjail then kills the jail and cleans up
            if cgroup is not None:
                cgroup.join(0)
            if datasets is not None:
                datasets.attach_in_child()  # read-only /data views, root only

        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            preexec_fn=in_child,
            close_fds=True,
        )
        return cls(proc)

    def _drain(self) -> None:
        """Keep the last OUTPUT_TAIL bytes of the jail's own stdout/stderr; drop the rest.

        A kernel writing to fd 1/2 outside a cell cannot fill the host's disk. One thread
        per jail, each reading only its own pipe. What is kept is the kernel's own words:
        shown when a start fails, never taken as the reason it died."""
        stdout = self.proc.stdout
        assert stdout is not None
        for chunk in iter(lambda: stdout.read1(65536), b""):  # type: ignore[attr-defined]
            self.tail.append(chunk)
            self.tail_bytes += len(chunk)
            while self.tail_bytes > OUTPUT_TAIL and len(self.tail) > 1:
                self.tail_bytes -= len(self.tail.popleft())

    def output_tail(self, limit: int = 2000) -> str:
        return b"".join(self.tail).decode("utf-8", "replace")[-limit:]

    def pidfd(self) -> int:
        """A new descriptor of nsjail's pidfd (the caller closes it), or -1 once stopped."""
        with self._pidfd_lock:
            return os.dup(self._pidfd) if self._pidfd >= 0 else -1

    def open_sink(self, audit: Callable[..., Any], name: str) -> None:
        """Audit what this jail sends past the proxy (:mod:`cellblock.egress.sink`): once
        its kernel answered, before any cell. Where this host refuses it, the jail is as
        closed as before and only its attempts go unaudited: said in the audit log."""
        if self.sink is not None:
            return
        pidfd = self.pidfd()
        try:
            self.sink = NetSink.open(self.proc.pid, pidfd, audit)
        except (SinkUnavailable, OSError) as exc:
            log.warning("kernel %s: network attempts from the jail are not audited: %s",
                        name, exc)
            audit("net.sink_unavailable", reason=str(exc))
        finally:
            if pidfd >= 0:
                os.close(pidfd)

    def stop(self) -> None:
        """SIGTERM (nsjail kills the jail and cleans up), SIGKILL after STOP_GRACE; then
        the sink audits what was still queued and closes."""
        self._stop()
        if self.sink is not None:
            self.sink.close()
        with self._pidfd_lock:
            if self._pidfd >= 0:
                os.close(self._pidfd)
                self._pidfd = -1

    def _stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                self.proc.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def death_reason(status: int, *, limits: Limits, cgroup: KernelCgroup | None, oom_base: int,
                 pids_base: int, shutdown_requested: bool) -> str | None:
    """Why the jail ended, in words for the user; None for a requested shutdown.

    Only host facts decide: the cgroup's OOM and pids counters (past their values when
    this jail started, ``oom_base``/``pids_base``), whether the gate forwarded a
    shutdown_request, and nsjail's exit status (128 + the signal that ended the kernel).
    Nothing the kernel printed: a hostile kernel can write "seccomp violation" and exit 3."""
    if cgroup is not None and cgroup.oom_kills() > oom_base:
        return f"memory limit {human_bytes(limits.memory)} exceeded"
    if shutdown_requested and status == 0:
        return None
    if cgroup is not None and cgroup.pids_max_hits() > pids_base:
        return f"process limit {limits.pids} reached (pids), then the kernel exited " \
               f"with status {status}"
    if status > 128:
        with contextlib.suppress(ValueError):
            sig = signal.Signals(status - 128)
            return _SIGNAL_REASONS.get(sig, "killed by signal {name}").format(
                name=sig.name, file_size=human_bytes(limits.file_size))
    return f"kernel process exited with status {status}"
