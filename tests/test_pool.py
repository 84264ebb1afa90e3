"""The warm pool: kernels started ahead of time by this process's spawner and adopted by
a launch. Real spawner, wardens, nsjail and ipykernel; the ``pooled`` profile of the test
policy keeps two kernels warm.

What must hold: an adopted kernel is an ordinary kernel of its launch (its kernel id, the
client's key and ports, the launch's datasets, a fresh state); a used kernel never goes
back; the pool refills, stays bounded and is drained when the policy changes; a launch the
pool cannot serve (a directory dataset) starts cold; nothing is left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import AsyncKernelManager
from test_lifecycle import run_cell

from cellblock.rundir import RunDir
from cellblock.warden.client import SpawnerClient, warm
from cellblock.warden.request import LaunchRequest

from conftest import (
    TEST_POLICY,
    audit_events,
    free_port,
    jail_processes,
    jupyter_app,
    wait_for,
)

pytestmark = [pytest.mark.jail, pytest.mark.nonroot, pytest.mark.usefixtures("no_leftovers")]


def pool_state(profile: str = "pooled") -> dict[str, Any]:
    return SpawnerClient.instance().pool(
        LaunchRequest(op="pool", profile=profile, env=dict(os.environ)))


@pytest.fixture
def pool(no_leftovers: None) -> Iterator[dict[str, Any]]:
    """The ``pooled`` profile's pool, full; emptied afterwards (before no_leftovers looks)."""
    state = warm("pooled", timeout=120)
    assert state["ready"] == 2, state
    yield state
    assert warm("pooled", size=0)["size"] == 0


async def start(profile: str = "pooled", **kw: Any) -> tuple[AsyncKernelManager, Any]:
    km = AsyncKernelManager(kernel_name=f"cellblock-{profile}", **kw)
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=60)
    return km, kc


async def stop(km: AsyncKernelManager, kc: Any) -> None:
    kc.stop_channels()
    await km.shutdown_kernel(now=False)


def record_of(km: AsyncKernelManager) -> Any:
    base = Path(os.environ["CELLBLOCK_RUNTIME_DIR"])
    for entry in base.iterdir():
        record = RunDir(base, entry.name).read_record()
        if record is not None and record.kernel_id == km.kernel_id:
            return record
    raise AssertionError(f"no run dir names kernel {km.kernel_id}")


async def test_adopted_kernel_is_an_ordinary_fresh_kernel(pool: dict[str, Any]) -> None:
    km, kc = await start()
    try:
        record = record_of(km)
        assert record.slot.startswith("pool-") and record.kernel_id == km.kernel_id
        events = [e.event for e in audit_events(km.kernel_id)]
        # the pooled start is in the kernel's own log, then the adoption, then ready
        assert events.index("kernel.start") < events.index("kernel.adopt") \
            < events.index("kernel.ready"), events
        out = await run_cell(kc, "import os\n"
                                 "print(len(In), os.getuid(), sorted(os.listdir('/tmp')))")
        assert out["stdout"] == "2 1000 []\n", out  # no code ran before this cell
        assert out["reply"]["execution_count"] == 1
        # the client's key: jupyter_client signed and verified every message above
        assert km.session.key and record.client_ports["shell_port"] == km.shell_port
    finally:
        await stop(km, kc)
    # a used kernel never goes back: its slot is gone, the pool refilled with new ones
    assert wait_for(lambda: not (Path(os.environ["CELLBLOCK_RUNTIME_DIR"]) / record.slot)
                    .exists(), timeout=20)
    assert wait_for(lambda: pool_state()["ready"] == 2, timeout=120), pool_state()


async def test_pool_is_bounded_and_refills(pool: dict[str, Any]) -> None:
    kernels = [await start() for _ in range(3)]  # one more than the pool holds
    try:
        slots = [record_of(km).slot for km, _ in kernels]
        assert sum(s.startswith("pool-") for s in slots) >= 2
        assert len(set(slots)) == 3
        ids = [(await run_cell(kc, "import os; print(os.getpid())"))["stdout"]
               for _, kc in kernels]
        assert ids == ["1\n"] * 3  # each is pid 1 of its own pid namespace
        state = pool_state()
        assert state["ready"] + state["starting"] <= 2, state
        assert wait_for(lambda: pool_state()["ready"] == 2, timeout=120), pool_state()
    finally:
        for km, kc in kernels:
            await stop(km, kc)


async def test_restart_adopts_a_new_kernel(pool: dict[str, Any]) -> None:
    km, kc = await start()
    try:
        await run_cell(kc, "x = 41")
        first = record_of(km).slot
        await km.restart_kernel(now=False)
        await kc.wait_for_ready(timeout=60)
        out = await run_cell(kc, "print('x' in dir())")
        assert out["stdout"] == "False\n"
        assert record_of(km).slot != first
    finally:
        await stop(km, kc)


async def test_policy_change_drains_the_pool(pool: dict[str, Any], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    before = pool_state()
    policy = tmp_path / "policy.toml"
    policy.write_text(TEST_POLICY.replace("warm_pool = 2", "warm_pool = 1"))
    monkeypatch.setenv("CELLBLOCK_POLICY", str(policy))
    km, kc = await start()  # another policy: the old pool cannot serve it
    try:
        assert not record_of(km).slot.startswith("pool-")
        after = pool_state()
        assert after["key"] != before["key"] and after["size"] == 1
    finally:
        await stop(km, kc)
    assert warm("pooled", size=0)["size"] == 0


@pytest.fixture
def datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
             no_leftovers: None) -> Iterator[Path]:
    d = tmp_path / "data"
    (d / "dir").mkdir(parents=True)
    (d / "dir" / "a.csv").write_text("a\n")
    (d / "sales.csv").write_text("day,amount\n1,10\n")
    for p in [d, *d.rglob("*")]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    policy = tmp_path / "policy.toml"
    policy.write_text(TEST_POLICY.replace("warm_pool = 2", f"""warm_pool = 2
datasets = ["sales", "dir"]

[datasets.sales]
path = "{d / 'sales.csv'}"
[datasets.dir]
path = "{d / 'dir'}"
"""))
    monkeypatch.setenv("CELLBLOCK_POLICY", str(policy))
    assert warm("pooled", timeout=120)["ready"] == 2
    yield d
    assert warm("pooled", size=0)["size"] == 0


async def test_file_dataset_granted_at_adoption(datasets: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELLBLOCK_DATASETS", "sales")
    km, kc = await start()
    try:
        assert record_of(km).slot.startswith("pool-")
        out = await run_cell(kc, "from cellblock_kernel import datasets\n"
                                 "print(datasets.open('sales').read().decode())")
        assert out["stdout"] == "day,amount\n1,10\n\n", out
    finally:
        await stop(km, kc)


async def test_directory_dataset_starts_cold(datasets: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELLBLOCK_DATASETS", "dir")
    km, kc = await start()
    try:
        assert not record_of(km).slot.startswith("pool-")  # mounted at jail start
        out = await run_cell(kc, "print(open('/data/dir/a.csv').read())")
        assert out["stdout"] == "a\n\n", out
    finally:
        await stop(km, kc)


CLIENT = """
import asyncio, os
from cellblock.warden.client import warm
from jupyter_client.manager import AsyncKernelManager
async def main():
    warm("pooled", timeout=120)
    km = AsyncKernelManager(kernel_name="cellblock-pooled")
    await km.start_kernel()
    kc = km.client(); kc.start_channels(); await kc.wait_for_ready(timeout=60)
    warm("pooled", timeout=120)
    print("READY", km.kernel_id, flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


def test_killed_client_takes_its_pool_along(tmp_path: Path, no_leftovers: None) -> None:
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(CLIENT))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("READY"), line
    marker = Path(os.environ["CELLBLOCK_RUNTIME_DIR"]).parent.name
    assert len([p for p in jail_processes(marker) if "nsjail" in p]) == 3  # 1 used + 2 warm
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert wait_for(lambda: not jail_processes(marker), timeout=30), jail_processes(marker)


async def test_spawner_death_leaves_running_kernels_alone(pool: dict[str, Any]) -> None:
    km, kc = await start()
    try:
        spawner = SpawnerClient.instance()._proc
        assert spawner is not None
        spawner.kill()
        spawner.wait()
        out = await run_cell(kc, "print(6 * 7)")
        assert out["stdout"] == "42\n"
        assert await km.is_alive()
        km2, kc2 = await start("agent")  # a new spawner serves the next launch
        await stop(km2, kc2)
    finally:
        await stop(km, kc)


async def test_jupyter_server_fills_the_pool_at_start(tmp_path: Path,
                                                      no_leftovers: None) -> None:
    """`jupyter server extension enable cellblock`: the pool is full before the first
    kernel, and Jupyter Server's kernels are adopted from it."""
    import json
    import uuid

    from tornado.httpclient import AsyncHTTPClient

    port, token = free_port(), uuid.uuid4().hex
    argv = [sys.executable, "-m", "jupyter_server", "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={token}", "--ServerApp.open_browser=False",
            f"--ServerApp.root_dir={tmp_path}", "--ServerApp.jpserver_extensions=cellblock=True",
            *(["--allow-root"] if os.geteuid() == 0 else [])]
    base = Path(os.environ["CELLBLOCK_RUNTIME_DIR"])

    def pooled() -> list[str]:
        records = [RunDir(base, e.name).read_record() for e in base.iterdir()] \
            if base.is_dir() else []
        return [r.slot for r in records if r is not None and r.state == "pooled"]

    http = AsyncHTTPClient()
    try:
        with jupyter_app(argv, port, token, tmp_path, "jupyter-server"):
            assert wait_for(lambda: len(pooled()) == 2, timeout=120), "the pool did not fill"
            auth = {"Authorization": f"token {token}"}
            resp = await http.fetch(f"http://127.0.0.1:{port}/api/kernels", method="POST",
                                    headers=auth, body=json.dumps({"name": "cellblock-pooled"}))
            kernel_id = json.loads(resp.body)["id"]
            record = next(r for e in base.iterdir()
                          if (r := RunDir(base, e.name).read_record())
                          and r.kernel_id == kernel_id)
            assert record.slot.startswith("pool-")
            await http.fetch(f"http://127.0.0.1:{port}/api/kernels/{kernel_id}",
                             method="DELETE", headers=auth)
    finally:
        http.close()
