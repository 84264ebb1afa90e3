"""The warden's books: audit events, the budget clock fed from the gate's observer, and the
budgets acting on the jail (interrupt, restart in place, stop).

Who calls it: :class:`cellblock.warden.warden.Warden` is a :class:`Bookkeeping`; the gate's
thread calls :meth:`Bookkeeping._observe` and :meth:`Bookkeeping._audit`, the warden's
main thread :meth:`Bookkeeping._watch`. The mixin uses these attributes of the warden:
``audit``, ``telemetry``, ``clock`` and ``_lock`` (the gate thread feeds the clock),
``_wake_w`` (wakes the main thread), ``gate``, ``jail``, ``proc``, ``cgroup``, ``profile``,
``drops``, ``restarts``, ``record``, ``run``, ``_inner``, ``_ids``, ``_argv``, ``_oom_base``,
``_pids_base``, ``_stop_reason``, ``_fault``, ``kernel_id``; and its methods ``_set_state``,
``_wait_for_kernel``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import select
import subprocess
import threading
import time
from typing import TYPE_CHECKING, Any

from ..budgets import Execution, Interrupt, Kill, Stop, seconds
from ..errors import CellblockError, JailStartError
from .cost import CellMeter
from .jail import JailProcess

if TYPE_CHECKING:
    from ..audit import AuditLog
    from ..budgets import BudgetClock
    from ..cgroups import KernelCgroup
    from ..gate.observe import Observed
    from ..gate.relay import Gate
    from ..policy import Profile
    from ..rundir import RunDir, WardenRecord
    from ..staging import DatasetSetup
    from ..telemetry import Telemetry

__all__ = ["Bookkeeping", "HeldAudit"]

log = logging.getLogger("cellblock.warden")
STATE_SETTLE = 0.25  # seconds a busy/idle state lasts before warden.json says so


class HeldAudit:
    """The audit sink of a pooled warden, until a launch adopts it and names the kernel:
    events are kept (at most ``limit``) and written to the kernel's log at adoption."""

    def __init__(self, limit: int = 200) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.limit = limit

    def write(self, event: str, *, session: str | None = None,
              parent_msg_id: str | None = None, **fields: Any) -> None:
        if len(self.events) < self.limit:
            self.events.append((event, {"session": session, "parent_msg_id": parent_msg_id,
                                        **fields}))

    def close(self) -> None:
        self.events.clear()


class Bookkeeping:
    """Audit, budgets and their actions for one kernel (see the module docstring)."""

    # Declared for the type checker; the Warden sets them.
    audit: AuditLog | HeldAudit
    telemetry: Telemetry | None
    clock: BudgetClock | None
    gate: Gate | None
    jail: JailProcess | None
    cgroup: KernelCgroup | None
    profile: Profile
    record: WardenRecord | None
    run: RunDir
    kernel_id: str
    drops: dict[str, int]
    restarts: int
    datasets: DatasetSetup | None
    client_pidfd: int
    _lock: threading.Lock
    _wake_r: int
    _wake_w: int
    _stop_reason: str | None
    _fault: str | None
    _inner: dict[str, Any]
    _ids: tuple[int, int]
    _argv: list[str]
    _oom_base: int
    _pids_base: int
    #: the output filter (its spool and cell numbers) and the cells' cost meter
    _filter: Any = None
    _meter: CellMeter | None = None

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        raise NotImplementedError  # the Warden's

    def _set_state(self, state: str) -> None:
        raise NotImplementedError  # the Warden's

    def _wait_for_kernel(self) -> None:
        raise NotImplementedError  # the Warden's

    def _open_sink(self) -> None:
        raise NotImplementedError  # the Warden's

    def _client_gone(self, ready: list[int]) -> bool:
        raise NotImplementedError  # the Warden's

    def _audit_write(self, event: str, **fields: Any) -> Any:
        """The broker's audit sink: whatever log the warden has now (held while pooled)."""
        return self.audit.write(event, **fields)

    def _audit(self, event: str, fields: dict[str, Any]) -> None:
        """Gate and output-rule events. Drops, strips, reconnects: the first 100 of each kind
        are written one by one; after that only the count, at exit, so a kernel flooding
        forgeries cannot flood the log. ``output.cell`` (what the policy did to one cell) is
        always written: there is one per cell, bounded by the executions budget."""
        if event == "output.cell":
            self.audit.write(event, **fields)
            return
        key = f"{event}:{fields.get('reason', '')}"
        self.drops[key] = self.drops.get(key, 0) + 1
        if self.drops[key] <= 100:
            self.audit.write(event, **{k: v for k, v in fields.items() if k != "event"})
        if self.drops[key] <= 3:
            log.info("kernel %s: %s %s", self.kernel_id, event, json.dumps(fields, default=str))

    def _watch(self, sigfd: int) -> Stop | None:
        """Run the budgets until a stop signal, a Stop, or the jail's own end (None).
        A cell past its grace has its jail killed and restarted in place here."""
        assert self.proc is not None
        pidfd = os.pidfd_open(self.proc.pid)
        wanted = ("", 0.0)  # the state to publish, and from when
        try:
            while self._stop_reason is None and self.proc.poll() is None:
                if self._fault is not None:
                    return Stop(self._fault, "network" if self._fault.startswith("network")
                                else "connections")
                with self._lock:
                    clock = self.clock
                    now = time.monotonic()
                    actions = clock.due(now) if clock is not None else []
                    deadline = clock.next_deadline() if clock is not None else None
                    busy = clock is not None and clock.running() is not None
                for action in actions:
                    if isinstance(action, Stop):
                        return action
                    if isinstance(action, Interrupt):
                        self._interrupt(action)
                    elif isinstance(action, Kill):
                        os.close(pidfd)
                        pidfd = -1
                        failed = self._restart_in_place(action)
                        if failed is not None:
                            return failed
                        pidfd = os.pidfd_open(self.proc.pid)
                if actions:
                    continue
                # busy/idle reach warden.json (`cellblock ps`) once they have lasted
                # STATE_SETTLE: a file write on every cell's start and end cost a 1+1 round
                # trip ~0.4 ms (1.24x -> 1.15x of a plain ipykernel, measured interleaved)
                state = "busy" if busy else "idle"
                if state != wanted[0]:
                    wanted = (state, now + STATE_SETTLE)
                if now >= wanted[1]:
                    self._set_state(state)
                elif deadline is None or wanted[1] < deadline:
                    deadline = wanted[1]
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                watched = [pidfd, sigfd, self._wake_r]
                if self.client_pidfd >= 0:
                    watched.append(self.client_pidfd)
                ready, _, _ = select.select(watched, [], [], timeout)
                if self._client_gone(ready):
                    break
                for fd in (sigfd, self._wake_r):
                    if fd in ready:
                        with contextlib.suppress(BlockingIOError):
                            os.read(fd, 4096)
        finally:
            if pidfd >= 0:
                os.close(pidfd)
        return None

    # -- budgets -------------------------------------------------------------------

    def _observe(self, seen: Observed) -> str | None:
        """The gate's observer (runs on the gate thread): feed the clock, audit what
        started or ended, and wake the main thread when a deadline moved."""
        now = time.monotonic()
        events: list[tuple[str, str, str, dict[str, Any]]] = []
        ended: list[Execution] = []
        verdict: str | None = None
        with self._lock:
            clock = self.clock
            if clock is None:
                return None
            head, stopped = clock.running(), clock.stopped
            if seen.kind == "request":
                verdict = clock.request(seen.msg_id, seen.msg_type, seen.session, seen.content,
                                        now)
                if seen.msg_type == "execute_request":
                    if verdict is None:
                        ex = clock.queue[seen.msg_id]
                        self._cell_starts(ex)
                        fields: dict[str, Any] = {"code_sha256": ex.code_sha256,
                                                  "queued": ex.started is None}
                        if ex.code is not None:
                            fields["code"] = ex.code
                        events.append(("execution.start", seen.session, seen.msg_id, fields))
                    else:
                        budget = "executions" if clock.stopped is None else clock.stopped.budget
                        events.append(("execution.refused", seen.session, seen.msg_id,
                                       {"budget": budget, "executions": clock.executions}))
                elif seen.msg_type == "interrupt_request":
                    events.append(("kernel.interrupt", seen.session, seen.msg_id,
                                   {"origin": "client"}))
            elif seen.kind == "output":
                if not clock.output(seen.msg_id, seen.bytes_in, seen.bytes_out, now):
                    # the crossing message: tell its cell at once, from the gate's thread
                    # output() refused it: the clock is stopped (by this message if
                    # it was not before, which only the crossing message tells its cell)
                    now_stopped = clock.stopped
                    verdict = "" if stopped is not None or now_stopped is None else \
                        f"cellblock: kernel stopped, {now_stopped.reason}"
            elif seen.kind == "reply" and seen.msg_type == "execute_request":
                answered = clock.reply(seen.msg_id, seen.content, now)  # ends at its idle
                if answered is not None:
                    answered.cost = self._cell_meter().end(answered.meter)
                    if (following := clock.running()) is not None:
                        self._cell_starts(following)
                ended = clock.take_unclosed()
            else:
                clock.idle(now)
                closed = clock.closed(seen.msg_id)
                ended = [closed] if closed is not None else []
            moved = clock.running() is not head or clock.stopped is not stopped
        for event, session, msg_id, fields in events:
            self._record(event, session=session, parent_msg_id=msg_id, **fields)
        for ex in ended:
            self._record_end(ex)
        if moved:
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"!")
        return verdict

    def _output_rules(self) -> tuple[Any, ...]:
        """The profile's output rules, the filter's spool in the run dir attached (the
        warden's ``output/``, never the jail's: cellblock.output.spool)."""
        from ..output import build_output_rules
        from ..output.spool import Spool
        from ..output_pages import SPOOL_DIR

        rules = build_output_rules(self.profile.output, audit=self._audit)
        self._filter = rules[0]
        self._filter.spool = Spool(self.run.path / SPOOL_DIR, self.profile.output.spool_bytes)
        return rules

    def _cell_meter(self) -> CellMeter:
        if self._meter is None:
            self._meter = CellMeter(self.cgroup)
        return self._meter

    def _cell_starts(self, ex: Execution) -> None:
        """A cell is forwarded: number it for the output filter; if it runs now (not
        queued), read its cost counters."""
        if self._filter is not None and ex.meter is None:
            self._filter.number(ex.msg_id, ex.number)
        if ex.started is not None and ex.meter is None:
            ex.meter = self._cell_meter().start()

    def _record_end(self, ex: Execution) -> None:
        queued = (ex.started - ex.forwarded) if ex.started is not None else 0.0
        streamed = self._filter.streamed.pop(ex.msg_id, None) if self._filter else None
        streamed = streamed or {"cut": 0, "kept": 0, "dropped": 0}
        cost = ex.cost or {"cpu_seconds": None, "peak_memory_bytes": None}
        self._record(
            "execution.end", session=ex.session, parent_msg_id=ex.msg_id,
            status=ex.status, duration_seconds=round(ex.duration, 6),
            queued_seconds=round(queued, 6), code_sha256=ex.code_sha256,
            output_bytes_in=ex.bytes_in, output_bytes_out=ex.bytes_out,
            output_messages=ex.messages, limits_hit=list(ex.limits_hit),
            execution=ex.number, **cost, output_bytes_cut=streamed["cut"],
            output_bytes_kept=streamed["kept"], output_bytes_not_kept=streamed["dropped"],
        )

    def _end_executions(self, status: str) -> None:
        """The kernel is going away: every execution still open ends with ``status``."""
        with self._lock:
            answered, cut = self.clock.killed(time.monotonic()) if self.clock is not None \
                else ([], [])
        for ex in answered:
            self._record_end(ex)
        for ex in cut:
            ex.status = status
            if not ex.cost and ex.meter is not None:  # the cgroup's counters outlive the jail
                ex.cost = self._cell_meter().end(ex.meter)
            self._record_end(ex)

    def _interrupt(self, action: Interrupt) -> None:
        ex = action.execution
        assert self.gate is not None
        self.gate.announce("CellblockBudget", action.message, msg_id=ex.msg_id)
        self.gate.interrupt()
        self._record("kernel.interrupt", session=ex.session, parent_msg_id=ex.msg_id,
                     origin="budget", budget="cell_seconds",
                     limit_seconds=self.profile.budgets.cell_seconds)

    def _restart_in_place(self, action: Kill) -> Stop | None:
        """Kill the jail of a cell past its grace and start a new one on the same run dir,
        behind the same gate (the client's sockets never close), with a fresh kernel key."""
        assert self.gate is not None and self.jail is not None and self.proc is not None
        ex = action.execution
        self._set_state("restarting")
        self.jail.stop()
        status = self.proc.returncode
        if self.cgroup is not None:
            self.cgroup.kill_all()
        self._end_executions("killed")
        self.restarts += 1
        try:
            key = secrets.token_hex(32)
            # The gate holds client requests from the rekey on: it must come before the
            # announcement that ends the killed cell, or a request sent right after it
            # would go, signed with the old key, to a kernel that drops it.
            if not self.gate.rekey(key):
                raise JailStartError("the gate did not take the new kernel key")
            self.gate.announce("CellblockBudget", action.message, replies=True)
            # Nothing the old jail wrote survives: its /tmp and $HOME were its own tmpfs,
            # and the ipc dir, the broker dir and the package are the warden's, read-only
            # in the jail. Only the key changes; the sockets stay bound for the new kernel.
            self._inner = {**self._inner, "key": key}
            self.run.write_connection_file(self._inner, *self._ids)
            if self.cgroup is not None:
                self._oom_base = self.cgroup.oom_kills()
                self._pids_base = self.cgroup.pids_max_hits()
            self.jail = JailProcess.start(self._argv, self.cgroup, self.datasets)
            if self.record is not None:
                self.record.nsjail_pid = self.proc.pid
            self._wait_for_kernel()
            self._open_sink()  # the new jail's namespace
            self.gate.resume()  # the requests that came in meanwhile go to the new kernel
        except (CellblockError, OSError) as exc:
            return Stop(f"restart after the {seconds(self.profile.budgets.grace_seconds)} "
                        f"grace failed: {exc}", "grace_seconds")
        self._record("kernel.restart", session=ex.session, parent_msg_id=ex.msg_id,
                     reason=action.message, budget="grace_seconds", status=status,
                     restarts=self.restarts)
        with self._lock:
            if self.clock is not None:
                self.clock.idle(time.monotonic())
        self._set_state("idle")
        return None

    def _totals(self) -> dict[str, Any]:
        with self._lock:
            clock = self.clock
            return {
                "executions": clock.executions if clock else 0,
                "output_bytes": clock.output_total if clock else 0,
                "restarts": self.restarts,
                "lifetime_seconds": round(time.monotonic() - clock.born, 3) if clock else 0.0,
            }

    def _record(self, event: str, *, session: str | None = None,
                parent_msg_id: str | None = None, **fields: Any) -> None:
        """One audit event, and its span when OpenTelemetry is on."""
        written = self.audit.write(event, session=session, parent_msg_id=parent_msg_id,
                                   **fields)
        if self.telemetry is not None and written is not None:  # None: held (pooled)
            self.telemetry.record(written)

