"""The jailed kernel's application: ipykernel, connecting to the warden instead of binding.

The warden binds every kernel-facing ZMQ socket in a directory the jail can read but not
write (mounted read-only at ``/run/cellblock``), and this kernel *connects* to them (ZMQ
lets either side bind). The host then never follows a path the jail could have replaced
(a symlink planted in a writable ipc dir once made the root warden connect to any host
unix socket), and never polls for the kernel's sockets to appear.

Two more differences from a stock ``IPKernelApp``, both for the gate's sake:

- large stream writes leave as messages of at most :data:`STREAM_CHUNK` characters, so an
  honest ``print('x' * 100_000_000)`` stays under the gate's frame limit and gets head,
  marker and tail instead of being dropped whole;
- no debugger socket: ipykernel connects its debug DEALER to the shell socket's last
  endpoint, which would now be the warden's own shell socket (the shell connects after).

On a profile with an image budget the warden also passes it on the command line
(``--CellblockKernelApp.image_max_side=...``), and matplotlib figures are rendered to fit it
(:mod:`cellblock_kernel.figures`).

Nothing here is a security control (everything in the jail is hostile); it only makes an
honest kernel fit the boundary the warden enforces.
"""

from __future__ import annotations

from typing import Any

import zmq
from ipykernel.heartbeat import Heartbeat
from ipykernel.iostream import OutStream
from ipykernel.kernelapp import IPKernelApp
from traitlets import Integer

from .figures import ImageBudget, install

__all__ = ["STREAM_CHUNK", "CellblockKernelApp", "ChunkedOutStream"]

#: characters per stream message (at most 4 MiB of UTF-8, far below the 64 MiB frame limit)
STREAM_CHUNK = 1024 * 1024


def _endpoint(transport: str, ip: str, port: int) -> str:
    if transport != "ipc":
        raise ValueError(f"cellblock kernel: transport {transport!r}; the jail has ipc only")
    return f"ipc://{ip}-{port}"


class ChunkedOutStream(OutStream):
    """ipykernel's OutStream, flushing at most :data:`STREAM_CHUNK` characters a message."""

    def _flush_buffers(self) -> Any:
        # ipykernel leaves OutStream._flush_buffers, IPKernelApp.init_control and
        # Heartbeat.__init__ unannotated (hence the three no-untyped-call ignores)
        for parent, data in super()._flush_buffers():  # type: ignore[no-untyped-call]
            if len(data) <= STREAM_CHUNK:
                yield parent, data
                continue
            for start in range(0, len(data), STREAM_CHUNK):
                yield parent, data[start:start + STREAM_CHUNK]


class ConnectingHeartbeat(Heartbeat):
    """The heartbeat echo, connected to the warden's bound socket."""

    def _try_bind_socket(self) -> None:
        self.socket.connect(_endpoint(self.transport, self.ip, self.port))


class CellblockKernelApp(IPKernelApp):
    """IPKernelApp whose five sockets connect to the warden's (see the module docstring)."""

    outstream_class = "cellblock_kernel.app.ChunkedOutStream"

    # The profile's image budget (cellblock's OutputPolicy.image_max_*), set by the warden.
    image_max_side = Integer(0, config=True, help="Long side in pixels matplotlib figures are "
                             "rendered to fit; 0: no limit.")
    image_max_pixels = Integer(0, config=True, help="Width x height matplotlib figures are "
                               "rendered to fit; 0: no limit.")
    image_max_bytes = Integer(0, config=True, help="Bytes matplotlib figures are rendered to "
                              "fit; 0: no limit.")

    _shell_endpoint = ""

    def _try_bind_socket(self, s: zmq.Socket[Any], port: int) -> int:
        if port <= 0:
            raise ValueError("cellblock kernel: the connection file must name every port")
        endpoint = _endpoint(self.transport, self.ip, port)
        if s is self.shell_socket:
            self._shell_endpoint = endpoint  # connected after init_control (see there)
        else:
            s.connect(endpoint)
        return port

    def init_control(self, context: zmq.Context[Any]) -> None:
        # ipykernel connects its debugger's DEALER to the shell socket's last endpoint,
        # which would be the warden's shell socket: a second peer sharing our requests.
        # With the shell not yet connected there is none, and the debugger stays unplugged.
        super().init_control(context)  # type: ignore[no-untyped-call]
        self.shell_socket.connect(self._shell_endpoint)

    def init_shell(self) -> None:
        super().init_shell()  # type: ignore[no-untyped-call]
        install(self.shell, ImageBudget(self.image_max_side, self.image_max_pixels,
                                        self.image_max_bytes))
        from cellblock_kernel.egress import install_pip_magic

        install_pip_magic(self.shell)

    def init_heartbeat(self) -> None:
        hb_ctx: zmq.Context[Any] = zmq.Context()
        self.heartbeat = ConnectingHeartbeat(  # type: ignore[no-untyped-call]
            hb_ctx, (self.transport, self.ip, self.hb_port))
        self.heartbeat.start()

    def write_connection_file(self, **kwargs: Any) -> None:
        """The warden wrote it, in a directory this kernel cannot write."""

    def cleanup_ipc_files(self) -> None:
        """The sockets are the warden's; nothing of ours to remove."""
