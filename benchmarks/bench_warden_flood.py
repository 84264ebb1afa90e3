"""What a hostile kernel can make its warden spend: peak memory and CPU under floods.

    python benchmarks/bench_warden_flood.py [--profile agent] [--json PATH]

Each case starts a fresh jailed kernel, runs one attack cell from inside the jail, and
samples the warden process (the host process that runs the kernel's gate) every 10 ms:
peak resident memory (VmHWM, reset before the attack) and the CPU seconds it used
(utime + stime) over the attack window. The client reads nothing meanwhile, as a slow or
busy client would not. Not a test: nothing asserts; docs/threat-model.md quotes the
numbers and the policy bound that holds them (``limits.warden_memory``/``warden_cpus``).

Cases
    status-flood   a thread publishes 40 ``status: busy`` messages of 20 MB each
    meta-flood     40 display_data messages with 20 MB of metadata each
    multipart      one multipart of 128 x 32 MiB frames (THREATS R10)
    symlink-storm  the stdin socket's path replaced by a symlink to ../control.sock, and the
                   kernel's stdin socket closed (issue 12 finding 2; refused since the ipc
                   dir is read-only in the jail)
    connect-storm  2,000 unix-socket connections to the warden's stdin socket
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from jupyter_client.manager import AsyncKernelManager

SETUP = """
from ipykernel.kernelapp import IPKernelApp
_k = IPKernelApp.instance().kernel
"""

CASES = {
    "status-flood": SETUP + """
pad = "x" * (20 << 20)
for _ in range(40):
    _k.session.send(_k.iopub_socket, "status", {"execution_state": "busy", "pad": pad},
                    parent=_k.get_parent())
print("flooded")
""",
    "meta-flood": SETUP + """
pad = "x" * (20 << 20)
for _ in range(40):
    _k.session.send(_k.iopub_socket, "display_data",
                    {"data": {"text/plain": "1"}, "metadata": {"pad": pad}},
                    metadata={"pad": pad}, parent=_k.get_parent())
print("flooded")
""",
    "multipart": """
import zmq
sock = get_ipython().kernel.iopub_thread.socket
frame = zmq.Frame(b"x" * (32 << 20))
sock.send_multipart([b"stream"] + [frame] * 128, copy=False)
print("sent")
""",
    "symlink-storm": """
import os
from ipykernel.kernelapp import IPKernelApp
app = IPKernelApp.instance()
try:  # the first version's ipc dir was the jail's: point stdin's path at the control socket
    os.unlink("/run/cellblock/k-3")
    os.symlink("../control.sock", "/run/cellblock/k-3")
    app.stdin_socket.close(linger=0)  # the gate reconnects by path
    print("planted")
except OSError as exc:
    print("refused:", exc)
""",
    "connect-storm": """
import socket
n = 0
for _ in range(2000):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect("/run/cellblock/k-3")
        n += 1
    except OSError:
        pass
    finally:
        s.close()
print("connected", n)
""",
}


def sample(pid: int) -> tuple[int, float]:
    """(VmHWM bytes, CPU seconds) of ``pid``, or (0, 0) once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0, 0.0
    hwm = next(int(line.split()[1]) * 1024 for line in status.splitlines()
               if line.startswith("VmHWM:"))
    ticks = os.sysconf("SC_CLK_TCK")
    return hwm, (int(stat[11]) + int(stat[12])) / ticks


async def run_case(profile: str, name: str, window: float) -> dict[str, Any]:
    km = AsyncKernelManager(kernel_name=f"cellblock-{profile}")
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        warden = km.provisioner.process.pid
        with open(f"/proc/{warden}/clear_refs", "w") as refs:
            refs.write("5")  # VmHWM := VmRSS now
        _, cpu0 = sample(warden)
        peak, cpu = 0, cpu0
        kc.execute(CASES[name])
        start = time.monotonic()
        while time.monotonic() - start < window:
            hwm, used = sample(warden)
            if hwm == 0:
                break  # the warden stopped its kernel and exited
            peak, cpu = max(peak, hwm), used
            await asyncio.sleep(0.01)  # the sampling interval
        stopped = sample(warden)[0] == 0
        return {"case": name, "peak_mib": round(peak / 2**20, 1),
                "cpu_s": round(cpu - cpu0, 2), "window_s": window, "warden_stopped": stopped}
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="agent")
    ap.add_argument("--window", type=float, default=10.0, help="seconds sampled per case")
    ap.add_argument("--only", help="comma-separated cases")
    ap.add_argument("--json")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(CASES)
    results = []
    for name in names:
        result = await run_case(args.profile, name, args.window)
        print(f"{name:14} warden peak {result['peak_mib']:8.1f} MiB   CPU {result['cpu_s']:6.2f} s"
              f" in {args.window:.0f} s   stopped the kernel: {result['warden_stopped']}",
              flush=True)
        results.append(result)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
