"""Run a notebook on a cellblock profile with nbclient (``cellblock run``), and say what
cellblock did to it.

The kernelspec is built in memory from the policy, so ``cellblock run`` works
whether or not ``cellblock install`` has been run.

The :class:`RunSummary` has two sources, kept apart because only one can be trusted:

- the kernel's **audit log** (:mod:`cellblock.audit`, written by the warden, outside the
  jail): per code cell, what the output policy cut, redacted and withheld and which limits
  it hit (:func:`cellblock.run_result.policy_report`, matched to cells by their
  execute_request's msg_id), the datasets the launch was granted and the broker's opens;
- the **notebook's own words**: the last stdout line of each code cell tagged
  ``cellblock-summary`` (the quickstart tags the cells that try to write the dataset and to
  reach the network: the jail refuses both without writing any log). That text comes from
  the kernel, so it is shown as such, one line, without control characters.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import nbformat
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from .audit import AuditEvent, audit_dir
from .datasets import DATASETS_ENV
from .errors import CellblockError, JailStartError, JailStartTimeout
from .kernelspec import kernel_name, kernelspec_dict
from .policy import load_policy
from .run_result import AuditTail, PolicyReport, policy_report

__all__ = [
    "SUMMARY_TAG",
    "CellEffect",
    "PolicyKernelSpecManager",
    "RunSummary",
    "read_notebook",
    "run_notebook",
    "sandbox_kernel_manager",
]


class PolicyKernelSpecManager(KernelSpecManager):
    """Serves ``cellblock-<profile>`` specs straight from the policy."""

    def get_kernel_spec(self, kernel_name_: str) -> KernelSpec:
        prefix = "cellblock-"
        if kernel_name_.startswith(prefix):
            policy = load_policy()
            name = kernel_name_[len(prefix):]
            if name in policy.profiles:
                return KernelSpec(resource_dir="", **kernelspec_dict(name, policy.profile(name)))
        try:
            return super().get_kernel_spec(kernel_name_)
        except NoSuchKernel:
            raise


def sandbox_kernel_manager(profile: str, **kwargs: Any) -> AsyncKernelManager:
    """An AsyncKernelManager for ``cellblock-<profile>`` that needs no installed spec."""
    load_policy().profile(profile)  # fail early, naming the known profiles
    return AsyncKernelManager(
        kernel_name=kernel_name(profile), kernel_spec_manager=PolicyKernelSpecManager(), **kwargs
    )


SUMMARY_TAG = "cellblock-summary"  # a code cell whose last stdout line goes in the summary


@dataclass(frozen=True)
class CellEffect:
    """What the output policy did to one code cell (``cell``: 1-based among code cells)."""

    cell: int
    report: PolicyReport


@dataclass(frozen=True)
class RunSummary:
    """One ``cellblock run`` (see the module docstring for where each field comes from)."""

    cells: int
    errors: int
    first_error: str
    kernel_id: str | None = None
    audit_log: Path | None = None
    granted: tuple[str, ...] = ()
    opened: dict[str, int] = field(default_factory=dict)  # dataset -> opens the broker made
    refused: dict[str, int] = field(default_factory=dict)  # dataset -> opens it refused
    effects: tuple[CellEffect, ...] = ()  # only the cells the policy changed
    reported: tuple[tuple[int, str], ...] = ()  # (code cell, its cellblock-summary line)

    def details(self) -> list[str]:
        """What cellblock did and what the notebook reported, for a person; empty when
        neither has anything to say."""
        did: list[str] = []
        for label, pick in (("cut", _cut), ("redacted", _redacted),
                            ("limits hit", _limits), ("withheld", _withheld)):
            did += [f"  {label:<10} code cell {e.cell}: {text}"
                    for e in self.effects if (text := pick(e.report))]
        if self.granted or self.opened or self.refused:
            parts = [f"granted {', '.join(self.granted) or 'none'}"]
            if self.opened:
                parts.append("the broker opened read-only " + _counts(self.opened))
            if self.refused:
                parts.append("refused " + _counts(self.refused))
            did.append(f"  {'datasets':<10} " + "; ".join(parts))
        lines = []
        if did:
            lines += ["what cellblock did (from the kernel's audit log, written outside "
                      "the jail):", *did]
        if self.reported:
            lines.append(f"what the notebook reported (cells tagged {SUMMARY_TAG}):")
            lines += [f"  code cell {cell}: {text}" for cell, text in self.reported]
        if lines and self.audit_log is not None:
            lines.append(f"audit log: {self.audit_log}")
        return lines


def _cut(report: PolicyReport) -> str:
    n = report.truncated_bytes
    return f"{n:,} bytes of output (the marker in its output says where)" if n else ""


def _redacted(report: PolicyReport) -> str:
    total = sum(report.redactions.values())
    if not total:
        return ""
    rules = ", ".join(f"{rule} x{n}" if n > 1 else rule
                      for rule, n in sorted(report.redactions.items()))
    return f"{total} match{'es' if total != 1 else ''} of {rules}"


def _limits(report: PolicyReport) -> str:
    return ", ".join(report.limits_hit)


def _withheld(report: PolicyReport) -> str:
    return "; ".join(n for n in report.notes if not n.endswith(" truncated"))


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} ({n} time{'s' if n != 1 else ''})"
                     for name, n in sorted(counts.items()))


def printable(text: str, limit: int = 200) -> str:
    """Kernel text made safe for a terminal: one line, no control or format characters
    (no escape sequences, no bidi overrides), at most ``limit`` characters."""
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def read_notebook(text: str, name: str) -> nbformat.NotebookNode:
    """Parse ``text`` as a v4 notebook; a :class:`CellblockError` naming ``name`` if it is not."""
    try:
        nb: nbformat.NotebookNode = nbformat.reads(  # type: ignore[no-untyped-call]
            text, as_version=4)  # nbformat is unannotated
        return nb
    except (ValueError, TypeError, KeyError, AttributeError,
            nbformat.ValidationError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CellblockError(f"notebook {name!r} is not a valid .ipynb notebook: "
                             f"{first[:200]}") from None


def run_notebook(
    nb: nbformat.NotebookNode | str, *, profile: str, output: Path, timeout: float,
    datasets: Sequence[str] | None = None,
) -> RunSummary:
    """Execute every cell (continuing past errors), write the executed notebook.

    ``nb`` is a notebook from :func:`read_notebook`, or its JSON text. ``datasets``: the
    names the launch asks for (None: ``$CELLBLOCK_DATASETS``, else the profile's defaults).
    """
    if isinstance(nb, str):
        nb = read_notebook(nb, "<text>")
    km = sandbox_kernel_manager(profile)
    client = NotebookClient(nb, km=km, timeout=timeout, allow_errors=True,
                            kernel_name=kernel_name(profile))
    started: dict[str, str] = {}
    msg_ids: dict[int, str] = {}  # notebook cell index -> its execute_request's msg_id

    def notebook_start(**_: Any) -> None:
        started["kernel_id"] = str(km.kernel_id)

    def cell_executed(cell_index: int, execute_reply: dict[str, Any] | None, **_: Any) -> None:
        if execute_reply is not None:
            msg_ids[cell_index] = str(execute_reply["parent_header"].get("msg_id", ""))

    client.on_notebook_start = notebook_start
    client.on_cell_executed = cell_executed
    env: dict[str, Any] = {}
    if datasets is not None:
        env["env"] = {**os.environ, DATASETS_ENV: ",".join(datasets)}
    first_error = ""
    try:
        client.execute(**env)
    except CellExecutionError as exc:  # only when a cell is tagged raises-exception wrongly
        first_error = str(exc).splitlines()[0]
    except RuntimeError as exc:
        if isinstance(exc, JailStartError) or "didn't respond" not in str(exc):
            raise
        raise JailStartTimeout(  # nbclient's wait_for_ready: say so, not a traceback
            f"the {profile!r} kernel ({started.get('kernel_id', 'not started')}) did not "
            f"answer within nbclient's startup timeout ({client.startup_timeout} s): {exc}. "
            "Its warden's log above says why, if it knows; `cellblock doctor` checks the "
            "host") from None
    finally:
        nbformat.write(nb, str(output))  # type: ignore[no-untyped-call]  # unannotated
    errors = 0
    reported = []
    code = [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    for number, (_, cell) in enumerate(code, 1):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                errors += 1
                if not first_error:
                    first_error = f"{out.get('ename')}: {out.get('evalue')}"
                break
        if SUMMARY_TAG in cell.get("metadata", {}).get("tags", []):
            reported.append((number, _last_line(cell)))
    summary = RunSummary(cells=len(code), errors=errors, first_error=first_error,
                         reported=tuple(reported))
    kernel_id = started.get("kernel_id")
    if kernel_id is None:
        return summary
    path = audit_dir(load_policy().audit.dir) / f"{kernel_id}.jsonl"
    cells = {msg_ids[i]: number for number, (i, _) in enumerate(code, 1) if i in msg_ids}
    return _audited(summary, kernel_id, path, AuditTail(path).take(), cells)


def _last_line(cell: nbformat.NotebookNode) -> str:
    text = "".join(str(o.get("text", "")) for o in cell.get("outputs", [])
                   if o.get("output_type") == "stream" and o.get("name") == "stdout")
    lines = [line for line in text.splitlines() if line.strip()]
    return printable(lines[-1]) if lines else "(no output)"


def _audited(summary: RunSummary, kernel_id: str, path: Path, events: list[AuditEvent],
             cells: dict[str, int]) -> RunSummary:
    """``summary`` with what the kernel's audit log says (``cells``: msg_id -> code cell)."""
    effects = []
    for msg_id, number in cells.items():
        report = policy_report(events, msg_id, stopped=False)
        if report.truncated_bytes or report.redactions or report.limits_hit or report.notes:
            effects.append(CellEffect(number, report))
    granted: tuple[str, ...] = ()
    opened: Counter[str] = Counter()
    refused: Counter[str] = Counter()
    for event in events:
        if event.event == "broker.start":
            granted = tuple(printable(str(n)) for n in event.fields.get("granted") or ())
        elif event.event == "broker.open" and event.fields.get("dataset"):
            name = printable(str(event.fields["dataset"]), 40)
            (opened if event.fields.get("decision") == "granted" else refused)[name] += 1
    return replace(summary, kernel_id=kernel_id, audit_log=path if events else None,
                   granted=granted, opened=dict(opened), refused=dict(refused),
                   effects=tuple(sorted(effects, key=lambda e: e.cell)))
