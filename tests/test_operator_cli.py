"""The operator's view: `cellblock ps`, `cellblock kill`, `cellblock audit`, the audit
schema, and OpenTelemetry, against real jailed kernels. Every CLI call is a separate
process, as an operator's would be."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from jupyter_client.manager import AsyncKernelManager
from test_budgets import audit_events, collect, jailed, run, wait_dead

from conftest import BIN, cgroup_leftovers

CLI = str(BIN / "cellblock")


def cellblock(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, check=check,
                          timeout=60)


def ps() -> list[dict[str, Any]]:
    return json.loads(cellblock("ps", "--json").stdout)


@pytest.fixture
async def kernels(jupyter_env: dict[str, str]) -> AsyncIterator[Any]:
    """start(profile) -> (km, kc); every kernel is shut down afterwards."""
    started: list[tuple[AsyncKernelManager, Any]] = []

    async def start(profile: str) -> tuple[AsyncKernelManager, Any]:
        km = AsyncKernelManager(kernel_name=f"cellblock-{profile}")
        await km.start_kernel()
        kc = km.client()
        kc.start_channels()
        started.append((km, kc))
        await kc.wait_for_ready(timeout=60)
        return km, kc

    yield start
    for km, kc in started:
        kc.stop_channels()
        if km.has_kernel:  # a test may have shut it down itself
            await km.shutdown_kernel(now=False)


@jailed
async def test_kill_all_stops_every_sandbox_within_two_seconds(
    kernels: Any, jupyter_env: dict[str, str],
) -> None:
    pairs = [await kernels(p) for p in ("agent", "analyst", "tiny")]
    ids = {km.kernel_id for km, _ in pairs}
    listed = ps()
    assert {row["kernel_id"] for row in listed} == ids
    for row in listed:
        assert row["state"] == "idle" and row["age_seconds"] >= 0
        assert row["memory_bytes"] is None or row["memory_bytes"] > 1024 * 1024
    profiles = {row["kernel_id"]: row["profile"] for row in listed}
    assert sorted(profiles.values()) == ["agent", "analyst", "tiny"]
    # a cell is running in one of them when the switch is pulled
    _, kc0 = pairs[0]
    msg_id = kc0.execute("import time\ntime.sleep(60)")
    assert (await asyncio.to_thread(
        lambda: _wait(lambda: any(r["state"] == "busy" for r in ps()))))

    done = await asyncio.to_thread(cellblock, "kill", "--all")
    for km, _ in pairs:  # the 60 s cell does not hold its kernel up (its speed: benchmarks)
        assert await wait_dead(km, timeout=30)
    assert sorted(line.split()[0] for line in done.stdout.splitlines()) == sorted(ids)
    assert all(line.endswith("stopped") for line in done.stdout.splitlines())
    # nothing of these kernels is left: process, run dir, cgroup
    runtime = Path(jupyter_env["CELLBLOCK_RUNTIME_DIR"])
    parent = jupyter_env["CELLBLOCK_CGROUP_PARENT"] or "cellblock"
    for kernel_id in ids:
        assert not processes_of(kernel_id)
        assert not (runtime / kernel_id).exists()
        assert not [c for c in cgroup_leftovers(parent) if c.endswith(kernel_id)]
    assert ps() == []
    out = await collect(kc0, msg_id, timeout=10)
    assert out["errors"] == ["cellblock: kernel stopped by operator"]
    assert out["reply"]["status"] == "error"
    for km, _ in pairs:
        exits = [e for e in audit_events(km.kernel_id) if e.event == "kernel.exit"]
        assert exits[0].fields["reason"] == "stopped by operator"


def processes_of(kernel_id: str) -> list[str]:
    """Host processes whose command line names this kernel (its warden and nsjail; the
    kernel inside dies with nsjail, the pid namespace's parent). conftest's
    jail_processes would also count other test runs' kernels on a shared machine."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if kernel_id.encode() in cmd and b"pytest" not in cmd:
            found.append(f"{pid}: {cmd[:120]!r}")
    return found


def _wait(condition: Any, timeout: float = 15.0) -> bool:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)  # polling a condition
    return True


@jailed
async def test_kill_by_profile_and_by_id_prefix_with_a_reason(kernels: Any) -> None:
    (tiny, _), (agent, agent_kc) = await kernels("tiny"), await kernels("agent")
    done = await asyncio.to_thread(cellblock, "kill", "--profile", "tiny")
    assert done.stdout.split()[:2] == [tiny.kernel_id, "tiny"]
    assert await wait_dead(tiny, timeout=5)
    assert await agent.is_alive()  # only the profile named
    assert [row["kernel_id"] for row in ps()] == [agent.kernel_id]

    msg_id = agent_kc.execute("import time\ntime.sleep(60)")
    await asyncio.to_thread(cellblock, "kill", agent.kernel_id[:8], "--reason",
                            "host maintenance")
    out = await collect(agent_kc, msg_id, timeout=10)
    assert out["errors"] == ["cellblock: kernel stopped by operator: host maintenance"]
    assert await wait_dead(agent, timeout=5)


def test_kill_of_an_unknown_kernel_is_bad_input(jupyter_env: dict[str, str]) -> None:
    done = cellblock("kill", "no-such-kernel", check=False)
    assert done.returncode == 2
    assert "no running cellblock kernel 'no-such-kernel'" in done.stderr
    done = cellblock("kill", check=False)
    assert done.returncode == 2 and "--all or --profile" in done.stderr


CANARY = "sk_live_" + "CELLBLOCKCANARY0123456789abcdef"


@jailed
async def test_audit_log_of_a_session_is_valid_correlated_and_secret_free(
    kernels: Any, jupyter_env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    otel = pytest.importorskip("opentelemetry.sdk.trace")
    assert otel is not None
    spans_file = tmp_path / "spans.jsonl"
    monkeypatch.setenv("CELLBLOCK_OTEL", f"file:{spans_file}")
    monkeypatch.setenv("CELLBLOCK_TEST_CANARY_ENV", CANARY)
    km, kc = await kernels("agent")
    kernel_key = (Path(jupyter_env["CELLBLOCK_RUNTIME_DIR"]) / km.kernel_id / "ipc"
                  / "kernel.json")
    inner_key = json.loads(kernel_key.read_text())["key"] if os.access(kernel_key, os.R_OK) \
        else None
    session = kc.session.session
    ok = await run(kc, f"secret = {CANARY!r}\nprint(secret[::-1])")
    assert ok["reply"]["status"] == "ok"
    failed = await run(kc, f"raise ValueError({CANARY!r})")
    assert failed["reply"]["status"] == "error"
    msg_id = kc.execute("import time\ntime.sleep(60)")
    while True:  # wait until it is running, then interrupt as a client would
        msg = await kc.get_iopub_msg(timeout=30)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "execute_input":
            break
    await km.interrupt_kernel()
    interrupted = await collect(kc, msg_id)
    assert interrupted["reply"]["ename"] == "KeyboardInterrupt"
    kc.stop_channels()
    await km.shutdown_kernel(now=False)

    path = Path(jupyter_env["CELLBLOCK_AUDIT_DIR"]) / f"{km.kernel_id}.jsonl"
    text = path.read_text()
    for secret in filter(None, (CANARY, CANARY[::-1], km.session.key.decode(), inner_key)):
        assert secret not in text
    schema = json.loads(cellblock("audit", "--schema").stdout)
    validator = jsonschema.Draft202012Validator(schema)
    lines = [json.loads(line) for line in text.splitlines()]
    for line in lines:
        validator.validate(line)
    assert all(line["kernel_id"] == km.kernel_id and line["version"] == 1 for line in lines)
    names = [line["event"] for line in lines if line["event"].startswith("kernel.")]
    assert names[:2] == ["kernel.start", "kernel.ready"] and names[-1] == "kernel.exit"
    lines = [line for line in lines if not line["event"].startswith("broker.")]
    assert lines[-1]["fields"]["reason"] == "shutdown requested"
    starts = {x["parent_msg_id"]: x for x in lines if x["event"] == "execution.start"}
    ends = {x["parent_msg_id"]: x for x in lines if x["event"] == "execution.end"}
    assert len(starts) == 3 and starts.keys() == ends.keys()
    assert {x["session"] for x in (*starts.values(), *ends.values())} == {session}
    assert [e["fields"]["status"] for e in ends.values()] == ["ok", "error", "error"]
    assert ends[msg_id]["fields"]["duration_seconds"] > 0
    interrupt = [x for x in lines if x["event"] == "kernel.interrupt"]
    assert interrupt[0]["fields"]["origin"] == "client" and interrupt[0]["session"] == session
    assert all("code" not in x["fields"] for x in starts.values())  # agent: hashes only

    spans = [json.loads(line) for line in spans_file.read_text().splitlines()]
    assert not any(CANARY in json.dumps(s) for s in spans)
    tools = [s for s in spans if s["name"] == "execute_tool cellblock.execute"]
    assert {s["attributes"]["gen_ai.tool.call.id"] for s in tools} == set(starts)
    assert {s["attributes"]["gen_ai.operation.name"] for s in tools} == {"execute_tool"}
    assert {"cellblock kernel.start", "cellblock kernel.exit"} <= {s["name"] for s in spans}


@jailed
async def test_audit_cli_filters_and_follows(kernels: Any) -> None:
    km, kc = await kernels("agent")
    follower = subprocess.Popen(  # started before the cell: it must see the new lines
        [CLI, "audit", "--follow", "--json", "--kernel", km.kernel_id[:8], "--event",
         "execution.*"], stdout=subprocess.PIPE, text=True)
    try:
        msg_id = kc.execute("print('hello')")
        await collect(kc, msg_id)
        seen = []
        while len(seen) < 2:
            line = await asyncio.wait_for(asyncio.to_thread(follower.stdout.readline), 30)
            seen.append(json.loads(line))
        assert [(e["event"], e["parent_msg_id"]) for e in seen] == [
            ("execution.start", msg_id), ("execution.end", msg_id)]
    finally:
        follower.terminate()
        follower.wait()
        follower.stdout.close()
    human = cellblock("audit", "--kernel", km.kernel_id, "--since", "10m").stdout
    assert "kernel.start" in human and "execution.end" in human
    assert cellblock("audit", "--kernel", km.kernel_id, "--since", "2099-01-01").stdout == ""
    bad = cellblock("audit", "--since", "yesterday", check=False)
    assert bad.returncode == 2 and "expected a duration" in bad.stderr


def test_warden_imports_no_opentelemetry() -> None:
    code = ("import sys, cellblock.warden, cellblock.cli, cellblock.provisioner\n"
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    env = {k: v for k, v in os.environ.items() if k != "CELLBLOCK_OTEL"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env)
    assert out.stdout.strip() == "[]"


def test_telemetry_spans_in_memory() -> None:
    pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from cellblock.audit import AuditEvent
    from cellblock.telemetry import Telemetry

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    t = Telemetry(provider.get_tracer("test"), "k1", "agent", provider)
    t.record(AuditEvent(ts="2026-01-01T00:00:00+00:00", kernel_id="k1", event="execution.end",
                        session="s1", parent_msg_id="m1",
                        fields={"status": "error", "duration_seconds": 1.5,
                                "limits_hit": ["cell_seconds"], "code": "never exported"}))
    t.record(AuditEvent(ts="2026-01-01T00:00:00+00:00", kernel_id="k1", event="kernel.exit",
                        fields={"reason": "stopped by operator", "status": 0}))
    t.close()
    tool, exit_ = exporter.get_finished_spans()
    assert tool.name == "execute_tool cellblock.execute"
    assert dict(tool.attributes) == {
        "cellblock.kernel.id": "k1", "cellblock.profile": "agent",
        "cellblock.event": "execution.end", "session.id": "s1",
        "cellblock.parent_msg_id": "m1", "cellblock.status": "error",
        "cellblock.duration_seconds": 1.5, "cellblock.limits_hit": ("cell_seconds",),
        "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "cellblock.execute",
        "gen_ai.tool.type": "extension",
        "gen_ai.tool.description": "Python code run in a cellblock sandbox",
        "gen_ai.tool.call.id": "m1", "error.type": "error",
    }
    assert tool.end_time - tool.start_time == 1_500_000_000
    assert tool.status.status_code.name == "ERROR"
    assert exit_.name == "cellblock kernel.exit"
    assert exit_.attributes["cellblock.reason"] == "stopped by operator"
