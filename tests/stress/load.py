"""Load: many jailed kernels at once running mixed work, for minutes; every expected output
must arrive, exactly, the gate must stay responsive, and nothing may leak.

Run it (as root or not; it sets up its own isolated environment)::

    /opt/cellblock/venv/bin/python tests/stress/load.py --kernels 40 --minutes 5 \\
        --json load.json

This process is the client (jupyter_client's AsyncKernelManager with the cellblock
provisioner; its spawner forks the wardens). Kernels use the ``canary``, ``agent`` and
``pooled`` profiles in turn (``pooled`` keeps a warm pool of two). Each kernel runs, in a
random order, over and over until the time is up:

- ``1+1`` (result ``2``); prints of 0 B to 12 KiB (exact); a print past the profile's
  stream budget (head + marker + tail of what was printed); ``1/0`` (ZeroDivisionError);
  a text table (exact); a sleep that the client interrupts once it printed "sleeping"
  (KeyboardInterrupt); an AWS-style key and the launch environment's exact secret (both
  redacted); a busy CPU loop of one second ("spun").

Meanwhile a probe sends ``kernel_info_request`` on control to a random kernel every
quarter second (answered by the kernel's control thread even while a cell runs) and
records the round trip through the gate: p50, p99 and max are reported, and a probe
without an answer in 30 s is a finding. Every 30 s the processes, run dirs and cgroups
are checked against the kernels that should exist.

At the end every kernel is shut down and the spawner closed; then no process, run dir,
cgroup or mount may be left. The client's open descriptors and RSS are reported before
the kernels start (after one kernel has started and stopped, so that imports, the spawner
and its warm pool are in place), at the peak, once every kernel has stopped (the same
state as before: more descriptors then than before is a finding) and after the spawner
was closed.

Exits 1 on any finding; ``--json`` writes the report.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import functools
import gc
import os
import queue
import random
import re
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Env, Expected, leftovers, log, percentile, proc_stats, settle, write_report

EXACT_ENV = "CELLBLOCK_TEST_EXACT_SECRET"  # redact_env of the canary profile
EXACT = "opreg-" + "l0ad-v4lu3-0f-a-s3cr3t-k7x"
AKIA = "AKIA" + "QWERTYUIOPASDFGH"  # not AWS's documented example: that one is left alone
PROFILES = ("canary", "agent", "pooled")
MARKER = re.compile(r"\n\[cellblock [0-9a-f]+: [\d,]+ bytes(, [\d,]+ lines?)? of [^\]]* "
                    r"truncated(; the rest is kept: read_output\([^)]*\))?\]\n")
TABLE_CODE = """
rows = [("alpha", 3, 1.5), ("beta", 14, 22.25), ("gamma", 159, 333.125), ("delta", 2, 0.5)]
print(f"{'name':<8}|{'count':>6}|{'value':>10}")
print("-" * 26)
for name, count, value in rows:
    print(f"{name:<8}|{count:>6}|{value:>10.3f}")
"""
TABLE = ("name    | count|     value\n" + "-" * 26 + "\n"
         "alpha   |     3|     1.500\nbeta    |    14|    22.250\n"
         "gamma   |   159|   333.125\ndelta   |     2|     0.500\n")


class Finding(Exception):
    pass


class Kernel:
    """One kernel under load: its manager, client and counters."""

    def __init__(self, index: int, profile: str) -> None:
        self.index = index
        self.profile = profile
        self.km: Any = None
        self.kc: Any = None
        self.cells: collections.Counter[str] = collections.Counter()
        self.control = asyncio.Lock()  # one control round trip at a time
        self.executions = 0  # since the last (re)start, against the profile's budgets
        self.output = 0
        self.restarts = 0

    async def start(self) -> float:
        from jupyter_client.manager import AsyncKernelManager

        t0 = time.monotonic()
        self.km = AsyncKernelManager(kernel_name=f"cellblock-{self.profile}")
        await self.km.start_kernel()
        self.kc = self.km.client()
        self.kc.start_channels()
        await self.kc.wait_for_ready(timeout=120)
        return time.monotonic() - t0

    async def restart(self) -> None:
        """jupyter_client's restart (a new warden and jail on the same ports)."""
        async with self.control:
            await self.km.restart_kernel(now=False)
            await self.kc.wait_for_ready(timeout=120)
        self.executions = self.output = 0
        self.restarts += 1

    async def stop(self) -> None:
        if self.kc is not None:
            self.kc.stop_channels()
        if self.km is not None:
            await self.km.shutdown_kernel(now=False)

    async def run(self, code: str, interrupt_on: str = "",
                  timeout: float = 180) -> dict[str, Any]:
        """Execute ``code``; gather stdout, stderr, results and errors until the reply."""
        msg_id = self.kc.execute(code)
        self.executions += 1
        out: dict[str, Any] = {"stdout": "", "stderr": "", "results": [], "errors": [],
                               "status": None}
        end = time.monotonic() + timeout
        interrupted, idle = False, False
        while not idle:
            msg = await self._next(self.kc.get_iopub_msg, end, code)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                out[content["name"]] += content["text"]
                if interrupt_on and not interrupted and interrupt_on in out["stdout"]:
                    await self.km.interrupt_kernel()
                    interrupted = True
            elif kind in ("execute_result", "display_data"):
                out["results"].append(content["data"])
            elif kind == "error":
                out["errors"].append(content["ename"])
            elif kind == "status" and content["execution_state"] == "idle":
                idle = True
        while out["status"] is None:
            reply = await self._next(self.kc.get_shell_msg, end, code)
            if reply["parent_header"].get("msg_id") == msg_id:
                out["status"] = reply["content"]["status"]
        self.output += len(out["stdout"]) + len(out["stderr"]) + len(str(out["results"]))
        return out

    async def _next(self, get: Any, end: float, code: str) -> dict[str, Any]:
        while True:
            try:
                return dict(await get(timeout=1.0))
            except queue.Empty:
                if time.monotonic() > end:
                    raise Finding(f"kernel {self.index} ({self.profile}): no answer to "
                                  f"{code[:40]!r} in time") from None
                if not await self.km.is_alive():
                    raise Finding(f"kernel {self.index} ({self.profile}) died running "
                                  f"{code[:40]!r}") from None

    async def kernel_info(self, timeout: float = 30) -> float:
        """One kernel_info round trip on control; its duration in seconds."""
        async with self.control:
            msg = self.kc.session.msg("kernel_info_request")
            t0 = time.monotonic()
            self.kc.control_channel.send(msg)
            end = t0 + timeout
            while True:
                left = end - time.monotonic()
                if left <= 0:
                    raise Finding(f"kernel {self.index}: no kernel_info_reply on control in "
                                  f"{timeout:.0f} s")
                try:
                    reply = await self.kc.get_control_msg(timeout=left)
                except queue.Empty:
                    continue
                if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
                    return time.monotonic() - t0


def work(rng: random.Random, head: int, tail: int, exact_env: bool) -> list[tuple[str, str,
                                                                              Any]]:
    """The mixed work of one pass: (name, code, check) in a random order. ``check`` gets
    the output and returns None if it is right, else what is wrong. ``head`` and ``tail``
    are the profile's stream budget; ``exact_env``: the profile redacts $EXACT_ENV."""
    n = rng.choice((0, 1, 100, 4000, 12000))
    big = head + tail + 50_000
    lines = [f"line {i:06d}" for i in range(big // 12 + 1)]
    printed = "\n".join(lines) + "\n"

    def exact(stdout: str, status: str = "ok", results: Any = (), errors: Any = ()) -> Any:
        want = {"stdout": stdout, "stderr": "", "results": list(results),
                "errors": list(errors), "status": status}
        return lambda out: None if out == want else f"want {want}, got {_short(out)}"

    def truncated(out: dict[str, Any]) -> str | None:
        text = out["stdout"]
        m = MARKER.search(text)
        if out["status"] != "ok" or m is None:
            return f"no truncation marker: {_short(out)}"
        before, after = text[:m.start()], text[m.end():]
        if not (printed.startswith(before) and printed.endswith(after) and before and after):
            return f"head/tail are not those printed: {_short(out)}"
        return None

    def secrets(out: dict[str, Any]) -> str | None:
        text = out["stdout"]
        if AKIA in text or EXACT in text:
            return f"a secret came through: {_short(out)}"
        key = "key: [REDACTED:aws-access-key-id]\n"
        want = text.startswith(key + "exact: [REDACTED:") and text.endswith("]\n") \
            if exact_env else text == key
        if not want:
            return f"the secrets were not redacted as expected: {_short(out)}"
        return None

    secret_code = f"print('key:', {AKIA[:4]!r} + {AKIA[4:]!r})\n"
    if exact_env:
        secret_code += f"print('exact:', {EXACT[:6]!r} + {EXACT[6:]!r})"

    items = [
        ("1+1", "1+1", exact("", results=[{"text/plain": "2"}])),
        (f"print {n}", f"print('a' * {n})", exact("a" * n + "\n")),
        ("print big", f"print('\\n'.join(f'line {{i:06d}}' for i in range({len(lines)})))",
         truncated),
        ("error", "1/0", exact("", status="error", errors=["ZeroDivisionError"])),
        ("table", TABLE_CODE, exact(TABLE)),
        ("interrupt", "import time\nprint('sleeping', flush=True)\ntime.sleep(120)",
         exact("sleeping\n", status="error", errors=["KeyboardInterrupt"])),
        ("secret", secret_code, secrets),
        ("cpu", "import time\nt = time.monotonic()\nn = 0\n"
                "while time.monotonic() - t < 1:\n    n += 1\nprint('spun')", exact("spun\n")),
    ]
    rng.shuffle(items)
    return items


def growth(snapshots: list[tracemalloc.Snapshot], top: int = 12) -> dict[str, Any]:
    """Where the client's Python heap grew during the load (first to second snapshot) and
    what of it was still held once every kernel had stopped (first to third)."""
    if len(snapshots) < 3:
        return {}
    out: dict[str, Any] = {}
    for name, later in (("during", snapshots[1]), ("kept_after_stop", snapshots[2])):
        diff = later.compare_to(snapshots[0], "traceback")
        out[name] = {
            "total_kib": sum(d.size_diff for d in diff) // 1024,
            "top": [{"kib": d.size_diff // 1024, "count": d.count_diff,
                     "where": [f"{f.filename.split('site-packages/')[-1]}:{f.lineno}"
                               for f in d.traceback][:6]}
                    for d in diff[:top]],
        }
    return out


def _short(out: dict[str, Any]) -> dict[str, Any]:
    return {k: (v[:300] + f"...({len(v)} chars)" if isinstance(v, str) and len(v) > 300
                else v) for k, v in out.items()}


class Load:
    def __init__(self, env: Env, kernels: int, seconds: float, rng: random.Random) -> None:
        self.env = env
        self.n = kernels
        self.seconds = seconds
        self.rng = rng
        self.kernels: list[Kernel] = []
        self.findings: list[str] = []
        self.latencies: list[float] = []
        self.start_seconds: list[float] = []
        self.cell_seconds: dict[str, list[float]] = collections.defaultdict(list)
        self.stats: dict[str, Any] = {}
        self.checks = 0
        self.aborted = 0  # cells ipykernel aborted right after an error, sent again
        self.trace = False  # --tracemalloc: where the client's memory grew
        self.churn_cycles = 0  # --churn: start/stop cycles before the load
        self.restarts = 0  # kernels restarted near a budget during the load
        self.snapshots: list[tracemalloc.Snapshot] = []
        self.kernels_done: list[tuple[int, str, dict[str, int]]] = []

    def find(self, what: str) -> None:
        self.findings.append(what)
        log(f"  FINDING {what}"[:1500])

    async def warm_up(self) -> None:
        """One kernel started and stopped first: imports, the spawner and its pool are in
        place before the baseline is taken."""
        k = Kernel(-1, "pooled")
        await k.start()
        out = await k.run("1+1")
        if out["results"] != [{"text/plain": "2"}]:
            self.find(f"warm-up kernel: 1+1 gave {out}")
        await k.stop()
        left = settle(lambda: leftovers(self.env, Expected({os.getpid()}, set(), 2)), 60)
        if left:
            self.find(f"after the warm-up kernel: {left}")

    async def start_all(self) -> None:
        sem = asyncio.Semaphore(4)  # starts in flight at once; the rest queue

        async def one(i: int) -> None:
            k = Kernel(i, PROFILES[i % len(PROFILES)])
            async with sem:
                try:
                    self.start_seconds.append(await k.start())
                except Exception as exc:
                    self.find(f"kernel {i} ({k.profile}) did not start: "
                              f"{type(exc).__name__}: {exc}")
                    if k.km is not None:
                        with contextlib.suppress(Exception):
                            await k.stop()
                    return
            self.kernels.append(k)

        await asyncio.gather(*(one(i) for i in range(self.n)))
        self.kernels.sort(key=lambda k: k.index)

    async def drive(self, k: Kernel, end: float) -> None:
        from cellblock.policy import load_policy

        profile = load_policy().profile(k.profile)
        out_policy, budgets = profile.output, profile.budgets
        rng = random.Random(self.rng.random())
        exact_env = EXACT_ENV in out_policy.redact_env
        last = "ok"
        while time.monotonic() < end:
            for name, code, check in work(rng, out_policy.stream_head, out_policy.stream_tail,
                                          exact_env):
                t0 = time.monotonic()
                try:
                    # A kernel near its executions or output budget is restarted first (the
                    # budget would refuse cells or stop it, as it should).
                    if (budgets.executions and k.executions >= budgets.executions - 5) or \
                            (budgets.output_bytes and k.output >= budgets.output_bytes * 0.7):
                        await k.restart()
                    out = await k.run(code, interrupt_on="sleeping" if name == "interrupt"
                                      else "")
                    if out["status"] == "aborted" and last == "error":
                        # ipykernel aborts what reaches it before it has finished flushing
                        # its queue after an error (a plain ipykernel does the same): once
                        self.aborted += 1
                        out = await k.run(code, interrupt_on="sleeping"
                                          if name == "interrupt" else "")
                except Finding as exc:
                    self.find(str(exc))
                    return
                last = out["status"]
                self.cell_seconds[name.split()[0]].append(time.monotonic() - t0)
                wrong = check(out)
                k.cells[name.split()[0]] += 1
                if wrong:
                    self.find(f"kernel {k.index} ({k.profile}) {name}: {wrong}")
                if time.monotonic() >= end:
                    return

    async def probe(self, end: float) -> None:
        while time.monotonic() < end:
            live = [k for k in self.kernels if k.kc is not None]
            if live:
                k = self.rng.choice(live)
                try:
                    self.latencies.append(await k.kernel_info())
                except Finding as exc:
                    self.find(str(exc))
            await asyncio.sleep(0.25)  # the probe's pace, not a wait for a condition

    async def watch(self, end: float) -> None:
        """Every 30 s: nothing exists that the running kernels do not account for."""
        while time.monotonic() < end - 5:
            await asyncio.sleep(min(30, max(0.0, end - 5 - time.monotonic())))
            expected = Expected({os.getpid()}, {str(k.km.kernel_id) for k in self.kernels}, 2)
            found = await asyncio.get_running_loop().run_in_executor(
                None, settle, functools.partial(leftovers, self.env, expected), 20)
            self.checks += 1
            if found:
                self.find(f"during the load: {found}")
            st = proc_stats(os.getpid())
            self.stats["peak_fds"] = max(self.stats.get("peak_fds", 0), st["fds"])
            self.stats["peak_rss_kib"] = max(self.stats.get("peak_rss_kib", 0), st["rss_kib"])

    async def churn(self, cycles: int) -> None:
        """Start ``self.n`` kernels, run 1+1 on each, stop them; ``cycles`` times. The
        client's descriptors and memory after each cycle (collected and trimmed) show
        whether starting and stopping kernels (the provisioner's part) keeps anything."""
        after: list[dict[str, int]] = []
        for cycle in range(cycles):
            await self.start_all()
            outs = await asyncio.gather(*(k.run("1+1") for k in self.kernels))
            if any(o["results"] != [{"text/plain": "2"}] for o in outs):
                self.find(f"churn cycle {cycle}: 1+1 gave {outs}")
            await asyncio.gather(*(k.stop() for k in self.kernels))
            self.kernels = []
            gc.collect()
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            left = settle(lambda: leftovers(self.env, Expected({os.getpid()}, set(), 2)), 60)
            if left:
                self.find(f"after churn cycle {cycle}: {left}")
            after.append(proc_stats(os.getpid()))
            log(f"churn cycle {cycle + 1}/{cycles}: {self.n} kernels started and stopped; "
                f"client {after[-1]}")
        self.stats["churn"] = after
        if len(after) > 1 and after[-1]["fds"] > after[0]["fds"]:
            self.find(f"the client's descriptors grew over {cycles} start/stop cycles: "
                      f"{[a['fds'] for a in after]}")

    async def main(self) -> None:
        await self.warm_up()
        if self.churn_cycles:
            await self.churn(self.churn_cycles)
        self.stats["before"] = proc_stats(os.getpid())
        log(f"baseline: {self.stats['before']}; starting {self.n} kernels")
        t0 = time.monotonic()
        await self.start_all()
        self.stats["start_all_seconds"] = round(time.monotonic() - t0, 1)
        self.stats["started"] = proc_stats(os.getpid())
        log(f"{len(self.kernels)} kernels up in {self.stats['start_all_seconds']} s; "
            f"client {self.stats['started']}; running for {self.seconds:.0f} s")
        end = time.monotonic() + self.seconds
        if self.trace:
            tracemalloc.start(8)
            self.snapshots.append(tracemalloc.take_snapshot())
        ticker = asyncio.create_task(self.tick(end))
        await asyncio.gather(self.probe(end), self.watch(end),
                             *(self.drive(k, end) for k in self.kernels))
        ticker.cancel()
        if self.trace:
            self.snapshots.append(tracemalloc.take_snapshot())
        log("stopping the kernels")
        await asyncio.gather(*(k.stop() for k in self.kernels))
        left = settle(lambda: leftovers(self.env, Expected({os.getpid()}, set(), 2)), 60)
        if left:
            self.find(f"after the shutdown: {left}")
        # the same state as the baseline: the spawner and its warm pool, no kernel
        self.stats["stopped"] = proc_stats(os.getpid())
        self.kernels_done = [(k.index, k.profile, dict(k.cells)) for k in self.kernels]
        self.restarts = sum(k.restarts for k in self.kernels)
        self.kernels = []
        gc.collect()
        if self.trace:
            self.snapshots.append(tracemalloc.take_snapshot())
            tracemalloc.stop()
        # What of the RSS is memory the allocator keeps but nothing holds: given back here.
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.stats["stopped_trimmed"] = proc_stats(os.getpid())

    async def tick(self, end: float) -> None:
        while True:
            await asyncio.sleep(15)  # progress line pace
            cells = sum(sum(k.cells.values()) for k in self.kernels)
            lat = self.latencies
            log(f"  {max(0, end - time.monotonic()):4.0f} s left: {cells} cells, "
                f"{len(lat)} probes (p50 {percentile(lat, .5) * 1000:.0f} ms, max "
                f"{max(lat, default=0) * 1000:.0f} ms), findings {len(self.findings)}, "
                f"client {proc_stats(os.getpid())}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", type=int, default=30)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, help="instead of --minutes")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--keep", action="store_true", help="keep the environment's dir")
    parser.add_argument("--churn", type=int, default=0, metavar="N",
                        help="first start and stop all kernels N times, measuring the "
                        "client after each cycle")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="report where the client's Python memory grew (slower)")
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else args.minutes * 60
    seed = args.seed if args.seed is not None else int(time.time())
    env = Env.create("load")
    os.environ[EXACT_ENV] = EXACT
    log(f"load: {args.kernels} kernels for {seconds:.0f} s, seed {seed}, env {env.top}, "
        f"uid {os.geteuid()}, load average {os.getloadavg()}")
    run = Load(env, args.kernels, seconds, random.Random(seed))
    run.trace = args.tracemalloc
    run.churn_cycles = args.churn
    t0 = time.monotonic()
    try:
        asyncio.run(run.main())
    finally:
        from cellblock.warden.client import SpawnerClient

        SpawnerClient.instance().close()
        left = settle(lambda: leftovers(env, Expected()), 60)
        if left:
            run.find(f"after the spawner closed: {left}")
        run.stats["after"] = proc_stats(os.getpid())
        env.close(keep=args.keep or bool(run.findings))
    before, after = run.stats["before"], run.stats["after"]
    stopped = run.stats.get("stopped", after)
    if stopped["fds"] > before["fds"]:
        run.find(f"the client holds {stopped['fds']} descriptors after the load, "
                 f"{before['fds']} before")
    lat = run.latencies
    cells: collections.Counter[str] = collections.Counter()
    for _, _, c in run.kernels_done:
        cells.update(c)
    report = {
        "command": [sys.executable, *sys.argv], "seed": seed, "uid": os.geteuid(),
        "kernels": args.kernels, "kernels_run": len(run.kernels_done),
        "seconds": seconds, "wall_seconds": round(time.monotonic() - t0, 1),
        "cells": dict(cells), "cells_total": sum(cells.values()),
        "cell_seconds": {k: {"n": len(v), "p50": round(percentile(v, .5), 3),
                             "max": round(max(v), 3)} for k, v in run.cell_seconds.items()},
        "kernel_info": {"n": len(lat), "p50_ms": round(percentile(lat, .5) * 1000, 1),
                        "p99_ms": round(percentile(lat, .99) * 1000, 1),
                        "max_ms": round(max(lat, default=0) * 1000, 1)},
        "start_seconds": {"n": len(run.start_seconds),
                          "p50": round(percentile(run.start_seconds, .5), 2),
                          "max": round(max(run.start_seconds, default=0), 2)},
        "client": run.stats, "leak_checks_during": run.checks,
        "aborted_after_error_resent": run.aborted,
        "restarts_near_budget": run.restarts,
        "memory_growth": growth(run.snapshots),
        "findings": run.findings, "load_average_end": os.getloadavg(), "env": str(env.top),
    }
    write_report(args.json, report)
    print()
    print(f"load: {report['kernels_run']}/{args.kernels} kernels, {seconds:.0f} s, "
          f"{report['cells_total']} cells {dict(cells)}")
    print(f"kernel_info on control: {report['kernel_info']}")
    print(f"client: before {before}, peak fds {run.stats.get('peak_fds')} rss "
          f"{run.stats.get('peak_rss_kib')} KiB, kernels stopped {stopped}, spawner closed "
          f"{after}")
    print(f"findings: {len(run.findings)}")
    for f in run.findings[:20]:
        print(f"  {f[:400]}")
    return 1 if run.findings else 0


if __name__ == "__main__":
    sys.exit(main())
