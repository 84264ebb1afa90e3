"""A jailed Python kernel for an LLM backend: start it, ``run(code)``, read what happened.

::

    from cellblock.sandbox import Sandbox

    async with Sandbox("agent", datasets=["sales"]) as sb:
        r = await sb.run("import pandas as pd; 1 + 1")
        r.stdout, r.results, r.error, r.policy.redactions

    with SyncSandbox("agent") as sb:          # the same, for code without an event loop
        print(sb.run("print('hi')").stdout)

Who calls what: a backend (or ``cellblock mcp``, :mod:`cellblock.mcp_server`) makes a
:class:`Sandbox`, enters it (or calls :meth:`Sandbox.start`), calls :meth:`Sandbox.run`
once per tool call, and leaves it (or calls :meth:`Sandbox.close`). It is built on
jupyter_client's AsyncKernelManager and AsyncKernelClient with the kernelspec derived from
the policy (:func:`cellblock.notebook_run.sandbox_kernel_manager`), so everything the
provisioner, warden and gate do applies unchanged; this module speaks no protocol of its own.

Obligations (as trio states them for its resources):

- closing always releases everything (the kernel, its warden and jail, the client's
  channels), on every path; closing twice is fine;
- a failed :meth:`~Sandbox.start` leaves nothing running and raises the cause: an
  :class:`~cellblock.errors.UnknownProfile` naming the known profiles, a
  :class:`~cellblock.errors.PolicyError` naming a dataset the profile does not allow and the
  ones it does, or the provisioner's :class:`~cellblock.errors.JailStartError`;
- :meth:`~Sandbox.run` calls are serialised (one cell at a time per sandbox); a cell that
  outlives the client's timeout raises :class:`CellTimeout` after interrupting it; a kernel
  that stops during a cell returns a result whose ``kernel_stopped`` says why, and every later
  :meth:`~Sandbox.run` raises :class:`SandboxStopped` until :meth:`~Sandbox.restart`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future
from pathlib import Path
from queue import Empty
from typing import Any, Self, TypeVar

from .audit import audit_dir
from .cell_cost import cell_cost
from .datasets import DATASETS_ENV, parse_selection, select_datasets
from .errors import CellTimeout, JailStartError, PolicyError, ProfileDisabled, SandboxStopped
from .files.sandbox import SandboxFiles, SyncSandboxFiles
from .output_pages import DEFAULT_PAGE, Page, read_output
from .policy import Policy, load_policy
from .run_result import (
    AuditTail,
    ErrorInfo,
    Output,
    PolicyReport,
    RunResult,
    policy_report,
    stop_message,
)

__all__ = [
    "CellTimeout",
    "PolicyReport",
    "RunResult",
    "Sandbox",
    "SandboxStopped",
    "SyncSandbox",
    "check_launch",
]

T = TypeVar("T")
STOPPED = "CellblockKernelStopped"  # the ename of the gate's "the kernel is gone" notice
_POLL = 0.1  # seconds of waiting on iopub before the shell channel is looked at again
_ALIVE_EVERY = 0.5  # seconds between liveness checks while a cell is quiet
IOPUB_GRACE = 4.0  # seconds a cell's idle may lag its reply (nbclient's iopub_timeout)


def _names(datasets: Sequence[str] | str | None) -> tuple[str, ...]:
    if datasets is None:
        return ()
    if isinstance(datasets, str):
        return parse_selection(datasets)
    return parse_selection(",".join(datasets))


def check_launch(policy: Policy, profile: str, datasets: Sequence[str] | str | None
                 ) -> tuple[str, ...]:
    """Check that a sandbox of ``profile`` asking for ``datasets`` may start, before anything
    does; return the datasets it is granted (none asked: the profile's ``default_datasets``).

    Raises UnknownProfile naming the known profiles, ProfileDisabled, or PolicyError naming
    the dataset and what the profile allows."""
    prof = policy.profile(profile)
    if not prof.enabled:
        raise ProfileDisabled(f"cellblock profile {profile!r} is disabled by the operator "
                              f"(enabled = false in [profiles.{profile}]); no new kernel "
                              "starts on it")
    for name in _names(datasets):
        if name not in prof.datasets:
            allowed = ", ".join(prof.datasets) or "none"
            raise PolicyError(f"dataset {name!r} is not allowed by profile {profile!r}; "
                              f"it allows: {allowed}")
    return select_datasets(policy, profile, ",".join(_names(datasets)))


class Sandbox(SandboxFiles):
    """One jailed kernel of a cellblock profile (see the module docstring).

    ``datasets``: names the profile allows (None or empty: its ``default_datasets``).
    ``timeout``: the client's limit per cell, in seconds; None: the profile's
    ``cell_seconds`` + ``grace_seconds`` + 30 s, so the warden's own budget acts first
    (600 s if the profile has no cell budget).
    """

    def __init__(self, profile: str = "agent", *, datasets: Sequence[str] | str | None = None,
                 timeout: float | None = None) -> None:
        self.profile = profile
        self.requested = _names(datasets)
        self.granted: tuple[str, ...] = ()
        self._timeout = timeout
        self._km: Any = None
        self._kc: Any = None
        self._tail: AuditTail | None = None
        self._stopped: str | None = None
        self._lock: asyncio.Lock | None = None
        self._closing: asyncio.Future[None] | None = None

    # -- lifecycle -----------------------------------------------------------------

    @property
    def kernel_id(self) -> str | None:
        return str(self._km.kernel_id) if self._km is not None else None

    @property
    def started(self) -> bool:
        return self._km is not None

    @property
    def audit_log(self) -> Path | None:
        """The running kernel's audit log, ``<audit dir>/<kernel id>.jsonl``."""
        return self._tail.path if self._tail is not None else None

    def default_timeout(self, policy: Policy | None = None) -> float:
        if self._timeout is not None:
            return self._timeout
        budgets = (policy or load_policy()).profile(self.profile).budgets
        if not budgets.cell_seconds:
            return 600.0
        return budgets.cell_seconds + budgets.grace_seconds + 30.0

    async def start(self) -> None:
        """Start the kernel and wait until it answers. A no-op if it is running."""
        async with self._locked():
            await self._start()

    async def _start(self) -> None:
        if self._km is not None:
            return
        from .notebook_run import sandbox_kernel_manager

        policy = load_policy()
        self.granted = check_launch(policy, self.profile, self.requested)
        profile = policy.profile(self.profile)
        env = {k: v for k, v in os.environ.items() if k != DATASETS_ENV}
        if self.requested:
            env[DATASETS_ENV] = ",".join(self.requested)
        km = sandbox_kernel_manager(self.profile)
        kc = None
        try:
            await km.start_kernel(env=env)
            tail = AuditTail(audit_dir(policy.audit.dir) / f"{km.kernel_id}.jsonl")
            kc = km.client()
            kc.start_channels()
            try:
                await kc.wait_for_ready(timeout=profile.startup_timeout)
            except RuntimeError as exc:  # the kernel died, or never answered
                events = tail.take()
                why = stop_message(events) if any(e.event == "kernel.exit" for e in events) \
                    else str(exc)
                raise JailStartError(f"cellblock sandbox (profile {self.profile!r}, kernel "
                                     f"{km.kernel_id}) did not answer: {why}") from None
        except BaseException:
            # shielded: a cancelled start still releases what it started
            await asyncio.shield(asyncio.ensure_future(_release(km, kc)))
            raise
        self._km, self._kc, self._stopped, self._tail = km, kc, None, tail
        tail.take()  # start-up events are not any cell's

    async def close(self) -> None:
        """Stop the kernel and release everything. Idempotent; safe after a failed start.
        Concurrent calls wait for the same release, and cancelling one does not stop it."""
        km, kc = self._km, self._kc
        self._km = self._kc = self._tail = None
        if km is not None or kc is not None:
            self._closing = asyncio.ensure_future(_release(km, kc))
        if self._closing is not None:
            await asyncio.shield(self._closing)

    async def restart(self) -> None:
        """A fresh kernel (new jail, empty state, the same profile and datasets)."""
        async with self._locked():
            km, kc = self._km, self._kc
            self._km = self._kc = self._tail = None
            await asyncio.shield(asyncio.ensure_future(_release(km, kc)))
            await self._start()

    async def interrupt(self) -> None:
        """Interrupt the running cell (an interrupt_request, relayed by the gate)."""
        if self._km is not None:
            await self._km.interrupt_kernel()

    async def lock_network(self) -> str:
        """Close the kernel's network allowlist now, and its open connections: install,
        then lock (docs/network.md). PolicyError if its profile has no network."""
        from .egress.control import lock_network

        if self.kernel_id is None:
            raise SandboxStopped(f"cellblock sandbox (profile {self.profile!r}) is not started")
        return await asyncio.to_thread(lock_network, self.kernel_id)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _locked(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    # -- running code --------------------------------------------------------------

    async def run(self, code: str, timeout: float | None = None) -> RunResult:
        """Execute ``code``; return once the cell's ``status: idle`` and reply arrived.

        Raises :class:`SandboxStopped` if the sandbox is not running, :class:`CellTimeout`
        (after interrupting the cell) if it runs past ``timeout`` seconds (default: see the
        class docstring)."""
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, not {type(code).__name__}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be a number of seconds > 0 (or None for the "
                             f"profile's cell budget), not {timeout!r}")
        async with self._locked():
            if self._km is None or self._kc is None:
                raise SandboxStopped(f"cellblock sandbox (profile {self.profile!r}) is not "
                                     "running; start() or enter it first")
            if self._stopped is None:  # between cells: a budget, an operator, a crash
                assert self._tail is not None
                events = self._tail.take()
                if not await self._km.is_alive() or any(e.event == "kernel.exit"
                                                        for e in events):
                    self._stopped = stop_message(events)
            if self._stopped is not None:
                raise SandboxStopped(f"cellblock sandbox (profile {self.profile!r}, kernel "
                                     f"{self.kernel_id}) has stopped: {self._stopped}; "
                                     "restart() for a fresh kernel")
            limit = self.default_timeout() if timeout is None else timeout
            return await self._run(code, limit)

    async def output(self, execution: int, offset: int = 0, size: int = DEFAULT_PAGE,
                     stream: str = "stdout") -> Page:
        """A page of what the stream budget cut from cell ``execution`` (``cost.execution``,
        or the N of the cut marker's ``read_output(execution=N, offset=M)``), kept redacted by
        the warden (:mod:`cellblock.output_pages`). Raises BadOutputRequest,
        OutputUnavailable, or SandboxStopped when no kernel runs."""
        if self._km is None:
            raise SandboxStopped(f"cellblock sandbox (profile {self.profile!r}) is not running;"
                                 " kept output lives only as long as its kernel")
        return read_output(self.kernel_id or "", execution, offset, size, stream)

    @property
    def stopped(self) -> str | None:
        """Why the kernel stopped (``"cellblock: kernel stopped, ..."``), once a cell or a
        :meth:`run` call found it gone; None while it runs."""
        return self._stopped

    async def _run(self, code: str, limit: float) -> RunResult:
        kc, km = self._kc, self._km
        assert self._tail is not None
        self._tail.take()  # whatever came after the last cell (a late timed-out one)
        msg_id = kc.execute(code, store_history=True, allow_stdin=False, stop_on_error=False)
        deadline = time.monotonic() + limit
        text = {"stdout": "", "stderr": ""}
        outputs: list[Output] = []
        errors: list[ErrorInfo] = []
        stopped: str | None = None
        reply: dict[str, Any] | None = None
        replied = checked = time.monotonic()
        idle = gone = False
        while not idle:
            now = time.monotonic()
            if now >= deadline:
                await self._timed_out(limit)
            if reply is None:
                reply = await self._shell_reply(msg_id)
                if reply is not None:
                    replied = now
            elif now - replied > IOPUB_GRACE:
                break  # replied, but its idle never came (lost on iopub): keep what came
            try:
                msg = await kc.get_iopub_msg(timeout=min(_POLL, deadline - now))
            except Empty:
                if now - checked >= _ALIVE_EVERY:  # quiet: is the kernel still there?
                    checked = now
                    if not await km.is_alive():
                        gone = True
                        break
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream" and content.get("name") in text:
                text[content["name"]] += str(content.get("text", ""))
            elif kind in ("execute_result", "display_data", "update_display_data"):
                outputs.append(Output(kind, dict(content.get("data") or {}),
                                      dict(content.get("metadata") or {})))
            elif kind == "error":
                err = ErrorInfo(str(content.get("ename", "")), str(content.get("evalue", "")),
                                tuple(str(t) for t in content.get("traceback") or ()))
                errors.append(err)
                if err.name == STOPPED:
                    stopped = err.value
            elif kind == "status" and content.get("execution_state") == "idle":
                idle = True
        if reply is None:  # a dead kernel's cell gets no reply: then only what already came
            block = not gone and stopped is None
            reply = await self._shell_reply(msg_id, block=block, deadline=deadline, limit=limit)
        events = self._tail.take()
        if stopped is None and reply is None and (gone or not await km.is_alive()):
            stopped = stop_message(events)  # it died without the gate saying so
        if stopped is not None:
            self._stopped = stopped
        content = reply["content"] if reply is not None else {}
        status = str(content.get("status", "stopped" if stopped else "unknown"))
        report = policy_report(events, msg_id, stopped is not None)
        if "grace_seconds" in report.limits_hit and stopped is None:
            await self._settle()
        return RunResult(
            stdout=text["stdout"], stderr=text["stderr"], outputs=tuple(outputs),
            errors=tuple(errors), status=status,
            execution_count=content.get("execution_count"), kernel_stopped=stopped,
            policy=report, cost=cell_cost(events, msg_id),
        )

    async def _settle(self) -> None:
        """After the warden killed a cell's jail and restarted it in place: wait until the
        new kernel answers on shell and iopub (as after any restart), so the next cell is
        not sent into the restart window, where the gate can lose it or its output."""
        try:
            await self._kc.wait_for_ready(timeout=load_policy().profile(
                self.profile).startup_timeout)
        except RuntimeError:
            pass  # the next run() finds the kernel gone, and says why

    async def _timed_out(self, limit: float) -> None:
        """Interrupt the cell and raise CellTimeout."""
        with contextlib.suppress(Exception):
            await self.interrupt()
        raise CellTimeout(
            f"cellblock sandbox (profile {self.profile!r}, kernel {self.kernel_id}): the "
            f"cell did not finish within the {limit:g} s timeout (run(timeout=...)); it "
            "was interrupted, and the kernel and its state are kept")

    async def _shell_reply(self, msg_id: str, *, block: bool = False, deadline: float = 0.0,
                           limit: float = 0.0) -> dict[str, Any] | None:
        """The execute_reply to ``msg_id`` if it has arrived; with ``block``, wait for it until
        ``deadline`` (None once the kernel is gone). Replies to other requests (a timed-out
        cell's) are dropped."""
        kc, km = self._kc, self._km
        while True:
            timeout = 0.0
            if block:
                if time.monotonic() >= deadline:
                    await self._timed_out(limit)
                timeout = max(0.0, min(_ALIVE_EVERY, deadline - time.monotonic()))
            try:
                msg = await kc.get_shell_msg(timeout=timeout)
            except Empty:
                if not block or not await km.is_alive():
                    return None
                continue
            if msg["parent_header"].get("msg_id") == msg_id:
                return dict(msg)


async def _release(km: Any, kc: Any) -> None:
    """Stop ``kc``'s channels and ``km``'s kernel; every step is tried whatever failed."""
    if kc is not None:
        with contextlib.suppress(Exception):
            kc.stop_channels()
    if km is None:
        return
    try:
        if km.has_kernel:
            await km.shutdown_kernel(now=False)
    except Exception:
        with contextlib.suppress(Exception):
            await km.shutdown_kernel(now=True)
    finally:
        with contextlib.suppress(Exception):
            await km.cleanup_resources()


class SyncSandbox(SyncSandboxFiles):
    """:class:`Sandbox` for code without an event loop: the same methods, blocking.

    The async sandbox runs on an event loop of its own, in a thread this object owns
    (started by :meth:`start`, ended by :meth:`close`), so it also works where a loop is
    already running (a Jupyter notebook)."""

    def __init__(self, profile: str = "agent", *, datasets: Sequence[str] | str | None = None,
                 timeout: float | None = None) -> None:
        self.sandbox = Sandbox(profile, datasets=datasets, timeout=timeout)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def kernel_id(self) -> str | None:
        return self.sandbox.kernel_id

    @property
    def granted(self) -> tuple[str, ...]:
        return self.sandbox.granted

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop is None:
            coro.close()
            raise SandboxStopped(f"cellblock sandbox (profile {self.sandbox.profile!r}) is "
                                 "not running; start() or enter it first")
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result()

    def start(self) -> None:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="cellblock-sandbox",
                                      daemon=True)
            thread.start()
            self._loop, self._thread = loop, thread
        try:
            self._call(self.sandbox.start())
        except BaseException:
            self.close()
            raise

    def run(self, code: str, timeout: float | None = None) -> RunResult:
        return self._call(self.sandbox.run(code, timeout))

    def restart(self) -> None:
        self._call(self.sandbox.restart())

    def output(self, execution: int, offset: int = 0, size: int = DEFAULT_PAGE,
               stream: str = "stdout") -> Page:
        return self._call(self.sandbox.output(execution, offset, size, stream))

    def lock_network(self) -> str:
        return self._call(self.sandbox.lock_network())

    def interrupt(self) -> None:
        self._call(self.sandbox.interrupt())

    def close(self) -> None:
        """Stop the kernel, then the loop and its thread. Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            self._call(self.sandbox.close())
        finally:
            self._loop = self._thread = None
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

