"""cellblock: a Jupyter kernel provisioner that runs every kernel inside nsjail.

The public API is what this package exports (``__all__``, pinned by tests/test_api.py)::

    import cellblock

    async with cellblock.Sandbox("agent", datasets=["sample"]) as sb:
        r: cellblock.RunResult = await sb.run("print(1 + 1)")
    with cellblock.SyncSandbox("agent") as sb:      # the same without an event loop
        sb.run("print('hi')")
    cellblock.warm("agent")                           # fill this process's warm pool
    except cellblock.CellblockError: ...              # the base of every error (errors.py)

Everything else (``cellblock.policy``, ``cellblock.gate``, ...) is internal and may change.

Host side. The provisioner (:mod:`cellblock.provisioner`) asks this process's spawner
(:mod:`cellblock.warden.spawner`) for one warden per kernel (:mod:`cellblock.warden`), which
owns the jail and runs the gate (:mod:`cellblock.gate`) between the client and the
kernel. See docs/ for the threat model and the policy reference.

Importing this package stays cheap: the provisioner, the spawner and the warden import its
submodules, so only the error classes (a module with no imports) load eagerly; ``Sandbox``,
``SyncSandbox``, ``RunResult`` and ``warm`` are imported on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    BadKernelId,
    BadOutputRequest,
    CellblockError,
    CellTimeout,
    FileRefused,
    HostUnsupported,
    JailStartError,
    JailStartTimeout,
    OutputUnavailable,
    PolicyError,
    ProfileDisabled,
    SandboxStopped,
    UnknownProfile,
)

if TYPE_CHECKING:
    from .run_result import RunResult
    from .sandbox import Sandbox, SyncSandbox
    from .warden.client import warm

__version__ = "0.1.0"

__all__ = [
    "BadKernelId",
    "BadOutputRequest",
    "CellTimeout",
    "CellblockError",
    "FileRefused",
    "HostUnsupported",
    "JailStartError",
    "JailStartTimeout",
    "OutputUnavailable",
    "PolicyError",
    "ProfileDisabled",
    "RunResult",
    "Sandbox",
    "SandboxStopped",
    "SyncSandbox",
    "UnknownProfile",
    "__version__",
    "warm",
]

#: lazily exported name -> the submodule that defines it
_LAZY = {
    "RunResult": "run_result",
    "Sandbox": "sandbox",
    "SyncSandbox": "sandbox",
    "warm": "warden.client",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cellblock' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next lookup does not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    """``jupyter server extension enable cellblock``: fill the warm pools at server start."""
    return [{"module": "cellblock.serverext"}]
