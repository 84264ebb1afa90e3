"""What one cell cost the host: CPU seconds and peak memory, from the kernel's cgroup.

Who calls what: the warden's books (:mod:`.budgeting`) call :meth:`CellMeter.start` when a
cell starts (the gate forwarded it, or the cell before it was answered) and
:meth:`CellMeter.end` when its reply comes, on the gate's thread; the numbers go into the
cell's ``execution.end`` audit event, where :class:`~cellblock.sandbox.Sandbox` reads them.
Host facts only: the kernel can make a cell cost more, never make it look cheaper than the
cgroup counted.

- CPU: v2 ``cpu.stat`` ``usage_usec``; v1 ``cpuacct.usage`` (the kernel's own cpuacct
  cgroup, or the cpu cgroup where cpu and cpuacct are mounted together); without either, the
  sum of utime, stime, cutime and cstime (``/proc/<pid>/stat``) of the cgroup's processes.
  Deltas from the cell's start to its reply.
- Peak memory: v1 ``memory.max_usage_in_bytes``, reset by writing 0 when the cell starts;
  v2 ``memory.peak`` reset through the descriptor the meter keeps open (Linux 6.12+), else
  the kernel's peak since it started (``peak_memory_scope`` = "kernel"), else the larger of
  ``memory.current`` at the cell's start and end ("sampled"). Scope "cell" means the peak of
  that cell alone. The bytes include the kernel's baseline (the interpreter, imports):
  ``memory_start_bytes`` is what the cgroup held when the cell started.
- No cgroups (``cgroups = "off"``): CPU and memory are None; wall time and output still count.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..cgroups import KernelCgroup

__all__ = ["CellMeter", "Sample"]

_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Sample:
    """The counters when a cell started."""

    cpu_ns: int | None
    memory: int | None


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _proc_cpu_ns(pids: list[int]) -> int | None:
    """utime + stime + cutime + cstime of ``pids``, in ns (their reaped children included)."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{pid}/stat").read_bytes()
            fields = stat[stat.rindex(b")") + 2:].split()
            ticks += sum(int(f) for f in fields[11:15])
    return ticks * 1_000_000_000 // _TICK if pids else None


class CellMeter:
    """CPU and peak memory of one kernel's cells (see the module docstring)."""

    def __init__(self, cgroup: KernelCgroup | None) -> None:
        self.cgroup = cgroup
        self._peak_fd = -1
        self.scope = "cell"

    def cpu_ns(self) -> int | None:
        cg = self.cgroup
        if cg is None:
            return None
        if cg.version == "v2":
            with contextlib.suppress(OSError, ValueError):
                for line in (cg.dirs[0] / "cpu.stat").read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key == "usage_usec":
                        return int(value) * 1000
            return None
        for d in (cg.acct, cg.dirs[2]):
            if d is not None and (usage := _read_int(d / "cpuacct.usage")) is not None:
                return usage
        return _proc_cpu_ns(cg.pids())

    def start(self) -> Sample:
        """A cell starts: reset the peak, read the counters."""
        cg = self.cgroup
        if cg is None:
            return Sample(None, None)
        if cg.version == "v1":
            try:
                (cg.dirs[0] / "memory.max_usage_in_bytes").write_text("0")
            except OSError:
                self.scope = "kernel"
        else:
            self._reset_v2_peak(cg.dirs[0] / "memory.peak")
        return Sample(self.cpu_ns(), cg.memory_current())

    def _reset_v2_peak(self, path: Path) -> None:
        if self._peak_fd < 0 and self.scope == "cell":
            try:
                self._peak_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                self.scope = "sampled"  # no memory.peak before Linux 5.19
                return
            except OSError:
                with contextlib.suppress(OSError):
                    self._peak_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                self.scope = "kernel"
        if self._peak_fd >= 0 and self.scope == "cell":
            try:
                os.pwrite(self._peak_fd, b"reset\n", 0)
            except OSError:
                self.scope = "kernel"  # before Linux 6.12: the peak since the kernel started

    def _peak(self, start: Sample, now: int | None) -> int | None:
        cg = self.cgroup
        if cg is None:
            return None
        if cg.version == "v1":
            peak = _read_int(cg.dirs[0] / "memory.max_usage_in_bytes")
        elif self._peak_fd >= 0:
            try:
                peak = int(os.pread(self._peak_fd, 64, 0).split()[0])
            except (OSError, ValueError, IndexError):
                peak = None
        else:
            peak = None
        known = [v for v in (peak, start.memory, now) if v is not None]
        return max(known) if known else None

    def end(self, start: Sample | None) -> dict[str, Any]:
        """The cost of the cell that started with ``start``, for its ``execution.end``."""
        if start is None or self.cgroup is None:
            return {"cpu_seconds": None, "peak_memory_bytes": None}
        cpu = self.cpu_ns()
        now = self.cgroup.memory_current()
        return {
            "cpu_seconds": None if cpu is None or start.cpu_ns is None
            else round(max(0, cpu - start.cpu_ns) / 1e9, 6),
            "peak_memory_bytes": self._peak(start, now),
            "peak_memory_scope": self.scope,
            "memory_start_bytes": start.memory,
        }

    def close(self) -> None:
        if self._peak_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._peak_fd)
            self._peak_fd = -1
