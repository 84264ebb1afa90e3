"""What one cell cost, as a client reads it: :attr:`RunResult.cost
<cellblock.run_result.RunResult.cost>` and the MCP tool result's ``_meta``.

Who calls what: :meth:`Sandbox.run <cellblock.sandbox.Sandbox.run>` builds a :class:`Cost`
with :func:`cell_cost` from the cell's ``execution.end`` audit event, which the warden writes
before the client sees the cell's idle (host facts: the kernel's cgroup counters,
:mod:`cellblock.warden.cost`, and the gate's byte counts; never the kernel's word).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .audit import AuditEvent

__all__ = ["Cost", "cell_cost"]


@dataclass(frozen=True)
class Cost:
    """One cell's cost. None where the host could not count it (no cgroups)."""

    #: the gate's number of the cell (1, 2, ... per kernel): ``read_output(execution=N)``
    execution: int
    wall_seconds: float  #: from the cell's start (not its wait in the queue) to its reply
    cpu_seconds: float | None  #: CPU time of everything in the kernel's cgroup meanwhile
    peak_memory_bytes: int | None  #: the cgroup's peak while the cell ran (baseline included)
    memory_start_bytes: int | None  #: what the cgroup held when the cell started
    peak_memory_scope: str | None  #: "cell", or "kernel"/"sampled" where no per-cell reset
    output_bytes_sent: int  #: every frame the client got for the cell
    output_bytes_cut: int  #: stream bytes the stream budget cut (not sent)
    output_bytes_kept: int  #: bytes kept on the host for read_output (head included)
    output_bytes_not_kept: int  #: cut bytes past the spool's cap

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _num(value: Any) -> Any:
    return value if type(value) in (int, float) else None


def cell_cost(events: list[AuditEvent], msg_id: str) -> Cost | None:
    """The cost of the cell whose execute_request was ``msg_id``, from its ``execution.end``
    among ``events`` (None if it has none: the kernel was gone before its end was written)."""
    for event in events:
        if event.event != "execution.end" or event.parent_msg_id != msg_id:
            continue
        f = event.fields
        number = f.get("execution")
        if type(number) is not int:
            return None
        scope = f.get("peak_memory_scope")
        return Cost(
            execution=number, wall_seconds=float(_num(f.get("duration_seconds")) or 0.0),
            cpu_seconds=_num(f.get("cpu_seconds")),
            peak_memory_bytes=_num(f.get("peak_memory_bytes")),
            memory_start_bytes=_num(f.get("memory_start_bytes")),
            peak_memory_scope=scope if isinstance(scope, str) else None,
            output_bytes_sent=int(_num(f.get("output_bytes_out")) or 0),
            output_bytes_cut=int(_num(f.get("output_bytes_cut")) or 0),
            output_bytes_kept=int(_num(f.get("output_bytes_kept")) or 0),
            output_bytes_not_kept=int(_num(f.get("output_bytes_not_kept")) or 0),
        )
    return None
