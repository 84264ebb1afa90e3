"""cellblock's REST API beside Jupyter Server's ``/api/kernels``, behind its own auth.

Routes (``<base_url>api/cellblock/kernels/<kernel id>/...``) are registered by
:func:`register`, which :func:`cellblock.serverext.load_jupyter_server_extension` calls once
at start. Every handler derives from :class:`~.base.CellblockKernelHandler`: Jupyter
Server's ``APIHandler`` (token or identity-provider authentication, XSRF rules, JSON errors),
authorised on the ``kernels`` resource like ``/api/kernels`` itself, and only for a kernel id
that is a valid name (:func:`cellblock.names.check_kernel_id`) of a kernel *this server*
runs: another user's or another server's kernel on the same host is a 404, like an unknown
one.

Modules: :mod:`.base` (the handler base), :mod:`.files` (inbox and outbox), :mod:`.output`
(the rest of a cut output, in pages).
"""

from __future__ import annotations

from typing import Any

from jupyter_server.utils import url_path_join

from .base import KERNEL_ROUTE, CellblockHandler, CellblockKernelHandler

__all__ = ["KERNEL_ROUTE", "CellblockHandler", "CellblockKernelHandler", "handlers",
           "register"]


def handlers() -> list[tuple[str, type[Any]]]:
    """Every cellblock route, relative to the server's base URL."""
    from .files import routes as file_routes
    from .output import OutputHandler

    return [(rf"{KERNEL_ROUTE}/output/(?P<execution>[^/]+)", OutputHandler), *file_routes()]


def register(serverapp: Any, routes: list[tuple[str, Any]] | None = None) -> None:
    """Add ``routes`` (default: :func:`handlers`) to ``serverapp``."""
    base = serverapp.web_app.settings.get("base_url", "/")
    serverapp.web_app.add_handlers(".*$", [(url_path_join(base, route), handler)
                                          for route, handler in (routes or handlers())])
