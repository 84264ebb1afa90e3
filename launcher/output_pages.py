"""Reading the rest of a cut output back, in pages, on the host.

Who calls what: :meth:`cellblock.sandbox.Sandbox.output`, the MCP ``read_output`` tool,
``GET /api/cellblock/kernels/<id>/output/<execution>`` (:mod:`cellblock.rest.output`) and
``cellblock output`` call :func:`read_output` with a kernel id; it finds the kernel's run dir
through its warden record (:mod:`cellblock.running`) and reads what the warden kept there
(:mod:`cellblock.output.spool`). The file names are built from an ``int`` and a fixed
stream name, opened with ``O_NOFOLLOW``, and must be regular files: no path a client or the
kernel wrote is ever followed. The text was redacted before it was written; nothing is
scanned or decoded here beyond UTF-8.

Offsets are byte offsets (UTF-8) in the stream as kept: the head as it was sent, then the
rest. A page ends on a character boundary, so it may hold a few bytes less than ``size``;
``next_offset`` says where the next one starts (None at the end of a finished cell).
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import BadOutputRequest, OutputUnavailable

__all__ = [
    "DEFAULT_PAGE", "MAX_PAGE", "SPOOL_DIR", "STREAMS", "Page", "check_request", "data_name",
    "meta_name", "read_output", "read_page",
]

DEFAULT_PAGE = 16 * 1024
MAX_PAGE = 1024 * 1024
SPOOL_DIR = "output"  #: in the kernel's run dir
STREAMS = ("stdout", "stderr")


def data_name(execution: int, stream: str) -> str:
    """The kept text of one stream of one cell: ``7.stdout`` (never a name from outside)."""
    return f"{int(execution)}.{STREAMS[STREAMS.index(stream)]}"


def meta_name(execution: int, stream: str) -> str:
    return data_name(execution, stream) + ".json"


@dataclass(frozen=True)
class Page:
    """One page of a cell's kept stream."""

    execution: int
    stream: str
    offset: int
    next_offset: int | None  #: None: nothing after this page (the cell has finished)
    total_bytes: int  #: bytes kept so far
    head_bytes: int  #: where the head the client was sent ends (the marker's offset)
    dropped_bytes: int  #: bytes after ``total_bytes`` that were not kept (the spool's cap)
    complete: bool  #: the cell has ended: ``total_bytes`` will not grow
    text: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_request(execution: object, offset: object, size: object, stream: object) -> None:
    """Raise :class:`BadOutputRequest` naming the bad value and what is allowed."""
    if type(execution) is not int or execution < 1:
        raise BadOutputRequest(f"execution must be a cell number >= 1 (the number in the cut "
                               f"marker, read_output(execution=N, ...)), not {execution!r}")
    if type(offset) is not int or offset < 0:
        raise BadOutputRequest(f"offset must be a byte offset >= 0, not {offset!r}")
    if type(size) is not int or not 1 <= size <= MAX_PAGE:
        raise BadOutputRequest(f"size must be a number of bytes from 1 to {MAX_PAGE}, "
                               f"not {size!r}")
    if stream not in STREAMS:
        raise BadOutputRequest(f"stream must be one of {', '.join(STREAMS)}, not {stream!r}")


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        meta = json.loads(os.read(fd, 4096) or b"{}")
    except ValueError:
        return None
    finally:
        os.close(fd)
    return meta if isinstance(meta, dict) else None


def read_page(directory: Path, execution: int, offset: int = 0, size: int = DEFAULT_PAGE,
              stream: str = "stdout", kernel: str = "") -> Page:
    """A page of ``execution``'s kept ``stream`` in the spool ``directory``."""
    check_request(execution, offset, size, stream)
    who = f"execution {execution}" + (f" of kernel {kernel}" if kernel else "")
    meta = _read_meta(directory / meta_name(execution, stream)) or {}
    if "evicted_by" in meta:
        raise OutputUnavailable(
            f"the kept {stream} of {who} ({int(meta.get('bytes', 0)):,} bytes) was dropped "
            f"to make room for execution {meta['evicted_by']}'s: the kernel keeps at most "
            f"{int(meta.get('cap', 0)):,} bytes of cut output (output.spool_bytes)")
    try:
        fd = os.open(directory / data_name(execution, stream),
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise OutputUnavailable(
            f"no kept {stream} for {who}: only a cell whose {stream} was cut by the stream "
            "budget has one (its cut marker says read_output(execution=N, offset=...)), "
            "and it is gone with the kernel") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OutputUnavailable(f"no kept {stream} for {who}")
        total = info.st_size
        if offset > total:
            raise BadOutputRequest(f"offset {offset} is past the end of the kept {stream} of "
                                   f"{who}: it holds {total} bytes (offsets 0 to {total})")
        raw = os.pread(fd, size + 4, offset) if offset < total else b""
    finally:
        os.close(fd)
    if raw and (raw[0] & 0xC0) == 0x80:
        raise BadOutputRequest(f"offset {offset} falls inside a UTF-8 character of the kept "
                               f"{stream} of {who}; start at 0, the marker's offset, or a "
                               "next_offset")
    end = min(size, len(raw))
    while 0 < end < len(raw) and (raw[end] & 0xC0) == 0x80:
        end -= 1
    if end == 0 and raw:  # a page smaller than one character: that character
        end = 1
        while end < len(raw) and (raw[end] & 0xC0) == 0x80:
            end += 1
    text = raw[:end].decode("utf-8", "replace")
    complete = bool(meta.get("complete"))
    after = offset + end
    return Page(
        execution=execution, stream=stream, offset=offset,
        next_offset=None if complete and after >= total else after, total_bytes=total,
        head_bytes=int(meta.get("head_bytes", 0)), dropped_bytes=int(meta.get("dropped_bytes",
                                                                              0)),
        complete=complete, text=text)


def spool_dir(kernel_id: str) -> Path:
    """The spool of the running kernel ``kernel_id`` (found by its warden record)."""
    from .running import list_running

    for kernel in list_running():
        if kernel.kernel_id == kernel_id:
            return kernel.run.path / SPOOL_DIR
    raise OutputUnavailable(f"no running cellblock kernel {kernel_id!r}: kept output lives "
                            "only as long as its kernel (see `cellblock ps`)")


def read_output(kernel_id: str, execution: int, offset: int = 0, size: int = DEFAULT_PAGE,
                stream: str = "stdout") -> Page:
    """A page of the kept ``stream`` of cell ``execution`` of the running kernel."""
    check_request(execution, offset, size, stream)
    return read_page(spool_dir(kernel_id), execution, offset, size, stream, kernel_id)
