"""cellblock: a Jupyter kernel provisioner that runs every kernel inside nsjail.

Host side. The provisioner (:mod:`cellblock.provisioner`) asks this process's spawner
(:mod:`cellblock.warden.spawner`) for one warden per kernel (:mod:`cellblock.warden`), which
owns the jail and runs the gate (:mod:`cellblock.gate`) between the client and the
kernel. See docs/ for the threat model and the policy reference.
"""

from typing import Any

__version__ = "0.1.0"


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    """``jupyter server extension enable cellblock``: fill the warm pools at server start."""
    return [{"module": "cellblock.serverext"}]
