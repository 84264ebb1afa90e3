"""Run a containment notebook (``notebooks/containment/``) on a started cellblock
kernel with nbclient, and judge its cases. Used by ``tests/test_containment.py``.

A case cell carries ``metadata.cellblock = {"case": "N1", "verdict": "kernel"|"gate"}``.
A "kernel" case passes only if its cell printed exactly ``HELD <case>`` and raised
nothing; a "gate" case prints ``SENT <case>`` and needs a host check. Cells without that
metadata are setup cells: they must not raise, nor print a verdict.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat
import pytest
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbformat import NotebookNode

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks" / "containment"
TOKEN = re.compile(r"\b(HELD|SENT) ([A-Z][0-9]+[a-z]?)\b")
CELL_TIMEOUT = 60


# -- reading and running a notebook -----------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One case cell: its notebook, its index there, its THREATS id and verdict kind."""

    notebook: str
    index: int
    case: str
    verdict: str  # "kernel": HELD printed in the jail; "gate": SENT, decided on the host


def load(name: str) -> NotebookNode:
    """``notebooks/containment/<name>.ipynb``, as committed."""
    return nbformat.read(str(NOTEBOOKS / f"{name}.ipynb"), as_version=4)


def cases_of(name: str, nb: NotebookNode | None = None) -> list[Case]:
    """The case cells of a notebook, in order (read at collection time for test ids)."""
    nb = load(name) if nb is None else nb
    out = []
    for i, cell in enumerate(nb.cells):
        meta = cell.metadata.get("cellblock")
        if cell.cell_type == "code" and meta:
            out.append(Case(name, i, meta["case"], meta["verdict"]))
    return out


def inject(nb: NotebookNode, params: dict[str, Any]) -> NotebookNode:
    """Papermill-style: a cell setting ``params`` right after the one tagged parameters."""
    nb = copy.deepcopy(nb)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    cell["id"] = "injected-parameters"
    nb.cells.insert(at + 1, cell)
    for c in nb.cells:
        if c.cell_type == "code":
            c.outputs = []
    return nb


def output_text(cell: NotebookNode) -> str:
    """Everything a cell showed, as text: streams, text MIME values and errors."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("display_data", "execute_result"):
            parts += [v if isinstance(v, str) else json.dumps(v) for k, v in out.data.items()
                      if k.startswith("text/") or k.endswith("json")]
        elif out.output_type == "error":
            parts.append(f"{out.ename}: {out.evalue}")
    return "\n".join(parts)


def errors(cell: NotebookNode) -> list[str]:
    """A cell's error outputs, as "ename: evalue"."""
    return [f"{o.ename}: {o.evalue}" for o in cell.get("outputs", []) if o.output_type == "error"]


Hook = Callable[[AsyncKernelManager], Awaitable[None]]


@dataclass
class Run:
    """An executed notebook and what the host saw while it ran."""

    name: str
    nb: NotebookNode
    host: dict[str, Any] = field(default_factory=dict)

    def cell(self, case: str) -> NotebookNode:
        """The executed cell of ``case``."""
        for cell in self.nb.cells:
            if cell.metadata.get("cellblock", {}).get("case") == case:
                return cell
        raise KeyError(case)


async def execute(nb: NotebookNode, km: AsyncKernelManager,
                  hooks: dict[str, Hook] | None = None) -> NotebookNode:
    """Run every code cell of ``nb`` on the started kernel ``km`` with nbclient, one by
    one; ``hooks[case]`` runs on the host right before that case's cell."""
    hooks = hooks or {}
    client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT, allow_errors=True,
                            startup_timeout=60)
    async with client.async_setup_kernel():
        try:
            for index, cell in enumerate(nb.cells):
                if cell.cell_type != "code":
                    continue
                case = cell.metadata.get("cellblock", {}).get("case")
                if case in hooks:
                    await hooks[case](km)
                await client.async_execute_cell(cell, index,
                                                execution_count=client.code_cells_executed + 1)
        finally:
            assert client.kc is not None
            client.kc.stop_channels()
    return nb


async def start_kernel(profile: str, env: dict[str, str] | None = None) -> AsyncKernelManager:
    """A started ``cellblock-<profile>`` kernel; the caller shuts it down."""
    km = AsyncKernelManager(kernel_name=f"cellblock-{profile}")
    await km.start_kernel(**({"env": env} if env is not None else {}))
    return km


# -- the verdict of one case ------------------------------------------------------------

def check_case(run: Run, case: str, host_check: Callable[[Run, NotebookNode], None] | None,
               expected_errors: tuple[str, ...] = ()) -> None:
    """The case's cell printed exactly its own token, showed exactly ``expected_errors``
    (none, but for what the gate itself announces) and, if given, its host check passed (a
    gate case must have one)."""
    cell = run.cell(case)
    verdict = cell.metadata["cellblock"]["verdict"]
    text = output_text(cell)
    tokens = TOKEN.findall(text)
    want = ("HELD" if verdict == "kernel" else "SENT", case)
    assert tuple(errors(cell)) == expected_errors, (
        f"{run.name} {case}: the cell raised {errors(cell)}, expected {list(expected_errors)}"
        f"\n{text[-3000:]}")
    assert tokens == [want], (
        f"{run.name} {case}: expected exactly '{' '.join(want)}' in the cell's output, "
        f"found {tokens}:\n{text[-3000:]}"
    )
    if verdict == "gate":
        assert host_check is not None, f"{run.name} {case}: a gate case needs a host check"
    if host_check is not None:
        host_check(run, cell)


def check_setup_cells(run: Run) -> None:
    """Setup cells (helpers, parameters, plants) ran cleanly and claimed no verdict."""
    for i, cell in enumerate(run.nb.cells):
        if cell.cell_type == "code" and not cell.metadata.get("cellblock"):
            assert not errors(cell), f"{run.name}: setup cell {i} raised: {errors(cell)}"
            assert not TOKEN.findall(output_text(cell)), f"{run.name}: setup cell {i}"


_RUNS: dict[str, Run | BaseException] = {}


def run_once(name: str, runner: Callable[[], Awaitable[Run | list[Run]]]) -> Run:
    """Each notebook runs once per test session; every case test reads the same run. A
    runner may execute several notebooks (one Run each, named); ``name`` picks one."""
    if name not in _RUNS:
        names = [name]
        try:
            result = asyncio.run(runner())
            runs = result if isinstance(result, list) else [result]
            names += [run.name for run in runs]
            for run in runs:  # a setup cell that failed (a plant) fails every run with it
                check_setup_cells(run)
            _RUNS.update({run.name: run for run in runs})
        except Exception as exc:  # every case fails with it, without running it again
            _RUNS.update(dict.fromkeys(names, exc))
    found = _RUNS[name]
    if isinstance(found, BaseException):
        raise AssertionError(f"{name}: the notebook run failed: {found!r}") from found
    return found


def case_params(name: str) -> list[Any]:
    """pytest parameters, one per case of a notebook, with ids like ``network-N1``."""
    return [pytest.param(c.case, id=f"{name}-{c.case}") for c in cases_of(name)]
