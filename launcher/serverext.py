"""A Jupyter Server extension that fills the warm pools when the server starts.

Enable it with ``jupyter server extension enable cellblock`` (or
``--ServerApp.jpserver_extensions=cellblock=True``). At start it asks this server's
spawner to fill the pool of every profile with ``warm_pool > 0``, in the background, so
that even the first kernel a user starts is adopted from the pool. Without it the pools
fill after each profile's first start. It also adds cellblock's REST routes beside
``/api/kernels`` (:mod:`cellblock.rest`): a kernel's inbox and outbox, and the rest of a cut
output (``GET /api/cellblock/kernels/<id>/output/<execution>``).
"""

from __future__ import annotations

import os
import threading
from typing import Any

__all__ = ["load_jupyter_server_extension"]


def _fill(log: Any) -> None:
    from .errors import CellblockError
    from .policy import load_policy
    from .warden.client import SpawnerClient
    from .warden.request import LaunchRequest

    try:
        policy = load_policy()
    except CellblockError as exc:
        log.warning("cellblock: no warm pools (%s)", exc)
        return
    client = SpawnerClient.instance()
    for name, profile in sorted(policy.profiles.items()):
        if profile.warm_pool > 0 and profile.enabled:
            state = client.pool(LaunchRequest(op="pool", profile=name, env=dict(os.environ)))
            log.info("cellblock: warm pool of %r: %s", name, state)


def load_jupyter_server_extension(serverapp: Any) -> None:
    """Called by Jupyter Server once, at start: the REST routes (cellblock.rest), and the
    warm pools filled in the background."""
    from .rest import register

    register(serverapp)
    threading.Thread(target=_fill, args=(serverapp.log,), name="cellblock-warm-pools",
                     daemon=True).start()
