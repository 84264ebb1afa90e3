"""The running kernels of this host, as `cellblock ps` and `cellblock kill` see them.

Who calls this: the CLI only. A running kernel is a run dir whose ``warden.json`` names a warden
that is still alive (:func:`cellblock.rundir.is_warden_alive` checks its pid and start time,
so a recycled pid is never mistaken for one). Stopping one is a signal to its warden, never to
nsjail: ``SIGUSR1`` means "stopped by operator". The warden then stops the jail, tells the
client why on iopub ("cellblock: kernel stopped by operator"), writes ``kernel.exit`` to the
audit log and removes everything, as on any other way out. An optional one-line reason is
written to ``<run dir>/stop-reason`` first and appended to that message.

Who may stop what: whoever may signal the warden, that is its own user and root. Root also
sees the running kernels of other users (their runtime dirs under ``/run/user`` and ``/tmp``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import CellblockError
from .names import KERNEL_ID
from .rundir import (
    RUNTIME_ENV,
    STOP_REASON_FILE,
    RunDir,
    WardenRecord,
    is_warden_alive,
    runtime_base,
)

__all__ = ["RunningKernel", "find", "list_running", "stop", "wait_gone"]


@dataclass(frozen=True)
class RunningKernel:
    """One running kernel (not :class:`cellblock.sandbox.Sandbox`, the client of one): its
    warden record, run dir and (if any) cgroup memory."""

    record: WardenRecord
    run: RunDir
    memory: int | None

    @property
    def kernel_id(self) -> str:
        return self.record.kernel_id

    def age(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.record.started)


def _bases() -> list[Path]:
    """Runtime dirs to look in: ours; as root (without an explicit dir) every user's too."""
    base = runtime_base()
    if os.environ.get(RUNTIME_ENV) or os.geteuid() != 0:
        return [base]
    tmp = Path("/tmp")  # noqa: S108 - where rundir puts a user's runtime dir without XDG
    found = [base, *Path("/run/user").glob("*/cellblock"), *tmp.glob("cellblock-*")]
    return list(dict.fromkeys(p for p in found if p.is_dir()))


def _memory(record: WardenRecord) -> int | None:
    if not record.cgroup_version:
        return None
    from .cgroups import KernelCgroup

    return KernelCgroup.for_kernel(record.cgroup_version, record.cgroup_parent,
                                   record.cgroup_name).memory_current()


def list_running(bases: Iterable[Path] | None = None) -> list[RunningKernel]:
    """Every kernel with a live warden, oldest first."""
    out = []
    for base in _bases() if bases is None else bases:
        with contextlib.suppress(OSError):
            for entry in base.iterdir():
                if not KERNEL_ID.fullmatch(entry.name):
                    continue  # not a run dir (nothing else belongs here, but never fail on it)
                run = RunDir(base, entry.name)
                record = run.read_record()
                if record is None or not is_warden_alive(record):
                    continue
                out.append(RunningKernel(record, run, _memory(record)))
    return sorted(out, key=lambda s: s.record.started)


def find(kernels: list[RunningKernel], kernel: str) -> RunningKernel:
    """The kernel whose id is ``kernel`` or starts with it (unambiguously)."""
    hits = [s for s in kernels if s.kernel_id == kernel] or \
        [s for s in kernels if s.kernel_id.startswith(kernel)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise CellblockError(f"no running cellblock kernel {kernel!r} (see `cellblock ps`)")
    ids = ", ".join(s.kernel_id for s in hits)
    raise CellblockError(f"kernel id prefix {kernel!r} is ambiguous: {ids}")


def stop(kernel: RunningKernel, reason: str = "") -> None:
    """Ask the kernel's warden to stop it "by operator" (SIGUSR1), with an optional reason.
    Raises PermissionError when this user may not signal that warden."""
    if reason:
        text = " ".join(reason.split())[:200]
        with contextlib.suppress(FileNotFoundError):
            path = kernel.run.path / STOP_REASON_FILE
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text + "\n")
    if is_warden_alive(kernel.record):
        with contextlib.suppress(ProcessLookupError):
            os.kill(kernel.record.warden_pid, signal.SIGUSR1)


def wait_gone(kernels: list[RunningKernel], timeout: float) -> list[RunningKernel]:
    """Wait until every warden has exited (its cleanup done); return those still alive."""
    deadline = time.monotonic() + timeout
    left = list(kernels)
    while left:
        left = [s for s in left if is_warden_alive(s.record)]
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.01)  # polling the wardens' exit, a condition
    return left
