"""The LLM-backend helper (cellblock.sandbox) through its real interface: real wardens,
nsjail, gates and ipykernel, started with AsyncKernelManager underneath.

Each test checks what the helper returns against what the gate and the audit log did, and
that nothing is left behind (``no_leftovers``), on success, failure and double close."""

from __future__ import annotations

import asyncio
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cellblock.audit import read_events
from cellblock.errors import CellblockError, PolicyError, UnknownProfile
from cellblock.sandbox import CellTimeout, Sandbox, SandboxStopped, SyncSandbox

from conftest import BIN, TEST_POLICY

pytestmark = [pytest.mark.jail, pytest.mark.nonroot, pytest.mark.usefixtures("no_leftovers")]

# A GitHub token shape, assembled in the kernel so the code's echo carries no finding.
SECRET_CODE = "print('ghp_' + 'aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dE3fG5')"
SECRET = "ghp_aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dE3fG5"


@pytest.fixture
async def sandbox(request: pytest.FixtureRequest, jupyter_env: dict[str, str]) -> Any:
    marker = request.node.get_closest_marker("profile")
    sb = Sandbox(marker.args[0] if marker else "agent")
    await sb.start()
    try:
        yield sb
    finally:
        await sb.close()


async def test_run_returns_streams_results_and_keeps_state(sandbox: Sandbox) -> None:
    r = await sandbox.run("import sys\nx = 41\nprint('out')\nprint('err', file=sys.stderr)\n"
                          "x + 1")
    assert (r.stdout, r.stderr, r.results, r.displays) == ("out\n", "err\n",
                                                          [{"text/plain": "42"}], [])
    assert r.ok and r.status == "ok" and r.error is None and r.kernel_stopped is None
    assert r.execution_count == 1
    assert r.policy.audited and r.policy.summary() == ""
    assert r.policy.redactions == {} and r.policy.truncated_bytes == 0
    r = await sandbox.run("from IPython.display import display, Markdown\n"
                          "display(Markdown('**x** is %d' % x))")
    assert r.displays == [{"text/plain": "<IPython.core.display.Markdown object>",
                           "text/markdown": "**x** is 41"}]
    assert r.results == [] and r.execution_count == 2


@pytest.mark.profile("tiny")  # normalise = false: IPython's colours reach the client
async def test_an_exception_is_an_error_with_a_plain_traceback(sandbox: Sandbox) -> None:
    r = await sandbox.run("def f():\n    return 1 / 0\nf()")
    assert not r.ok and r.status == "error"
    assert r.error is not None
    assert (r.error.name, r.error.value) == ("ZeroDivisionError", "division by zero")
    assert any("\x1b[" in line for line in r.error.traceback)
    text = r.error.text()
    assert text.startswith("ZeroDivisionError: division by zero\n")
    assert "\x1b" not in text
    assert "----> 2     return 1 / 0" in text
    assert text.endswith("ZeroDivisionError: division by zero")


async def test_policy_report_counts_redactions_by_rule(sandbox: Sandbox) -> None:
    r = await sandbox.run(SECRET_CODE + "\n" + SECRET_CODE)
    assert SECRET not in r.stdout
    assert r.stdout == "[REDACTED:github-pat]\n[REDACTED:github-pat]\n"
    assert r.policy.redactions == {"github-pat": 2}
    assert r.policy.summary() == "2 redactions (github-pat x2)"


async def test_policy_report_counts_truncated_bytes(sandbox: Sandbox) -> None:
    # stream: agent keeps a 16 KiB head and a 4 KiB tail; the marker says how much was cut
    r = await sandbox.run("print('a' * 100000)")
    marker = re.search(r"\n\[cellblock [0-9a-f]{6}: ([0-9,]+) bytes of stdout truncated"
                       r"; the rest is kept: read_output\(execution=\d+, offset=16384\)\]\n",
                       r.stdout)
    assert marker is not None
    cut = int(marker.group(1).replace(",", ""))
    assert r.policy.truncated_bytes == cut
    assert len(r.stdout) - len(marker.group(0)) + cut == 100001
    # a text value: max_text 16 KiB, reported by the output filter's audit note
    r = await sandbox.run("'b' * 100000")
    (note,) = r.policy.notes
    cut = int(note.split()[0])
    assert note == f"{cut} bytes of text/plain truncated"
    assert r.policy.truncated_bytes == cut
    assert len(r.results[0]["text/plain"]) < 100000 < len(r.results[0]["text/plain"]) + cut
    assert r.policy.summary() == f"{cut:,} bytes truncated"


async def test_policy_report_names_withheld_output(sandbox: Sandbox) -> None:
    r = await sandbox.run("from IPython.display import display, HTML\ndisplay(HTML('<b>x</b>'))")
    assert r.policy.notes == ("text/html (not allowed by the profile)",)
    assert r.policy.summary() == "withheld: text/html (not allowed by the profile)"


async def test_output_bytes_out_counts_what_the_flush_sent(sandbox: Sandbox) -> None:
    """execution.end is written at the cell's idle, after the output rules released the
    marker and the tail: output_bytes_out covers everything the client got."""
    r = await sandbox.run("print('a' * 100000)")
    assert r.policy.output_bytes_out is not None
    assert r.policy.output_bytes_out >= len(r.stdout.encode())
    assert r.policy.truncated_bytes > 0


async def test_every_cell_of_a_long_session_reports_its_redactions(sandbox: Sandbox) -> None:
    """The output filter writes one output.cell event per cell (per-message events stopped
    reaching the log after 100 in a kernel's life, with the warden's cap per event kind):
    the 101st cell and later ones still report what the policy redacted."""
    path = sandbox.audit_log
    assert path is not None
    for n in range(105):
        r = await sandbox.run(SECRET_CODE)
        assert r.stdout == "[REDACTED:github-pat]\n"
        assert r.policy.redactions == {"github-pat": 1}, f"cell {n + 1}"
    cells = [e for e in read_events(path) if e.event == "output.cell"
             and e.fields["redactions"] == {"github-pat": 1}]
    assert len(cells) == 105 and len({e.parent_msg_id for e in cells}) == 105


async def test_a_printed_truncation_marker_is_not_a_truncation(sandbox: Sandbox) -> None:
    """Truncation is read from the audit log, which a kernel cannot write, not from markers
    in the text, which it can print."""
    fake = "[cellblock 3fa2b1: 81,920 bytes, 2,048 lines of stdout truncated]"
    r = await sandbox.run(f"print({fake!r})")
    assert r.stdout == fake + "\n"
    assert r.policy.truncated_bytes == 0 and r.policy.summary() == ""
    r = await sandbox.run("print('a' * 100000)")  # a real one is counted, once
    assert 0 < r.policy.truncated_bytes < 100000 and r.policy.notes == ()


@pytest.mark.profile("cell")
async def test_a_cell_budget_is_a_limit_hit_and_the_kernel_stays(sandbox: Sandbox) -> None:
    r = await sandbox.run("x = 1\nimport time\ntime.sleep(60)")
    assert r.status == "error"
    assert r.error is not None and r.error.name == "CellblockBudget"
    assert r.error.value == "cellblock: cell exceeded 1.5 s wall-clock limit; kernel interrupted"
    assert [e.name for e in r.errors] == ["CellblockBudget", "KeyboardInterrupt"]
    assert r.policy.limits_hit == ("cell_seconds",)
    assert r.kernel_stopped is None
    assert (await sandbox.run("x")).results == [{"text/plain": "1"}]


@pytest.mark.profile("cell")
async def test_a_cell_past_its_grace_is_killed_and_the_kernel_restarted(
        sandbox: Sandbox) -> None:
    code = ("x = 1\nimport time\nwhile True:\n    try:\n        time.sleep(60)\n"
            "    except KeyboardInterrupt:\n        pass")
    r = await sandbox.run(code)
    assert r.policy.limits_hit == ("cell_seconds", "grace_seconds")
    assert r.errors[-1].value == ("cellblock: cell exceeded 1.5 s wall-clock limit; kernel "
                                  "killed after 1 s grace and restarted")
    assert r.kernel_stopped is None
    r = await sandbox.run("x")  # restarted in place: the same sandbox, a fresh kernel
    assert r.error is not None and r.error.name == "NameError"


@pytest.mark.profile("tiny")
async def test_a_kernel_killed_at_its_memory_limit_says_so(sandbox: Sandbox) -> None:
    r = await sandbox.run("x = bytearray(512 * 1024 * 1024)\n"
                          "for i in range(0, len(x), 4096): x[i] = 1")
    assert r.kernel_stopped == "cellblock: kernel stopped, memory limit 256 MiB exceeded"
    assert r.status == "stopped" and not r.ok
    assert r.error is not None and r.error.name == "CellblockKernelStopped"
    assert r.policy.limits_hit == ("memory",)
    with pytest.raises(SandboxStopped, match="memory limit 256 MiB exceeded; restart"):
        await sandbox.run("1")
    await sandbox.restart()
    assert (await sandbox.run("1 + 1")).results == [{"text/plain": "2"}]


async def test_a_kernel_stopped_between_cells_is_found_by_the_next_run(
        sandbox: Sandbox) -> None:
    await sandbox.run("x = 1")
    assert sandbox.kernel_id is not None
    done = await asyncio.to_thread(
        subprocess.run, [str(BIN / "cellblock"), "kill", sandbox.kernel_id, "--reason",
                         "maintenance"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with pytest.raises(SandboxStopped, match=r"has stopped: cellblock: kernel stopped by "
                                             r"operator: maintenance; restart\(\) for a fresh"):
        await sandbox.run("x")
    assert sandbox.stopped == "cellblock: kernel stopped by operator: maintenance"
    await sandbox.restart()
    assert sandbox.stopped is None
    assert (await sandbox.run("2")).results == [{"text/plain": "2"}]


async def test_a_client_timeout_raises_and_interrupts_the_cell(sandbox: Sandbox) -> None:
    with pytest.raises(CellTimeout, match=r"within the 1 s timeout") as caught:
        await sandbox.run("import time\ntime.sleep(60)", timeout=1)
    assert isinstance(caught.value, TimeoutError)
    r = await sandbox.run("'still here'")  # the interrupt freed the kernel
    assert r.results == [{"text/plain": "'still here'"}]


async def test_runs_are_serialised(sandbox: Sandbox) -> None:
    slow, fast = await asyncio.gather(
        sandbox.run("import time\ntime.sleep(0.5)\nprint('slow')\n'a'"), sandbox.run("'b'"))
    assert (slow.stdout, slow.results, fast.results) == (
        "slow\n", [{"text/plain": "'a'"}], [{"text/plain": "'b'"}])


async def test_restart_gives_a_fresh_kernel(sandbox: Sandbox) -> None:
    await sandbox.run("x = 1")
    before = sandbox.kernel_id
    await sandbox.restart()
    assert sandbox.kernel_id != before
    r = await sandbox.run("x")
    assert r.error is not None and r.error.name == "NameError"


async def test_close_releases_everything_and_twice_is_fine(jupyter_env: dict[str, str]) -> None:
    sb = Sandbox("agent")
    await sb.close()  # never started
    async with sb:
        assert (await sb.run("1")).results == [{"text/plain": "1"}]
    assert not sb.started
    await sb.close()
    with pytest.raises(SandboxStopped, match="not running"):
        await sb.run("1")


async def test_an_unknown_profile_names_the_known_ones(jupyter_env: dict[str, str]) -> None:
    sb = Sandbox("nope")
    with pytest.raises(UnknownProfile, match=r"unknown profile 'nope'; known profiles: .*agent"):
        await sb.start()
    assert not sb.started
    await sb.close()


@pytest.fixture
def sales_policy(tmp_path: Path, operator: Any) -> Path:
    data = tmp_path / "sales.csv"
    data.write_text("day,amount\n1,10\n")
    data.chmod(0o644)
    tmp_path.chmod(0o755)
    operator(TEST_POLICY + f"""
[datasets.sales]
path = "{data}"
description = "Daily sales"
[datasets.hr]
path = "{data}"
[profiles.agent]
datasets = ["sales"]

[profiles.broken]
python = "/nonexistent/bin/python3"
""")
    return data


async def test_datasets_are_granted_at_launch(sales_policy: Path) -> None:
    async with Sandbox("agent", datasets=["sales"]) as sb:
        assert sb.granted == ("sales",)
        r = await sb.run("from cellblock_kernel import datasets\n"
                         "print(datasets.open('sales').read().decode(), end='')")
        assert r.stdout == "day,amount\n1,10\n"


async def test_a_dataset_the_profile_does_not_allow_is_refused_before_start(
        sales_policy: Path) -> None:
    sb = Sandbox("agent", datasets="sales,hr")
    with pytest.raises(PolicyError,
                       match=r"^dataset 'hr' is not allowed by profile 'agent'; it allows: "
                             r"sales$"):
        await sb.start()
    assert not sb.started


async def test_a_failed_start_leaves_nothing(sales_policy: Path) -> None:
    sb = Sandbox("broken")
    with pytest.raises(CellblockError, match="python '/nonexistent/bin/python3' does not exist"):
        await sb.start()
    assert not sb.started
    await sb.close()
    await sb.close()


def test_sync_sandbox(jupyter_env: dict[str, str]) -> None:
    with SyncSandbox("agent") as sb:
        sb.run("x = 20")
        r = sb.run("x * 2 + 2")
        assert r.results == [{"text/plain": "42"}]
        sb.restart()
        assert sb.run("x").error.name == "NameError"  # type: ignore[union-attr]
    sb.close()
    with pytest.raises(SandboxStopped):
        sb.run("1")


async def test_sync_sandbox_works_inside_a_running_loop(jupyter_env: dict[str, str]) -> None:
    sb = SyncSandbox("agent")
    sb.start()
    try:
        assert sb.run("6 * 7").results == [{"text/plain": "42"}]
    finally:
        sb.close()


def test_a_failed_sync_start_stops_its_thread(sales_policy: Path) -> None:
    import threading

    sb = SyncSandbox("nope")
    with pytest.raises(UnknownProfile):
        sb.start()
    assert not [t for t in threading.enumerate() if t.name == "cellblock-sandbox"]
