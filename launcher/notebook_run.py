"""Run a notebook on a cellblock profile with nbclient (``cellblock run``).

The kernelspec is built in memory from the policy, so ``cellblock run`` works
whether or not ``cellblock install`` has been run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from .errors import CellblockError
from .kernelspec import kernel_name, kernelspec_dict
from .policy import load_policy

__all__ = [
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


@dataclass(frozen=True)
class RunSummary:
    cells: int
    errors: int
    first_error: str


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
    nb: nbformat.NotebookNode | str, *, profile: str, output: Path, timeout: float
) -> RunSummary:
    """Execute every cell (continuing past errors), write the executed notebook.

    ``nb`` is a notebook from :func:`read_notebook`, or its JSON text.
    """
    if isinstance(nb, str):
        nb = read_notebook(nb, "<text>")
    km = sandbox_kernel_manager(profile)
    client = NotebookClient(nb, km=km, timeout=timeout, allow_errors=True,
                            kernel_name=kernel_name(profile))
    first_error = ""
    try:
        client.execute()
    except CellExecutionError as exc:  # only when a cell is tagged raises-exception wrongly
        first_error = str(exc).splitlines()[0]
    finally:
        nbformat.write(nb, str(output))  # type: ignore[no-untyped-call]  # unannotated
    cells = [c for c in nb.cells if c.cell_type == "code"]
    errors = 0
    for cell in cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                errors += 1
                if not first_error:
                    first_error = f"{out.get('ename')}: {out.get('evalue')}"
                break
    return RunSummary(cells=len(cells), errors=errors, first_error=first_error)
