"""Budgets: the clocks and counters of one kernel, and what to do when one runs out.

Who calls what: the warden feeds :class:`BudgetClock` what the gate's observer sees
(:meth:`~BudgetClock.request`, :meth:`~BudgetClock.output`, :meth:`~BudgetClock.reply`,
:meth:`~BudgetClock.idle`) from the gate's thread, and asks :meth:`~BudgetClock.due` from its
own thread for the actions that are due; the warden holds one lock around every call. Pure
logic: time is passed in (``time.monotonic()`` values), so tests drive it with exact tables.

What each budget ends, and nothing else:

- ``cell_seconds``: the cell. An :class:`Interrupt` when it has run that long, then a
  :class:`Kill` ``grace_seconds`` later if it is still running (the warden kills the jail
  and restarts it in place). A cell's clock starts when the gate forwards it, or, if it
  queued behind another cell, when that one is answered: never on the kernel's word (a
  hostile kernel could simply not say ``busy``). It stops at the cell's ``execute_reply``.
- ``lifetime_seconds`` and ``idle_seconds``: the kernel (a :class:`Stop`). Idle means no
  client request and no cell running; heartbeats do not count.
- ``executions``: each execute_request past the count is refused; the kernel and its
  running cell are untouched.
- ``output_bytes``: the kernel (a :class:`Stop`); the message that would cross the budget
  is dropped, and so is everything after it.

Start-up (until the warden is ready) and shutdown are charged to no cell: the clock is
made when the kernel is ready, and a ``shutdown_request`` stops every clock.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .policy import Budgets

__all__ = [
    "BudgetClock",
    "Execution",
    "Interrupt",
    "Kill",
    "Stop",
    "seconds",
]

_STATUS = re.compile(rb'"status"\s*:\s*"(ok|error|aborted)"')


def seconds(value: float) -> str:
    """``30`` -> ``"30 s"``, ``0.5`` -> ``"0.5 s"``."""
    return f"{value:g} s"


def _size(n: int) -> str:
    """A byte count the way the operator wrote it: ``65536`` -> "64 KiB", 10**7 -> "10 MB"."""
    for k in (3, 2, 1):
        if n >= 1024**k and n % 1024**k == 0:
            return f"{n // 1024**k} {('KiB', 'MiB', 'GiB')[k - 1]}"
        if n >= 1000**k and n % 1000**k == 0:
            return f"{n // 1000**k} {('kB', 'MB', 'GB')[k - 1]}"
    return f"{n} bytes"


@dataclass
class Execution:
    """One execute_request, from forwarded to answered."""

    msg_id: str
    session: str
    code_sha256: str
    code: str | None
    forwarded: float
    started: float | None = None
    interrupted: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    messages: int = 0
    limits_hit: list[str] = field(default_factory=list)
    status: str = "running"
    ended: float | None = None
    #: the gate's own count of execute_requests (1, 2, ...): the cell's number for its kept
    #: output and its cost, never the kernel's execution_count
    number: int = 0
    #: the cell's cost counters when it started, and what it cost (the warden's, cost.py)
    meter: Any = None
    cost: dict[str, Any] = field(default_factory=dict)

    @property
    def duration(self) -> float:
        if self.started is None or self.ended is None:
            return 0.0
        return max(0.0, self.ended - self.started)


@dataclass(frozen=True)
class Interrupt:
    execution: Execution
    message: str


@dataclass(frozen=True)
class Kill:
    execution: Execution
    message: str


@dataclass(frozen=True)
class Stop:
    reason: str  #: for the audit log and the message: "lifetime limit 3600 s reached"
    budget: str  #: the policy key


Action = Interrupt | Kill | Stop


def _code_of(content: bytes) -> str:
    try:
        code = json.loads(content).get("code", "")
    except (ValueError, AttributeError, RecursionError):
        return ""
    return code if isinstance(code, str) else ""


CLOSING_MAX = 64  # answered executions waiting for their idle

class BudgetClock:
    """The budgets of one kernel (see the module docstring). Not thread-safe by itself."""

    def __init__(self, budgets: Budgets, now: float, keep_code: bool = False) -> None:
        self.budgets = budgets
        self.keep_code = keep_code
        self.born = now
        self.last_activity = now
        self.executions = 0
        self.output_total = 0
        self.queue: OrderedDict[str, Execution] = OrderedDict()
        #: answered, but the cell's last output (what the output rules held back, released
        #: with its idle) may still come: counted here until :meth:`closed`
        self.closing: OrderedDict[str, Execution] = OrderedDict()
        self.unclosed: list[Execution] = []
        self.stopped: Stop | None = None
        self.shutting_down = False

    # -- fed from the gate's thread ---------------------------------------------

    def request(self, msg_id: str, msg_type: str, session: str, content: bytes,
                now: float) -> str | None:
        """A client request is about to be forwarded; return a refusal text, or None."""
        self.last_activity = now
        if msg_type == "shutdown_request":
            self.shutting_down = True
            return None
        if msg_type != "execute_request":
            return None
        if self.stopped is not None:
            return f"cellblock: kernel stopped, {self.stopped.reason}"
        limit = self.budgets.executions
        if limit and self.executions >= limit:
            return (f"cellblock: execution budget of {limit} cells used; "
                    "restart the kernel to run more")
        self.executions += 1
        code = _code_of(content)
        execution = Execution(
            msg_id=msg_id, session=session,
            code_sha256=hashlib.sha256(code.encode("utf-8", "surrogatepass")).hexdigest(),
            code=code if self.keep_code else None, forwarded=now, number=self.executions,
        )
        if not self.queue:
            execution.started = now
        self.queue[msg_id] = execution
        return None

    def output(self, msg_id: str, bytes_in: int, bytes_out: int, now: float) -> bool:
        """An output message of ``msg_id`` is about to be sent; False: drop it."""
        execution = self.queue.get(msg_id) or self.closing.get(msg_id)
        if self.stopped is not None and self.stopped.budget == "output_bytes":
            return False
        limit = self.budgets.output_bytes
        if limit and self.output_total + bytes_out > limit:
            if execution is not None and "output_bytes" not in execution.limits_hit:
                execution.limits_hit.append("output_bytes")
            if self.stopped is None:
                self.stopped = Stop(f"output budget of {_size(limit)} used", "output_bytes")
            return False
        self.output_total += bytes_out
        if execution is not None:
            execution.bytes_in += bytes_in
            execution.bytes_out += bytes_out
            execution.messages += 1
        return True

    def reply(self, msg_id: str, content: bytes, now: float) -> Execution | None:
        """The reply to ``msg_id`` was sent; return the execution it ended, if any."""
        self.last_activity = now
        execution = self.queue.pop(msg_id, None)
        if execution is None:
            return None
        match = _STATUS.search(content[:1024])
        execution.status = match.group(1).decode() if match else "unknown"
        execution.ended = now
        self._start_next(now)
        self.closing[msg_id] = execution
        while len(self.closing) > CLOSING_MAX:  # a kernel that never says idle
            self.unclosed.append(self.closing.popitem(last=False)[1])
        return execution

    def take_unclosed(self) -> list[Execution]:
        """Answered executions that stopped waiting for their idle (audit them now)."""
        taken, self.unclosed = self.unclosed, []
        return taken

    def idle(self, now: float) -> None:
        self.last_activity = now

    def closed(self, msg_id: str) -> Execution | None:
        """The idle of ``msg_id`` was sent: its output is complete. Returns the execution
        once, if it was answered (then it is complete to audit)."""
        return self.closing.pop(msg_id, None)

    def killed(self, now: float) -> tuple[list[Execution], list[Execution]]:
        """The jail was killed (or is going away): returns the executions that were
        answered but whose idle never came, and those cut short (status ``killed``, which
        the caller may refine)."""
        cut = list(self.queue.values())
        for execution in cut:
            execution.status = "killed"
            execution.ended = now
        self.queue.clear()
        answered = list(self.closing.values())
        self.closing.clear()
        self.last_activity = now
        return answered, cut

    def _start_next(self, now: float) -> None:
        for execution in self.queue.values():
            if execution.started is None:
                execution.started = now
            return

    # -- asked from the warden's thread ---------------------------------------------

    def running(self) -> Execution | None:
        return next(iter(self.queue.values()), None)

    def due(self, now: float) -> list[Action]:
        """The actions due at ``now``. An Interrupt or Kill is returned once; a Stop every
        time until the warden has acted on it (it then stops asking)."""
        b = self.budgets
        if self.shutting_down:
            return []
        if self.stopped is not None:
            return [self.stopped]
        if b.lifetime_seconds and now - self.born >= b.lifetime_seconds:
            self.stopped = Stop(f"lifetime limit {seconds(b.lifetime_seconds)} reached",
                                "lifetime_seconds")
            return [self.stopped]
        head = self.running()
        if head is None:
            if b.idle_seconds and now - self.last_activity >= b.idle_seconds:
                self.stopped = Stop(f"idle limit {seconds(b.idle_seconds)} reached",
                                    "idle_seconds")
                return [self.stopped]
            return []
        if not b.cell_seconds or head.started is None:
            return []
        limit = f"cell exceeded {seconds(b.cell_seconds)} wall-clock limit"
        if head.interrupted is None and now - head.started >= b.cell_seconds:
            head.interrupted = now
            head.limits_hit.append("cell_seconds")
            return [Interrupt(head, f"cellblock: {limit}; kernel interrupted")]
        if head.interrupted is not None and now - head.interrupted >= b.grace_seconds \
                and "grace_seconds" not in head.limits_hit:
            head.limits_hit.append("grace_seconds")
            return [Kill(head, f"cellblock: {limit}; kernel killed after "
                               f"{seconds(b.grace_seconds)} grace and restarted")]
        return []

    def next_deadline(self) -> float | None:
        """The monotonic time at which :meth:`due` may next have something, or None."""
        b = self.budgets
        if self.shutting_down or self.stopped is not None:
            return None
        times = []
        if b.lifetime_seconds:
            times.append(self.born + b.lifetime_seconds)
        head = self.running()
        if head is None:
            if b.idle_seconds:
                times.append(self.last_activity + b.idle_seconds)
        elif b.cell_seconds and head.started is not None:
            if head.interrupted is None:
                times.append(head.started + b.cell_seconds)
            elif "grace_seconds" not in head.limits_hit:
                times.append(head.interrupted + b.grace_seconds)
        return min(times) if times else None
