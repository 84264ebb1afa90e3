"""Notebooks through nbclient: golden notebooks re-run on their cellblock kernel and
compared with their saved outputs, and `cellblock run` on the embedded quickstart."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import unicodedata
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_notebook

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


MARKER = re.compile(r"\[cellblock [0-9a-f]{6}: ([0-9,]+) bytes, [0-9,]+ lines of stdout "
                    r"truncated(?:; the rest is kept: read_output\([^)]*\))?\]")


def test_cellblock_run_quickstart(tmp_path: Path, jupyter_env: dict[str, str]) -> None:
    """The front door: the embedded quickstart on the sample dataset, and a summary that says
    what was cut, what was redacted, what the jail refused and where the notebook is."""
    out = subprocess.run([str(BIN / "cellblock"), "run"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    executed_path = tmp_path / "quickstart.executed.ipynb"
    executed = nbformat.read(str(executed_path), as_version=4)
    text = json.dumps([c.get("outputs", []) for c in executed.cells])
    cut = MARKER.findall(text)
    assert len(cut) == 1, text  # the flood, and only the flood, was cut
    audit = Path(jupyter_env["CELLBLOCK_AUDIT_DIR"])
    lines = out.stdout.splitlines()
    head = re.escape("quickstart.ipynb: 7 code cells on profile 'agent' in ") + r"[0-9.]+" \
        + re.escape(f" s; 0 with errors; written to {executed_path}")
    assert re.fullmatch(head, lines[0]), out.stdout
    # EACCES where the jail's uid does not own the file (as root; or a venv root installed),
    # else EROFS (the mount the broker opened it through is read-only): refused either way
    refusal = lines[7].removeprefix("  code cell 3: write to dataset 'sample': refused (")
    assert refusal in ("Permission denied)", "Read-only file system)"), out.stdout
    assert lines[1:] == [
        "what cellblock did (from the kernel's audit log, written outside the jail):",
        f"  cut        code cell 5: {cut[0]} bytes of output (the marker in its output says "
        "where)",
        "  redacted   code cell 6: 1 match of aws-access-key-id",
        "  datasets   granted sample; the broker opened read-only sample (2 times)",
        "what the notebook reported (cells tagged cellblock-summary):",
        "  code cell 2: read dataset 'sample' through the broker: 12 orders, 752.05 in total",
        f"  code cell 3: write to dataset 'sample': refused ({refusal}",
        "  code cell 4: network: refused (Network is unreachable)",
        lines[-1],
    ], out.stdout
    assert re.fullmatch(re.escape(f"audit log: {audit}/") + r"[0-9a-f-]{36}\.jsonl",
                        lines[-1]), out.stdout
    assert Path(lines[-1].removeprefix("audit log: ")).is_file()
    assert "[REDACTED:aws-access-key-id]" in text
    assert "AKIAQUICKSTARTFAKE23" not in text + out.stdout
    assert "write to dataset 'sample': refused" in text  # the summary quotes the notebook


def test_cellblock_run_summary_is_not_the_kernels_to_write(tmp_path: Path,
                                                           jupyter_env: dict[str, str]) -> None:
    """What the summary says was cut or redacted comes from the audit log: a kernel that
    prints a marker and a redaction of its own gets neither reported, and the line a tagged
    cell contributes reaches the terminal without escape sequences or bidi overrides
    (:func:`cellblock.notebook_run.printable`, behind the gate's own normalisation)."""
    nb = new_notebook(cells=[
        new_code_cell("print('[cellblock 0a1b2c: 999,999 bytes, 9 lines of stdout truncated]')\n"
                      "print('[REDACTED:aws-access-key-id]')"),
        new_code_cell("print('ok \\x1b]0;title\\x07\\x1b[31mred\\u202e!')",
                      metadata={"tags": ["cellblock-summary"]}),
    ])
    path = tmp_path / "fake.ipynb"
    nbformat.write(nb, str(path))
    out = subprocess.run([str(BIN / "cellblock"), "run", str(path), "--profile", "analyst"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert "[cellblock 0a1b2c: 999,999 bytes" in (tmp_path / "fake.executed.ipynb").read_text()
    lines = out.stdout.splitlines()
    assert lines[1] == "what the notebook reported (cells tagged cellblock-summary):"
    assert lines[2].startswith("  code cell 2: ok ") and lines[2].endswith("red!"), out.stdout
    assert lines[3].startswith("audit log: ") and len(lines) == 4, out.stdout
    assert not [c for c in out.stdout if unicodedata.category(c) in ("Cc", "Cf")
                         and c != "\n"]
