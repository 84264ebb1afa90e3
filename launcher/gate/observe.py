"""The gate's observer hook: how the warden learns when a cell starts, speaks and ends.

Who calls what: the warden passes ``Gate(..., observer=callable)``; the gate's one thread
calls it with an :class:`Observed` at four points of a request's life, so the warden can
run its budgets (cell clock, idle clock, execution count, output bytes) without parsing
anything the gate has not already parsed:

=========== ============================================================ ==================
``kind``    when                                                         a returned string
=========== ============================================================ ==================
request     a client request on shell or control passed every check and  refuses it: the gate
            is about to be forwarded (``content`` is its raw content)    answers it with an
                                                                         error, the kernel
                                                                         never sees it
output      an iopub message bound to the request (not ``status``, not   drops it (audited
            ``execute_input``) is about to be sent; ``bytes_in`` is the  ``gate.drop`` with
            kernel's content size, ``bytes_out`` what the client gets    reason ``budget``);
                                                                         a non-empty string
                                                                         is also published
                                                                         to the request as
                                                                         an ``error``
reply       the request's reply was sent to the client (``content`` is   ignored
            the reply's raw content, ``bytes_out`` its size)
idle        the request's ``status: idle`` was released: it is closed    ignored
=========== ============================================================ ==================

The callable must be cheap and must not block: it runs on the relay's thread, once per
forwarded message. It must not call :meth:`Gate.close`. An observer that raises is
counted (``Gate.audit_errors``) and treated as having returned None. Messages the gate
makes itself (announcements, refusals, its own interrupt) are not observed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Observed", "Observer"]


@dataclass(frozen=True, slots=True)
class Observed:
    """One observation; ``msg_id``/``msg_type``/``session`` are the client request's."""

    kind: str
    msg_id: str
    msg_type: str
    session: str
    bytes_in: int = 0
    bytes_out: int = 0
    content: bytes = b""


#: ``observer(observed) -> str | None`` (see the module docstring for the return value).
Observer = Callable[[Observed], "str | None"]
