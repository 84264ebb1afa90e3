"""``GET /api/cellblock/kernels/<kernel id>/output/<execution>?offset=&size=&stream=``.

A page of what the stream budget cut from cell ``<execution>`` of the kernel (the number in
its cut marker, ``read_output(execution=7, offset=16384)``), as JSON: the fields of
:class:`cellblock.output_pages.Page` (``text``, ``offset``, ``next_offset``, ``total_bytes``,
``complete``, ...). 400 for a bad number, offset, size or stream (the message says what is
allowed), 404 for a kernel this server does not run or output that is not kept.
"""

from __future__ import annotations

import json

from jupyter_server.auth.decorator import authorized
from tornado import web

from ..errors import BadOutputRequest, OutputUnavailable
from ..output_pages import DEFAULT_PAGE, read_output
from .base import CellblockHandler

__all__ = ["OutputHandler"]


def _int(value: str, name: str) -> int:
    try:
        return int(value, 10)
    except ValueError:
        raise web.HTTPError(400, f"{name} must be a whole number, not {value[:40]!r}") from None


class OutputHandler(CellblockHandler):
    @web.authenticated
    @authorized
    async def get(self, kernel_id: str, execution: str) -> None:
        self.check_kernel(kernel_id)
        number = _int(execution, "execution")
        offset = _int(self.get_argument("offset", "0"), "offset")
        size = _int(self.get_argument("size", str(DEFAULT_PAGE)), "size")
        stream = self.get_argument("stream", "stdout")
        try:
            page = read_output(kernel_id, number, offset, size, stream)
        except BadOutputRequest as exc:
            raise web.HTTPError(400, str(exc)) from None
        except OutputUnavailable as exc:
            raise web.HTTPError(404, str(exc)) from None
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(page.as_dict()))
