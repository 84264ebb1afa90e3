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


REBUILD = sorted((REPO / "notebooks" / "golden" / "rebuild").glob("*.ipynb"))
UUID = re.compile(r"\b[0-9a-f]{32}\b")


def as_seen(outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a reader sees of a cell's outputs: consecutive stream pieces of one name joined
    (the gate may coalesce them), tracebacks (paths, ANSI) and execution counts left out,
    widget model ids masked; every MIME bundle and its metadata kept."""
    out: list[dict[str, Any]] = []
    for output in outputs:
        output = {k: v for k, v in output.items() if k not in ("execution_count", "traceback")}
        last = out[-1] if out else None
        if (output["output_type"] == "stream" and last is not None
                and last["output_type"] == "stream" and last["name"] == output["name"]):
            last["text"] += output["text"]
            continue
        out.append(output)
    for output in out:  # TODO(issue 13 finding 7, the cleaning path in output/streams.py):
        if output["output_type"] == "stream":  # analyst streams lose their \r; drop this
            output["text"] = output["text"].replace("\r", "")  # once they keep it
    return json.loads(UUID.sub("UUID", json.dumps(out)))


@pytest.mark.parametrize("path", REBUILD, ids=lambda p: p.name)
def test_golden_notebook_unchanged_by_the_rebuild(path: Path, jupyter_env: dict[str, str]) -> None:
    """Ordinary notebook output (pandas HTML, matplotlib PNG, an image with width/height
    metadata, tqdm, markdown, a widget, an error), saved from a plain ipykernel, comes
    through the gate (which rebuilds every message) as it was, metadata included."""
    expected = nbformat.read(str(path), as_version=4)
    nb = copy.deepcopy(expected)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    NotebookClient(nb, kernel_name=expected.metadata["kernelspec"]["name"], timeout=90).execute()
    for i, (got, want) in enumerate(zip(nb.cells, expected.cells, strict=True)):
        if want.cell_type == "code":
            assert as_seen(got.outputs) == as_seen(want.outputs), f"cell {i}: {want.source!r}"


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
