"""The layout rules that code review would otherwise have to remember."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import cellblock.errors

ROOT = Path(__file__).resolve().parent.parent
KERNEL_FILES = sorted((ROOT / "kernel").rglob("*.py"))


def _host_imports(tree: ast.AST, depth: int = 1) -> list[str]:
    """Every way a module ``depth`` packages deep (1: cellblock_kernel itself) names the
    host package `cellblock`: import statements, relative imports that climb out of
    cellblock_kernel, and import_module/__import__ calls with a literal name."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level > depth:
                found.append(f"line {node.lineno}: relative import above the package")
            names = [node.module or ""] if node.level == 0 else []
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            arg = node.args[0].value
            names = [arg] if called in ("import_module", "__import__") and isinstance(arg, str) \
                else []
        else:
            continue
        found += [f"line {node.lineno}: {n}" for n in names
                  if n == "cellblock" or n.startswith("cellblock.")]
    return found


def test_kernel_files_found() -> None:
    assert ROOT / "kernel" / "__main__.py" in KERNEL_FILES


@pytest.mark.parametrize("path", KERNEL_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_jail_side_never_imports_host_side(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    depth = len(path.relative_to(ROOT / "kernel").parts)
    assert _host_imports(tree, depth) == []


@pytest.mark.parametrize(("source", "expected"), [
    ("import cellblock", ["line 1: cellblock"]),
    ("import cellblock.policy as p", ["line 1: cellblock.policy"]),
    ("from cellblock.errors import PolicyError", ["line 1: cellblock.errors"]),
    ("from cellblock import errors", ["line 1: cellblock"]),
    ("import importlib\nimportlib.import_module('cellblock.policy')",
     ["line 2: cellblock.policy"]),
    ("__import__('cellblock')", ["line 1: cellblock"]),
    ("from .. import policy", ["line 1: relative import above the package"]),
    ("import cellblock_kernel\nfrom cellblock_kernel import __main__", []),
    ("from . import datasets\nimport zmq, ipykernel", []),
])
def test_the_import_check_itself(source: str, expected: list[str]) -> None:
    assert _host_imports(ast.parse(source)) == expected


def test_errors_all_is_pinned() -> None:
    assert cellblock.errors.__all__ == [
        "CellTimeout",
        "CellblockError",
        "HostUnsupported",
        "JailStartError",
        "JailStartTimeout",
        "PolicyError",
        "ProfileDisabled",
        "SandboxStopped",
        "UnknownProfile",
    ]


def test_errors_tree() -> None:
    e = cellblock.errors
    for child, parents in [
        (e.PolicyError, (e.CellblockError, ValueError)),
        (e.UnknownProfile, (e.PolicyError, KeyError)),
        (e.ProfileDisabled, (e.PolicyError,)),
        (e.HostUnsupported, (e.CellblockError, RuntimeError)),
        (e.JailStartError, (e.CellblockError, RuntimeError)),
        (e.JailStartTimeout, (e.JailStartError, TimeoutError)),
        (e.CellTimeout, (e.CellblockError, TimeoutError)),
        (e.SandboxStopped, (e.CellblockError, RuntimeError)),
    ]:
        assert child.__bases__ == parents
    # every name in __all__ is drawn in the module docstring's tree
    for name in e.__all__:
        assert f"{name}(" in (e.__doc__ or "")
