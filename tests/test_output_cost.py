"""The rest of a cut output and what each cell cost, end to end through every surface.

Real jailed kernels: the Python helper (Sandbox), ``cellblock output`` (the CLI), ``cellblock
mcp`` through the official MCP client, and Jupyter Server's REST route with the cellblock
extension. The pure parts (redaction across the cut, the cap, the reader's checks) have exact
tests in test_output_spool.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from cellblock import BadOutputRequest, OutputUnavailable, Sandbox, SandboxStopped
from cellblock.output.filter import build_redactor
from cellblock.policy import load_policy

from conftest import BIN, audit_events, free_port, jupyter_app
from jupyter_ws import execute, open_channels, start_kernel

pytestmark = [pytest.mark.jail, pytest.mark.nonroot, pytest.mark.usefixtures("no_leftovers")]

GHP = "ghp_" + "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5"  # GitHub token format, not a real one
CALL = re.compile(r"read_output\(execution=(\d+), offset=(\d+)\)")
# 50 MB of stdout in 100-byte lines, one of them (half way) with a token in it
FLOOD = f"""
import sys
line = "{{:08d}} " + "0123456789" * 9 + "\\n"
w = sys.stdout.write
for i in range(500_000):
    w(line.format(i) if i != 250_000 else "token: {GHP} here\\n")
"""


def flood_text() -> str:
    line = "{:08d} " + "0123456789" * 9 + "\n"
    return "".join(line.format(i) if i != 250_000 else f"token: {GHP} here\n"
                   for i in range(500_000))


def small_flood(n: int) -> str:
    return f"for i in range({n}): print(f'row {{i}} ' + 'x' * 40)"


def small_text(n: int) -> str:
    return "".join(f"row {i} " + "x" * 40 + "\n" for i in range(n))


async def read_all(sb: Sandbox, execution: int, offset: int, size: int = 1 << 20) -> str:
    parts: list[str] = []
    at: int | None = offset
    while at is not None:
        page = await sb.output(execution, at, size)
        parts.append(page.text)
        at = page.next_offset
    return "".join(parts)


@pytest.mark.timeout(600)
async def test_a_50mb_print_reads_back_whole_and_redacted() -> None:
    """Must-show 3: head + every page of the kept rest == what the cell printed, with the
    profile's redaction applied (the same redactor the gate uses, here on the host)."""
    redacted_line = build_redactor(load_policy().profile("agent").output, env={}).redact(
        f"token: {GHP} here\n").text
    assert GHP not in redacted_line
    expected = flood_text().replace(f"token: {GHP} here\n", redacted_line)
    async with Sandbox("agent") as sb:
        r = await sb.run(FLOOD)
        assert r.ok, r.error
        m = CALL.search(r.stdout)
        assert m is not None, r.stdout[-2000:]
        execution, offset = int(m.group(1)), int(m.group(2))
        head = r.stdout.split("\n[cellblock ")[0]
        assert len(head.encode()) == offset == 16384
        rest = await read_all(sb, execution, offset)
        assert GHP not in rest
        assert head + rest == expected
        assert r.cost is not None and r.cost.execution == execution == 1
        assert r.cost.output_bytes_kept == len(expected)
        assert r.cost.output_bytes_cut == r.policy.truncated_bytes > 49_000_000
        assert r.cost.output_bytes_not_kept == 0
        assert r.cost.output_bytes_sent < 100_000
        print(f"\n50 MB print: {len(expected):,} bytes printed, {r.cost.output_bytes_cut:,} "
              f"cut, {r.cost.output_bytes_kept:,} kept, read back equal; wall "
              f"{r.cost.wall_seconds:.2f} s")


@pytest.mark.timeout(300)
async def test_cpu_seconds_and_peak_memory_of_a_cell() -> None:
    """Must-show 4: a cell that allocates (and touches) 500 MB and spins 2 s of CPU. The
    cgroup's numbers are compared with what the kernel process itself counted
    (getrusage of the cell) and with the bytes it allocated."""
    code = """
import resource
def used():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
before = used()
b = bytearray(500_000_000)
b[::4096] = b"x" * len(b[::4096])
import time
t = time.process_time()
while time.process_time() - t < 2:
    pass
print(used() - before)
"""
    async with Sandbox("agent") as sb:
        r = await sb.run(code)
        assert r.ok, r.error
        inside = float(r.stdout)
        c = r.cost
        assert c is not None and c.cpu_seconds is not None and c.peak_memory_bytes is not None
        assert c.memory_start_bytes is not None and c.peak_memory_scope == "cell"
        added = c.peak_memory_bytes - c.memory_start_bytes
        print(f"\ncost: cpu {c.cpu_seconds:.3f} s (the kernel counted {inside:.3f} s), peak "
              f"{c.peak_memory_bytes:,} B from {c.memory_start_bytes:,} B: +{added:,} B for "
              f"500,000,000 allocated; wall {c.wall_seconds:.2f} s")
        assert 2.0 <= inside and abs(c.cpu_seconds - inside) <= 0.1 * inside
        assert 500_000_000 <= added <= 550_000_000
        assert c.wall_seconds >= c.cpu_seconds * 0.9
        # a later cell's peak is its own (reset when it started), not the one before
        await sb.run("del b")
        small = (await sb.run("x = 1")).cost
        assert small is not None and small.peak_memory_bytes is not None
        assert small.peak_memory_bytes < c.peak_memory_bytes - 400_000_000
        assert small.execution == c.execution + 2
        end = [e for e in audit_events(sb.kernel_id or "") if e.event == "execution.end"]
        fields = end[0].fields
        assert fields["execution"] == 1 and fields["cpu_seconds"] == c.cpu_seconds
        assert fields["peak_memory_bytes"] == c.peak_memory_bytes
        assert {"output_bytes_cut", "output_bytes_kept", "output_bytes_not_kept"} <= set(fields)


@pytest.mark.timeout(300)
async def test_numbers_are_the_gates_and_reads_are_checked() -> None:
    """The kernel sets its own execution_count to 1000: the marker, the cost and the kept
    file still use the gate's count. Bad reads raise errors that say what is allowed."""
    async with Sandbox("agent") as sb:
        await sb.run("get_ipython().execution_count = 1000")
        r = await sb.run(small_flood(20_000))
        assert r.execution_count is not None and r.execution_count >= 1000
        m = CALL.search(r.stdout)
        assert m is not None and int(m.group(1)) == 2
        assert r.cost is not None and r.cost.execution == 2
        offset = int(m.group(2))
        head = r.stdout.split("\n[cellblock ")[0]
        assert head + await read_all(sb, 2, offset, 4000) == small_text(20_000)
        page = await sb.output(2, offset, 10)
        assert (page.offset, page.next_offset, page.complete) == (offset, offset + 10, True)
        with pytest.raises(BadOutputRequest, match="execution must be a cell number >= 1"):
            await sb.output(0)
        with pytest.raises(BadOutputRequest, match=r"offset 99999999 is past the end of the "
                                                   r"kept stdout of execution 2 of kernel"):
            await sb.output(2, 99_999_999)
        with pytest.raises(OutputUnavailable, match="no kept stdout for execution 1 of"):
            await sb.output(1)
        with pytest.raises(OutputUnavailable, match="no kept stdout for execution 7 of"):
            await sb.output(7)
        # the kept text is the warden's: nothing the jail can see holds it
        seen = await sb.run("import glob\nprint(sorted(p for d in ('/run', '/opt', '/etc', "
                            "'/tmp', '/home', '/data') for p in glob.glob(d + '/**/*.std*', "
                            "recursive=True)))")
        assert seen.stdout == "[]\n", seen.stdout
        # the CLI reads the same pages
        cli = subprocess.run([str(BIN / "cellblock"), "output", (sb.kernel_id or "")[:8], "2",
                              "--offset", str(offset), "--all", "--size", "5000"],
                             capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        assert head + cli.stdout == small_text(20_000)
        bad = subprocess.run([str(BIN / "cellblock"), "output", sb.kernel_id or "", "2",
                              "--offset", "99999999"], capture_output=True, text=True,
                             timeout=60)
        assert bad.returncode == 2 and "is past the end of the kept stdout" in bad.stderr
        assert "Traceback" not in bad.stderr
        kernel = sb.kernel_id
    gone = subprocess.run([str(BIN / "cellblock"), "output", kernel or "", "2"],
                          capture_output=True, text=True, timeout=60)
    assert gone.returncode == 2 and "no running cellblock kernel" in gone.stderr
    with pytest.raises(SandboxStopped):
        await sb.output(2)


@pytest.mark.timeout(300)
async def test_the_spool_cap_drops_the_oldest_and_says_so() -> None:
    """Profile ``spooled`` keeps 300 KiB per kernel: a second 200 KB cell drops the first
    one's kept text; a 400 KB cell keeps its first 300 KiB and its marker says how many
    bytes were not kept."""
    async with Sandbox("spooled") as sb:
        await sb.run(small_flood(4_500))  # ~210 KB
        await sb.run(small_flood(4_500))
        with pytest.raises(OutputUnavailable, match=r"kept stdout of execution 1 .* was dropped "
                                                    r"to make room for execution 2's"):
            await sb.output(1)
        assert (await read_all(sb, 2, 0)) == small_text(4_500)
        r = await sb.run(small_flood(9_000))  # ~420 KB
        assert "bytes after it were not kept (the kernel's output spool of 307,200 bytes " \
               "is full)" in r.stdout
        assert r.cost is not None and r.cost.output_bytes_kept == 307_200
        assert r.cost.output_bytes_not_kept == len(small_text(9_000)) - 307_200
        kept = await read_all(sb, 3, 0)
        assert kept == small_text(9_000).encode()[:307_200].decode()


def mcp_env() -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG")
    return {k: v for k, v in os.environ.items() if k.startswith(("CELLBLOCK_", "JUPYTER_"))
            or k in keep}


@pytest.mark.timeout(300)
async def test_mcp_read_output_and_cost_metadata() -> None:
    from mcp import ClientSession, StdioServerParameters, stdio_client
    from mcp.types import TextContent

    params = StdioServerParameters(command=str(BIN / "cellblock"),
                                   args=["mcp", "--profile", "agent"], env=mcp_env())
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        r = await session.call_tool("run_python", {"code": small_flood(30_000)})
        assert not r.is_error
        text = "".join(c.text for c in r.content if isinstance(c, TextContent))
        m = CALL.search(text)
        assert m is not None
        cost = (r.meta or {})["cellblock/cost"]
        assert cost["execution"] == int(m.group(1)) == 1
        assert cost["output_bytes_kept"] == len(small_text(30_000))
        assert cost["wall_seconds"] > 0 and "cpu_seconds" in cost
        head = text.split("\n[cellblock ")[0]
        rest, args = "", {"execution": 1, "offset": int(m.group(2)), "size": 100_000}
        while True:
            page = await session.call_tool("read_output", args)
            assert not page.is_error
            body, where = (c.text for c in page.content if isinstance(c, TextContent))
            rest += body
            info = page.structured_content or {}
            if info["next_offset"] is None:
                assert where == "[end of the kept output]"
                break
            assert where == f"[next page: read_output(execution=1, offset={info['next_offset']})]"
            args = {**args, "offset": info["next_offset"]}
        assert head + rest == small_text(30_000)
        for bad, message in (({"execution": 0}, "execution must be a cell number >= 1"),
                             ({"execution": 1, "offset": 10**9}, "is past the end"),
                             ({"execution": 1, "size": 0}, "size must be a number of bytes"),
                             ({"execution": 5}, "no kept stdout for execution 5")):
            r = await session.call_tool("read_output", bad)
            assert r.is_error
            assert message in r.content[0].text  # type: ignore[union-attr]


@pytest.mark.timeout(300)
async def test_rest_route_behind_jupyter_server_auth(tmp_path: Path) -> None:
    port, token = free_port(), uuid.uuid4().hex
    base = f"127.0.0.1:{port}"
    argv = [str(BIN / "jupyter"), "server", "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={token}", "--ServerApp.open_browser=False",
            "--ServerApp.jpserver_extensions=cellblock=True",
            f"--ServerApp.root_dir={tmp_path}",
            *(["--allow-root"] if os.geteuid() == 0 else [])]
    http = AsyncHTTPClient()
    auth = {"Authorization": f"token {token}"}

    async def get(path: str, headers: dict[str, str] | None = None) -> Any:
        resp = await http.fetch(f"http://{base}{path}", headers=auth if headers is None
                                else headers)
        return json.loads(resp.body)

    async def status(path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
        try:
            await get(path, headers)
        except HTTPClientError as exc:
            assert exc.response is not None
            return exc.code, json.loads(exc.response.body or b"{}").get("message", "")
        return 200, ""

    with jupyter_app(argv, port, token, tmp_path, "server"):
        kernel = await start_kernel(http, base, "cellblock-agent", token)
        try:
            ws = await open_channels(base, kernel, token, "s1")
            got = await execute(ws, small_flood(30_000), "s1")
            ws.close()
            m = CALL.search(got["stdout"])
            assert m is not None
            route = f"/api/cellblock/kernels/{kernel}/output/{m.group(1)}"
            head = got["stdout"].split("\n[cellblock ")[0]
            rest, offset = "", int(m.group(2))
            while offset is not None:
                page = await get(f"{route}?offset={offset}&size=65536")
                rest += page["text"]
                offset = page["next_offset"]
            assert head + rest == small_text(30_000)
            assert (await status(f"{route}?offset=0", headers={}))[0] == 403
            code, message = await status(f"{route}?offset=999999999")
            assert code == 400 and "is past the end of the kept stdout" in message
            code, message = await status(f"{route}?offset=x1")
            assert code == 400 and "offset must be a whole number, not 'x1'" in message
            code, message = await status(f"/api/cellblock/kernels/{kernel}/output/0")
            assert code == 400 and "execution must be a cell number >= 1" in message
            code, message = await status(f"/api/cellblock/kernels/{kernel}/output/9")
            assert code == 404 and "no kept stdout for execution 9" in message
            code, message = await status(f"/api/cellblock/kernels/{uuid.uuid4()}/output/1")
            assert code == 404 and "no kernel" in message
        finally:
            await http.fetch(f"http://{base}/api/kernels/{kernel}", method="DELETE",
                             headers=auth)
    http.close()
