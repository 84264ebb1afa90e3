"""Notebooks through nbclient: golden notebooks re-run on their cellblock kernel and
compared with their saved outputs, and `cellblock run` on the embedded quickstart."""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import BIN, REPO

pytestmark = [pytest.mark.jail, pytest.mark.nonroot, pytest.mark.usefixtures("no_leftovers")]

GOLDEN = sorted((REPO / "notebooks" / "golden").glob("*.ipynb"))


NONCE = re.compile(r"\[cellblock [0-9a-f]{6}: ")


def normalise(output: dict[str, Any]) -> dict[str, Any]:
    """What must match: everything but execution counts, traceback text (paths, ANSI)
    and the per-kernel nonce in truncation markers."""
    out = {k: v for k, v in output.items() if k not in ("execution_count", "metadata")}
    if out.get("output_type") == "error":
        out.pop("traceback", None)
    return json.loads(NONCE.sub("[cellblock NONCE: ", json.dumps(out)))


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.name)
def test_golden_notebook(path: Path, jupyter_env: dict[str, str]) -> None:
    expected = nbformat.read(str(path), as_version=4)
    nb = copy.deepcopy(expected)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    kernel_name = expected.metadata["kernelspec"]["name"]
    NotebookClient(nb, kernel_name=kernel_name, timeout=60).execute()
    for i, (got, want) in enumerate(zip(nb.cells, expected.cells, strict=True)):
        if want.cell_type != "code":
            continue
        assert [normalise(o) for o in got.outputs] == [normalise(o) for o in want.outputs], (
            f"cell {i}: {want.source!r}"
        )


def test_cellblock_run_quickstart(tmp_path: Path, jupyter_env: dict[str, str]) -> None:
    out = subprocess.run([str(BIN / "cellblock"), "run"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert "quickstart.ipynb: 4 code cells on profile 'agent'" in out.stdout
    assert "0 with errors" in out.stdout
    executed = nbformat.read(str(tmp_path / "quickstart.executed.ipynb"), as_version=4)
    text = json.dumps([c.get("outputs", []) for c in executed.cells])
    assert "no network: Network is unreachable" in text
    # EACCES as root (the file is not the jail uid's), EROFS unprivileged (it is, but the
    # bind is read-only): refused either way
    assert ("writing /etc/passwd: Permission denied" in text
            or "writing /etc/passwd: Read-only file system" in text), text
