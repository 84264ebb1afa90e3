"""The file methods of :class:`cellblock.sandbox.Sandbox` and ``SyncSandbox`` (mixins).

Thin: each runs :mod:`cellblock.files.client` for the sandbox's kernel, in a thread for
the async sandbox. FileRefused says why a file was not let in or out.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import IO, Any, TypeVar

from ..errors import SandboxStopped
from . import client
from .client import DownloadedFile

__all__ = ["SandboxFiles", "SyncSandboxFiles"]

T = TypeVar("T")
Source = bytes | str | os.PathLike[str] | IO[bytes]


class SandboxFiles:
    """``upload``, ``inbox``, ``files`` and ``download`` of the async Sandbox."""

    profile: str

    @property
    def kernel_id(self) -> str | None:
        raise NotImplementedError  # the Sandbox's

    def _kernel(self) -> str:
        kernel_id = self.kernel_id
        if kernel_id is None:
            raise SandboxStopped(f"cellblock sandbox (profile {self.profile!r}) is not "
                                 "running; start() or enter it first")
        return kernel_id

    async def upload(self, name: str, data_or_path: Source) -> dict[str, Any]:
        """Put a file into the kernel's read-only ``/inbox`` as ``name``: ``bytes``, or a
        path (``str`` or ``Path``) or binary file streamed from the host. Returns its
        ``name``, ``size`` and ``sha256``."""
        return await asyncio.to_thread(client.upload, self._kernel(), name, data_or_path)

    async def inbox(self) -> list[dict[str, Any]]:
        """The files uploaded so far: ``[{"name", "size"}]``."""
        return await asyncio.to_thread(client.inbox, self._kernel())

    async def files(self) -> list[dict[str, Any]]:
        """The kernel's ``/outbox``: ``[{"name", "size", "kind"}]``; only ``kind == "file"``
        can be downloaded."""
        return list((await asyncio.to_thread(client.outbox, self._kernel()))["files"])

    async def download(self, name: str) -> DownloadedFile:
        """Fetch ``/outbox/<name>``: text redacted by the profile, images as bytes."""
        return await asyncio.to_thread(client.download, self._kernel(), name)


class SyncSandboxFiles:
    """The same methods, blocking, for :class:`cellblock.sandbox.SyncSandbox`."""

    @property
    def _box(self) -> SandboxFiles:
        box = self.__dict__["sandbox"]  # the SyncSandbox's Sandbox
        assert isinstance(box, SandboxFiles)
        return box

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        raise NotImplementedError  # the SyncSandbox's

    def upload(self, name: str, data_or_path: Source) -> dict[str, Any]:
        return self._call(self._box.upload(name, data_or_path))

    def inbox(self) -> list[dict[str, Any]]:
        return self._call(self._box.inbox())

    def files(self) -> list[dict[str, Any]]:
        return self._call(self._box.files())

    def download(self, name: str) -> DownloadedFile:
        return self._call(self._box.download(name))
