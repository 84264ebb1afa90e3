"""Per-kernel cgroups on cgroup v2 or v1, owned by the warden.

The warden makes one cgroup per kernel (``<parent>/<kernel id>`` under each
controller), writes the profile's memory, pids and CPU limits into it, and puts
nsjail into it before nsjail execs, so the jail and everything it forks are
charged there. Because this cgroup outlives nsjail, the warden can read its
counters after the jail ends and tell the user *which* limit ended the kernel
(an OOM kill and a time limit both look like exit 137 from outside).

cgroup v2 (one hierarchy at /sys/fs/cgroup) is what most hosts have; cgroup v1
(one hierarchy per controller, as on this project's CI) is supported too.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import HostUnsupported
from .policy import Limits

__all__ = ["CgroupDetection", "KernelCgroup", "detect", "own_cgroups"]

CGROUP_ROOT = Path(os.environ.get("CELLBLOCK_CGROUP_ROOT", "/sys/fs/cgroup"))
V1_CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000


@dataclass(frozen=True)
class CgroupDetection:
    """What the host offers: ``version`` is "v2", "v1" or None (with ``reason``)."""

    version: str | None
    reason: str = ""


def detect(root: Path = CGROUP_ROOT) -> CgroupDetection:
    """Find a cgroup hierarchy with the memory, pids and cpu controllers."""
    controllers = root / "cgroup.controllers"
    if controllers.is_file():
        have = set(controllers.read_text().split())
        missing = {"memory", "pids", "cpu"} - have
        if not missing:
            return CgroupDetection("v2")
        return CgroupDetection(None, f"cgroup v2 at {root} lacks controllers: {sorted(missing)}")
    absent = [c for c in V1_CONTROLLERS if not (root / c / "cgroup.procs").is_file()]
    if not absent:
        return CgroupDetection("v1")
    return CgroupDetection(
        None, f"no cgroup v2 at {root} and no cgroup v1 controllers for {absent}"
    )


def own_cgroups(root: Path = CGROUP_ROOT) -> dict[str, Path]:
    """The calling process's cgroups, by controller ("" for the v2 hierarchy), from
    /proc/self/cgroup: where a warden returns before it removes its own cgroup."""
    out: dict[str, Path] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            rel = path.lstrip("/")
            if controllers == "":
                out[""] = root / rel
            for c in controllers.split(","):
                if c in V1_CONTROLLERS:
                    out[c] = root / c / rel
    return out


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _make_or_reuse_empty(d: Path) -> None:
    """``mkdir d``; a directory left by a dead warden of the same slot (SIGKILLed, its
    cgroup not yet swept: a restart after it comes here first) is reused once nothing runs
    in it. One with a process in it belongs to a live warden: FileExistsError, as before."""
    try:
        d.mkdir()
    except FileExistsError:
        if (d / "cgroup.procs").read_text().split():
            raise


def _keyed(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit():
                out[parts[0]] = int(parts[1])
    return out


class KernelCgroup:
    """The cgroup(s) of one kernel. Create with :meth:`create`; close with :meth:`remove`.

    ``remove`` kills whatever is left inside and deletes the directories; it is
    idempotent and safe to call from any cleanup path, including a later sweep
    after a warden was SIGKILLed (:meth:`for_kernel` rebuilds the paths).
    """

    def __init__(self, version: str, dirs: tuple[Path, ...], acct: Path | None = None) -> None:
        self.version = version
        self.dirs = dirs
        #: v1 only: the kernel's cpuacct cgroup when that controller is mounted on its own
        #: (best effort: only CPU accounting, never a limit, depends on it)
        self.acct = acct

    @classmethod
    def for_kernel(cls, version: str, parent: str, kernel_id: str,
                   root: Path = CGROUP_ROOT) -> KernelCgroup:
        from .names import check_kernel_id

        check_kernel_id(kernel_id)
        if version == "v2":
            return cls(version, (root / parent / kernel_id,))
        acct = None
        with contextlib.suppress(OSError):
            if (root / "cpuacct").is_dir() and not (root / "cpu" / "cpuacct.usage").exists():
                acct = root / "cpuacct" / parent / kernel_id
        return cls(version, tuple(root / c / parent / kernel_id for c in V1_CONTROLLERS), acct)

    @classmethod
    def create(cls, version: str, parent: str, kernel_id: str, limits: Limits,
               root: Path = CGROUP_ROOT) -> KernelCgroup:
        """Make the kernel's cgroup(s) and write the limits. Raises HostUnsupported."""
        cg = cls.for_kernel(version, parent, kernel_id, root)
        try:
            if version == "v2":
                cg._create_v2(root, parent, limits)
            else:
                cg._create_v1(limits)
        except OSError as exc:
            cg.remove()
            where = exc.filename or "cgroupfs"
            raise HostUnsupported(
                f"cannot set up cgroup {version} limits at {where}: {exc.strerror}. "
                f"Fix: run as root, or delegate {root}/.../{parent} to this user "
                "(mkdir it and chown it to the user; on systemd: Delegate=yes), "
                "or set cgroups = \"off\" in the profile to run without memory/pids/cpu limits"
            ) from None
        return cg

    @classmethod
    def for_warden(cls, version: str, parent: str, slot: str,
                   root: Path = CGROUP_ROOT) -> KernelCgroup:
        """The warden's own cgroup(s), beside the kernel's: ``<parent>/<slot>.warden`` (a
        dot never appears in a kernel id, so it never names a kernel)."""
        from .names import check_kernel_id

        name = check_kernel_id(slot) + ".warden"
        if version == "v2":
            return cls(version, (root / parent / name,))
        return cls(version, tuple(root / c / parent / name for c in V1_CONTROLLERS))

    @classmethod
    def create_for_warden(cls, version: str, parent: str, slot: str, limits: Limits,
                          root: Path = CGROUP_ROOT) -> KernelCgroup:
        """Make the warden's cgroup with ``limits.warden_memory``/``warden_cpus`` (no pids
        limit: the warden's threads are its own). Raises HostUnsupported."""
        cg = cls.for_warden(version, parent, slot, root)
        try:
            if version == "v2":
                cg._prepare_v2_parent(root, parent)
                (d,) = cg.dirs
                _make_or_reuse_empty(d)
                _write(d / "memory.max", str(limits.warden_memory))
                with contextlib.suppress(FileNotFoundError):
                    _write(d / "memory.swap.max", "0")
                _write(d / "cpu.max", f"{int(limits.warden_cpus * CPU_PERIOD_US)} "
                                      f"{CPU_PERIOD_US}")
            else:
                mem, _pids, cpu = cg.dirs
                for d in cg.dirs:
                    d.parent.mkdir(parents=True, exist_ok=True)
                    _make_or_reuse_empty(d)
                _write(mem / "memory.limit_in_bytes", str(limits.warden_memory))
                with contextlib.suppress(FileNotFoundError, PermissionError):
                    _write(mem / "memory.memsw.limit_in_bytes", str(limits.warden_memory))
                _write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                _write(cpu / "cpu.cfs_quota_us", str(int(limits.warden_cpus * CPU_PERIOD_US)))
        except OSError as exc:
            cg.remove_empty()
            raise HostUnsupported(
                f"cannot set up the warden's cgroup {version} at {exc.filename or 'cgroupfs'}"
                f": {exc.strerror}. Fix: as for the kernel's cgroup (run as root or delegate "
                f"{root}/.../{parent}), or set cgroups = \"off\" in the profile") from None
        return cg

    def leave(self, to: dict[str, Path]) -> None:
        """Move the calling process out of these cgroups, into ``to`` (controller -> the
        cgroup it came from; see :func:`own_cgroups`), so that they can be removed.
        Best effort: where it may not move, :meth:`remove_empty` later fails quietly and
        the sweep removes the directories once the process is gone."""
        names = ("",) if self.version == "v2" else V1_CONTROLLERS
        for controller, d in zip(names, self.dirs, strict=True):
            for target in (to.get(controller), d.parent):  # where it came from, else above
                if target is None:
                    continue
                try:
                    _write(target / "cgroup.procs", "0")
                    break
                except OSError:
                    continue

    def remove_empty(self) -> None:
        """Remove the directories if nothing is left in them (never kills). Idempotent."""
        for d in self._all_dirs():
            with contextlib.suppress(OSError):
                d.rmdir()

    def _prepare_v2_parent(self, root: Path, parent: str) -> None:
        want = "+memory +pids +cpu"
        node = root
        for part in parent.split("/"):
            with contextlib.suppress(OSError):  # may already be on, or not ours to change
                _write(node / "cgroup.subtree_control", want)
            node = node / part
            node.mkdir(exist_ok=True)
        with contextlib.suppress(OSError):
            _write(node / "cgroup.subtree_control", want)

    def _create_v2(self, root: Path, parent: str, limits: Limits) -> None:
        self._prepare_v2_parent(root, parent)
        (d,) = self.dirs
        d.mkdir()
        _write(d / "memory.max", str(limits.memory))
        with contextlib.suppress(FileNotFoundError):  # no swap accounting on this host
            _write(d / "memory.swap.max", "0")
        with contextlib.suppress(FileNotFoundError):
            _write(d / "memory.oom.group", "1")
        _write(d / "pids.max", str(limits.pids))
        _write(d / "cpu.max", f"{int(limits.cpus * CPU_PERIOD_US)} {CPU_PERIOD_US}")

    def _create_v1(self, limits: Limits) -> None:
        mem, pids, cpu = self.dirs
        for d in self.dirs:
            d.parent.mkdir(parents=True, exist_ok=True)
            d.mkdir()
        _write(mem / "memory.limit_in_bytes", str(limits.memory))
        with contextlib.suppress(FileNotFoundError, PermissionError):  # swapaccount=0 hosts
            _write(mem / "memory.memsw.limit_in_bytes", str(limits.memory))
        _write(pids / "pids.max", str(limits.pids))
        _write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
        _write(cpu / "cpu.cfs_quota_us", str(int(limits.cpus * CPU_PERIOD_US)))
        if self.acct is not None:
            try:
                self.acct.parent.mkdir(parents=True, exist_ok=True)
                self.acct.mkdir()
            except OSError:  # not delegated to this user: CPU is then counted from /proc
                self.acct = None

    def join(self, pid: int = 0) -> None:
        """Move ``pid`` (0: the caller) into every cgroup of this kernel.

        Called in the child between fork and exec of nsjail, so nothing the jail
        forks can start outside the limits.
        """
        for d in self.dirs:
            _write(d / "cgroup.procs", str(pid))
        if self.acct is not None:
            with contextlib.suppress(OSError):
                _write(self.acct / "cgroup.procs", str(pid))

    def oom_kills(self) -> int:
        if self.version == "v2":
            return _keyed(self.dirs[0] / "memory.events").get("oom_kill", 0)
        return _keyed(self.dirs[0] / "memory.oom_control").get("oom_kill", 0)

    def pids_max_hits(self) -> int:
        d = self.dirs[0] if self.version == "v2" else self.dirs[1]
        return _keyed(d / "pids.events").get("max", 0)

    def _all_dirs(self) -> tuple[Path, ...]:
        return self.dirs if self.acct is None else (*self.dirs, self.acct)

    def memory_current(self) -> int | None:
        name = "memory.current" if self.version == "v2" else "memory.usage_in_bytes"
        try:
            return int((self.dirs[0] / name).read_text())
        except (OSError, ValueError):
            return None

    def pids(self) -> list[int]:
        out: set[int] = set()
        for d in self.dirs:
            with contextlib.suppress(OSError):
                out.update(int(p) for p in (d / "cgroup.procs").read_text().split())
        return sorted(out)

    def kill_all(self, deadline: float = 5.0) -> None:
        """SIGKILL every process left in the cgroup and wait until it is empty."""
        kill_file = self.dirs[0] / "cgroup.kill"
        if self.version == "v2" and kill_file.exists():
            with contextlib.suppress(OSError):
                _write(kill_file, "1")
        end = time.monotonic() + deadline
        while (left := self.pids()) and time.monotonic() < end:
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)  # a poll interval while the kernel reaps; not a timing guess

    def remove(self) -> None:
        """Kill what is left and delete the directories. Idempotent."""
        self.kill_all()
        for d in self._all_dirs():
            for _ in range(100):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        break
                    time.sleep(0.01)  # EBUSY while the last task exits; poll again
