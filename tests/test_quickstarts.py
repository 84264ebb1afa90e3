"""Every code block of docs/quickstart-analyst.md and docs/quickstart-ci.md, run as written.

The fence's info string says how a block runs:

- ``sh``: a bash script (``set -euo pipefail``) in a scratch directory that holds a copy of
  notebooks/parameterised.ipynb, with the venv's bin first on PATH;
- ``sh server``: one command that starts a Jupyter server: it runs in the background until
  the end of the page, with ``JUPYTER_PORT`` and ``JUPYTER_TOKEN`` in its environment (and
  ``--allow-root`` added as root), and is ready once ``/api/status`` answers;
- ``python``: a script run by the venv's Python in the scratch directory;
- ``python cell``: a notebook cell, run on the page's kernelspec (DOC_KERNELS) in one kernel
  started through that server's REST API and driven over its WebSocket, as JupyterLab does;
- ``text``: what the block above printed (stdout and stderr together; for a cell, its
  streams, then its result, then ``ename: evalue``), matched line by line, where ``...``
  alone on a line stands for any number of lines and within a line for any text.

Any other fence, or an indented one, fails the test: every block of these pages is either run
or checked. The environment is a user's: the built-in policy (no test profiles), fresh Jupyter
dirs, and only the kernelspecs the page itself installs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient

from conftest import BIN, REPO, free_port, jupyter_app
from jupyter_ws import execute, open_channels, start_kernel

DOC_KERNELS = {"quickstart-analyst.md": "cellblock-analyst", "quickstart-ci.md": None}
KINDS = {"sh", "sh server", "python", "python cell", "text"}
FENCE = re.compile(r"^```(.*)$")


@dataclass
class Block:
    kind: str
    code: str
    line: int  # 1-based line of the opening fence


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a page, refusing kinds this test does not run or check."""
    found: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        assert not re.match(r"^\s+```", lines[i]), (
            f"{path.name}:{i + 1}: an indented fence is neither run nor checked")
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        kind, start = m.group(1).strip(), i
        assert kind in KINDS, f"{path.name}:{i + 1}: fence {kind!r} is not one of {sorted(KINDS)}"
        i += 1
        body: list[str] = []
        while i < len(lines) and lines[i] != "```":
            body.append(lines[i])
            i += 1
        assert i < len(lines), f"{path.name}:{start + 1}: unclosed fence"
        found.append(Block(kind, "\n".join(body) + "\n", start + 1))
        i += 1
    return found


def expected_pattern(text: str) -> re.Pattern[str]:
    """A ``text`` block as a regex over whole output (see the module docstring for ``...``)."""
    parts = []
    for line in text.rstrip("\n").split("\n"):
        if line.rstrip() == "...":
            parts.append(r"(?:.*\n)?")
        else:
            parts.append("[^\n]*?".join(re.escape(p) for p in line.rstrip().split("..."))
                         + r"\n")
    return re.compile("".join(parts), re.DOTALL)


def tidy(output: str) -> str:
    """Output as compared: trailing spaces dropped, ending in one newline."""
    text = "\n".join(line.rstrip() for line in output.rstrip("\n").split("\n"))
    return text + "\n" if text else ""


@pytest.fixture
def user_env(tmp_path: Path, jupyter_env: dict[str, str], no_leftovers: None,
             monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user's environment in a scratch directory: built-in policy, empty Jupyter dirs, the
    venv's bin first on PATH. The session's run, audit and cgroup dirs stay, so that
    ``no_leftovers`` checks what the page started. Yields the scratch directory."""
    monkeypatch.delenv("CELLBLOCK_POLICY", raising=False)
    for var, sub in (("JUPYTER_PATH", "share/jupyter"), ("JUPYTER_DATA_DIR", "data"),
                     ("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_RUNTIME_DIR", "runtime"),
                     ("HOME", "home")):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}")
    work = tmp_path / "work"
    (work / "notebooks").mkdir(parents=True)
    shutil.copy(REPO / "notebooks" / "parameterised.ipynb", work / "notebooks")
    return work


class Page:
    """Runs one page's blocks in order and keeps what they share (server, kernel)."""

    def __init__(self, name: str, work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.name, self.work, self.monkeypatch = name, work, monkeypatch
        self.stack = contextlib.ExitStack()
        self.server: str | None = None
        self.token = uuid.uuid4().hex
        self.ws: Any = None
        self.http = AsyncHTTPClient()

    async def run(self, block: Block) -> str:
        where = f"{self.name}:{block.line}"
        if block.kind == "sh":
            return await self.shell(["bash", "-euo", "pipefail", "-c", block.code], where)
        if block.kind == "python":
            return await self.shell([sys.executable, "-c", block.code], where)
        if block.kind == "sh server":
            return self.start_server(block.code, where)
        return await self.cell(block.code, where)

    async def shell(self, argv: list[str], where: str) -> str:
        done = await asyncio.to_thread(subprocess.run, argv, cwd=self.work, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       timeout=300)
        assert done.returncode == 0, f"{where} exited {done.returncode}:\n{done.stdout}"
        return done.stdout

    def start_server(self, code: str, where: str) -> str:
        argv = shlex.split(code)
        assert self.server is None and argv[:1] == ["jupyter"], (
            f"{where}: one `jupyter ...` server per page")
        port = free_port()
        self.monkeypatch.setenv("JUPYTER_PORT", str(port))
        self.monkeypatch.setenv("JUPYTER_TOKEN", self.token)
        self.monkeypatch.setenv("JUPYTER_PORT_RETRIES", "0")
        argv[0] = str(BIN / "jupyter")
        if os.geteuid() == 0:
            argv.append("--allow-root")
        self.stack.enter_context(jupyter_app(argv, port, self.token, self.work, "server"))
        self.server = f"127.0.0.1:{port}"
        return ""

    async def cell(self, code: str, where: str) -> str:
        kernel = DOC_KERNELS[self.name]
        assert kernel and self.server, f"{where}: a cell needs the page's kernel and server"
        if self.ws is None:
            kernel_id = await start_kernel(self.http, self.server, kernel, self.token)
            self.ws = await open_channels(self.server, kernel_id, self.token, "docs")
        got = await execute(self.ws, code, "docs")
        shown = got["stdout"] + got["stderr"]
        shown += got["result"] + "\n" if "result" in got else ""
        shown += got["error"] + "\n" if "error" in got else ""
        return shown

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()
        self.http.close()
        self.stack.close()  # stops the server, which shuts its kernels down


@pytest.mark.jail
@pytest.mark.nonroot
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", sorted(DOC_KERNELS))
async def test_quickstart_blocks_run_as_written(name: str, user_env: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    page_blocks = blocks(REPO / "docs" / name)
    runnable = [b for b in page_blocks if b.kind != "text"]
    assert len(runnable) >= 3, f"{name}: too few blocks to be a quickstart"
    page = Page(name, user_env, monkeypatch)
    try:
        last: tuple[Block, str] | None = None
        for block in page_blocks:
            if block.kind == "text":
                assert last is not None, f"{name}:{block.line}: output with no block above"
                ran, output = last
                if not expected_pattern(block.code).fullmatch(tidy(output)):
                    pytest.fail(f"{name}:{ran.line} printed\n{output}\nwhich does not match "
                                f"the output shown at {name}:{block.line}:\n{block.code}")
                last = None
            else:
                last = (block, await page.run(block))
    finally:
        page.close()


@pytest.mark.nonroot
def test_expected_output_patterns() -> None:
    """The ``text`` block matcher itself: ``...`` lines and inline ``...``."""
    pattern = expected_pattern("a\n...\n[ok] x: ... done\n")
    assert pattern.fullmatch("a\n[ok] x: 12 done\n")
    assert pattern.fullmatch("a\nb\nc\n[ok] x: 12 done\n")
    assert not pattern.fullmatch("a\n[ok] x: 12 done\nextra\n")
    assert not pattern.fullmatch("a\n[ok] y: 12 done\n")
    assert not expected_pattern("1 + 1\n").fullmatch("1 1\n")
