"""``cellblock upload``, ``cellblock files`` and ``cellblock download``: a running kernel's
inbox and outbox from a shell (the operator's, or a backend's scripts).

Who calls it: :func:`cellblock.cli.build_parser` (:func:`add_commands`). The kernel is named
by its id or a unique prefix (``cellblock ps``); errors are FileRefused, which the CLI prints
on one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import FileRefused, PolicyError

__all__ = ["add_commands"]


def _kernel_id(prefix: str) -> str:
    from ..grants import find_kernel
    from ..rundir import RunDir

    run = find_kernel(prefix)
    record = RunDir(run.parent, run.name).read_record()
    if record is None:
        raise PolicyError(f"kernel {prefix!r}: its warden.json cannot be read")
    return record.kernel_id


def _upload(args: argparse.Namespace) -> int:
    from .client import upload

    path = Path(args.path)
    if not path.is_file():
        raise FileRefused(f"{args.path!r} is not a file", "not_found")
    done = upload(_kernel_id(args.kernel), args.name or path.name, path)
    print(f"uploaded {done['name']} ({done['size']} bytes, sha256 {done['sha256']})")
    return 0


def _files(args: argparse.Namespace) -> int:
    from .client import inbox, outbox

    kernel = _kernel_id(args.kernel)
    listed: dict[str, Any] = ({"files": inbox(kernel), "hidden": 0} if args.inbox
                              else outbox(kernel))
    if args.json:
        print(json.dumps(listed))
        return 0
    for entry in listed["files"]:
        kind = entry.get("kind", "file")
        print(f"{entry['name']}\t{entry['size']}" + ("" if kind == "file" else f"\t{kind}"))
    if listed["hidden"]:
        print(f"({listed['hidden']} entries with names that are not shown)")
    return 0


def _download(args: argparse.Namespace) -> int:
    from .client import download

    got = download(_kernel_id(args.kernel), args.name)
    if args.output == "-":
        sys.stdout.buffer.write(got.data)
        sys.stdout.flush()
    else:
        target = Path(args.output or got.name)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(got.data)
        note = f", redacted: {', '.join(got.redactions)}" if got.redactions else ""
        print(f"downloaded {got.name} to {target} ({len(got.data)} bytes, {got.mime}{note})",
              file=sys.stderr)
    return 0


def add_commands(sub: Any) -> None:
    """Add ``upload``, ``files`` and ``download`` to the CLI's subcommands."""
    up = sub.add_parser("upload", help="put a file into a running kernel's /inbox")
    up.add_argument("kernel", help="kernel id, or a unique prefix of one")
    up.add_argument("path", help="the file to upload")
    up.add_argument("--name", help="its name in /inbox (default: the file's name)")
    up.set_defaults(func=_upload)

    ls = sub.add_parser("files", help="list a running kernel's /outbox (or --inbox)")
    ls.add_argument("kernel", help="kernel id, or a unique prefix of one")
    ls.add_argument("--inbox", action="store_true", help="list /inbox instead")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_files)

    down = sub.add_parser("download", help="fetch a file from a running kernel's /outbox "
                          "(text redacted by its profile)")
    down.add_argument("kernel", help="kernel id, or a unique prefix of one")
    down.add_argument("name", help="the file's name in /outbox")
    down.add_argument("-o", "--output", help="where to write it (default: its name; - for "
                      "stdout)")
    down.set_defaults(func=_download)
