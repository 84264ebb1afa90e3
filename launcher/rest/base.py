"""The base handler of cellblock's REST routes (see :mod:`cellblock.rest`)."""

from __future__ import annotations

from jupyter_server.base.handlers import APIHandler
from tornado import web

from ..errors import BadKernelId
from ..names import check_kernel_id

__all__ = ["KERNEL_ROUTE", "CellblockHandler", "CellblockKernelHandler"]

#: the route prefix of one kernel, ``api/cellblock/kernels/<kernel_id>``
KERNEL_ROUTE = r"api/cellblock/kernels/(?P<kernel_id>[^/]+)"


class CellblockKernelHandler(APIHandler):
    """Jupyter Server's ``APIHandler`` (JSON errors, XSRF rules); subclasses put
    ``@web.authenticated`` and ``@authorized`` (resource ``kernels``) on every method and call
    :meth:`checked_kernel` first."""

    auth_resource = "kernels"

    def checked_kernel(self, kernel_id: str) -> str:
        """``kernel_id`` if it is a valid name of a kernel of this server; else HTTP 404 (an
        unknown id, another server's or user's kernel, and a malformed id alike)."""
        try:
            check_kernel_id(kernel_id)
        except BadKernelId:
            raise web.HTTPError(404, f"no kernel {kernel_id[:80]!r}") from None
        if kernel_id not in self.kernel_manager:
            raise web.HTTPError(404, f"no kernel {kernel_id!r} in this server")
        return kernel_id

    def check_kernel(self, kernel_id: str) -> None:
        """:meth:`checked_kernel`, for a caller that needs no value back."""
        self.checked_kernel(kernel_id)


CellblockHandler = CellblockKernelHandler
