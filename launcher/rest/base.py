"""The base handler of cellblock's REST routes (see :mod:`cellblock.rest`)."""

from __future__ import annotations

from jupyter_server.base.handlers import APIHandler
from tornado import web

__all__ = ["CellblockHandler"]


class CellblockHandler(APIHandler):
    """Jupyter Server's ``APIHandler`` (JSON errors, XSRF rules); subclasses put
    ``@web.authenticated`` and ``@authorized`` (resource ``kernels``) on every method and call
    :meth:`check_kernel` first."""

    auth_resource = "kernels"

    def check_kernel(self, kernel_id: str) -> None:
        """404 unless ``kernel_id`` is a kernel of this server."""
        if kernel_id not in self.kernel_manager:
            raise web.HTTPError(404, f"no kernel {kernel_id} in this server")
