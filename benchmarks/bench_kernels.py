"""cellblock against a plain ipykernel, side by side in one run.

    python benchmarks/bench_kernels.py [--runs N] [--mb 50] [--json out.json]

Measures, for a plain local ipykernel (the venv's ``python3`` kernelspec, tcp) and
for cellblock kernels (built-in profiles, jailed, behind the gate):

- start: ``start_kernel`` until the first ``kernel_info_reply``;
- ``1+1``: execute round trip, until the reply and the idle status;
- print: ``print('x' * N)`` of ``--mb`` MB, until idle (the analyst profile's output
  policy, redaction on, cuts it to head + marker + tail; the agent's much smaller).

Prints medians and the ratio to plain ipykernel; absolute times vary between
machines, ratios are what we compare. Not a test: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from jupyter_client.manager import AsyncKernelManager

from cellblock.notebook_run import sandbox_kernel_manager


async def drain(kc: Any, msg_id: str) -> int:
    """Wait for the reply and the idle of ``msg_id``; return stream bytes received."""
    got = 0
    idle = replied = False
    while not (idle and replied):
        if not replied:
            try:
                reply = await kc.get_shell_msg(timeout=0.001)
                replied = reply["parent_header"].get("msg_id") == msg_id
            except Exception:  # noqa: BLE001, S110 - queue empty
                pass
        try:
            msg = await kc.get_iopub_msg(timeout=0.05)
        except Exception:  # noqa: BLE001, S112
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            got += len(msg["content"]["text"])
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            idle = True
    return got


async def measure(make_km: Callable[[], AsyncKernelManager], runs: int, mb: int,
                  ) -> dict[str, Any]:
    starts, rts, prints, shown = [], [], [], 0
    for _ in range(runs):
        km = make_km()
        t = time.perf_counter()
        await km.start_kernel()
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=60)
        starts.append(time.perf_counter() - t)
        try:
            for _ in range(20):
                t = time.perf_counter()
                await drain(kc, kc.execute("1+1"))
                rts.append(time.perf_counter() - t)
            t = time.perf_counter()
            shown = await drain(kc, kc.execute(f"print('x' * {mb} * 1000 * 1000)"))
            prints.append(time.perf_counter() - t)
        finally:
            kc.stop_channels()
            await km.shutdown_kernel(now=True)
    return {"start_s": statistics.median(starts), "rt_1p1_ms": statistics.median(rts) * 1e3,
            "print_s": statistics.median(prints), "print_chars_received": shown}


async def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--mb", type=int, default=50)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    cases: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {
        "plain ipykernel": lambda: measure(lambda: AsyncKernelManager(kernel_name="python3"),
                                           args.runs, args.mb),
        "cellblock analyst": lambda: measure(lambda: sandbox_kernel_manager("analyst"),
                                             args.runs, args.mb),
        "cellblock agent": lambda: measure(lambda: sandbox_kernel_manager("agent"),
                                           args.runs, args.mb),
    }
    results = {}
    for name, run in cases.items():
        print(f"measuring {name} ({args.runs} kernels)...", file=sys.stderr, flush=True)
        results[name] = await run()
    base = results["plain ipykernel"]
    print(f"\n{'':22}{'start (s)':>16}{'1+1 (ms)':>16}{f'print {args.mb} MB (s)':>22}"
          f"{'chars received':>16}")
    for name, r in results.items():
        def cell(key: str, fmt: str, r: dict[str, Any] = r) -> str:
            ratio = r[key] / base[key] if base[key] else float("nan")
            return f"{r[key]:{fmt}} ({ratio:.2f}x)"
        print(f"{name:22}{cell('start_s', '.3f'):>16}{cell('rt_1p1_ms', '.2f'):>16}"
              f"{cell('print_s', '.3f'):>22}{r['print_chars_received']:>16,}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": args.runs, "mb": args.mb, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
