"""cellblock's REST routes in Jupyter Server, under ``/api/cellblock/``.

Who calls what: :func:`cellblock.serverext.load_jupyter_server_extension` calls
:func:`register` once at start; each route is a handler of :func:`handlers`, built on
:class:`~.base.CellblockHandler`: Jupyter Server's ``APIHandler`` (JSON errors, XSRF),
behind its authentication (``@web.authenticated``) and authorization (``@authorized``, on
the ``kernels`` resource), and limited to kernels this server's kernel manager runs: a
user of one server never reaches another server's kernels through these routes.
"""

from __future__ import annotations

from typing import Any

from jupyter_server.utils import url_path_join

from .base import CellblockHandler
from .output import OutputHandler

__all__ = ["CellblockHandler", "handlers", "register"]

KERNEL = r"(?P<kernel_id>[A-Za-z0-9_-]{1,64})"


def handlers() -> list[tuple[str, type[Any]]]:
    """Every cellblock route, relative to the server's base URL."""
    return [(rf"/api/cellblock/kernels/{KERNEL}/output/(?P<execution>[^/]+)", OutputHandler)]


def register(serverapp: Any) -> None:
    base = serverapp.web_app.settings.get("base_url", "/")
    serverapp.web_app.add_handlers(".*$", [(url_path_join(base, path), handler)
                                           for path, handler in handlers()])
