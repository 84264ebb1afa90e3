"""The warden's part in a kernel's files: it serves the file socket (cellblock.files).

Who calls it: :class:`cellblock.warden.warden.Warden` is a :class:`ServesFiles`; it calls
:meth:`ServesFiles._serve_files` when its kernel is ready (a cold launch, or a pooled kernel
at adoption: idempotent, so a restart in place keeps the one service) and
:meth:`ServesFiles._close_files` on its way out. The service finds the current jail through
:attr:`jail` at each request, so a jail restarted in place is read, never the old one.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..files.service import FileService
    from ..policy import Profile
    from ..rundir import RunDir
    from .jail import JailProcess

__all__ = ["ServesFiles"]

log = logging.getLogger("cellblock.warden")


class ServesFiles:
    """The file service of one warden (see the module docstring)."""

    jail: JailProcess | None
    profile: Profile
    run: RunDir
    files_service: FileService | None = None

    def _audit_write(self, event: str, **fields: Any) -> Any:
        raise NotImplementedError  # Bookkeeping's

    def _serve_files(self) -> None:
        if self.files_service is not None:  # (it answers "disabled" for a profile without)
            return
        from ..files.service import FileService
        from ..output.filter import build_redactor

        self.files_service = FileService(self.run.path, self.profile,
                                         build_redactor(self.profile.output),
                                         self._audit_write, self._jail_now)

    def _jail_now(self) -> tuple[int, int] | None:
        jail = self.jail
        if jail is None:
            return None
        pidfd = jail.pidfd()
        return None if pidfd < 0 else (jail.proc.pid, pidfd)

    def _close_files(self) -> None:
        service, self.files_service = self.files_service, None
        if service is not None:
            with contextlib.suppress(Exception):
                service.close()
