"""The public API: what ``import cellblock`` exports, pinned, and what importing it costs;
and the README's front door (its two commands, and the API it documents)."""

from __future__ import annotations

import ast
import json
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

import cellblock
import cellblock.errors
import cellblock.run_result
import cellblock.sandbox
import cellblock.warden.client

from conftest import BIN, REPO


@pytest.mark.nonroot
def test_all_is_pinned() -> None:
    assert cellblock.__all__ == [
        "BadKernelId",
        "BadOutputRequest",
        "CellTimeout",
        "CellblockError",
        "FileRefused",
        "HostUnsupported",
        "JailStartError",
        "JailStartTimeout",
        "OutputUnavailable",
        "PolicyError",
        "ProfileDisabled",
        "RunResult",
        "Sandbox",
        "SandboxStopped",
        "SyncSandbox",
        "UnknownProfile",
        "__version__",
        "warm",
    ]


@pytest.mark.nonroot
def test_every_export_is_the_submodules_object() -> None:
    assert cellblock.Sandbox is cellblock.sandbox.Sandbox
    assert cellblock.SyncSandbox is cellblock.sandbox.SyncSandbox
    assert cellblock.RunResult is cellblock.run_result.RunResult
    assert cellblock.warm is cellblock.warden.client.warm
    for name in cellblock.errors.__all__:  # the whole error tree, nothing else of errors.py
        assert getattr(cellblock, name) is getattr(cellblock.errors, name)
    assert set(cellblock.errors.__all__) <= set(cellblock.__all__)
    # the names modules used to define for themselves are the tree's
    assert cellblock.sandbox.CellTimeout is cellblock.CellTimeout
    assert cellblock.sandbox.SandboxStopped is cellblock.SandboxStopped
    assert set(cellblock.__all__) <= set(dir(cellblock))


@pytest.mark.nonroot
def test_unknown_attribute() -> None:
    with pytest.raises(AttributeError, match="module 'cellblock' has no attribute 'Sandboxx'"):
        cellblock.Sandboxx  # noqa: B018


@pytest.mark.nonroot
def test_import_is_cheap() -> None:
    """The provisioner, spawner and warden import cellblock submodules, so the package must
    not pull in the Sandbox (jupyter_client, pydantic, zmq) until someone asks for it."""
    code = ("import sys, json, cellblock\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith("
            "('cellblock', 'jupyter_client', 'zmq', 'pydantic', 'asyncio')))))\n"
            "cellblock.Sandbox\n"
            "print(json.dumps('cellblock.sandbox' in sys.modules))\n")
    out = subprocess.run([str(BIN / "python"), "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    first, second = out.stdout.splitlines()
    assert json.loads(first) == ["cellblock", "cellblock.errors"]
    assert json.loads(second) is True


@pytest.mark.nonroot
def test_one_class_per_name() -> None:
    """No two public classes of the host package share a name (there were two Sandboxes)."""
    package = Path(cellblock.__file__).parent  # launcher/, or the installed copy of it
    files = sorted(package.rglob("*.py"))
    assert package / "sandbox.py" in files
    where: dict[str, list[str]] = defaultdict(list)
    for path in files:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                where[node.name].append(str(path.relative_to(package)))
    assert {name: paths for name, paths in where.items() if len(paths) > 1} == {}


# Not nonroot: the unprivileged pass of .ci/test runs on a copy of tests/, notebooks/ and
# docs/ only (no README.md, no .ci/).

def test_readme_names_the_public_api() -> None:
    readme = (REPO / "README.md").read_text()
    missing = [name for name in cellblock.__all__ if name != "__version__"
               and f"`{name}`" not in readme and f"cellblock.{name}" not in readme]
    assert missing == []
    assert "cellblock.sandbox.Sandbox" not in readme  # the public name is cellblock.Sandbox


def test_readme_two_commands_and_ci() -> None:
    """The README's two commands exist, and CI (.ci/run) runs exactly those."""
    readme = (REPO / "README.md").read_text()
    block = readme[readme.index("## Two commands"):]
    block = block[block.index("```sh\n") + 6:]
    commands = [line.split("#")[0].strip() for line in block[:block.index("```")].splitlines()]
    assert commands == ["bash .ci/demo", "bash .ci/test"]
    for command in commands:
        assert (REPO / command.split()[1]).is_file()
    run = (REPO / ".ci" / "run").read_text().splitlines()
    assert [line for line in run if line.startswith("bash ")] == [
        "bash .ci/demo --fresh", "bash .ci/test"]
