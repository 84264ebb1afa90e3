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
        "SandboxStopped",
        "UnknownProfile",
    ]


def test_errors_tree() -> None:
    e = cellblock.errors
    for child, parents in [
        (e.BadKernelId, (e.CellblockError, ValueError)),
        (e.PolicyError, (e.CellblockError, ValueError)),
        (e.UnknownProfile, (e.PolicyError, KeyError)),
        (e.ProfileDisabled, (e.PolicyError,)),
        (e.HostUnsupported, (e.CellblockError, RuntimeError)),
        (e.JailStartError, (e.CellblockError, RuntimeError)),
        (e.JailStartTimeout, (e.JailStartError, TimeoutError)),
        (e.CellTimeout, (e.CellblockError, TimeoutError)),
        (e.SandboxStopped, (e.CellblockError, RuntimeError)),
        (e.BadOutputRequest, (e.CellblockError, ValueError)),
        (e.OutputUnavailable, (e.CellblockError, LookupError)),
    ]:
        assert child.__bases__ == parents
    # every name in __all__ is drawn in the module docstring's tree
    for name in e.__all__:
        assert f"{name}(" in (e.__doc__ or "")


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` but those under ``if TYPE_CHECKING:`` (never imported)."""
    out: list[ast.AST] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) \
                and node.test.id == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        out.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return out


def _package_imports() -> dict[str, set[str]]:
    """Every module of ``launcher/`` (as ``cellblock.x.y``) and the cellblock modules it
    imports anywhere in its source, lazily inside a function too."""
    root = Path(cellblock.__file__).resolve().parent
    graph: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        is_pkg = parts[-1] == "__init__"
        name = ".".join(("cellblock", *(parts[:-1] if is_pkg else parts)))
        package = name if is_pkg else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("cellblock."))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    mod = ".".join([*base, node.module] if node.module else base)
                else:
                    mod = node.module or ""
                if not mod.startswith("cellblock"):
                    continue
                for alias in node.names:  # "from . import life" names a module
                    if (root / Path(*f"{mod}.{alias.name}".split(".")[1:])).with_suffix(
                            ".py").exists():
                        deps.add(f"{mod}.{alias.name}")
                    else:
                        deps.add(mod)
        deps.discard(name)
        graph[name] = {d for d in deps if d != "cellblock"}
    return graph


def test_no_import_circles() -> None:
    """Issue 18: no module of cellblock imports, even lazily, a module that imports it
    back through any chain (a package's __init__ counts as importing what it names)."""
    graph = _package_imports()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep):], dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_no_module_over_500_lines() -> None:
    root = Path(cellblock.__file__).resolve().parent
    long = {str(p.relative_to(root)): n for p in root.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long


def test_every_package_directory_is_installed() -> None:
    """A subpackage missing from pyproject's package list works in an editable install and
    is absent from a real one (cellblock.files and cellblock.egress were: `cellblock` failed
    to start with ModuleNotFoundError after a non-editable install)."""
    import tomllib

    root = Path(__file__).resolve().parent.parent
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    for top, name in (("launcher", "cellblock"), ("kernel", "cellblock_kernel")):
        for init in sorted((root / top).glob("*/__init__.py")):
            package = f"{name}.{init.parent.name}"
            assert package in setup["packages"], f"{package} is not in [tool.setuptools]"
            assert setup["package-dir"].get(package) == f"{top}/{init.parent.name}", package
