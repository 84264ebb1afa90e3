"""Stress in CI: short runs of the fault-injection and load scripts (``tests/stress/``; the
full-length runs are for people, see the scripts' docstrings), and regression tests for
what those runs found.

The short runs start the scripts as they would be run by hand (a subprocess, an
environment of their own) and assert on their JSON reports: no finding, and the run
covered what it is meant to cover.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import AsyncKernelManager
from test_lifecycle import run_cell

from cellblock.rundir import RunDir
from cellblock.warden.client import SpawnerClient, warm
from cellblock.warden.request import LaunchRequest

from conftest import REPO, TEST_POLICY, audit_events, wait_dead, wait_for

pytestmark = [pytest.mark.jail, pytest.mark.nonroot]

STRESS = REPO / "tests" / "stress"
sys.path.insert(0, str(STRESS))

from faults import MOMENTS, VICTIMS  # noqa: E402


def run_script(name: str, args: list[str], tmp_path: Path, timeout: float) -> dict[str, Any]:
    """Run ``tests/stress/<name>.py`` with ``args``; return its JSON report."""
    report = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, str(STRESS / f"{name}.py"), *args,
                           "--json", str(report)],
                          capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    assert proc.returncode == 0, (f"{name}.py {' '.join(args)} exited {proc.returncode}:\n"
                                  f"{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}")
    return dict(json.loads(report.read_text()))


@pytest.mark.timeout(400)
def test_faults_short(tmp_path: Path) -> None:
    """20 rounds: every victim and every moment at least once (a different half of the
    pairs on each seed); nothing left behind, the next kernel always works."""
    seed = int(time.time())
    report = run_script("faults", ["--rounds", "20", "--seed", str(seed)], tmp_path, 380)
    assert report["findings"] == [], f"seed {seed}: {report['findings']}"
    pairs = [p.split(":") for p in report["pairs"]]
    assert {v for v, _ in pairs} == set(VICTIMS), report["pairs"]
    assert {m for _, m in pairs} == set(MOMENTS), report["pairs"]
    assert report["rounds"] == 20
    # most kills landed inside the operation they were meant to interrupt
    assert report["phases"].get("during", 0) >= 6, report["phases"]


@pytest.mark.timeout(400)
def test_load_short(tmp_path: Path) -> None:
    """8 kernels started and stopped twice, then 35 s of mixed work: every output exact,
    the gate answers, nothing leaks, and the client holds no more descriptors after than
    before (nor after each start/stop cycle)."""
    report = run_script("load", ["--kernels", "8", "--seconds", "35", "--churn", "2"],
                        tmp_path, 380)
    assert report["findings"] == [], report["findings"]
    assert report["kernels_run"] == 8
    assert set(report["cells"]) == {"1+1", "print", "error", "table", "interrupt", "secret",
                                    "cpu"}, report["cells"]
    assert report["kernel_info"]["n"] > 10, report["kernel_info"]
    assert report["client"]["stopped"]["fds"] <= report["client"]["before"]["fds"], \
        report["client"]
    churn = [c["fds"] for c in report["client"]["churn"]]
    assert len(churn) == 2 and churn[1] <= churn[0], report["client"]


def nsjail_of(warden_pid: int) -> int:
    """The nsjail process a warden started."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_bytes()
            cmd = Path(f"/proc/{name}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[stat.rfind(b")") + 2:].split()[1]) == warden_pid and b"nsjail" in cmd:
            return int(name)
    raise AssertionError(f"warden {warden_pid} has no nsjail")


@pytest.mark.parametrize("profile", ["pooled", "agent"])
async def test_restart_after_the_jail_died(profile: str, no_leftovers: None) -> None:
    """Found by faults.py (nsjail killed, then ``restart_kernel``): the restart's
    shutdown_request, sent to the dead kernel, stayed queued on jupyter_client's closed
    control socket for its 100 ms linger and reached the next kernel on the same ports,
    which shut down before its first cell ("Kernel died before replying to kernel_info").
    An adoption from the warm pool (~50 ms) hit it nearly every time."""
    if profile == "pooled":
        assert warm("pooled", timeout=120)["ready"] == 2
    km = AsyncKernelManager(kernel_name=f"cellblock-{profile}")
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        for _ in range(5):
            os.kill(nsjail_of(km.provisioner.process.pid), signal.SIGKILL)
            assert await wait_dead(km)
            await km.restart_kernel(now=False)
            await kc.wait_for_ready(timeout=60)
            out = await run_cell(kc, "1+1")
            assert out["results"] == [{"text/plain": "2"}], out
        exits = [e.fields.get("reason") for e in audit_events(km.kernel_id)
                 if e.event == "kernel.exit"]
        assert exits == ["kernel process exited with status -9"] * 5, exits
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=False)
        if profile == "pooled":
            assert warm("pooled", size=0)["size"] == 0


async def test_requests_right_after_the_spawner_was_killed(jupyter_env: dict[str, str],
                                                           no_leftovers: None) -> None:
    """Found by faults.py (spawner killed, next round at once): a request sent while the
    SIGKILLed spawner still looked alive failed with a raw ConnectionResetError (a start
    from start_kernel, a pool query from warm()). Now a new spawner answers it."""
    client = SpawnerClient.instance()
    for _ in range(3):
        assert client.pool(LaunchRequest(op="pool", profile="agent", env=dict(os.environ)))["ok"]
        assert client._proc is not None
        os.kill(client._proc.pid, signal.SIGKILL)  # still dying as the next request goes
        state = client.pool(LaunchRequest(op="pool", profile="agent", env=dict(os.environ)))
        assert state["ok"], state
        os.kill(client._proc.pid, signal.SIGKILL)
        km = AsyncKernelManager(kernel_name="cellblock-agent")
        await km.start_kernel()
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=60)
            out = await run_cell(kc, "1+1")
            assert out["results"] == [{"text/plain": "2"}], out
        finally:
            kc.stop_channels()
            await km.shutdown_kernel(now=False)


PR_SET_CHILD_SUBREAPER = 36


def _children_of(pid: int, marker: bytes) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_bytes()
            cmd = Path(f"/proc/{name}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[stat.rfind(b")") + 2:].split()[1]) == pid and marker in cmd:
            out.append(int(name))
    return out


def _reap(pids: list[int], timeout: float = 20) -> None:
    """Reap those of ``pids`` that are (or become) zombie children of this process."""
    end = time.monotonic() + timeout
    left = list(pids)
    while left and time.monotonic() < end:
        for pid in list(left):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not (or no longer) our child
                if not Path(f"/proc/{pid}").exists():
                    left.remove(pid)
                continue
            if done:
                left.remove(pid)
        time.sleep(0.05)  # polling for the children to end


async def test_restart_after_an_orphaned_warden_was_killed(jupyter_env: dict[str, str],
                                                           no_leftovers: None) -> None:
    """Found by faults.py (spawner killed, then the kernel's warden): the warden, orphaned
    by the spawner, stays a zombie until whoever adopted it reaps it. The sweep took the
    zombie for a live warden and kept its run dir and cgroup; the restart (same kernel id,
    same run dir) failed with FileExistsError, and that failed warden then removed the
    old run dir, so the old cgroup was never swept. Here this process adopts the orphans
    (a child subreaper) and reaps them only at the end: the zombie lasts the whole test."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    km = AsyncKernelManager(kernel_name="cellblock-agent")
    kc = None
    orphans: list[int] = []
    try:
        await km.start_kernel()
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=60)
        spawner = SpawnerClient.instance()._proc
        assert spawner is not None
        spawner.kill()
        spawner.wait()
        warden = km.provisioner.process.pid
        nsjail = nsjail_of(warden)
        orphans = [warden, nsjail, *_children_of(nsjail, b"cellblock_kernel")]
        os.kill(warden, signal.SIGKILL)
        assert await wait_dead(km)
        assert Path(f"/proc/{warden}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] == b"Z"
        await km.restart_kernel(now=False)
        await kc.wait_for_ready(timeout=60)
        out = await run_cell(kc, "1+1")
        assert out["results"] == [{"text/plain": "2"}], out
    finally:
        if kc is not None:
            kc.stop_channels()
        await km.shutdown_kernel(now=False)
        _reap(orphans)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


MAKE_RUN_DIR_AND_DIE = """
import os, signal, sys
from pathlib import Path
from cellblock.rundir import RunDir, jail_ids
RunDir(Path(sys.argv[1]), sys.argv[2]).create(*jail_ids())
os.kill(os.getpid(), signal.SIGKILL)  # a warden killed before it wrote warden.json
"""


async def test_run_dir_of_a_warden_killed_before_its_record(jupyter_env: dict[str, str],
                                                           no_leftovers: None) -> None:
    """Found by faults.py (a warden killed during its start, 2 rounds in 250): a warden
    killed after making its run dir but before writing
    warden.json left both behind for 5 minutes, until the sweep took the
    dir for old enough; a restart on that kernel id failed meanwhile (FileExistsError).
    Here a process makes the run dir with the warden's own code and dies at that point;
    a kernel started on the same kernel id right after must start."""
    import uuid

    from cellblock.rundir import runtime_base

    kernel_id = str(uuid.uuid4())
    run = runtime_base() / kernel_id
    proc = subprocess.run([sys.executable, "-c", MAKE_RUN_DIR_AND_DIE, str(runtime_base()),
                           kernel_id], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert run.is_dir() and not (run / "warden.json").exists()
    km = AsyncKernelManager(kernel_name="cellblock-agent")
    await km.start_kernel(kernel_id=kernel_id)
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        out = await run_cell(kc, "1+1")
        assert out["results"] == [{"text/plain": "2"}], out
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=False)
    assert not run.exists()


def _pool_slot_in_probe(base: Path) -> tuple[Path, int] | None:
    """A pooled kernel that has bound its five sockets (so its warden is probing it, or
    has): its run dir and the kernel's pid."""
    for entry in base.iterdir() if base.is_dir() else []:
        if not entry.name.startswith("pool-"):
            continue
        record = RunDir(base, entry.name).read_record()
        if record is None or not record.nsjail_pid:
            continue
        if not all((entry / "ipc" / f"k-{p}").exists() for p in range(1, 6)):
            continue
        kernels = _children_of(record.nsjail_pid, b"cellblock_kernel")
        if kernels:
            return entry, kernels[0]
    return None


def _state(base: Path, slot: str) -> str:
    record = RunDir(base, slot).read_record()
    return record.state if record is not None else ""


async def test_pooled_kernel_dying_while_probed(jupyter_env: dict[str, str], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                no_leftovers: None) -> None:
    """Found by faults.py (a pooled kernel killed while the pool refilled): a pooled
    warden whose kernel died after binding its sockets, before answering the warden's
    kernel_info, waited for that answer until the profile's startup_timeout (60 s) and
    held its pool slot meanwhile. Here the kernel is stopped once its sockets exist (so
    it cannot answer), then killed; the startup_timeout is 600 s, and the warden must be
    gone long before it."""
    policy = tmp_path / "policy.toml"
    policy.write_text(TEST_POLICY.replace("warm_pool = 2", "warm_pool = 1\n"
                                          "startup_timeout = 600"))
    monkeypatch.setenv("CELLBLOCK_POLICY", str(policy))
    base = Path(jupyter_env["CELLBLOCK_RUNTIME_DIR"])
    client = SpawnerClient.instance()
    try:
        for _ in range(5):  # until the kernel is caught before it answered
            assert client.pool(
                LaunchRequest(op="pool", profile="pooled", env=dict(os.environ)))["ok"]
            found = wait_for(lambda: _pool_slot_in_probe(base), timeout=60, interval=0.001)
            assert found, "no pooled kernel bound its sockets"
            run, kernel = found
            os.kill(kernel, signal.SIGSTOP)
            record = RunDir(base, run.name).read_record()
            if not wait_for(lambda run=run: _state(base, run.name) == "pooled", timeout=2):
                break
            os.kill(kernel, signal.SIGCONT)  # it answered in time: empty the pool, again
            assert warm("pooled", size=0)["size"] == 0
            assert wait_for(lambda: not any(base.glob("pool-*")), timeout=30)
        else:
            pytest.fail("never caught a pooled kernel between its sockets and its answer")
        assert record is not None
        os.kill(kernel, signal.SIGKILL)
        warden = record.warden_pid
        assert wait_for(lambda: not Path(f"/proc/{warden}").exists() or Path(
            f"/proc/{warden}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] == b"Z",
            timeout=60), "the pooled warden still waits for its dead kernel"
    finally:
        assert warm("pooled", size=0)["size"] == 0


async def test_failed_start_leaves_a_live_kernels_run_dir_alone(
        jupyter_env: dict[str, str], no_leftovers: None) -> None:
    """Seen while looking into the faults.py findings above: a warden whose run dir
    already existed (FileExistsError: another warden, alive, holds that kernel id)
    removed that run dir in its cleanup, as if it were its own. Here the run dir names a
    live warden (this process); the start fails, and the run dir must still be there."""
    import dataclasses
    import uuid

    from cellblock.errors import JailStartError
    from cellblock.rundir import WardenRecord, process_start, runtime_base

    kernel_id = str(uuid.uuid4())
    run = RunDir(runtime_base(), kernel_id)
    run.path.mkdir(parents=True)
    record = WardenRecord(kernel_id=kernel_id, profile="agent", warden_pid=os.getpid(),
                          jail_uid=os.getuid(), cgroup_version=None, cgroup_parent="",
                          started=time.time(), client_ports={}, slot=kernel_id,
                          warden_start=process_start(os.getpid()) or 0)
    run.write_record(dataclasses.replace(record))
    try:
        km = AsyncKernelManager(kernel_name="cellblock-agent")
        with pytest.raises(JailStartError, match="File exists"):
            await km.start_kernel(kernel_id=kernel_id)
        await km.cleanup_resources()
        assert run.read_record() == record, "the failed warden removed a live kernel's run dir"
    finally:
        run.remove()


def test_a_dead_wardens_empty_cgroup_is_reused_a_live_ones_is_not(jupyter_env: dict[str, str],
                                                                   no_leftovers: None) -> None:
    """A warden SIGKILLed before its cgroup was swept leaves ``<slot>.warden`` behind; the
    restart of that kernel (same slot) made its own there first and failed with "File
    exists" (seen in the unprivileged suite). Empty, it is reused; with a process in it (a
    live warden of that slot) it is still refused."""
    import uuid

    from cellblock.cgroups import KernelCgroup, detect
    from cellblock.errors import HostUnsupported
    from cellblock.policy import load_policy

    version = detect().version
    if version is None:
        pytest.skip("no cgroup controllers here")
    policy = load_policy()
    parent, limits = policy.host.cgroup_parent, policy.profiles["agent"].limits
    slot = str(uuid.uuid4())
    left = KernelCgroup.for_warden(version, parent, slot)
    for d in left.dirs:  # what the dead warden left: the directories, nothing in them
        d.parent.mkdir(parents=True, exist_ok=True)
        d.mkdir()
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        cg = KernelCgroup.create_for_warden(version, parent, slot, limits)
        cg.join(sleeper.pid)
        with pytest.raises(HostUnsupported, match="File exists"):
            KernelCgroup.create_for_warden(version, parent, slot, limits)
    finally:
        sleeper.kill()
        sleeper.wait()
        left.remove_empty()
    assert not any(d.exists() for d in left.dirs)


KILL_WARDEN_AT = """
import os, signal, sys
from cellblock.cgroups import KernelCgroup
from cellblock.rundir import RunDir
from cellblock.warden.warden import Warden

where, slot = sys.argv[1], sys.argv[2]
if where == "warden cgroup joined":
    join = KernelCgroup.join
    def joined(self, pid=0):
        join(self, pid)
        if self.dirs[0].name.endswith(".warden"):
            os.kill(os.getpid(), signal.SIGKILL)
    KernelCgroup.join = joined
else:
    RunDir.write_record = lambda self, record: os.kill(os.getpid(), signal.SIGKILL)
Warden(slot, "pooled", None, pooled=True).start_pooled()
"""


@pytest.mark.parametrize("where", ["warden cgroup joined", "record written"])
def test_a_warden_killed_during_its_start_leaves_nothing_the_sweep_misses(
        where: str, jupyter_env: dict[str, str], no_leftovers: None) -> None:
    """Found by the fault stress in CI (round 6, warden:start): a warden SIGKILLed while
    it started left an empty ``<slot>.warden`` cgroup that nothing removed, because it
    made that cgroup before the run dir's record named it, and the sweep finds cgroups by
    the record. The warden here kills itself at the two moments around that: right after
    it joined its own cgroup, and when it writes its record. Either way, one sweep
    afterwards leaves no cgroup and no run dir of that slot."""
    import uuid

    from cellblock.cgroups import KernelCgroup, detect
    from cellblock.policy import load_policy
    from cellblock.rundir import runtime_base, sweep_stale

    version = detect().version
    if version is None:
        pytest.skip("no cgroup controllers here")
    slot = str(uuid.uuid4())
    proc = subprocess.run([sys.executable, "-c", KILL_WARDEN_AT, where, slot],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])
    parent = load_policy().host.cgroup_parent
    warden_cg = KernelCgroup.for_warden(version, parent, slot)
    kernel_cg = KernelCgroup.for_kernel(version, parent, slot)
    try:
        sweep_stale()
        left = [str(d) for d in (*warden_cg.dirs, *kernel_cg.dirs) if d.exists()]
        assert not left, f"killed at {where!r}, the sweep left cgroups: {left}"
        assert not (runtime_base() / slot).exists(), "the sweep left the run dir"
    finally:  # on a failure too: what the sweep missed must not fail later tests
        warden_cg.remove_empty()
        kernel_cg.remove()
        RunDir(runtime_base(), slot).remove()


def test_the_spawner_sweeps_after_a_warden_it_reaps(jupyter_env: dict[str, str],
                                                     tmp_path: Path,
                                                     no_leftovers: None) -> None:
    """Found by the fault stress (warden:refill): a warm-pool warden SIGKILLed while it
    started kept its run dir for 45 s. The warden refilling the pool swept before the dead
    one was reaped (so it still looked alive), and nothing else swept until the next
    start. The spawner reaps its wardens: it sweeps the slot of each one it reaps. Here a
    cold launch's warden is SIGKILLed once its record is written, and nobody else
    sweeps: no provisioner (its cleanup sweeps), no other start."""
    import uuid

    from jupyter_client.connect import write_connection_file

    from cellblock.rundir import runtime_base, sweep_stale

    _, info = write_connection_file(str(tmp_path / "client.json"), ip="127.0.0.1",
                                    key=b"a-test-key")
    conn = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in info.items()}
    kernel_id = str(uuid.uuid4())
    run = RunDir(runtime_base(), kernel_id)
    sock = SpawnerClient.instance().request(LaunchRequest(
        profile="agent", env=dict(os.environ), kernel_id=kernel_id, client_conn=conn))
    try:
        assert wait_for(lambda: run.read_record() is not None, timeout=60, interval=0.001), \
            "the warden never wrote its record"
        record = run.read_record()
        assert record is not None
        os.kill(record.warden_pid, signal.SIGKILL)
        assert wait_for(lambda: not run.path.exists(), timeout=30), \
            f"the spawner reaped the warden but left its run dir: {sorted(run.path.iterdir())}"
    finally:
        sock.close()
        sweep_stale()  # on a failure too: what the spawner left must not fail later tests
