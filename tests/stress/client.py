"""A Jupyter client process driven over stdin/stdout, for ``faults.py`` (which kills it,
among others, with SIGKILL at chosen moments).

Who runs it: :class:`faults.ClientProc`, as ``python tests/stress/client.py``, with the
stress environment in its environment. It is an ordinary client: jupyter_client's
AsyncKernelManager (the cellblock provisioner runs here, and this process's spawner is
started by the first launch) and AsyncKernelClient.

Protocol: one JSON object a line. A command ``{"id": N, "op": ..., ...}`` on stdin runs as
its own task (commands overlap); its answer is ``{"id": N, "ok": bool, ...}`` on stdout,
and an exec may first send ``{"id": N, "event": "output"}`` when its cell's first output
arrives. Ops: start, exec, restart, shutdown, alive, warm, stats, exit (see ``Client``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import sys
import threading
import time
import uuid
from typing import Any

from jupyter_client.manager import AsyncKernelManager


def emit(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload, default=str) + "\n")
    sys.stdout.flush()


class Client:
    """The kernels of this process, by slot name (each an AsyncKernelManager + client)."""

    def __init__(self) -> None:
        self.kms: dict[str, tuple[AsyncKernelManager, Any]] = {}

    async def op_start(self, slot: str, profile: str, timeout: float = 90, id: int = 0,
                       **_: Any) -> dict[str, Any]:
        """Start a kernel in ``slot`` (which must be empty) and wait until it is ready."""
        assert slot not in self.kms, f"slot {slot} is taken"
        kernel_id = str(uuid.uuid4())
        emit({"id": id, "event": "kernel_id", "slot": slot, "kernel_id": kernel_id})
        km = AsyncKernelManager(kernel_name=f"cellblock-{profile}")
        t0 = time.monotonic()
        try:
            await km.start_kernel(kernel_id=kernel_id)
        except Exception as exc:
            with contextlib.suppress(Exception):
                await km.cleanup_resources()
            return {"ok": False, "stage": "start", "kernel_id": kernel_id,
                    "error": f"{type(exc).__name__}: {exc}"[:500]}
        kc = km.client()
        kc.start_channels()
        self.kms[slot] = (km, kc)
        try:
            await kc.wait_for_ready(timeout=timeout)
        except Exception as exc:
            return {"ok": False, "stage": "ready", "kernel_id": kernel_id,
                    "error": f"{type(exc).__name__}: {exc}"[:500]}
        return {"ok": True, "kernel_id": kernel_id, "seconds": time.monotonic() - t0}

    async def op_exec(self, slot: str, code: str, timeout: float = 60, id: int = 0,
                      interrupt_on: str = "", **_: Any) -> dict[str, Any]:
        """Run ``code``; gather its output until its reply. ``outcome`` is "ok", "error",
        "died" (the kernel ended before the reply) or "timeout". With ``interrupt_on``,
        interrupt the kernel once that text shows in stdout."""
        km, kc = self.kms[slot]
        msg_id = kc.execute(code)
        out: dict[str, Any] = {"ok": True, "stdout": "", "stderr": "", "results": [],
                               "errors": [], "outcome": "timeout"}
        deadline = time.monotonic() + timeout
        told = interrupted = False
        idle = False
        while not idle and time.monotonic() < deadline:
            try:
                msg = await kc.get_iopub_msg(timeout=0.5)
            except queue.Empty:
                if not await km.is_alive():
                    out["outcome"] = "died"
                    return out
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                out[content["name"]] += content["text"]
                if not told:
                    emit({"id": id, "event": "output"})
                    told = True
                if interrupt_on and not interrupted and interrupt_on in out["stdout"]:
                    await km.interrupt_kernel()
                    interrupted = True
            elif kind in ("execute_result", "display_data"):
                out["results"].append(content["data"])
            elif kind == "error":
                out["errors"].append({k: content.get(k) for k in ("ename", "evalue")})
            elif kind == "status" and content["execution_state"] == "idle":
                idle = True
        while time.monotonic() < deadline:
            try:
                reply = await kc.get_shell_msg(timeout=0.5)
            except queue.Empty:
                if not await km.is_alive():
                    out["outcome"] = "died"
                    return out
                continue
            if reply["parent_header"].get("msg_id") == msg_id:
                out["outcome"] = reply["content"]["status"]
                break
        return out

    async def op_restart(self, slot: str, timeout: float = 90, **_: Any) -> dict[str, Any]:
        km, kc = self.kms[slot]
        t0 = time.monotonic()
        try:
            await km.restart_kernel(now=False)
        except Exception as exc:
            return {"ok": False, "stage": "restart", "error": f"{type(exc).__name__}: {exc}"}
        try:
            await kc.wait_for_ready(timeout=timeout)
        except Exception as exc:
            return {"ok": False, "stage": "ready", "error": f"{type(exc).__name__}: {exc}"}
        return {"ok": True, "seconds": time.monotonic() - t0}

    async def op_shutdown(self, slot: str, **_: Any) -> dict[str, Any]:
        """Shut the kernel down and forget the slot (even if shutting down failed)."""
        km, kc = self.kms.pop(slot)
        kc.stop_channels()
        t0 = time.monotonic()
        try:
            await km.shutdown_kernel(now=False)
        except Exception as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        return {"ok": True, "seconds": time.monotonic() - t0}

    async def op_drop(self, slot: str, **_: Any) -> dict[str, Any]:
        """Forget a kernel whose start failed: release what jupyter_client holds."""
        km, kc = self.kms.pop(slot)
        kc.stop_channels()
        with contextlib.suppress(Exception):
            await km.shutdown_kernel(now=True)
        return {"ok": True}

    async def op_alive(self, slot: str, **_: Any) -> dict[str, Any]:
        if slot not in self.kms:
            return {"ok": True, "alive": False, "known": False}
        km, _ = self.kms[slot]
        return {"ok": True, "alive": await km.is_alive(), "known": True,
                "kernel_id": km.kernel_id}

    async def op_warm(self, profile: str, size: int | None = None, timeout: float = 120,
                      **_: Any) -> dict[str, Any]:
        from cellblock.warden.client import warm

        loop = asyncio.get_running_loop()
        try:
            state = await loop.run_in_executor(
                None, lambda: warm(profile, size=size, timeout=timeout))
        except Exception as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        return {"ok": True, "state": state}

    async def op_stats(self, **_: Any) -> dict[str, Any]:
        from cellblock.warden.client import SpawnerClient

        proc = SpawnerClient.instance()._proc
        rss = 0
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
        return {"ok": True, "fds": len(os.listdir("/proc/self/fd")), "rss_kib": rss,
                "threads": threading.active_count(),
                "spawner": proc.pid if proc is not None and proc.poll() is None else None,
                "slots": {s: km.kernel_id for s, (km, _) in self.kms.items()}}


async def main() -> None:
    client = Client()
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str] = asyncio.Queue()

    def reader() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line)
        loop.call_soon_threadsafe(lines.put_nowait, "")

    threading.Thread(target=reader, daemon=True).start()
    tasks: set[asyncio.Task[None]] = set()

    async def run(cmd: dict[str, Any]) -> None:
        handler = getattr(client, f"op_{cmd.get('op')}", None)
        try:
            if handler is None:
                raise ValueError(f"unknown op {cmd.get('op')!r}")
            answer = await handler(**cmd)
        except Exception as exc:  # the orchestrator decides what a failure means
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
        emit({**answer, "id": cmd.get("id")})

    emit({"event": "hello", "pid": os.getpid()})
    while True:
        line = await lines.get()
        if not line:
            break
        cmd = json.loads(line)
        if cmd.get("op") == "exit":
            break
        task = asyncio.create_task(run(cmd))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    for slot in list(client.kms):
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.op_shutdown(slot), 30)
    emit({"event": "bye"})


if __name__ == "__main__":
    asyncio.run(main())
