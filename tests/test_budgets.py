"""Budgets: what each one ends, and nothing else, seen from the client.

Pure tables drive :class:`cellblock.budgets.BudgetClock` with exact times; the rest start
real jailed kernels (profiles ``cell``, ``brief``, ``idler``, ``counted``, ``chatty`` and the
disabled ``off`` in conftest's TEST_POLICY) through AsyncKernelManager and check what a
client sees, then what the audit log says.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import pytest
from jupyter_client.manager import AsyncKernelManager

from cellblock.budgets import CLOSING_MAX, BudgetClock, Interrupt, Kill, Stop
from cellblock.errors import ProfileDisabled
from cellblock.policy import Budgets

from conftest import audit_events, wait_dead


def jailed(test: Any) -> Any:
    """Marks a test that starts real jails (and must leave nothing behind)."""
    for mark in (pytest.mark.jail, pytest.mark.nonroot, pytest.mark.usefixtures("no_leftovers")):
        test = mark(test)
    return test


CELL_LIMIT = "cellblock: cell exceeded 1.5 s wall-clock limit"


# -- the clock, pure ---------------------------------------------------------------------

def _clock(**budgets: Any) -> BudgetClock:
    base = {"cell_seconds": 0, "lifetime_seconds": 0, "idle_seconds": 0, "executions": 0,
            "output_bytes": 0}
    return BudgetClock(Budgets(**{**base, **budgets}), now=100.0)


def test_cell_clock_interrupts_then_kills() -> None:
    c = _clock(cell_seconds=30, grace_seconds=5)
    assert c.request("m1", "execute_request", "s", b'{"code": "x"}', 100.0) is None
    assert c.next_deadline() == 130.0
    assert c.due(129.9) == []
    (action,) = c.due(130.0)
    assert isinstance(action, Interrupt)
    assert action.message == "cellblock: cell exceeded 30 s wall-clock limit; kernel interrupted"
    assert c.due(131.0) == [] and c.next_deadline() == 135.0
    (action,) = c.due(135.0)
    assert isinstance(action, Kill)
    assert action.message == ("cellblock: cell exceeded 30 s wall-clock limit; kernel killed "
                              "after 5 s grace and restarted")
    assert action.execution.limits_hit == ["cell_seconds", "grace_seconds"]
    answered, cut = c.killed(135.5)
    assert answered == [] and [e.status for e in cut] == ["killed"]
    assert c.running() is None


def test_an_execution_ends_at_its_idle_with_the_output_released_there() -> None:
    """The output rules release a cell's held-back text (and the truncation marker and
    tail) with its idle, after the reply: that output is still the cell's."""
    c = _clock(cell_seconds=10)
    c.request("a", "execute_request", "s", b"{}", 100.0)
    assert c.output("a", 10, 10, 100.5)
    answered = c.reply("a", b'{"status": "ok"}', 101.0)
    assert answered is not None and c.running() is None
    assert c.output("a", 500, 40, 101.1)  # flushed at the idle
    ended = c.closed("a")
    assert ended is answered and (ended.bytes_in, ended.bytes_out, ended.messages) == \
        (510, 50, 2)
    assert c.closed("a") is None  # once


def test_answered_executions_whose_idle_never_comes_are_bounded() -> None:
    c = _clock(cell_seconds=10, executions=0)
    for i in range(CLOSING_MAX + 3):
        c.request(f"m{i}", "execute_request", "s", b"{}", 100.0 + i)
        c.reply(f"m{i}", b'{"status": "ok"}', 100.5 + i)
    assert len(c.closing) == CLOSING_MAX
    assert [e.msg_id for e in c.take_unclosed()] == ["m0", "m1", "m2"]
    answered, cut = c.killed(500.0)
    assert len(answered) == CLOSING_MAX and cut == []


def test_a_queued_cell_starts_its_clock_when_the_one_before_is_answered() -> None:
    c = _clock(cell_seconds=10)
    c.request("a", "execute_request", "s", b"{}", 100.0)
    c.request("b", "execute_request", "s", b"{}", 101.0)
    assert c.queue["b"].started is None
    ended = c.reply("a", b'{"status": "ok"}', 108.0)
    assert ended is not None and ended.status == "ok" and ended.duration == 8.0
    assert c.queue["b"].started == 108.0
    assert c.due(117.9) == [] and isinstance(c.due(118.0)[0], Interrupt)


@pytest.mark.parametrize(("budgets", "events", "at", "expected"), [
    ({"lifetime_seconds": 60}, [], 160.0, "lifetime limit 60 s reached"),
    ({"idle_seconds": 5}, [("request", 102.0)], 107.0, "idle limit 5 s reached"),
    ({"idle_seconds": 5}, [("request", 102.0)], 106.9, None),
    # a running cell is not idle, however long it runs
    ({"idle_seconds": 5}, [("execute", 100.0)], 500.0, None),
])
def test_kernel_budgets(budgets: dict[str, Any], events: list[tuple[str, float]], at: float,
                        expected: str | None) -> None:
    c = _clock(**budgets)
    for kind, when in events:
        msg_type = "execute_request" if kind == "execute" else "kernel_info_request"
        c.request("m", msg_type, "s", b"{}", when)
    due = c.due(at)
    if expected is None:
        assert due == []
    else:
        assert due == [Stop(expected, next(iter(budgets)))]


def test_execution_budget_refuses_only_new_cells() -> None:
    c = _clock(executions=2)
    assert c.request("a", "execute_request", "s", b"{}", 100.0) is None
    assert c.request("b", "execute_request", "s", b"{}", 100.0) is None
    refusal = c.request("c", "execute_request", "s", b"{}", 100.0)
    assert refusal == ("cellblock: execution budget of 2 cells used; restart the kernel to "
                       "run more")
    assert c.request("d", "complete_request", "s", b"{}", 100.0) is None
    assert list(c.queue) == ["a", "b"] and c.due(100.0) == []


def test_output_budget_drops_the_crossing_message_and_stops() -> None:
    c = _clock(output_bytes=1000)
    c.request("a", "execute_request", "s", b"{}", 100.0)
    assert c.output("a", 600, 600, 100.1)
    assert not c.output("a", 500, 500, 100.2)
    assert not c.output("a", 1, 1, 100.3)  # nothing after it either
    assert c.output_total == 600 and c.queue["a"].limits_hit == ["output_bytes"]
    assert c.due(100.3) == [Stop("output budget of 1 kB used", "output_bytes")]


def test_shutdown_is_not_charged() -> None:
    c = _clock(cell_seconds=1, lifetime_seconds=10)
    c.request("a", "execute_request", "s", b"{}", 100.0)
    c.request("z", "shutdown_request", "s", b"{}", 100.5)
    assert c.due(200.0) == [] and c.next_deadline() is None


def test_code_is_hashed_and_kept_only_when_asked() -> None:
    c = _clock()
    c.request("a", "execute_request", "s", b'{"code": "print(1)"}', 100.0)
    assert c.queue["a"].code is None
    assert c.queue["a"].code_sha256 == hashlib.sha256(b"print(1)").hexdigest()
    k = BudgetClock(Budgets(), now=0.0, keep_code=True)
    k.request("a", "execute_request", "s", b'{"code": "print(1)"}', 0.0)
    assert k.queue["a"].code == "print(1)"


# -- through a real jailed kernel --------------------------------------------------------

async def collect(kc: Any, msg_id: str, timeout: float = 60) -> dict[str, Any]:
    """Everything the client sees for ``msg_id`` until its idle, then its shell reply."""
    out: dict[str, Any] = {"stdout": "", "errors": [], "results": []}
    while True:
        msg = await kc.get_iopub_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            out["stdout"] += content["text"]
        elif kind == "error":
            out["errors"].append(content["evalue"])
        elif kind == "execute_result":
            out["results"].append(content["data"])
        elif kind == "status" and content["execution_state"] == "idle":
            break
    while True:
        reply = await kc.get_shell_msg(timeout=timeout)
        if reply["parent_header"].get("msg_id") == msg_id:
            out["reply"] = reply["content"]
            return out


async def run(kc: Any, code: str, timeout: float = 60) -> dict[str, Any]:
    return await collect(kc, kc.execute(code), timeout)





@pytest.mark.profile("cell")
@jailed
async def test_sleep_past_the_limit_is_interrupted(kernel: Any) -> None:
    km, kc = kernel
    await run(kc, "x = 41")
    started = time.monotonic()
    out = await run(kc, "import time\ntime.sleep(60)")
    took = time.monotonic() - started
    assert out["errors"][0] == f"{CELL_LIMIT}; kernel interrupted"
    assert out["reply"]["status"] == "error" and out["reply"]["ename"] == "KeyboardInterrupt"
    assert took >= 1.5, took  # not before the 2 s limit (load only makes it later)
    # only the cell ended: the kernel and its state are still there
    assert (await run(kc, "x + 1"))["results"] == [{"text/plain": "42"}]
    events = audit_events(km.kernel_id)
    interrupts = [e for e in events if e.event == "kernel.interrupt"]
    assert [e.fields["origin"] for e in interrupts] == ["budget"]
    end = [e for e in events if e.event == "execution.end"
           and e.parent_msg_id == interrupts[0].parent_msg_id]
    assert end[0].fields["limits_hit"] == ["cell_seconds"]
    assert not [e for e in events if e.event in ("kernel.restart", "kernel.exit")]


IGNORES_SIGINT = {
    "sig_ign_busy_loop": "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                         "while True:\n    pass",
    # SIGINT blocked at the thread level, then a sleep in C through ctypes: the signal
    # never reaches the process, so Python's handler never runs
    "c_level_sleep": "import ctypes, signal\n"
                     "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})\n"
                     "ctypes.CDLL(None).sleep(60)",
}


@pytest.mark.profile("cell")
@jailed
@pytest.mark.parametrize("code", IGNORES_SIGINT.values(), ids=IGNORES_SIGINT.keys())
async def test_a_cell_ignoring_interrupts_is_killed_and_the_kernel_restarts(
    kernel: Any, code: str,
) -> None:
    km, kc = kernel
    ports = km.get_connection_info()
    await run(kc, "x = 41")
    started = time.monotonic()
    out = await run(kc, code)
    took = time.monotonic() - started
    assert out["errors"] == [
        f"{CELL_LIMIT}; kernel interrupted",
        f"{CELL_LIMIT}; kernel killed after 1 s grace and restarted",
    ]
    assert out["reply"]["status"] == "error" and out["reply"]["ename"] == "CellblockBudget"
    assert took >= 2.5, took  # the limit, then the 1 s grace (load only makes it later)
    # the kernel came back in place: same warden, same ports, fresh state
    await kc.wait_for_ready(timeout=60)
    assert await km.is_alive()
    assert km.get_connection_info() == ports
    assert (await run(kc, "print('x' in globals())"))["stdout"] == "False\n"
    events = audit_events(km.kernel_id)
    restarts = [e for e in events if e.event == "kernel.restart"]
    assert len(restarts) == 1 and restarts[0].fields["restarts"] == 1
    killed = [e for e in events if e.event == "execution.end" and e.fields["status"] == "killed"]
    assert [e.parent_msg_id for e in killed] == [restarts[0].parent_msg_id]
    assert killed[0].fields["limits_hit"] == ["cell_seconds", "grace_seconds"]


@pytest.mark.profile("cell")
@jailed
async def test_requests_sent_during_a_restart_in_place_reach_the_new_kernel(
    kernel: Any,
) -> None:
    """Cells sent the moment the client hears of the restart (before the new jail is up)
    are held by the gate until the new kernel has welcomed its iopub subscription: every
    one gets its output, its reply and its idle."""
    _, kc = kernel
    msg_id = kc.execute(IGNORES_SIGINT["sig_ign_busy_loop"])
    while True:  # until the restart notice, then at once the next cells
        msg = await kc.get_iopub_msg(timeout=60)
        if msg["msg_type"] == "error" and "restarted" in msg["content"]["evalue"]:
            break
    pending = [kc.execute(f"print('after restart', {i})") for i in range(3)]
    out = await collect(kc, msg_id, 60)
    assert out["reply"]["status"] == "error"
    for i, pid in enumerate(pending):
        got = await collect(kc, pid, 60)
        assert got["stdout"] == f"after restart {i}\n", got
        assert got["reply"]["status"] == "ok"


@pytest.mark.profile("brief")
@jailed
async def test_lifetime_stops_the_kernel(kernel: Any) -> None:
    km, kc = kernel
    assert (await run(kc, "1 + 1"))["results"] == [{"text/plain": "2"}]
    out = await run(kc, "import time\ntime.sleep(60)")
    assert out["errors"] == ["cellblock: kernel stopped, lifetime limit 4 s reached"]
    assert await wait_dead(km)
    exits = [e for e in audit_events(km.kernel_id) if e.event == "kernel.exit"]
    assert exits[0].fields["reason"] == "lifetime limit 4 s reached"
    assert exits[0].fields["budget"] == "lifetime_seconds"
    # never before the limit, on the warden's own clock (it starts before kernel.ready is
    # written: the time between the two audit lines can be a little under 4 s)
    assert exits[0].fields["lifetime_seconds"] >= 4


@pytest.mark.profile("idler")
@jailed
async def test_idle_stops_the_kernel_but_not_a_running_cell(kernel: Any) -> None:
    km, kc = kernel
    # longer than the 2 s idle limit, but running: not idle
    out = await run(kc, "import time\ntime.sleep(3)\nprint('done')")
    assert out["stdout"] == "done\n" and out["reply"]["status"] == "ok"
    idle_from = time.monotonic()
    while True:  # the kernel's own announcement, with an empty parent (no cell is open)
        msg = await kc.get_iopub_msg(timeout=30)
        if msg["msg_type"] == "error":
            break
    assert msg["content"]["evalue"] == "cellblock: kernel stopped, idle limit 2 s reached"
    assert time.monotonic() - idle_from >= 1.5
    assert await wait_dead(km)
    exits = [e for e in audit_events(km.kernel_id) if e.event == "kernel.exit"]
    assert exits[0].fields["budget"] == "idle_seconds"


@pytest.mark.profile("counted")
@jailed
async def test_execution_budget_refuses_the_fourth_cell_only(kernel: Any) -> None:
    km, kc = kernel
    for i in range(3):
        assert (await run(kc, f"{i} * 2"))["results"] == [{"text/plain": str(i * 2)}]
    out = await run(kc, "print('never runs')")
    assert out["errors"] == ["cellblock: execution budget of 3 cells used; restart the kernel "
                             "to run more"]
    assert out["reply"]["status"] == "error" and out["stdout"] == ""
    # the kernel itself is untouched: other requests still work
    assert await km.is_alive()
    kc.kernel_info()
    reply = await kc.get_shell_msg(timeout=30)
    assert reply["msg_type"] == "kernel_info_reply" and reply["content"]["status"] == "ok"
    events = audit_events(km.kernel_id)
    refused = [e for e in events if e.event == "execution.refused"]
    assert len(refused) == 1 and refused[0].fields == {"budget": "executions", "executions": 3}
    starts = [e for e in events if e.event == "execution.start"]
    assert [e.fields["code"] for e in starts] == ["0 * 2", "1 * 2", "2 * 2"]  # audit_code_text


@pytest.mark.profile("chatty")
@jailed
async def test_output_budget_stops_the_kernel(kernel: Any) -> None:
    km, kc = kernel
    seen = 0
    for _ in range(2):
        out = await run(kc, "print('a' * 10000)")
        assert out["stdout"] == "a" * 10000 + "\n"
        seen += len(out["stdout"])
    # 200 kB printed; the output rules truncate it to about 20 KiB, which crosses 32 KiB
    out = await run(kc, "import sys\nfor _ in range(50):\n    print('b' * 4000, flush=True)")
    assert out["errors"] == ["cellblock: kernel stopped, output budget of 32 KiB used"]
    assert seen + len(out["stdout"]) < 32 * 1024
    assert await wait_dead(km)
    events = audit_events(km.kernel_id)
    exits = [e for e in events if e.event == "kernel.exit"]
    assert exits[0].fields["budget"] == "output_bytes"
    assert exits[0].fields["output_bytes"] <= 32 * 1024
    ends = [e for e in events if e.event == "execution.end"]
    assert [e.fields["limits_hit"] for e in ends] == [[], [], ["output_bytes"]]


@jailed
async def test_a_disabled_profile_starts_nothing(jupyter_env: dict[str, str]) -> None:
    km = AsyncKernelManager(kernel_name="cellblock-off")
    with pytest.raises(ProfileDisabled, match="profile 'off' is disabled by the operator"):
        await km.start_kernel()
    await km.cleanup_resources()
