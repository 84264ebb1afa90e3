"""What the parts of the gate share: the state :class:`cellblock.gate.relay.Gate` sets up in
its ``__init__``, declared once, so that each mixin (:mod:`~cellblock.gate.forward`,
:mod:`~cellblock.gate.own`, :mod:`~cellblock.gate.links`) reads typed attributes and calls
the others' methods through one declared surface. No behaviour here: annotations only.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import zmq

    from cellblock.gate.connection import GateLimits
    from cellblock.gate.observe import Observed, Observer, Verdict
    from cellblock.gate.replay import ReplayWindow
    from cellblock.gate.rules import OutputRule
    from cellblock.gate.tracker import Request, RequestTable
    from cellblock.gate.wire import Dropped, Signer

__all__ = ["GateState"]


class GateState:
    """The attributes and cross-part methods of one gate (see ``Gate.__init__``)."""

    _limits: GateLimits
    _client_signer: Signer
    _kernel_signer: Signer
    _on_fault: Callable[[str], None] | None
    _accepts: dict[str, int]
    _live: dict[str, set[int]]
    _up: set[str]
    _broken: set[str]
    _down_held: list[tuple[str, list[bytes]]]
    _faulted: bool
    _rules: tuple[OutputRule, ...]
    _allowed: frozenset[str] | None
    _stdin: bool
    _comms: bool
    _kernel_types: dict[str, frozenset[str]]
    _comm_requests: dict[str, Request]
    _started: bool
    _count: int
    _backlog: deque[list[bytes]]
    _dropped: float
    _dropped_at: float
    _table: RequestTable
    _replay: ReplayWindow
    _session: str
    _identity: bytes
    _client: dict[str, zmq.Socket[bytes]]
    _kernel: dict[str, zmq.Socket[bytes]]
    _monitors: dict[str, zmq.Socket[bytes]]
    _shutdown_requested: bool
    audit_errors: int
    _observer: Observer | None
    _own: dict[str, None]
    _told: dict[str, str]
    _kernel_welcomed: bool
    _kernel_ready: threading.Event
    _kernel_connected: threading.Event
    _held: list[tuple[str, list[bytes]]] | None

    if TYPE_CHECKING:  # defined by the parts; declared here for the others' calls
        def _emit(self, event: str, fields: dict[str, Any]) -> None: ...
        def _drop(self, direction: str, channel: str, dropped: Dropped) -> None: ...
        def _observe(self, observed: Observed) -> Verdict: ...
        def _from_client(self, channel: str, frames: list[bytes]) -> None: ...
        def _flush(self, parent_msg_id: str, parent: bytes) -> None: ...
        def _spent_dropped(self, size: int) -> None: ...
        def _check_ready(self) -> None: ...
        def _send_iopub(self, out: list[bytes], request: Request | None = None) -> None: ...
        def _drain_backlog(self) -> bool: ...
        def _note(self, parent: bytes, text: str) -> None: ...
        def _lost_marker(self, request: Request) -> None: ...
        def _mark_open_requests(self, text: str) -> None: ...
        def _next_id(self) -> str: ...
        def _publish_own(self, msg_type: str, parent: bytes, content: bytes) -> None: ...
        def _own_frames(self, msg_type: str, parent: bytes, content: bytes) -> list[bytes]: ...
        def _tell(self, msg_id: str, parent: bytes, ename: str, evalue: str) -> None: ...
        def _refuse(self, channel: str, idents: tuple[bytes, ...], parent: bytes,
                    msg_type: str, text: str) -> None: ...
        def _refuse_not_allowed(self, channel: str, idents: tuple[bytes, ...],
                                parent: bytes, msg_type: str) -> None: ...
        def _reply_error(self, channel: str, idents: Sequence[bytes], parent: bytes,
                         msg_type: str, ename: str, evalue: str) -> None: ...
