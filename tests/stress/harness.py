"""Shared by the stress scripts (``faults.py``, ``load.py``): an isolated cellblock
environment, a view of the host's processes that belong to it, and the leftover check.

Who uses it: ``tests/stress/faults.py`` and ``tests/stress/load.py`` (run standalone or by
``tests/test_stress.py``). Nothing here starts a kernel; it only sets up where kernels
go (a temp runtime dir, audit dir, Jupyter dirs with cellblock's kernelspecs, the test
policy of ``tests/conftest.py`` and a cgroup parent of its own) and looks at what is left.

What counts as "ours": a spawner or warden whose environment names the environment's
top dir, an nsjail whose command line does, and any process in one of the environment's
cgroups (the kernels: a jailed kernel's command line and environment name nothing of the
host). A kernel whose nsjail is gone is ours too if it sits in our cgroups.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "tests"))

from conftest import TEST_POLICY, cgroup_dirs  # noqa: E402

STRESS_ENV = "CELLBLOCK_STRESS"  # set in a stress client's environment (and its children)


@dataclass
class Env:
    """An isolated cellblock environment (like the ``jupyter_env`` fixture): made by
    :meth:`create`, applied to ``os.environ``, removed by :meth:`close`."""

    top: Path
    vars: dict[str, str]
    cgroup_parent: str
    owns_cgroup_parent: bool

    @property
    def runtime(self) -> Path:
        return Path(self.vars["CELLBLOCK_RUNTIME_DIR"])

    @property
    def marker(self) -> str:
        return str(self.top)

    @classmethod
    def create(cls, name: str) -> Env:
        top = Path(tempfile.mkdtemp(prefix=f"cellblock-{name}-"))
        os.chmod(top, 0o711)  # the jail's uid traverses the runtime dir below it
        (top / "policy.toml").write_text(TEST_POLICY)
        # A cgroup parent of its own below the delegated one (unprivileged) or below
        # "cellblock" (root): the cgroup check then sees only this run's kernels.
        base = os.environ.get("CELLBLOCK_CGROUP_PARENT", "") or "cellblock"
        parent = f"{base}/{top.name}"
        env = {
            "JUPYTER_PATH": str(top / "share" / "jupyter"),
            "JUPYTER_RUNTIME_DIR": str(top / "jupyter-runtime"),
            "JUPYTER_CONFIG_DIR": str(top / "config"),
            "JUPYTER_DATA_DIR": str(top / "data"),
            "JUPYTER_PLATFORM_DIRS": "1",
            "CELLBLOCK_POLICY": str(top / "policy.toml"),
            "CELLBLOCK_RUNTIME_DIR": str(top / "run"),
            "CELLBLOCK_AUDIT_DIR": str(top / "audit"),
            "CELLBLOCK_CGROUP_PARENT": parent,
            STRESS_ENV: str(top),
        }
        os.environ.update(env)
        subprocess.run([str(BIN / "cellblock"), "install", "--prefix", str(top)], check=True,
                       capture_output=True)
        return cls(top, env, parent, True)

    def close(self, keep: bool = False) -> None:
        if not keep:
            shutil.rmtree(self.top, ignore_errors=True)
        # Empty cgroups go even when the findings keep the files: they were reported
        # already, and one left under the suite's parent would fail every later test's
        # leftover check (CI saw one leak turn into 8 errors). Deepest first.
        for d in cgroup_dirs(self.cgroup_parent):
            if not d.is_dir():
                continue
            for sub in sorted((p for p in d.rglob("*") if p.is_dir()),
                              key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    sub.rmdir()
            with contextlib.suppress(OSError):
                d.rmdir()


# -- processes ---------------------------------------------------------------------------


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    kind: str  #: spawner, warden, nsjail, kernel
    cmd: str
    start: int  #: start time (clock ticks since boot): a pid and this name one process

    @property
    def title(self) -> str:
        """A warden's kernel id or pool slot (``cellblock-warden <this>``)."""
        return self.cmd.split()[1] if self.kind == "warden" and " " in self.cmd else ""


def _kind(cmd: str) -> str:
    if cmd.startswith("cellblock-spawner"):
        return "spawner"
    if cmd.startswith("cellblock-warden"):
        return "warden"
    if "nsjail --config" in cmd or cmd.startswith("nsjail "):
        return "nsjail"
    if "-m cellblock_kernel" in cmd:
        return "kernel"
    return ""


def processes(env: Env) -> list[Proc]:
    """The processes of ``env`` that are spawners, wardens, nsjail or kernels."""
    out = []
    marker = env.marker.encode()
    cgroup_mark = env.cgroup_parent.encode()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        cmd = _read(f"/proc/{name}/cmdline").replace(b"\0", b" ").decode(errors="replace")
        kind = _kind(cmd.strip())
        if not kind:
            continue
        stat = _read(f"/proc/{name}/stat")
        if not stat:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        ppid, start = int(fields[1]), int(fields[19])
        if kind in ("spawner", "warden"):
            ours = marker in _read(f"/proc/{name}/environ")
        elif kind == "nsjail":
            ours = env.marker in cmd
        else:
            ours = False
        ours = ours or cgroup_mark in _read(f"/proc/{name}/cgroup")
        if ours:
            out.append(Proc(int(name), ppid, kind, cmd.strip()[:200], start))
    return out


def kernel_tree(procs: Iterable[Proc], warden_title: str) -> dict[str, Proc]:
    """The warden titled ``cellblock-warden <warden_title>`` and its nsjail and kernel
    (whichever of them exist)."""
    procs = list(procs)
    warden = next((p for p in procs if p.kind == "warden" and p.title == warden_title), None)
    return {} if warden is None else tree_below(procs, warden)


def tree_below(procs: list[Proc], warden: Proc) -> dict[str, Proc]:
    """``warden`` and whichever of its nsjail and kernel exist in ``procs``."""
    out = {"warden": warden}
    nsjail = next((p for p in procs if p.kind == "nsjail" and p.ppid == warden.pid), None)
    if nsjail is not None:
        out["nsjail"] = nsjail
        kernel = next((p for p in procs if p.kind == "kernel" and p.ppid == nsjail.pid), None)
        if kernel is not None:
            out["kernel"] = kernel
    return out


def sigkill(proc: Proc) -> bool:
    """SIGKILL exactly this process (through a pidfd, after checking that the pid still
    names it). False if it was already gone."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except OSError:
        return False
    try:
        stat = _read(f"/proc/{proc.pid}/stat")
        if not stat or int(stat[stat.rfind(b")") + 2:].split()[19]) != proc.start:
            return False
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return True
    except OSError:
        return False
    finally:
        os.close(pidfd)


# -- run dirs, cgroups, mounts -----------------------------------------------------------


def run_dirs(env: Env) -> dict[str, dict[str, Any]]:
    """Each run dir's name and its warden.json (empty dict when there is none)."""
    out: dict[str, dict[str, Any]] = {}
    if not env.runtime.is_dir():
        return out
    for entry in env.runtime.iterdir():
        if entry.is_dir():
            try:
                out[entry.name] = json.loads((entry / "warden.json").read_text())
            except (OSError, ValueError):
                out[entry.name] = {}
    return out


def cgroups(env: Env) -> list[Path]:
    return [p for d in cgroup_dirs(env.cgroup_parent) if d.is_dir() for p in d.iterdir()
            if p.is_dir()]


def mounts(env: Env, pids: Iterable[int] = (), slots: Iterable[str] = ()) -> list[str]:
    """Mounts that name the environment's dir, in this process's mount namespace and in
    that of each of ``pids`` that is not in a namespace of a jail; except the ipc tmpfs
    of each of ``slots`` (as root a live kernel's ipc dir is a tmpfs on the host)."""
    own = os.readlink("/proc/self/ns/mnt")
    allowed = {str(env.runtime / slot / "ipc") for slot in slots}
    seen, out = set(), []
    for pid in ["self", *map(str, pids)]:
        with contextlib.suppress(OSError):
            ns = os.readlink(f"/proc/{pid}/ns/mnt")
            if ns in seen or (pid != "self" and ns != own):
                continue
            seen.add(ns)
            for line in _read(f"/proc/{pid}/mountinfo").decode(errors="replace").splitlines():
                fields = line.split()
                if env.marker in line and not (len(fields) > 4 and fields[4] in allowed):
                    out.append(f"mount {fields[4] if len(fields) > 4 else ''} (in {ns}, "
                               f"pid {pid}: {line[:200]})")
    return out


@dataclass
class Expected:
    """What may exist while a client lives: its spawner, the wardens (with their nsjail
    and kernel) of the kernel ids it holds, and up to ``pool`` pooled wardens."""

    clients: set[int] = field(default_factory=set)
    kernels: set[str] = field(default_factory=set)
    pool: int = 0


def leftovers(env: Env, expected: Expected) -> list[str]:
    """Everything of ``env`` that ``expected`` does not account for: processes, run dirs,
    cgroups and mounts. Empty when all is as it should be."""
    procs = processes(env)
    by_pid = {p.pid: p for p in procs}
    allowed: set[int] = set()
    spawners = {p.pid for p in procs if p.kind == "spawner" and p.ppid in expected.clients}
    allowed |= spawners
    pooled = [p for p in procs if p.kind == "warden" and p.title.startswith("pool-")
              and p.ppid in spawners]
    for p in procs:
        if p.kind == "warden" and (p.title in expected.kernels or p in pooled):
            allowed.add(p.pid)
    for kind in ("nsjail", "kernel"):
        for p in procs:
            if p.kind == kind and p.ppid in allowed:
                allowed.add(p.pid)
    found = [f"process {p.kind} {p.pid} (parent {p.ppid}): {p.cmd}" for p in procs
             if p.pid not in allowed]
    if len(pooled) > expected.pool:
        found.append(f"{len(pooled)} pooled wardens, at most {expected.pool} expected: "
                     f"{[p.title for p in pooled]}")
    slots = set()
    for name, record in run_dirs(env).items():
        pid = record.get("warden_pid")
        warden = by_pid.get(pid) if isinstance(pid, int) else None
        if warden is None or warden.pid not in allowed or warden.kind != "warden":
            found.append(f"run dir {env.runtime / name} (warden.json: "
                         f"{json.dumps(record)[:300] if record else 'none'})")
        else:
            slots.add(name)
    for cg in cgroups(env):  # a kernel's cgroup, and its warden's own (<slot>.warden)
        if cg.name.removesuffix(".warden") not in slots:
            found.append(f"cgroup {cg} (procs: "
                         f"{_read(str(cg / 'cgroup.procs')).decode().split()})")
    found += mounts(env, [p.pid for p in procs], slots)
    return found


def settle(check: Callable[[], list[str]], timeout: float) -> list[str]:
    """Poll ``check`` until it finds nothing or ``timeout`` passes; the last findings."""
    end = time.monotonic() + timeout
    found = check()
    while found and time.monotonic() < end:
        time.sleep(0.1)  # polling a condition
        found = check()
    return found


# -- the client process --------------------------------------------------------------------


def proc_stats(pid: int) -> dict[str, int]:
    """Open descriptors and resident memory (KiB) of process ``pid``."""
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        fds = -1
    rss = 0
    for line in _read(f"/proc/{pid}/status").decode().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return {"fds": fds, "rss_kib": rss}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def write_report(path: str | None, report: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(report, indent=2, default=str) + "\n")


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)
