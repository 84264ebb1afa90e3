"""``cellblock output KERNEL EXECUTION``: the rest of a cell's cut output, from the shell.

Prints a page (``--offset``, ``--size``) of what the warden kept of cell ``EXECUTION``'s
stream (the numbers of the cut marker's ``read_output(execution=7, offset=16384)``), or
with ``--all`` everything from ``--offset`` to the end, page by page; ``--json`` prints the
page with its offsets instead. Errors (a bad number, an offset past the end, output that is
not or no longer kept) exit 2 with the reason on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .output_pages import DEFAULT_PAGE, MAX_PAGE, SPOOL_DIR, read_page

__all__ = ["add_output_command"]


def _cmd_output(args: argparse.Namespace) -> int:
    from .running import find, list_running

    kernel = find(list_running(), args.kernel)
    directory = kernel.run.path / SPOOL_DIR
    offset: int | None = args.offset
    while offset is not None:
        page = read_page(directory, args.execution, offset, args.size, args.stream,
                         kernel.kernel_id)
        if args.json:
            print(json.dumps(page.as_dict()))
        else:
            sys.stdout.write(page.text)
        offset = page.next_offset if args.all and page.text else None
    sys.stdout.flush()
    return 0


def add_output_command(sub: Any) -> None:
    out = sub.add_parser("output", help="print the rest of a cell's cut output "
                         "(its marker's read_output(execution=N, offset=M))")
    out.add_argument("kernel", help="kernel id, or a unique prefix of one")
    out.add_argument("execution", type=int, help="the cell's number (from the cut marker)")
    out.add_argument("--offset", type=int, default=0, help="byte offset (default 0)")
    out.add_argument("--size", type=int, default=DEFAULT_PAGE,
                     help=f"bytes per page, 1 to {MAX_PAGE} (default {DEFAULT_PAGE})")
    out.add_argument("--stream", default="stdout", choices=("stdout", "stderr"))
    out.add_argument("--all", action="store_true", help="every page to the end")
    out.add_argument("--json", action="store_true", help="pages as JSON lines, with offsets")
    out.set_defaults(func=_cmd_output)
