"""papermill runs notebooks/parameterised.ipynb on `cellblock-agent`: once with the
`papermill` command line, once with `papermill.execute_notebook`. Each checks the cell
papermill injected after the `parameters` cell and the outputs the parameters produce,
including one that only a jailed kernel gives (no network)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import nbformat
import pytest

from conftest import BIN, REPO

pytestmark = [pytest.mark.jail, pytest.mark.nonroot, pytest.mark.usefixtures("no_leftovers")]
NOTEBOOK = REPO / "notebooks" / "parameterised.ipynb"


def check(path: Path, n: int, label: str) -> None:
    """The executed notebook at ``path`` ran with ``n`` and ``label`` on cellblock-agent."""
    nb = nbformat.read(str(path), as_version=4)
    tags = [c.metadata.get("tags", []) for c in nb.cells]
    defaults = next(i for i, t in enumerate(tags) if "parameters" in t)
    injected = [i for i, t in enumerate(tags) if "injected-parameters" in t]
    assert injected == [defaults + 1], tags
    assert f"n = {n}\n" in nb.cells[injected[0]].source
    assert f'label = "{label}"' in nb.cells[injected[0]].source
    assert nb.metadata["papermill"]["parameters"] == {"n": n, "label": label}
    assert nb.metadata["papermill"]["exception"] is None
    assert nb.metadata["kernelspec"]["name"] == "cellblock-agent"
    code = [c for c in nb.cells if c.cell_type == "code"][2:]
    stdout = ["".join(o.get("text", "") for o in c.outputs if o.output_type == "stream")
              for c in code]
    assert stdout[0] == f"{label} {n} {sum(i * i for i in range(n))}\n"
    assert stdout[1] == "no network: Network is unreachable\n"
    result = [o for o in code[2].outputs if o.output_type == "execute_result"]
    assert [r.data["text/plain"] for r in result] == [str((n - 1) ** 2)]


def test_papermill_cli(tmp_path: Path, jupyter_env: dict[str, str]) -> None:
    out = tmp_path / "out.ipynb"
    run = subprocess.run([str(BIN / "papermill"), str(NOTEBOOK), str(out),
                          "-k", "cellblock-agent", "-p", "n", "7", "-p", "label", "cli"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    check(out, 7, "cli")


def test_papermill_api(tmp_path: Path, jupyter_env: dict[str, str]) -> None:
    import papermill

    out = tmp_path / "out.ipynb"
    papermill.execute_notebook(str(NOTEBOOK), str(out), parameters={"n": 5, "label": "api"},
                               kernel_name="cellblock-agent", progress_bar=False,
                               cwd=str(tmp_path))
    check(out, 5, "api")
