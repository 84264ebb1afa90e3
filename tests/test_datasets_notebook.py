"""notebooks/datasets-demo.ipynb through nbclient: pandas in the jail reads the shipped
notebooks/data/sales.csv through the broker. The expected figures are computed here,
on the host, from the same file with the csv module."""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO, TEST_POLICY

pytestmark = [pytest.mark.jail, pytest.mark.nonroot, pytest.mark.usefixtures("no_leftovers")]

NOTEBOOK = REPO / "notebooks" / "datasets-demo.ipynb"
CSV = REPO / "notebooks" / "data" / "sales.csv"


def stdout_of(cell: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream"
                   and o.name == "stdout")


def test_datasets_demo_notebook(tmp_path: Path, jupyter_env: dict[str, str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pandas", reason="the demo needs pandas (pip install '.[test]')")
    policy = tmp_path / "policy.toml"
    policy.write_text(TEST_POLICY + f"""
[datasets.sales]
path = "{CSV}"
description = "Daily sales, 2024 (demo data)"

[profiles.agent]
datasets = ["sales"]
default_datasets = ["sales"]
""")
    monkeypatch.setenv("CELLBLOCK_POLICY", str(policy))
    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    NotebookClient(nb, kernel_name=nb.metadata["kernelspec"]["name"], timeout=120).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert errors == []
    code = [c for c in nb.cells if c.cell_type == "code"]

    with CSV.open(newline="") as f:
        rows = list(csv.DictReader(f))
    total = sum(float(r["amount"]) for r in rows)
    regions: dict[str, float] = defaultdict(float)
    for r in rows:
        regions[r["region"]] += float(r["amount"])

    assert stdout_of(code[0]) == "sales: file, Daily sales, 2024 (demo data)\n"
    assert stdout_of(code[1]) == (f"{len(rows)} rows, {rows[0]['date']} to {rows[-1]['date']}\n"
                                  f"total amount: {total:.2f}\n")
    assert stdout_of(code[2]) == "".join(f"{k:<6} {round(v, 2):9.2f}\n"
                                         for k, v in sorted(regions.items()))
    # EROFS from the read-only view; EACCES first when the jail's uid does not own the
    # file (as root every kernel has its own uid): refused either way
    assert stdout_of(code[4]) in [("write refused: EBADF\n"
                                   f"reopen for writing refused: {err}\n"
                                   "dataset 'salaries' is not granted to this kernel; "
                                   "granted: sales\n") for err in ("EROFS", "EACCES")]
    assert os.access(CSV, os.R_OK)
