"""Every error cellblock raises on the host side.

The tree::

    CellblockError(Exception)
    ├── BadKernelId(CellblockError, ValueError)      a kernel id that cannot be a name
    │                                                  (run dir, cgroup, audit file)
    ├── PolicyError(CellblockError, ValueError)      bad policy file, key or value
    │   ├── UnknownProfile(PolicyError, KeyError)    a profile name that no policy defines
    │   └── ProfileDisabled(PolicyError)             the operator set enabled = false on it
    ├── HostUnsupported(CellblockError, RuntimeError)  the host lacks what a profile requires
    │                                                  (user namespaces, cgroups, a readable
    │                                                  Python environment); the message says
    │                                                  which piece and how to fix it
    ├── JailStartError(CellblockError, RuntimeError) the warden or nsjail failed to start
    │   └── JailStartTimeout(JailStartError, TimeoutError)
    ├── FileRefused(CellblockError, ValueError)     an inbox or outbox file the profile does
    │                                                  not let through (a bad name, over a cap,
    │                                                  not a plain file, missing); ``code``
    │                                                  says which (cellblock.files)
    ├── CellTimeout(CellblockError, TimeoutError)    Sandbox.run: a cell outlived the client's
    │                                                  timeout (it was interrupted; the kernel
    │                                                  and its state are kept)
    ├── SandboxStopped(CellblockError, RuntimeError) Sandbox.run on a sandbox that is closed,
    │                                                  not started, or whose kernel stopped
    ├── BadOutputRequest(CellblockError, ValueError) reading kept output: a bad execution
    │                                                  number, offset, page size or stream
    └── OutputUnavailable(CellblockError, LookupError) no kept output for that cell: never
                                                       cut, dropped for room (the spool's
                                                       cap), or its kernel is gone

Messages name the kernel or profile, the bad value, and the fix. They never contain
a secret: keys, tokens and dataset contents stay out of exception text.
"""

from __future__ import annotations

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
    "SandboxStopped",
    "UnknownProfile",
]


class CellblockError(Exception):
    """Base class of every cellblock error."""


class BadKernelId(CellblockError, ValueError):
    """A kernel id that is not a short ``[A-Za-z0-9_-]`` name (a UUID is one)."""


class FileRefused(CellblockError, ValueError):
    """A file the profile does not let into the inbox or out of the outbox. ``code`` is one
    of :data:`cellblock.files.wire.CODES` (``bad_name``, ``too_large``, ``not_found``...)."""

    def __init__(self, message: str, code: str = "refused") -> None:
        super().__init__(message)
        self.code = code


class PolicyError(CellblockError, ValueError):
    """The policy (built-in or an operator's TOML file) is invalid."""


class UnknownProfile(PolicyError, KeyError):
    """A profile name that the resolved policy does not define."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "unknown profile"


class ProfileDisabled(PolicyError):
    """The operator disabled the profile (``enabled = false``): no new kernel starts on it."""


class HostUnsupported(CellblockError, RuntimeError):
    """The host cannot provide something the profile requires; fail closed."""


class JailStartError(CellblockError, RuntimeError):
    """The warden or the jail did not come up."""


class JailStartTimeout(JailStartError, TimeoutError):
    """The warden did not report ready in time."""


class CellTimeout(CellblockError, TimeoutError):
    """A cell did not finish within the client's timeout (the kernel was interrupted)."""


class SandboxStopped(CellblockError, RuntimeError):
    """The sandbox is closed, not started, or its kernel stopped; :meth:`Sandbox.restart
    <cellblock.sandbox.Sandbox.restart>` (or ``start()`` on a new one) gives a fresh kernel."""


class BadOutputRequest(CellblockError, ValueError):
    """A read of kept output with a bad execution number, offset, size or stream."""


class OutputUnavailable(CellblockError, LookupError):
    """No kept output for that cell (never cut, dropped to make room, or the kernel is gone)."""

    def __str__(self) -> str:  # LookupError's KeyError cousin would not, but be explicit
        return str(self.args[0]) if self.args else "no kept output"
