"""docs/quickstart-llm.md runs as written: every fenced block is exercised, in order, and a
``text`` block under a ``python`` or ``sh`` block is exactly what that block printed.

- ``python``: run as a script with the venv's Python;
- ``sh``: run with bash (``-e``), stdin from /dev/null;
- ``toml``: becomes the operator policy ($CELLBLOCK_POLICY) for the blocks after it, with
  the example's ``/srv/data/`` pointing at a directory holding the example's ``sales.csv``;
- ``json``: an MCP client configuration; each server in it is started with the MCP SDK's
  stdio client, exactly with its ``args`` (the ``command`` must be a ``cellblock``; the one of
  this venv is used), and its tools are called;
- ``text``: the expected output of the block above it.

A block of any other language fails the test, so nothing in the page goes unrun."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from conftest import BIN, REPO

pytestmark = [pytest.mark.jail, pytest.mark.nonroot, pytest.mark.usefixtures("no_leftovers")]

DOC = REPO / "docs" / "quickstart-llm.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)
SALES = "day,amount\n1,10\n2,20\n3,30\n"


def blocks() -> list[tuple[int, str, str]]:
    text = DOC.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2))
            for m in FENCE.finditer(text)]


def test_the_page_has_the_blocks_this_test_knows() -> None:
    found = blocks()
    assert found, f"no code blocks in {DOC}"
    assert {lang for _, lang, _ in found} <= {"python", "sh", "toml", "json", "text"}, found
    for i, (line, lang, _) in enumerate(found):
        if lang == "text":
            assert i > 0 and found[i - 1][1] in ("python", "sh"), \
                f"line {line}: a text block must follow a python or sh block"


def test_the_install_line_names_a_real_extra() -> None:
    assert "pip install 'cellblock[mcp]'" in DOC.read_text()
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert any(dep.startswith("mcp") for dep in extras["mcp"])


def mcp_config(env: dict[str, str], text: str) -> None:
    from mcp import ClientSession, StdioServerParameters, stdio_client
    from mcp.types import TextContent

    servers = json.loads(text)["mcpServers"]
    assert servers

    async def exercise(entry: dict[str, Any]) -> None:
        assert Path(entry["command"]).name == "cellblock"
        params = StdioServerParameters(command=str(BIN / "cellblock"), args=entry["args"],
                                       env=env)
        async with stdio_client(params) as (read, write), \
                ClientSession(read, write) as session:
            await session.initialize()
            names = sorted(t.name for t in (await session.list_tools()).tools)
            assert names == ["list_datasets", "list_files", "read_file", "read_output", "restart",
                             "run_python", "upload_file"]
            result = await session.call_tool("run_python", {"code": "6 * 7"})
            assert not result.is_error
            assert [c.text for c in result.content if isinstance(c, TextContent)] == ["42"]
            listed = await session.call_tool("list_datasets", {})
            assert not listed.is_error and listed.structured_content is not None

    for entry in servers.values():
        asyncio.run(exercise(entry))


@pytest.mark.timeout(600)
def test_every_block_runs_as_written(tmp_path: Path, jupyter_env: dict[str, str]) -> None:
    env = {
        "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "LANG": "C.UTF-8",
        **{k: v for k, v in jupyter_env.items() if v},
    }
    data = tmp_path / "data"
    data.mkdir()
    (data / "sales.csv").write_text(SALES)
    for p in (tmp_path, data, data / "sales.csv"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    found = blocks()
    ran = 0
    for i, (line, lang, body) in enumerate(found):
        expected = found[i + 1][2] if i + 1 < len(found) and found[i + 1][1] == "text" \
            else None
        where = f"{DOC.name} line {line} ({lang})"
        if lang in ("python", "sh"):
            argv = [str(BIN / "python"), "-c", body] if lang == "python" else \
                ["bash", "-e", "-c", body]
            done = subprocess.run(argv, env=env, cwd=tmp_path, stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"{where} failed:\n{done.stdout}\n{done.stderr}"
            if expected is not None:
                assert done.stdout == expected, f"{where} printed:\n{done.stdout}"
            ran += 1
        elif lang == "toml":
            assert "/srv/data/" in body, f"{where}: the example's data lives in /srv/data/"
            policy = tmp_path / "policy.toml"
            policy.write_text(body.replace("/srv/data/", f"{data}/"))
            env["CELLBLOCK_POLICY"] = str(policy)
            ran += 1
        elif lang == "json":
            mcp_config(env, body)
            ran += 1
    assert ran == sum(1 for _, lang, _ in found if lang != "text")
