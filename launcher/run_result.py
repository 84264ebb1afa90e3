"""What one cell did, as :class:`cellblock.sandbox.Sandbox` returns it: the output the client
got, the error, and what the profile's output policy and budgets did to the cell.

Who calls what: :meth:`Sandbox.run <cellblock.sandbox.Sandbox.run>` collects a cell's
iopub messages and shell reply into a :class:`RunResult`; the :class:`PolicyReport` in it
comes from the kernel's audit log (:mod:`cellblock.audit`), which the warden writes, read
through an :class:`AuditTail` once the cell's ``status: idle`` and reply have arrived:

- the cell's ``output.cell`` (written by the output filter when the gate releases the cell's
  idle, before the client sees it; one per cell, the policy's whole effect on it): redactions
  by rule (not those in the echo of the code), bytes cut by the stream budget and by
  ``max_text``, and notes such as ``"81,920 bytes of text/plain truncated"`` or
  ``"image/png of 900,000 bytes (limit 524,288)"``;
- the cell's ``execution.end`` (written when its idle passes the gate, before the client sees it):
  ``limits_hit`` (``cell_seconds``, ``grace_seconds``, ``output_bytes``) and the output
  bytes the kernel sent and the client got;
- a ``kernel.exit`` written while the cell ran: the budget that stopped the kernel, or
  ``memory``/``pids`` when the jail died at a cgroup limit.

Nothing is read from the text the client got: a kernel can print something that looks like the
gate's truncation marker, but it cannot write the audit log.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .audit import AuditEvent
from .cell_cost import Cost

__all__ = [
    "AuditTail",
    "Cost",
    "ErrorInfo",
    "Output",
    "PolicyReport",
    "RunResult",
    "policy_report",
    "stop_message",
    "strip_ansi",
]

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
_NOTE_CUT = re.compile(r"^([0-9]+) bytes of .+ truncated$")
#: death reasons the warden words (``Warden.death_reason``) -> the limit's policy key
_DEATHS = (("memory limit ", "memory"), ("process limit ", "pids"),
           ("killed by the seccomp policy", "seccomp"))


def strip_ansi(text: str) -> str:
    """``text`` without ANSI escape sequences (IPython colours its tracebacks)."""
    return _ANSI.sub("", text)


@dataclass(frozen=True)
class ErrorInfo:
    """An ``error`` the cell published: the kernel's exception, or a notice of the gate's
    (``CellblockBudget``: a budget acted; ``CellblockKernelStopped``: the kernel is gone)."""

    name: str
    value: str
    traceback: tuple[str, ...] = ()

    def text(self) -> str:
        """``name: value`` and the traceback, without ANSI colours."""
        head = f"{self.name}: {self.value}"
        lines = [strip_ansi(line) for line in self.traceback]
        if not lines or lines == [self.value]:
            return head
        return head + "\n" + "\n".join(lines)


@dataclass(frozen=True)
class Output:
    """One rich output: ``kind`` is ``execute_result``, ``display_data`` or
    ``update_display_data``; ``data`` is the MIME bundle as the gate let it through."""

    kind: str
    data: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PolicyReport:
    """What the profile's output policy and budgets did to one cell (see the module
    docstring for where each field comes from).

    ``audited`` is False when the cell's ``execution.end`` was not in the audit log (the log
    was unreadable, or the warden never saw the cell end): the counts are then partial.
    """

    truncated_bytes: int = 0
    redactions: dict[str, int] = field(default_factory=dict)
    limits_hit: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    output_bytes_in: int | None = None
    output_bytes_out: int | None = None
    audited: bool = False

    def summary(self) -> str:
        """One line for a person or a model; empty when the policy changed nothing."""
        parts = []
        if self.redactions:
            total = sum(self.redactions.values())
            rules = ", ".join(f"{rule} x{n}" if n > 1 else rule
                              for rule, n in sorted(self.redactions.items()))
            parts.append(f"{total} redaction{'s' if total != 1 else ''} ({rules})")
        if self.truncated_bytes:
            parts.append(f"{self.truncated_bytes:,} bytes truncated")
        if self.limits_hit:
            parts.append("limits hit: " + ", ".join(self.limits_hit))
        withheld = [n for n in self.notes if not _NOTE_CUT.match(n)]
        if withheld:
            parts.append("withheld: " + "; ".join(withheld))
        return "; ".join(parts)


@dataclass(frozen=True)
class RunResult:
    """Everything one :meth:`Sandbox.run <cellblock.sandbox.Sandbox.run>` saw.

    ``status`` is the reply's (``ok``, ``error``, ``aborted``), or ``stopped`` when the kernel
    stopped before replying. ``error`` is the first error of the cell (a budget's notice comes
    before the ``KeyboardInterrupt`` it causes); ``errors`` has them all. ``kernel_stopped``
    is the gate's ``"cellblock: kernel stopped, ..."`` when the kernel ended during the cell.
    """

    stdout: str = ""
    stderr: str = ""
    outputs: tuple[Output, ...] = ()
    errors: tuple[ErrorInfo, ...] = ()
    status: str = "ok"
    execution_count: int | None = None
    kernel_stopped: str | None = None
    policy: PolicyReport = field(default_factory=PolicyReport)
    #: what the cell cost (its ``execution.end``: cellblock.cell_cost); ``cost.execution`` is
    #: the number ``Sandbox.output`` takes
    cost: Cost | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok" and not self.errors

    @property
    def error(self) -> ErrorInfo | None:
        return self.errors[0] if self.errors else None

    @property
    def results(self) -> list[dict[str, Any]]:
        """MIME bundles of ``execute_result`` (the value of the cell's last expression)."""
        return [o.data for o in self.outputs if o.kind == "execute_result"]

    @property
    def displays(self) -> list[dict[str, Any]]:
        """MIME bundles of ``display_data`` and ``update_display_data``, in order."""
        return [o.data for o in self.outputs if o.kind != "execute_result"]


class AuditTail:
    """Reads one kernel's audit log incrementally: each :meth:`take` returns the complete
    lines written since the last one (a line still being written is left for next time)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0

    def take(self) -> list[AuditEvent]:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return []
        end = data.rfind(b"\n") + 1
        self._offset += end
        return list(_parse(data[:end]))


def _parse(data: bytes) -> Iterator[AuditEvent]:
    for line in data.splitlines():
        try:
            yield AuditEvent.model_validate(json.loads(line))
        except ValueError:
            continue


def policy_report(events: list[AuditEvent], msg_id: str, stopped: bool) -> PolicyReport:
    """The report of the cell whose execute_request was ``msg_id``, from the audit events
    written while it ran. ``stopped``: the kernel ended during the cell, so a ``kernel.exit``
    among ``events`` says which limit."""
    redactions: dict[str, int] = {}
    notes: list[str] = []
    limits: list[str] = []
    cut = 0
    end: AuditEvent | None = None
    for event in events:
        fields = event.fields
        if event.event == "kernel.exit" and stopped:
            limits.extend(_exit_limit(fields))
            continue
        if event.parent_msg_id != msg_id:
            continue
        if event.event == "output.cell":  # one per cell (more if it outlived 1024 others)
            for rule, n in (fields.get("redactions") or {}).items():
                redactions[str(rule)] = redactions.get(str(rule), 0) + int(n)
            cut += sum(int(n) for n in (fields.get("truncated_bytes") or {}).values())
            notes.extend(str(note) for note in fields.get("notes") or [])
        elif event.event == "execution.end":
            end = event
    if end is not None:
        limits = [str(x) for x in end.fields.get("limits_hit", [])] + limits
    return PolicyReport(
        truncated_bytes=cut, redactions=redactions, limits_hit=tuple(dict.fromkeys(limits)),
        notes=tuple(notes),
        output_bytes_in=end.fields.get("output_bytes_in") if end is not None else None,
        output_bytes_out=end.fields.get("output_bytes_out") if end is not None else None,
        audited=end is not None,
    )


def stop_message(events: list[AuditEvent]) -> str:
    """The user's words for a kernel that ended, from its ``kernel.exit`` among ``events``,
    worded as the warden words its notice (``"cellblock: kernel stopped, ..."``)."""
    for event in events:
        if event.event == "kernel.exit":
            reason = str(event.fields.get("reason", "")) or "no reason recorded"
            if reason.startswith("stopped"):
                return f"cellblock: kernel {reason}"
            return f"cellblock: kernel stopped, {reason}"
    return "cellblock: kernel stopped (its warden exited without a kernel.exit event)"


def _exit_limit(fields: dict[str, Any]) -> list[str]:
    budget = fields.get("budget")
    if isinstance(budget, str) and budget and budget != "operator":
        return [budget]
    reason = str(fields.get("reason", ""))
    return [key for prefix, key in _DEATHS if reason.startswith(prefix)]
