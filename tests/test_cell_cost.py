"""The cell cost meter (cellblock.warden.cost) and its reading by clients
(cellblock.cell_cost), exact values on cgroup files laid out in a temp dir: cgroup v2 and v1
as the kernel shows them (this machine has v1 only; the jailed end-to-end numbers are in
test_output_cost.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cellblock.audit import AuditEvent
from cellblock.cell_cost import cell_cost
from cellblock.cgroups import KernelCgroup
from cellblock.warden.cost import CellMeter, Sample

pytestmark = pytest.mark.nonroot


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_v2_cpu_from_cpu_stat_and_a_sampled_peak_without_memory_peak(tmp_path: Path) -> None:
    write(tmp_path / "cpu.stat", "usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n")
    write(tmp_path / "memory.current", "100000000\n")
    meter = CellMeter(KernelCgroup("v2", (tmp_path,)))
    start = meter.start()
    assert start == Sample(1_500_000_000, 100_000_000)
    write(tmp_path / "cpu.stat", "usage_usec 3750000\n")
    write(tmp_path / "memory.current", "80000000\n")
    assert meter.end(start) == {"cpu_seconds": 2.25, "peak_memory_bytes": 100_000_000,
                                "peak_memory_scope": "sampled",
                                "memory_start_bytes": 100_000_000}


def test_v1_cpu_from_cpuacct_and_the_peak_reset_at_the_start(tmp_path: Path) -> None:
    mem, pids, cpu, acct = (tmp_path / n for n in ("memory", "pids", "cpu", "cpuacct"))
    write(mem / "memory.usage_in_bytes", "50000000\n")
    write(mem / "memory.max_usage_in_bytes", "900000000\n")  # an earlier cell's
    write(acct / "cpuacct.usage", "1000000000\n")
    write(pids / "cgroup.procs", "")
    write(cpu / "cgroup.procs", "")
    meter = CellMeter(KernelCgroup("v1", (mem, pids, cpu), acct))
    start = meter.start()
    assert (mem / "memory.max_usage_in_bytes").read_text() == "0"  # reset for this cell
    write(mem / "memory.max_usage_in_bytes", "600000000\n")
    write(acct / "cpuacct.usage", "3000000001\n")
    cost = meter.end(start)
    assert cost == {"cpu_seconds": 2.0, "peak_memory_bytes": 600_000_000,
                    "peak_memory_scope": "cell", "memory_start_bytes": 50_000_000}


def test_v1_without_cpuacct_counts_the_cgroups_processes(tmp_path: Path) -> None:
    mem, pids, cpu = (tmp_path / n for n in ("memory", "pids", "cpu"))
    write(mem / "memory.usage_in_bytes", "1\n")
    write(mem / "memory.max_usage_in_bytes", "1\n")
    for d in (mem, pids, cpu):
        write(d / "cgroup.procs", f"{os.getpid()}\n")
    meter = CellMeter(KernelCgroup("v1", (mem, pids, cpu)))
    start = meter.start()
    assert start.cpu_ns is not None and start.cpu_ns > 0  # this test process's own CPU time
    t = os.times()
    while os.times().user + os.times().system - t.user - t.system < 0.2:
        pass
    cost = meter.end(start)
    assert cost["cpu_seconds"] is not None and cost["cpu_seconds"] >= 0.15


def test_no_cgroup_no_numbers() -> None:
    meter = CellMeter(None)
    assert meter.end(meter.start()) == {"cpu_seconds": None, "peak_memory_bytes": None}


def event(msg_id: str, **fields: object) -> AuditEvent:
    return AuditEvent.model_validate({"ts": "2026-01-01T00:00:00Z", "kernel_id": "k",
                                      "event": "execution.end", "parent_msg_id": msg_id,
                                      "fields": fields})


def test_a_client_reads_the_cost_from_execution_end() -> None:
    end = event("m1", execution=3, duration_seconds=1.5, cpu_seconds=1.25,
                peak_memory_bytes=10, memory_start_bytes=4, peak_memory_scope="cell",
                output_bytes_out=99, output_bytes_cut=7, output_bytes_kept=20,
                output_bytes_not_kept=0)
    cost = cell_cost([event("other", execution=2), end], "m1")
    assert cost is not None and cost.as_dict() == {
        "execution": 3, "wall_seconds": 1.5, "cpu_seconds": 1.25, "peak_memory_bytes": 10,
        "memory_start_bytes": 4, "peak_memory_scope": "cell", "output_bytes_sent": 99,
        "output_bytes_cut": 7, "output_bytes_kept": 20, "output_bytes_not_kept": 0}
    assert cell_cost([end], "m2") is None
    assert cell_cost([event("m1", duration_seconds=1.0)], "m1") is None  # no number, no cost
