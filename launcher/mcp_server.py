"""``cellblock mcp``: a Model Context Protocol server over stdio, one sandbox per session.

Who calls what: an MCP client (Claude Desktop, an agent framework, ``mcp.client.stdio``)
starts ``cellblock mcp --profile NAME [--datasets a,b]`` as a subprocess and speaks MCP on
its stdin and stdout; :func:`main` (called by :mod:`cellblock.cli`) serves one session with
the official SDK's low-level :class:`mcp.server.lowlevel.Server`, until the client closes
stdin or sends SIGTERM. The session owns one :class:`~cellblock.sandbox.Sandbox`: started on
the first ``run_python``, kept between calls (variables survive), replaced by ``restart``,
and closed (kernel, warden, jail, run dir, cgroup) when the session ends.

Tools:

- ``run_python(code)``: stdout, stderr and text results as text content, ``image/png``,
  ``image/jpeg``, ``image/gif`` and ``image/webp`` results as image content, and a last
  text line saying what the policy did (redactions, truncation, limits hit). An exception
  in the code, a budget that stopped the cell, or a kernel that stopped is a tool error
  (``isError``) whose text has the exception's name, value and traceback without ANSI
  colours.
- ``list_datasets()``: the datasets the profile allows, which this session was granted,
  and how to read them (``cellblock_kernel.datasets``). Never a host path.
- ``restart()``: a fresh kernel; every variable is gone.
- ``upload_file(name, text|base64)``, ``list_files()``, ``read_file(name)``: the session's
  /inbox and /outbox (:mod:`cellblock.files.mcp`).
- ``read_output(execution, offset, size, stream)``: a page of what the stream budget cut
  from a cell, as its cut marker says (``read_output(execution=7, offset=16384)``); the text
  was redacted by the warden before it was kept (:mod:`cellblock.mcp_output`).

Every ``run_python`` result carries the cell's cost in ``_meta["cellblock/cost"]``
(:class:`cellblock.cell_cost.Cost`: the execution number, wall and CPU seconds, peak memory,
output bytes sent, cut and kept).

Nothing but MCP is written to stdout: the SDK's ``stdio_server`` points fd 1 at stderr
while it serves (the warden and anything else started then inherit that), and logs go to
stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from . import __version__
from .errors import CellblockError, HostUnsupported
from .mcp_output import COST_META, read_output_call, read_output_tool
from .policy import load_policy
from .run_result import RunResult
from .sandbox import Sandbox, SandboxStopped, check_launch

__all__ = ["TOOLS", "Session", "build_server", "main", "tool_result"]

log = logging.getLogger("cellblock.mcp")
IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
TEXT_TYPES = ("text/plain", "text/markdown", "text/latex", "application/json")
RESTART_HINT = ("The sandbox kernel has stopped and its state is lost; call the `restart` "
                "tool for a fresh one.")


def _tools(profile: str) -> list[Any]:
    from mcp.types import Tool, ToolAnnotations

    return [
        Tool(
            name="run_python",
            description=(
                f"Run Python code in a sandboxed Jupyter kernel (cellblock profile {profile!r}): "
                "no network, a read-only system, small memory and time limits. Variables, "
                "imports and files in /tmp persist between calls until restart. Returns "
                "stdout, stderr, the value of the last expression and images (display a "
                "PNG with IPython.display). Output is truncated and secrets are redacted by "
                "the sandbox's policy; the result says so when it happened."
            ),
            input_schema={
                "type": "object",
                "properties": {"code": {"type": "string", "description": "Python source"}},
                "required": ["code"],
            },
            annotations=ToolAnnotations(title="Run Python", open_world_hint=False),
        ),
        Tool(
            name="list_datasets",
            description=("List the datasets this sandbox may read, which are granted to it, "
                         "and how to open them from Python."),
            input_schema={"type": "object", "properties": {}},
            annotations=ToolAnnotations(title="List datasets", read_only_hint=True,
                                        open_world_hint=False),
        ),
        Tool(
            name="restart",
            description=("Restart the Python sandbox: a fresh kernel with empty state. Use it "
                         "after the kernel stopped (memory limit, time budget) or to start "
                         "over."),
            input_schema={"type": "object", "properties": {}},
            annotations=ToolAnnotations(title="Restart sandbox", destructive_hint=True,
                                        open_world_hint=False),
        ),
        read_output_tool(),
    ]


TOOLS = ("run_python", "list_datasets", "restart", "read_output", "upload_file", "list_files",
         "read_file")


def _text(text: str) -> Any:
    from mcp.types import TextContent

    return TextContent(type="text", text=text)


def _bundle_content(data: dict[str, Any]) -> list[Any]:
    """One rich output as MCP content: its image (``ImageContent``: base64 and MIME type, never
    base64 as text; the first of its image types, one image per output), else its most
    readable text. Each image already fits the profile's image budget, if it has one: the
    gate withheld any other (cellblock.output.imagefit)."""
    from mcp.types import ImageContent

    for mime in IMAGE_TYPES:
        if isinstance(data.get(mime), str):
            return [ImageContent(type="image", data="".join(data[mime].split()),
                                 mime_type=mime)]
    for mime in TEXT_TYPES:
        if mime in data:
            value = data[mime]
            return [_text(value if isinstance(value, str) else json.dumps(value, indent=1))]
    if data:
        return [_text(f"[output of type {', '.join(sorted(data))} not shown]")]
    return []


def tool_result(result: RunResult) -> Any:
    """A :class:`~cellblock.run_result.RunResult` as an MCP ``CallToolResult``."""
    from mcp.types import CallToolResult

    content: list[Any] = []
    if result.stdout:
        content.append(_text(result.stdout))
    if result.stderr:
        content.append(_text("[stderr]\n" + result.stderr))
    for output in result.outputs:
        content.extend(_bundle_content(output.data))
    failed = not result.ok
    for error in result.errors:
        content.append(_text(error.text()))
    if failed and not result.errors:
        content.append(_text(f"the cell ended with status {result.status!r}"))
    if result.kernel_stopped:
        content.append(_text(RESTART_HINT))
    summary = result.policy.summary()
    if summary:
        content.append(_text(f"[cellblock policy: {summary}]"))
    if not content:
        content.append(_text("(no output)"))
    meta = {COST_META: result.cost.as_dict()} if result.cost is not None else None
    return CallToolResult(content=content, is_error=failed, meta=meta)


def _error(text: str) -> Any:
    from mcp.types import CallToolResult

    return CallToolResult(content=[_text(text)], is_error=True)


class Session:
    """What one MCP session holds: its sandbox (the server's lifespan context)."""

    def __init__(self, profile: str, datasets: tuple[str, ...]) -> None:
        self.profile = profile
        self.datasets = datasets
        self.sandbox = Sandbox(profile, datasets=datasets)

    async def run_python(self, arguments: dict[str, Any]) -> Any:
        code = arguments.get("code")
        if not isinstance(code, str):
            return _error("run_python needs a string argument 'code' (the Python source)")
        if not self.sandbox.started:
            try:
                await self.sandbox.start()
            except CellblockError as exc:
                return _error(f"the sandbox did not start: {exc}")
            except Exception as exc:  # a host failure is the model's to know, not a crash
                log.exception("the sandbox did not start")
                return _error(f"the sandbox did not start: {type(exc).__name__}: {exc}")
        try:
            return tool_result(await self.sandbox.run(code))
        except SandboxStopped as exc:
            reason = self.sandbox.stopped
            if reason is None:
                return _error(str(exc))
            return _error(f"{reason}. {RESTART_HINT}")
        except (CellblockError, TimeoutError) as exc:
            return _error(str(exc))

    async def list_datasets(self) -> Any:
        from mcp.types import CallToolResult

        policy = load_policy()
        profile = policy.profile(self.profile)
        granted = check_launch(policy, self.profile, self.datasets)
        rows = []
        for name in profile.datasets:
            dataset = policy.datasets[name]
            rows.append({"name": name, "description": dataset.description,
                         "kind": "directory" if Path(dataset.path).is_dir() else "file",
                         "granted": name in granted})
        shown = {
            "profile": self.profile,
            "datasets": rows,
            "granted": list(granted),
            "how_to_read": ("from cellblock_kernel import datasets; datasets.list(); "
                            "f = datasets.open(NAME) (a read-only binary file); "
                            "datasets.open(NAME, 'member/path.csv') for a file in a directory "
                            "dataset"),
        }
        return CallToolResult(content=[_text(json.dumps(shown, indent=1))],
                              structured_content=shown)

    async def restart(self) -> Any:
        from mcp.types import CallToolResult

        try:
            await self.sandbox.restart()
        except CellblockError as exc:
            return _error(str(exc))
        return CallToolResult(content=[_text(
            f"restarted: a fresh kernel (profile {self.profile!r}, kernel "
            f"{self.sandbox.kernel_id}); all variables are gone")])

    async def close(self) -> None:
        await self.sandbox.close()


def build_server(session: Session) -> Any:
    """The MCP server for one session (not yet running); it closes ``session`` when the
    session ends."""
    import anyio
    from mcp.server.lowlevel import Server
    from mcp.shared.exceptions import MCPError
    from mcp.types import INVALID_PARAMS, ListToolsResult

    from .files.mcp import FILE_TOOLS, call_file_tool, file_tools

    tools = _tools(session.profile) + file_tools(session.profile)

    @contextlib.asynccontextmanager
    async def lifespan(_server: Any) -> AsyncIterator[Session]:
        try:
            yield session
        finally:
            with anyio.CancelScope(shield=True):
                await session.close()

    async def list_tools(_ctx: Any, _params: Any) -> Any:
        return ListToolsResult(tools=tools)

    async def call_tool(ctx: Any, params: Any) -> Any:
        session: Session = ctx.lifespan_context
        arguments = params.arguments or {}
        if params.name == "run_python":
            return await session.run_python(arguments)
        if params.name == "list_datasets":
            return await session.list_datasets()
        if params.name == "restart":
            return await session.restart()
        if params.name == "read_output":
            return await read_output_call(session.sandbox, arguments)
        if params.name in FILE_TOOLS:  # upload_file, list_files, read_file (cellblock.files)
            return await call_file_tool(session.sandbox, params.name, arguments,
                                        load_policy().profile(session.profile).output)
        raise MCPError(code=INVALID_PARAMS, message=f"unknown tool {params.name!r}; tools: "
                       f"{', '.join(TOOLS)}")

    return Server(
        "cellblock", version=__version__, lifespan=lifespan,
        instructions=(f"A sandboxed Python kernel (cellblock profile {session.profile!r}). Call "
                      "run_python to run code; state persists until restart."),
        on_list_tools=list_tools, on_call_tool=call_tool,
    )


async def serve(profile: str, datasets: tuple[str, ...]) -> None:
    """Serve one MCP session on stdin/stdout until stdin closes. SIGTERM (what an MCP
    client sends a server that did not exit soon enough after stdin closed) closes the
    session's sandbox, then exits at once: the SDK's stdin reader may still be blocked."""
    from mcp.server.stdio import stdio_server

    session = Session(profile, datasets)
    loop = asyncio.get_running_loop()
    stopping: set[asyncio.Task[None]] = set()

    async def terminate() -> None:
        with contextlib.suppress(Exception):
            await session.close()
        os._exit(0)

    loop.add_signal_handler(signal.SIGTERM,
                            lambda: stopping.add(loop.create_task(terminate())))
    server = build_server(session)
    try:
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def main(profile: str, datasets: str = "") -> int:
    """``cellblock mcp``: check the profile and datasets (bad input raises before anything
    is served), then serve. Called by :mod:`cellblock.cli`."""
    try:
        import mcp  # noqa: F401
    except ImportError:
        raise HostUnsupported("cellblock mcp needs the MCP SDK: pip install 'cellblock[mcp]' "
                              "(or 'mcp>=2.3,<3')") from None
    policy = load_policy()
    granted = check_launch(policy, profile, datasets)
    requested = granted if datasets.strip() else ()
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING,
                        format="[cellblock mcp %(asctime)s] %(name)s: %(message)s")
    asyncio.run(serve(profile, requested))
    return 0

