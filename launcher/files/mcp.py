"""The MCP tools for a session's files: ``upload_file``, ``list_files``, ``read_file``.

Who calls it: :mod:`cellblock.mcp_server` adds :func:`file_tools` to its tool list and
sends calls of :data:`FILE_TOOLS` to :func:`call_file_tool`. The session's sandbox is started
on first use, as ``run_python`` does. A refused file (bad name, over a cap, a symlink or
FIFO in the outbox...) is a tool error whose text says why and what is allowed.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from ..errors import CellblockError
from ..output.imagefit import has_image_budget, image_over_budget
from ..policy import OutputPolicy
from .sandbox import SandboxFiles

__all__ = ["FILE_TOOLS", "call_file_tool", "file_tools"]

FILE_TOOLS = ("list_files", "read_file", "upload_file")


def file_tools(profile: str) -> list[Any]:
    from mcp.types import Tool, ToolAnnotations

    return [
        Tool(
            name="upload_file",
            description=(
                "Put a file into the sandbox's read-only /inbox, where Python reads it "
                "(`from cellblock_kernel import files; files.path(NAME)`). Give `text` for a "
                "text file or `base64` for binary content. Names: letters, digits, '.', '_' "
                f"and '-'. Size and count are capped by the profile ({profile!r})."),
            input_schema={
                "type": "object",
                "properties": {
                    "name": {"type": "string", "description": "file name, e.g. data.csv"},
                    "text": {"type": "string", "description": "the content, as UTF-8 text"},
                    "base64": {"type": "string", "description": "the content, base64"},
                },
                "required": ["name"],
            },
            annotations=ToolAnnotations(title="Upload file", open_world_hint=False),
        ),
        Tool(
            name="list_files",
            description=("List the sandbox's files: /inbox (uploaded) and /outbox (written by "
                         "Python for you to read with read_file)."),
            input_schema={"type": "object", "properties": {}},
            annotations=ToolAnnotations(title="List files", read_only_hint=True,
                                        open_world_hint=False),
        ),
        Tool(
            name="read_file",
            description=("Read a file Python wrote to /outbox: text (secrets redacted) or an "
                         "image. Save files there with open('/outbox/NAME', 'w') or "
                         "fig.savefig('/outbox/chart.png')."),
            input_schema={
                "type": "object",
                "properties": {"name": {"type": "string", "description": "a name in /outbox"}},
                "required": ["name"],
            },
            annotations=ToolAnnotations(title="Read file", read_only_hint=True,
                                        open_world_hint=False),
        ),
    ]


def _text(text: str) -> Any:
    from mcp.types import TextContent

    return TextContent(type="text", text=text)


def _error(text: str) -> Any:
    from mcp.types import CallToolResult

    return CallToolResult(content=[_text(text)], is_error=True)


async def call_file_tool(sandbox: Any, name: str, arguments: dict[str, Any],
                         output: OutputPolicy | None = None) -> Any:
    """One call of a tool in :data:`FILE_TOOLS` on ``sandbox`` (a Sandbox). ``output``: the
    profile's output policy; an outbox image over its image budget (docs/policy.md, "Images
    sized for a model") is refused as a tool error saying its size and the budget, as the
    gate does for a displayed one: what reaches the model's context fits it either way."""
    from mcp.types import CallToolResult, ImageContent

    assert isinstance(sandbox, SandboxFiles)
    try:
        if not sandbox.kernel_id:
            await sandbox.start()  # type: ignore[attr-defined]
        if name == "upload_file":
            fname = arguments.get("name")
            text, b64 = arguments.get("text"), arguments.get("base64")
            if not isinstance(fname, str) or (text is None) == (b64 is None):
                return _error("upload_file needs 'name' and exactly one of 'text' or 'base64'")
            try:
                data = (text.encode("utf-8") if isinstance(text, str)
                        else base64.b64decode(str(b64), validate=True))
            except (binascii.Error, ValueError):
                return _error("upload_file: 'base64' is not valid base64")
            done = await sandbox.upload(fname, data)
            return CallToolResult(content=[_text(
                f"uploaded /inbox/{done['name']} ({done['size']} bytes)")],
                structured_content=done)
        if name == "list_files":
            shown = {"inbox": await sandbox.inbox(), "outbox": await sandbox.files()}
            return CallToolResult(content=[_text(json.dumps(shown, indent=1))],
                                  structured_content=shown)
        fname = arguments.get("name")
        if not isinstance(fname, str):
            return _error("read_file needs a string argument 'name' (a file in /outbox)")
        got = await sandbox.download(fname)
    except CellblockError as exc:
        return _error(str(exc))
    if got.kind == "image":
        b64 = base64.b64encode(got.data).decode("ascii")
        if output is not None and has_image_budget(output):
            why = image_over_budget(got.mime, b64, output)
            if why is not None:
                return _error(f"read_file: /outbox/{fname} not sent: {got.mime} {why}")
        return CallToolResult(content=[ImageContent(type="image", data=b64,
                                                    mime_type=got.mime)])
    content = [_text(got.text)]
    if got.redactions:
        content.append(_text(f"[cellblock policy: redacted {', '.join(got.redactions)}]"))
    return CallToolResult(content=content)
