"""The MCP ``read_output`` tool of ``cellblock mcp`` (:mod:`cellblock.mcp_server`).

A cell whose stream went past the profile's stream budget shows its head, a marker and its
tail; the marker says how to read the rest: ``read_output(execution=7, offset=16384)``. This
tool returns one page of it from what the kernel's warden kept (redacted before it was
written, :mod:`cellblock.output.spool`), with where the next page starts. Bad arguments and
output that is not (or no longer) kept are tool errors whose text says what is allowed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import CellblockError
from .output_pages import DEFAULT_PAGE, MAX_PAGE

if TYPE_CHECKING:
    from .sandbox import Sandbox

__all__ = ["COST_META", "read_output_call", "read_output_tool"]

#: the key of a run_python result's ``_meta`` that holds the cell's cost
COST_META = "cellblock/cost"


def read_output_tool() -> Any:
    from mcp.types import Tool, ToolAnnotations

    return Tool(
        name="read_output",
        description=(
            "Read the part of a cell's output that was cut: the cut marker in run_python's "
            "result says the call to make, e.g. read_output(execution=7, offset=16384). "
            f"Returns up to `size` bytes (default {DEFAULT_PAGE}, at most {MAX_PAGE}) and "
            "the offset of the next page (none at the end). Secrets were redacted."),
        input_schema={
            "type": "object",
            "properties": {
                "execution": {"type": "integer", "minimum": 1,
                              "description": "the cell's number, from the cut marker"},
                "offset": {"type": "integer", "minimum": 0, "default": 0,
                           "description": "byte offset, from the marker or next_offset"},
                "size": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE,
                         "default": DEFAULT_PAGE, "description": "bytes to read at most"},
                "stream": {"type": "string", "enum": ["stdout", "stderr"],
                           "default": "stdout"},
            },
            "required": ["execution"],
        },
        annotations=ToolAnnotations(title="Read cut output", read_only_hint=True,
                                    open_world_hint=False),
    )


async def read_output_call(sandbox: Sandbox, arguments: dict[str, Any]) -> Any:
    """One ``read_output`` call against the session's sandbox."""
    from mcp.types import CallToolResult, TextContent

    try:
        page = await sandbox.output(
            arguments.get("execution"),  # type: ignore[arg-type]  # checked by pages
            arguments.get("offset", 0), arguments.get("size", DEFAULT_PAGE),
            arguments.get("stream", "stdout"))
    except CellblockError as exc:
        return CallToolResult(content=[TextContent(type="text", text=str(exc))], is_error=True)
    info = page.as_dict()
    del info["text"]
    if page.next_offset is None:
        where = "[end of the kept output]"
    else:
        where = (f"[next page: read_output(execution={page.execution}"
                 + ("" if page.stream == "stdout" else f', stream="{page.stream}"')
                 + f", offset={page.next_offset})]")
    return CallToolResult(content=[TextContent(type="text", text=page.text),
                                   TextContent(type="text", text=where)],
                          structured_content=info)
