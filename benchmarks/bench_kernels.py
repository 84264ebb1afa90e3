"""cellblock against a plain ipykernel, side by side in one run (docs/benchmarks.md).

    python benchmarks/bench_kernels.py [--quick] [--json PATH] [--only NAMES]

Every figure is a median, printed with its ratio to a plain local ipykernel measured in
the same run on the same machine (the venv's ``python3`` kernelspec, tcp): absolute times
vary between machines, ratios are what we compare. Not a test: nothing asserts on time.

Cases
    plain        ipykernel as jupyter_client starts it (``python -m ipykernel_launcher``)
    plain-nodbg  the same without debugpy (cellblock's kernel does not load the debugger,
                 since every cellblock kernelspec says ``"debugger": false``): the
                 like-for-like baseline, so the sandbox's own cost is visible too
    agent, analyst   cellblock's built-in profiles, jailed, behind the gate
    agent-warm   the agent profile with ``warm_pool`` (an operator file made here)

Figures
    start        ``start_kernel()`` until the first ``kernel_info_reply`` (one request,
                 sent as soon as the client's channels are up); each kernel is new. The
                 first start in a process also starts its spawner: shown apart
                 (``first_start_s``), not in the median.
    rt           execute round trip of ``1+1``: until both the reply and ``idle``.
    print        ``print('x' * 50_000_000)`` until ``idle`` (the analyst profile's output
                 policy, redaction on, sends head + marker + tail).
    mem          idle memory per kernel with 20 kernels running: the PSS (proportional
                 set size, so shared pages are split among the processes sharing them)
                 of every host process of those kernels (plain: the kernel; cellblock:
                 warden, nsjail, kernel, and the spawner's share), summed, divided by 20.
    capacity     how many idle cellblock kernels this machine holds with every one still
                 answering kernel_info within a second (``--capacity N`` to try N).
    scan         the gate's output scanning, MB/s per core (benchmarks/bench_redact.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
from jupyter_client.kernelspec import KernelSpec
from jupyter_client.manager import AsyncKernelManager

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

NODBG = ("import sys; sys.modules['debugpy'] = None; "
         "from ipykernel.kernelapp import IPKernelApp; IPKernelApp.launch_instance()")


def plain(nodbg: bool = False) -> AsyncKernelManager:
    km = AsyncKernelManager(kernel_name="python3")
    if nodbg:
        km._kernel_spec = KernelSpec(
            argv=[sys.executable, "-c", NODBG, "-f", "{connection_file}"],
            display_name="plain ipykernel without debugpy", language="python")
    return km


def sandbox(profile: str) -> AsyncKernelManager:
    from cellblock.notebook_run import sandbox_kernel_manager

    return sandbox_kernel_manager(profile)


# -- one kernel ---------------------------------------------------------------------------

async def first_reply(km: AsyncKernelManager) -> tuple[Any, float]:
    """Start ``km``; return its client and the seconds until the first kernel_info_reply."""
    t = time.perf_counter()
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    msg_id = kc.kernel_info()
    while True:
        reply = await kc.get_shell_msg(timeout=120)
        if reply["parent_header"].get("msg_id") == msg_id:
            return kc, time.perf_counter() - t


async def until_idle(kc: Any, msg_id: str) -> int:
    """Wait for the reply and the idle of ``msg_id``; return the stream characters seen."""
    async def reply() -> None:
        while (await kc.get_shell_msg(timeout=600))["parent_header"].get("msg_id") != msg_id:
            pass

    async def idle() -> int:
        got = 0
        while True:
            msg = await kc.get_iopub_msg(timeout=600)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                got += len(msg["content"]["text"])
            elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                return got

    _, got = await asyncio.gather(reply(), idle())
    return got


async def settle(kc: Any) -> None:
    """Before timing anything: make sure the client's iopub subscription is live (as
    jupyter_client's wait_for_ready does; a cell run before that may lose its idle to
    ZMQ's slow joiner, with a plain kernel as with cellblock), then run one cell."""
    await kc.wait_for_ready(timeout=120)
    await until_idle(kc, kc.execute("0"))


async def stop(km: AsyncKernelManager, kc: Any) -> None:
    kc.stop_channels()
    await km.shutdown_kernel(now=True)


# -- figures ------------------------------------------------------------------------------

Maker = Callable[[], AsyncKernelManager]


async def starts(makers: dict[str, Maker], runs: int,
                 between: Callable[[], Any] | None = None) -> dict[str, list[float]]:
    """Start and stop one kernel of each case in turn, ``runs`` times (interleaved, so
    that a machine that slows down or speeds up meanwhile affects every case alike)."""
    times: dict[str, list[float]] = {name: [] for name in makers}
    for _ in range(runs):
        for name, make in makers.items():
            if between is not None:
                between()
            km = make()
            kc, dt = await first_reply(km)
            times[name].append(dt)
            await stop(km, kc)
    return times


async def open_kernels(makers: dict[str, Maker]) -> dict[str, tuple[AsyncKernelManager, Any]]:
    out = {}
    for name, make in makers.items():
        km = make()
        kc, _ = await first_reply(km)
        await settle(kc)
        out[name] = (km, kc)
    return out


async def round_trips(makers: dict[str, Maker], kernels: int,
                      per_kernel: int) -> dict[str, list[float]]:
    """``1+1`` on one kernel of each case at once, alternating one cell per case."""
    times: dict[str, list[float]] = {name: [] for name in makers}
    for _ in range(kernels):
        open_ = await open_kernels(makers)
        try:
            for _ in range(per_kernel):
                for name, (_, kc) in open_.items():
                    t = time.perf_counter()
                    await until_idle(kc, kc.execute("1+1"))
                    times[name].append(time.perf_counter() - t)
        finally:
            for km, kc in open_.values():
                await stop(km, kc)
    return times


async def prints(makers: dict[str, Maker], runs: int,
                 mb: int) -> tuple[dict[str, list[float]], dict[str, int]]:
    """``print('x' * N)`` on one kernel of each case, alternating."""
    times: dict[str, list[float]] = {name: [] for name in makers}
    shown: dict[str, int] = {}
    open_ = await open_kernels(makers)
    try:
        for _ in range(runs):
            for name, (_, kc) in open_.items():
                t = time.perf_counter()
                shown[name] = await until_idle(
                    kc, kc.execute(f"print('x' * {mb * 1000 * 1000})"))
                times[name].append(time.perf_counter() - t)
    finally:
        for km, kc in open_.values():
            await stop(km, kc)
    return times, shown


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def descendants(pid: int) -> list[int]:
    out, i = [pid], 0
    while i < len(out):
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{out[i]}/task"):
                with open(f"/proc/{out[i]}/task/{task}/children") as f:
                    out += [int(c) for c in f.read().split()]
        i += 1
    return out


def spawner_pid() -> int | None:
    from cellblock.warden.client import SpawnerClient

    proc = SpawnerClient.instance()._proc
    return proc.pid if proc is not None and proc.poll() is None else None


async def memory(make: Callable[[], AsyncKernelManager], n: int, sandboxed: bool,
                 idle_s: float) -> dict[str, Any]:
    kernels = []
    try:
        for _ in range(n):
            km = make()
            kc, _ = await first_reply(km)
            await settle(kc)
            kernels.append((km, kc))
        await asyncio.sleep(idle_s)  # idle: let every process reach its resting size
        pids = [p for km, _ in kernels for p in descendants(km.provisioner.process.pid)]
        total = sum(pss_kib(p) for p in pids)
        parts = {"processes": len(pids)}
        if sandboxed:
            spawner = spawner_pid()
            shared = pss_kib(spawner) if spawner else 0
            total += shared
            parts["spawner_kib"] = shared
        per = total / n / 1024
        return {"mem_mib": per, "mem_detail": parts}
    finally:
        for km, kc in kernels:
            await stop(km, kc)


async def capacity(target: int, step: int) -> dict[str, Any]:
    """Start idle agent kernels up to ``target``; after each ``step``, every kernel must
    answer kernel_info within a second. Returns the largest count that held."""
    kernels: list[tuple[AsyncKernelManager, Any]] = []
    held, worst, last_ok = 0, 0.0, []
    try:
        while len(kernels) < target:
            for _ in range(min(step, target - len(kernels))):
                km = sandbox("agent")
                kc, _ = await first_reply(km)
                kernels.append((km, kc))
            await asyncio.sleep(2)
            lat = []
            for _, kc in kernels:
                t = time.perf_counter()
                msg_id = kc.kernel_info()
                try:
                    while (await kc.get_shell_msg(timeout=1.0))["parent_header"].get(
                            "msg_id") != msg_id:
                        pass
                    lat.append(time.perf_counter() - t)
                except Exception:
                    lat.append(float("inf"))
            if max(lat) > 1.0:
                break
            held, worst, last_ok = len(kernels), max(lat), lat
            print(f"  {held} kernels: every one answered, slowest {worst * 1e3:.0f} ms",
                  file=sys.stderr, flush=True)
    finally:
        for km, kc in kernels:
            with contextlib.suppress(Exception):
                await stop(km, kc)
    return {"capacity": held, "capacity_worst_ms": worst * 1e3,
            "capacity_median_ms": statistics.median(last_ok) * 1e3 if last_ok else None}


def warm_policy(size: int) -> Path:
    from cellblock.policy import find_policy_file

    base = find_policy_file()
    text = base.read_text() if base is not None else ""
    path = Path(tempfile.mkdtemp(prefix="cellblock-bench-")) / "policy.toml"
    path.write_text(text + f"\n[profiles.agent]\nwarm_pool = {size}\n" if "[profiles.agent]"
                    not in text else text.replace("[profiles.agent]",
                                                  f"[profiles.agent]\nwarm_pool = {size}", 1))
    return path


# -- the run ------------------------------------------------------------------------------

async def run(args: argparse.Namespace) -> dict[str, Any]:
    zmq.Context.instance().set(zmq.MAX_SOCKETS, 65536)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    q = args.quick
    results: dict[str, dict[str, Any]] = {}
    makers: dict[str, tuple[Maker, bool]] = {
        "plain": (plain, False),
        "plain-nodbg": (lambda: plain(nodbg=True), False),
        "agent": (lambda: sandbox("agent"), True),
        "analyst": (lambda: sandbox("analyst"), True),
    }
    only = set(args.only.split(",")) if args.only else None
    for name in makers:  # the table's order
        if not only or name in only:
            results[name] = {}

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    # The spawner's start belongs to a process's first kernel: measured once, apart.
    say("first cellblock start in this process (starts the spawner)...")
    first = await starts({"agent": makers["agent"][0]}, 1)
    results.setdefault("agent", {})["first_start_s"] = first["agent"][0]
    chosen = {n: m for n, (m, _) in makers.items() if not only or n in only}
    if chosen:
        say(f"starts: {', '.join(chosen)}, interleaved")
        for name, ts in (await starts(chosen, 3 if q else args.runs)).items():
            results.setdefault(name, {}).update(start_s=statistics.median(ts), start_all_s=ts)
        say("1+1 round trips, interleaved")
        for name, ts in (await round_trips(chosen, 1 if q else 3, 50 if q else 200)).items():
            results[name]["rt_ms"] = statistics.median(ts) * 1e3
        say(f"print {args.mb} MB, interleaved")
        times, shown = await prints(chosen, 1 if q else 5, args.mb)
        for name, ts in times.items():
            results[name].update(print_s=statistics.median(ts),
                                 print_chars_received=shown[name])
    for name, (make, sandboxed) in makers.items():
        if name in chosen:
            n = 4 if q else args.kernels
            say(f"{name}: memory with {n} idle kernels")
            results[name].update(await memory(make, n, sandboxed, 3 if q else 10))

    if not only or "agent-warm" in only:
        from cellblock.warden.client import warm

        size = 2
        policy = warm_policy(size)
        os.environ["CELLBLOCK_POLICY"] = str(policy)
        try:
            say("agent-warm: starts from the warm pool")
            warm("agent", timeout=120)
            ts = (await starts({"agent-warm": makers["agent"][0]}, 5 if q else args.runs,
                               between=lambda: warm("agent", timeout=120)))["agent-warm"]
            results["agent-warm"] = {"start_s": statistics.median(ts), "start_all_s": ts}
            warm("agent", size=0)
        finally:  # the operator file made for this case goes, whatever happened
            del os.environ["CELLBLOCK_POLICY"]
            shutil.rmtree(policy.parent, ignore_errors=True)

    if args.capacity and (not only or "capacity" in only):
        say(f"capacity: up to {args.capacity} idle agent kernels")
        results.setdefault("agent", {}).update(await capacity(args.capacity, 25))

    if not only or "scan" in only:
        say("scan: the gate's output scanning")
        results["scan"] = scan(quick=q)
    return results


def scan(quick: bool) -> dict[str, Any]:
    """The gate's output scanning on the notebook corpus (benchmarks/bench_redact.py):
    MB/s of text per core, end to end through the output filter and scanning alone."""
    import bench_redact

    r = bench_redact.measure(mb=2 if quick else 20, runs=1 if quick else 5, legacy=False,
                             pathological=False, profiles=("analyst", "agent"))
    out: dict[str, Any] = {}
    for name, row in r["notebook"].items():
        out[f"{name} gate end to end"] = row["gate_mb_s"]
        out[f"{name} gate scanning"] = row["gate_scanning_mb_s"]
    return out


def table(results: dict[str, dict[str, Any]], mb: int) -> str:
    base = results.get("plain", {})
    like = results.get("plain-nodbg", {})
    cols = [("start_s", "start (s)", ".3f"), ("rt_ms", "1+1 (ms)", ".2f"),
            ("print_s", f"print {mb} MB (s)", ".3f"), ("mem_mib", "idle MiB/kernel", ".1f")]
    lines = [f"{'':14}" + "".join(f"{title:>22}" for _, title, _ in cols)]
    for name, r in results.items():
        if name == "scan":
            continue
        cells = []
        for key, _, fmt in cols:
            if key not in r:
                cells.append(f"{'':>22}")
                continue
            ratio = f" ({r[key] / base[key]:.2f}x)" if base.get(key) else ""
            cells.append(f"{format(r[key], fmt) + ratio:>22}")
        lines.append(f"{name:14}" + "".join(cells))
    lines.append("")
    lines.append("ratios are to 'plain' (ipykernel as users get it); against 'plain-nodbg' "
                 "(the same kernel without debugpy, like cellblock's):")
    for name in ("agent", "analyst", "agent-warm"):
        r = results.get(name, {})
        parts = [f"{key.split('_')[0]} {r[key] / like[key]:.2f}x" for key, _, _ in cols
                 if key in r and like.get(key)]
        if parts:
            lines.append(f"  {name}: " + ", ".join(parts))
    warm = results.get("agent-warm", {}).get("start_s")
    if warm and base.get("start_s"):
        lines.append(f"warm-pool start: {warm * 1e3:.1f} ms = {warm / base['start_s']:.3f}x of a "
                     "plain cold start")
    first = results.get("agent", {}).get("first_start_s")
    if first:
        lines.append(f"first cellblock start in a process (spawner included): {first:.3f} s")
    agent = results.get("agent", {})
    if "capacity" in agent:
        lines.append(f"capacity: {agent['capacity']} idle agent kernels, each answering "
                     f"kernel_info within a second (slowest {agent['capacity_worst_ms']:.0f} ms)")
    for name, rate in results.get("scan", {}).items():
        lines.append(f"scan, {name}: {rate:.0f} MB/s of text per core (notebook corpus)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=9, help="kernel starts per case")
    ap.add_argument("--mb", type=int, default=50)
    ap.add_argument("--kernels", type=int, default=20, help="kernels for the memory figure")
    ap.add_argument("--capacity", type=int, default=0, help="try holding this many kernels")
    ap.add_argument("--only", help="comma-separated cases: plain,plain-nodbg,agent,analyst,"
                    "agent-warm,capacity,scan")
    ap.add_argument("--quick", action="store_true", help="few runs, for a smoke test")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    results = asyncio.run(run(args))
    print(table(results, args.mb))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                        "python": platform.python_version()},
            "args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
