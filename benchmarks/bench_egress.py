"""Throughput through the egress proxy: a 100 MB download from a jailed kernel (forwarder,
unix socket, the warden's proxy) against the same download made by the host, in one run.

    python benchmarks/bench_egress.py [--mb 100] [--rounds 3] [--json PATH]

A server on this machine's loopback serves ``/blob/<n>`` (n bytes, written in 1 MiB
chunks); the proxy's resolver is pointed at it with ``$CELLBLOCK_EGRESS_RESOLVER``
(docs/network.md), so the jail reaches it as ``bench.test``, a TEST-NET address routed to
127.0.0.1. Rounds are interleaved (host, jail, host, jail, ...). The jailed download is
timed inside the kernel around ``urllib.request.urlopen(...).read(1 MiB)`` in a loop, the
host's the same way in this process. Also reported: the warden's CPU seconds and its peak
resident memory (VmHWM) over the jailed downloads. Not a test: nothing asserts;
docs/network.md quotes the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import http.server
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

CHUNK = 1 << 20

KERNEL_CELL = """
import time, urllib.request
t0 = time.perf_counter()
n = 0
with urllib.request.urlopen("{url}") as r:
    while chunk := r.read({chunk}):
        n += len(chunk)
print(n, time.perf_counter() - t0)
"""


class Blob(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        size = int(self.path.rsplit("/", 1)[-1])
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        block = b"x" * CHUNK
        while size > 0:
            self.wfile.write(block[:size])
            size -= CHUNK

    def log_message(self, *args: object) -> None:
        pass


def host_download(url: str) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = 0
    with urllib.request.urlopen(url) as r:
        while chunk := r.read(CHUNK):
            n += len(chunk)
    return n, time.perf_counter() - t0


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


async def run(mb: int, rounds: int) -> dict[str, Any]:
    from cellblock.rundir import RunDir, runtime_base
    from cellblock.sandbox import Sandbox

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Blob)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    size = mb * 1_000_000
    top = Path(tempfile.mkdtemp(prefix="cellblock-bench-egress-"))
    (top / "resolver.json").write_text(json.dumps({
        "names": {"bench.test": ["203.0.113.20"]}, "routes": {"203.0.113.20": "127.0.0.1"}}))
    (top / "policy.toml").write_text(
        f'[profiles.bench.network]\nallow = ["bench.test:{port}"]\nmax_bytes = 0\n'
        "[profiles.bench.budgets]\ncell_seconds = 600\n")
    os.environ["CELLBLOCK_EGRESS_RESOLVER"] = str(top / "resolver.json")
    os.environ["CELLBLOCK_POLICY"] = str(top / "policy.toml")
    os.environ.setdefault("CELLBLOCK_AUDIT_DIR", str(top / "audit"))
    host_s: list[float] = []
    jail_s: list[float] = []
    try:
        async with Sandbox("bench") as sb:
            assert sb.kernel_id is not None
            record = RunDir(runtime_base(), sb.kernel_id).read_record()
            assert record is not None
            warden = record.warden_pid
            cpu0 = proc_cpu(warden)
            cell = KERNEL_CELL.format(url=f"http://bench.test:{port}/blob/{size}", chunk=CHUNK)
            for _ in range(rounds):
                n, secs = host_download(f"http://127.0.0.1:{port}/blob/{size}")
                assert n == size
                host_s.append(secs)
                r = await sb.run(cell, timeout=600)
                got, secs_text = r.stdout.split()
                assert int(got) == size, r
                jail_s.append(float(secs_text))
            cpu = proc_cpu(warden) - cpu0
            hwm = proc_hwm_kib(warden)
    finally:
        server.shutdown()
        server.server_close()
        shutil.rmtree(top, ignore_errors=True)
    host_med, jail_med = statistics.median(host_s), statistics.median(jail_s)
    return {
        "bytes": size, "rounds": rounds,
        "host_seconds": host_s, "jail_seconds": jail_s,
        "host_MBps": round(size / host_med / 1e6, 1),
        "jail_MBps": round(size / jail_med / 1e6, 1),
        "ratio_jail_over_host_seconds": round(jail_med / host_med, 2),
        "warden_cpu_seconds_per_100MB": round(cpu / rounds * 100 / mb, 2),
        "warden_peak_rss_MiB": round(hwm / 1024, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    result = asyncio.run(run(args.mb, args.rounds))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
