"""The gate's observer hook: how the warden learns when a cell starts, speaks and ends.

Who calls what: the warden passes ``Gate(..., observer=callable)``; the gate's one thread
calls it with an :class:`Observed` at four points of a request's life, so the warden can
run its budgets (cell clock, idle clock, execution count, output bytes) without parsing
anything the gate has not already parsed:

=========== ============================================================ ==================
``kind``    when                                                         a refusal
=========== ============================================================ ==================
request     a client request on shell or control passed every check and  refuses it: the gate
            is about to be forwarded (``content`` is its raw content)    answers it with an
                                                                         error, the kernel
                                                                         never sees it
output      a kernel message bound to the request is about to be sent:   drops it (audited
            iopub output, ``status`` and ``execute_input`` included,     ``gate.drop`` with
            and the reply itself (``msg_type`` is the request's).        reason ``budget``);
            ``bytes_in`` is every frame the kernel sent, ``bytes_out``   a message is also
            every frame the client gets (buffers included): every byte   published to the
            forwarded counts                                             request as an
                                                                         ``error``. A refused
                                                                         status is still sent
                                                                         (it is the gate's
                                                                         own, 30 bytes), a
                                                                         refused reply is
                                                                         replaced by an error
                                                                         reply
reply       the request's reply was sent to the client (``content`` is   ignored
            the reply's raw content, ``bytes_out`` its size)
idle        the request's ``status: idle`` was released: it is closed    ignored
=========== ============================================================ ==================

The observer answers with a :class:`Verdict` (:data:`ALLOW`, or :func:`refuse` with the
words to publish, or none). For the warden as it was written, ``None`` still means allow,
``""`` refuse silently and any other string refuse with that message (:func:`as_verdict`).

The callable must be cheap and must not block: it runs on the relay's thread, once per
forwarded message. It must not call :meth:`Gate.close`. An observer that raises is
counted (``Gate.audit_errors``) and treated as having returned None. Messages the gate
makes itself (announcements, refusals, its own interrupt) are not observed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ALLOW", "Observed", "Observer", "Verdict", "as_verdict", "refuse"]


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


@dataclass(frozen=True, slots=True)
class Verdict:
    """The observer's answer: ``allowed``, or refused with ``message`` published to the
    request as an ``error`` (nothing published when it is empty)."""

    allowed: bool
    message: str = ""


#: Forward it.
ALLOW = Verdict(True)


def refuse(message: str = "") -> Verdict:
    """Refuse it, telling the request ``message`` (if any)."""
    return Verdict(False, message)


def as_verdict(answer: Verdict | str | None) -> Verdict:
    """An observer's answer as a Verdict: a Verdict as it is; ``None`` allows; a str refuses
    with that message (``""``: silently, as the warden answers once its budget is spent)."""
    if answer is None:
        return ALLOW
    if isinstance(answer, Verdict):
        return answer
    return Verdict(False, str(answer))


#: ``observer(observed) -> Verdict`` (``str | None`` still accepted, see :func:`as_verdict`).
Observer = Callable[[Observed], Verdict | str | None]
