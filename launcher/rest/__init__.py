"""cellblock's REST API beside Jupyter Server's ``/api/kernels``, behind its own auth.

Routes (``<base_url>api/cellblock/kernels/<kernel id>/...``) are registered by
:func:`register`, which :mod:`cellblock.serverext` calls with each route module's
``routes()`` when the extension loads. Every
handler derives from :class:`CellblockKernelHandler`: Jupyter Server's ``APIHandler``
(token or identity-provider authentication, XSRF rules, JSON errors), authorised on the
``kernels`` resource like ``/api/kernels`` itself, and only for a kernel id that is a valid
name (:func:`cellblock.names.check_kernel_id`) of a kernel *this server* runs: another
user's or another server's kernel on the same host is a 404, like an unknown one.

Modules: :mod:`.files` (inbox and outbox).
"""

from __future__ import annotations

from typing import Any

from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web

from ..errors import BadKernelId
from ..names import check_kernel_id

__all__ = ["KERNEL_ROUTE", "CellblockKernelHandler", "register"]

#: the route prefix of one kernel, ``api/cellblock/kernels/<kernel_id>``
KERNEL_ROUTE = r"api/cellblock/kernels/(?P<kernel_id>[^/]+)"


class CellblockKernelHandler(APIHandler):
    """Base of cellblock's kernel routes (see the module docstring)."""

    auth_resource = "kernels"

    def checked_kernel(self, kernel_id: str) -> str:
        """``kernel_id`` if it names a kernel of this server; else HTTP 404."""
        try:
            check_kernel_id(kernel_id)
        except BadKernelId:
            raise web.HTTPError(404, f"no kernel {kernel_id[:80]!r}") from None
        if kernel_id not in self.kernel_manager:
            raise web.HTTPError(404, f"no kernel {kernel_id!r} in this server")
        return kernel_id


def register(serverapp: Any, routes: list[tuple[str, Any]]) -> None:
    """Add ``routes`` (``(pattern below base_url, handler class)``) to ``serverapp``."""
    base = serverapp.web_app.settings.get("base_url", "/")
    serverapp.web_app.add_handlers(".*$", [(url_path_join(base, route), handler)
                                          for route, handler in routes])
