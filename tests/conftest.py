"""Shared fixtures: an isolated Jupyter environment with cellblock's kernelspecs
installed, an operator policy with a small ``tiny`` profile for limit tests, and a
check after every jail test that it left no process, run dir or cgroup behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

TEST_POLICY = """
[profiles.tiny]
display_name = "Python (cellblock: tiny, tests)"
description = "Small limits so limit tests are quick."
allow_stdin = true

[profiles.canary]
display_name = "Python (cellblock: canary, tests)"
description = "Every carrier open (HTML, stdin, history), redaction on, a 64 KiB head."
allow_stdin = true

[profiles.canary.output]
stream_head = "64KiB"
stream_tail = "16KiB"
max_text = "64KiB"
redact_secrets = true
redact_env = ["CELLBLOCK_TEST_EXACT_SECRET"]
allow_comms = true

[profiles.tiny.limits]
memory = "256MiB"
pids = 48
cpus = 1.0
tmp_size = "16MiB"
home_size = "8MiB"
open_files = 512
file_size = "64MiB"

# Budget tests (tests/test_budgets.py): one budget each, small, the others off.
[profiles.cell.budgets]
cell_seconds = 1.5
grace_seconds = 1
lifetime_seconds = 0
idle_seconds = 0
executions = 0
output_bytes = 0

[profiles.brief.budgets]
lifetime_seconds = 4
idle_seconds = 0

[profiles.idler.budgets]
idle_seconds = 2

[profiles.counted]
audit_code_text = true

[profiles.counted.budgets]
executions = 3

[profiles.chatty.budgets]
output_bytes = "32KiB"

[profiles.off]
enabled = false

# Kept cut output (tests/test_output_cost.py): a spool that fills after two cells.
[profiles.spooled.output]
spool_bytes = "300KiB"

# Warm pool tests (tests/test_pool.py).
[profiles.pooled]
warm_pool = 2
"""


def _proc(pid: str, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return b""


def jail_processes(marker: str = "") -> list[str]:
    """Host processes that belong to cellblock kernels of this test session (``marker``
    is in its runtime dir, or a kernel id): wardens (forked by the spawner, titled
    ``cellblock-warden <kernel id>``, with the session's environment), nsjail, the kernels
    whose nsjail is ours or gone, and spawners whose client is gone."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        cmd = _proc(pid, "cmdline").replace(b"\0", b" ").decode(errors="replace").strip()
        if not cmd or "pytest" in cmd:
            continue
        stat = _proc(pid, "stat")
        ppid = stat[stat.rfind(b")") + 2:].split()[1].decode() if stat else "1"
        parent = _proc(ppid, "cmdline").replace(b"\0", b" ").decode(errors="replace")
        if cmd.startswith("cellblock-warden"):
            ours = marker in cmd or marker.encode() in _proc(pid, "environ")
        elif cmd.startswith("cellblock-spawner"):  # lives as long as its client, no longer
            ours = marker.encode() in _proc(pid, "environ") and (ppid == "1" or not parent)
        elif "nsjail --config" in cmd:
            ours = marker in cmd
        elif "-m cellblock_kernel" in cmd:
            ours = ppid == "1" or "nsjail" not in parent or marker in parent
        else:
            continue
        if ours:
            out.append(f"{pid}: {cmd[:160]}")
    return out


def wait_for(condition, timeout: float = 15.0, interval: float = 0.02):
    """Poll ``condition`` until it returns a truthy value; return it, or the last value."""
    end = time.monotonic() + timeout
    value = condition()
    while not value and time.monotonic() < end:
        time.sleep(interval)
        value = condition()
    return value


def cgroup_dirs(parent: str) -> list[Path]:
    root = Path("/sys/fs/cgroup")
    return [root / parent] + [root / c / parent for c in ("memory", "pids", "cpu", "cpuacct")]


def cgroup_leftovers(parent: str = "cellblock") -> list[str]:
    return [str(p) for d in cgroup_dirs(parent) if d.is_dir() for p in d.iterdir()
            if p.is_dir()]


@pytest.fixture(scope="session")
def jupyter_env() -> Iterator[dict[str, str]]:
    """JUPYTER_PATH etc. pointing at a temp prefix where `cellblock install` put the specs."""
    top = Path(tempfile.mkdtemp(prefix="cellblock-test-"))
    os.chmod(top, 0o711)  # the jail's uid traverses the runtime dir below it
    policy = top / "policy.toml"
    policy.write_text(TEST_POLICY)
    runtime = top / "run"
    env = {
        "JUPYTER_PATH": str(top / "share" / "jupyter"),
        "JUPYTER_RUNTIME_DIR": str(top / "jupyter-runtime"),
        "JUPYTER_CONFIG_DIR": str(top / "config"),
        "JUPYTER_DATA_DIR": str(top / "data"),
        "JUPYTER_PLATFORM_DIRS": "1",
        "CELLBLOCK_POLICY": str(policy),
        "CELLBLOCK_RUNTIME_DIR": str(runtime),
        "CELLBLOCK_AUDIT_DIR": str(top / "audit"),
        # Each test session gets its own cgroup parent, so the leftover check sees only
        # its own kernels (a delegated parent for unprivileged runs comes from the env).
        "CELLBLOCK_CGROUP_PARENT": os.environ.get("CELLBLOCK_CGROUP_PARENT", "")
        or f"cellblock/{top.name}",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update({k: v for k, v in env.items() if v})
    subprocess.run([str(BIN / "cellblock"), "install", "--prefix", str(top)], check=True,
                   capture_output=True)
    yield env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    shutil.rmtree(top, ignore_errors=True)
    if env["CELLBLOCK_CGROUP_PARENT"].endswith(top.name):
        for d in cgroup_dirs(env["CELLBLOCK_CGROUP_PARENT"]):
            with contextlib.suppress(OSError):
                d.rmdir()


@pytest.fixture
def no_leftovers(jupyter_env: dict[str, str]) -> Iterator[None]:
    """After the test: no warden, nsjail or kernel process, run dir or cgroup survives."""
    yield
    runtime = Path(jupyter_env["CELLBLOCK_RUNTIME_DIR"])
    marker = runtime.parent.name
    procs = wait_for(lambda: not jail_processes(marker), timeout=20)
    assert procs, f"processes left behind: {jail_processes(marker)}"
    dirs = wait_for(lambda: not (runtime.is_dir() and any(runtime.iterdir())), timeout=10)
    assert dirs, f"run dirs left behind: {list(runtime.iterdir())}"
    parent = jupyter_env["CELLBLOCK_CGROUP_PARENT"]
    assert not cgroup_leftovers(parent), f"cgroups left behind: {cgroup_leftovers(parent)}"
    assert not mount_leftovers(runtime), f"mounts left behind: {mount_leftovers(runtime)}"


def mount_leftovers(runtime: Path) -> list[str]:
    """Host mounts under the runtime dir (as root, each kernel's ipc dir is a tmpfs)."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(f"{runtime}/")]


CANARY_ENV = "CELLBLOCK_TEST_CANARY_ENV"


@pytest.fixture
async def kernel(request: pytest.FixtureRequest, jupyter_env: dict[str, str],
                 monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Any, Any]]:
    """A started cellblock kernel and its client (profile from ``@pytest.mark.profile``,
    default agent). A canary variable is set in the client's environment, which the
    jail must never see."""
    from jupyter_client.manager import AsyncKernelManager

    marker = request.node.get_closest_marker("profile")
    profile = marker.args[0] if marker else "agent"
    monkeypatch.setenv(CANARY_ENV, "canary-env-value-8d1f2e")
    km = AsyncKernelManager(kernel_name=f"cellblock-{profile}")
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        yield km, kc
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=False)


def audit_events(kernel_id: str) -> list[Any]:
    """The audit events of one kernel of this test session."""
    from cellblock.audit import read_events

    path = Path(os.environ["CELLBLOCK_AUDIT_DIR"]) / f"{kernel_id}.jsonl"
    return list(read_events(path)) if path.exists() else []


async def wait_dead(km: Any, timeout: float = 30) -> bool:
    """Poll until the kernel manager says the kernel is gone."""
    end = time.monotonic() + timeout
    while await km.is_alive():
        if time.monotonic() > end:
            return False
        await asyncio.sleep(0.02)  # polling a condition
    return True


@pytest.fixture
def operator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Write an operator policy file and point $CELLBLOCK_POLICY at it."""

    def write(text: str) -> Path:
        path = tmp_path / "policy.toml"
        path.write_text(text)
        monkeypatch.setenv("CELLBLOCK_POLICY", str(path))
        return path

    return write


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, for a server a test starts."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def jupyter_app(argv: list[str], port: int, token: str, cwd: Path, name: str,
                ready: str = "/api/status",
                timeout: float = 180) -> Iterator[subprocess.Popen[bytes]]:
    """Run a Jupyter web app (``jupyter lab``, ``jupyter kernelgateway``, ...) listening on
    127.0.0.1:``port`` with ``token``; yield it once GET ``ready`` answers 200, stop it
    (SIGTERM, then SIGKILL) afterwards. Its output goes to ``cwd/<name>.log``, which a
    failed start quotes. Used by tests/test_jupyterlab.py and tests/test_gateway.py."""
    import signal
    import urllib.error
    import urllib.request

    log_path = cwd / f"{name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)

    def answers() -> bool:
        if proc.poll() is not None:
            return True
        req = urllib.request.Request(f"http://127.0.0.1:{port}{ready}",
                                     headers={"Authorization": f"token {token}"})
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    try:
        up = wait_for(answers, timeout=timeout, interval=0.2) and proc.poll() is None
        assert up, f"{argv[:3]} did not answer {ready}:\n{log_path.read_text()[-3000:]}"
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def make_world() -> Iterator[Any]:
    """Gates between raw ZMQ sockets (tests/gate_harness.py): ``make_world(**options)``
    gives a World; every one made is closed and checked for leftovers at the end."""
    from gate_harness import worlds

    with worlds() as make:
        yield make
