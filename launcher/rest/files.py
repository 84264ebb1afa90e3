"""REST routes for a kernel's files (cellblock.files), behind Jupyter Server's auth::

    PUT  api/cellblock/kernels/<id>/inbox/<name>    the request body becomes /inbox/<name>
    GET  api/cellblock/kernels/<id>/inbox           [{"name", "size"}]
    GET  api/cellblock/kernels/<id>/outbox          {"files": [{"name", "size", "kind"}],
                                                     "hidden": N}
    GET  api/cellblock/kernels/<id>/outbox/<name>   the file: text redacted by the profile,
                                                     images as bytes; X-Cellblock-Sha256 and
                                                     X-Cellblock-Redactions say what was sent

A PUT needs a Content-Length no larger than the profile's ``files.max_upload`` (else 413
before the body is read); the body is spooled (memory, then a private temporary file) and
streamed to the warden. A refusal is a JSON error whose status follows its code
(:data:`cellblock.files.wire.CODES`) and whose message says why.
"""

from __future__ import annotations

import asyncio
import tempfile
from typing import IO, Any

from jupyter_core.utils import ensure_async
from jupyter_server.auth.decorator import authorized
from tornado import web

from ..errors import FileRefused
from ..files import client
from ..files.wire import CODES
from .base import KERNEL_ROUTE, CellblockKernelHandler

__all__ = ["routes"]

SPOOL_IN_MEMORY = 1 << 20


def _fail(exc: FileRefused) -> web.HTTPError:
    return web.HTTPError(CODES.get(exc.code, 403), str(exc), reason=exc.code)


def _max_upload(kernel_id: str) -> int:
    from ..policy import load_policy
    from ..rundir import RunDir

    run = client.run_dir_of(kernel_id)
    record = RunDir(run.parent, run.name).read_record()
    if record is None:
        raise FileRefused(f"kernel {kernel_id}: its warden.json cannot be read", "not_running")
    return load_policy().profile(record.profile).files.max_upload


@web.stream_request_body
class InboxFileHandler(CellblockKernelHandler):
    """PUT one inbox file, streamed."""

    _spool: IO[bytes] | None = None
    _left = 0

    async def prepare(self) -> None:  # type: ignore[override]
        await super().prepare()
        if self.request.method != "PUT":
            return
        # Before a byte of the body is spooled: the same checks as @web.authenticated and
        # @authorized on put(), which tornado runs only after the whole body arrived.
        user = self.current_user
        if not user or not await ensure_async(
                self.authorizer.is_authorized(self, user, "write", self.auth_resource)):
            raise web.HTTPError(403)
        kernel_id = self.checked_kernel(self.path_kwargs["kernel_id"])
        try:
            client.check_name(self.path_kwargs["name"])
            cap = await asyncio.to_thread(_max_upload, kernel_id)
        except FileRefused as exc:
            raise _fail(exc) from None
        length = self.request.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise web.HTTPError(411, "an upload needs a Content-Length")
        if int(length) > cap:
            raise web.HTTPError(413, f"upload of {length} bytes; this kernel's profile takes "
                                f"at most {cap} bytes (files.max_upload)", reason="too_large")
        set_max = getattr(self.request.connection, "set_max_body_size", None)
        if set_max is not None:  # tornado's HTTP/1 connection: its default cap is 100 MB
            set_max(int(length))
        self._left = int(length)
        self._spool = tempfile.SpooledTemporaryFile(SPOOL_IN_MEMORY)

    def data_received(self, chunk: bytes) -> None:
        if self._spool is not None:
            self._spool.write(chunk)

    def on_finish(self) -> None:
        if self._spool is not None:
            self._spool.close()

    @web.authenticated
    @authorized
    async def put(self, kernel_id: str, name: str) -> None:
        kernel_id = self.checked_kernel(kernel_id)
        assert self._spool is not None
        self._spool.seek(0)
        try:  # streamed from the spool (at most the profile's max_upload, checked above)
            done = await asyncio.to_thread(client.upload, kernel_id, name, self._spool)
        except FileRefused as exc:
            raise _fail(exc) from None
        self.set_status(201)
        self.finish(done)


class ListHandler(CellblockKernelHandler):
    """GET the inbox or the outbox."""

    @web.authenticated
    @authorized
    async def get(self, kernel_id: str, box: str) -> None:
        kernel_id = self.checked_kernel(kernel_id)
        try:
            if box == "inbox":
                self.finish({"files": await asyncio.to_thread(client.inbox, kernel_id)})
            else:
                self.finish(await asyncio.to_thread(client.outbox, kernel_id))
        except FileRefused as exc:
            raise _fail(exc) from None


class OutboxFileHandler(CellblockKernelHandler):
    """GET one outbox file."""

    @web.authenticated
    @authorized
    async def get(self, kernel_id: str, name: str) -> None:
        kernel_id = self.checked_kernel(kernel_id)
        try:
            got = await asyncio.to_thread(client.download, kernel_id, name)
        except FileRefused as exc:
            raise _fail(exc) from None
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Content-Disposition", f'attachment; filename="{got.name}"')
        self.set_header("X-Cellblock-Sha256", got.sha256)
        self.set_header("X-Cellblock-Redactions", ",".join(got.redactions))
        self.finish(got.data, set_content_type=got.mime + (
            "; charset=utf-8" if got.kind == "text" else ""))


def routes() -> list[tuple[str, Any]]:
    name = r"(?P<name>[^/]+)"
    return [
        (rf"{KERNEL_ROUTE}/inbox/{name}", InboxFileHandler),
        (rf"{KERNEL_ROUTE}/(?P<box>inbox|outbox)", ListHandler),
        (rf"{KERNEL_ROUTE}/outbox/{name}", OutboxFileHandler),
    ]
