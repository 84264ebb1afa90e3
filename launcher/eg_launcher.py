"""``cellblock-eg-launcher``: a jailed kernel per pod for Jupyter Enterprise Gateway and
gateway_provisioners.

The gateway runs this in the kernel's pod or container (the image's command, or a
kernelspec's argv for a host); it speaks the launcher protocol of
:mod:`cellblock.eg_protocol` and starts one cellblock kernel: a warden, its gate and
nsjail, exactly as the provisioner does on a host. Then:

- the gate's five client-facing sockets are bound on ``--ip`` (default all addresses of
  the pod) on ports from ``--port-range``; the gateway connects to them, so every
  message passes the gate; the kernel itself stays on ipc sockets inside the jail;
- the connection info goes to the response address, encrypted for the server's key;
- the comm port takes the server's requests: ``signum`` 0 (a poll) is answered by being
  there; SIGINT becomes an ``interrupt_request`` through the gate (interrupts are messages:
  a signal reaching nsjail would end the jail); SIGTERM, SIGKILL, SIGHUP, SIGQUIT and
  ``shutdown`` stop the kernel and end the launcher; any other signal is logged and
  ignored;
- the launcher ends when its kernel ends (a ``shutdown_request``, the kernel dying, the
  budget stopping it), so the container or pod ends with it.

**The profile decides, not the request.** The profile is ``--profile`` (else
``$CELLBLOCK_PROFILE``, else ``agent``), set by the image or the pod template. The
gateway's ``KERNEL_*`` values (``KERNEL_MEMORY``, ``KERNEL_UID``, ...) and the protocol's
variables never reach the warden's environment, and limits, budgets and output rules are
the profile's. In a container whose cgroup fs is read-only (the image's policy sets
``cgroups = "off"``) the pod's own limits bind the kernel: size them with
``--pod-resources PROFILE``, which prints the profile's kernel plus warden limits.

Exit status: 0 the kernel ended, 1 it failed to start, 2 bad arguments (named).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from .eg_protocol import MAX_REQUEST, LaunchArgs, PortRange, encrypt_payload, parse_request
from .errors import CellblockError, PolicyError

__all__ = ["main", "pod_resources"]

log = logging.getLogger("cellblock.eg_launcher")

#: the launcher's own arguments and the protocol's variables: never the warden's env
_DROPPED_ENV = ("KERNEL_", "RESPONSE_ADDRESS", "PUBLIC_KEY", "PORT_RANGE", "EG_", "GP_")
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGKILL, signal.SIGHUP, signal.SIGQUIT}
_PORT_TRIES = 50


def pod_resources(profile_name: str) -> dict[str, Any]:
    """What a pod running one kernel of the profile needs as its limits: the kernel's
    memory, CPUs and pids plus its warden's (the gate, the broker, this launcher)."""
    from .policy import load_policy

    lim = load_policy().profile(profile_name).limits
    return {"memory": lim.memory + lim.warden_memory, "cpus": lim.cpus + lim.warden_cpus,
            "pids": lim.pids + 64,  # the warden's threads, the launcher, nsjail
            "memory_mib": (lim.memory + lim.warden_memory) // 2**20}


def _pick_ports(ip: str, ports: PortRange, count: int) -> list[int]:
    """``count`` distinct ports free on ``ip`` now, in the range if one is set."""
    chosen: list[int] = []
    for _ in range(_PORT_TRIES * count):
        if len(chosen) == count:
            break
        want = 0 if ports.any else random.randint(ports.low, ports.high)  # noqa: S311
        with socket.socket() as s:
            try:
                s.bind((ip, want))
            except OSError:
                continue
            port = int(s.getsockname()[1])
        if port not in chosen:
            chosen.append(port)
    if len(chosen) < count:
        raise CellblockError(f"no {count} free ports on {ip} in {ports.low}..{ports.high}")
    return chosen


def _warden_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(_DROPPED_ENV)}


class Launcher:
    """One kernel, its comm port and its answer to the server."""

    def __init__(self, args: LaunchArgs, profile: str, ip: str) -> None:
        self.args = args
        self.profile = profile
        self.ip = ip
        self.km: Any = None
        self.stop = asyncio.Event()
        self._tmp = Path(tempfile.mkdtemp(prefix="cellblock-eg-"))

    async def start(self) -> None:
        from jupyter_client.kernelspec import KernelSpecManager
        from jupyter_client.manager import AsyncKernelManager

        from .kernelspec import kernel_name, write_kernelspec
        from .policy import load_policy

        profile = load_policy().startable(self.profile)  # UnknownProfile, ProfileDisabled
        write_kernelspec(self._tmp / "kernels" / kernel_name(self.profile), self.profile,
                         profile)
        ports = _pick_ports(self.ip, self.args.port_range, 5)
        self.km = AsyncKernelManager(
            kernel_name=kernel_name(self.profile), ip=self.ip, cache_ports=False,
            kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(self._tmp / "kernels")]),
            connection_file=str(self._tmp / f"kernel-{self.args.kernel_id}.json"),
            shell_port=ports[0], iopub_port=ports[1], stdin_port=ports[2], hb_port=ports[3],
            control_port=ports[4])
        await self.km.start_kernel(kernel_id=self.args.kernel_id, env=_warden_env())

    async def serve(self) -> int:
        """Answer the server, take its requests until the kernel ends or it says stop."""
        (comm_port,) = _pick_ports(self.ip, self.args.port_range, 1)
        server = await asyncio.start_server(self._request, self.ip, comm_port)
        try:
            info = {k: v.decode() if isinstance(v, bytes) else v
                    for k, v in self.km.get_connection_info().items()}
            info.update(kernel_id=self.args.kernel_id, comm_port=comm_port,
                        pid=os.getpid(), pgid=os.getpgid(0))
            await self._respond(info)
            ended = asyncio.ensure_future(self.km.provisioner.wait())
            stop = asyncio.ensure_future(self.stop.wait())
            await asyncio.wait({ended, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if not ended.done():
                log.info("cellblock-eg-launcher: stopping kernel %s", self.args.kernel_id)
                await self.km.shutdown_kernel(now=False)
                ended.cancel()
            else:
                log.info("cellblock-eg-launcher: kernel %s ended", self.args.kernel_id)
                await self.km.cleanup_resources()
        finally:
            server.close()
            await server.wait_closed()
        return 0

    async def _respond(self, info: dict[str, Any]) -> None:
        host, port = self.args.response_address
        payload = encrypt_payload(info, self.args.public_key)
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
        writer.write(payload)
        await writer.drain()
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        log.info("cellblock-eg-launcher: kernel %s: connection info sent to %s:%d "
                 "(ports %s, comm %d)", self.args.kernel_id, host, port,
                 [info[f"{c}_port"] for c in ("shell", "iopub", "stdin", "hb", "control")],
                 info["comm_port"])

    async def _request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            data = await asyncio.wait_for(reader.read(MAX_REQUEST + 1), 10)
            while len(data) <= MAX_REQUEST:
                more = await asyncio.wait_for(reader.read(MAX_REQUEST + 1 - len(data)), 10)
                if not more:
                    break
                data += more
            signum, shutdown = parse_request(data)
        except (ValueError, TimeoutError, OSError) as e:
            log.warning("cellblock-eg-launcher: comm request refused: %s",
                        type(e).__name__ if not isinstance(e, ValueError) else e)
            signum, shutdown = None, False
        finally:
            writer.close()
        if signum == signal.SIGINT:
            log.info("cellblock-eg-launcher: SIGINT: interrupt_request through the gate")
            await self.km.interrupt_kernel()
        elif signum in _STOP_SIGNALS or shutdown:
            log.info("cellblock-eg-launcher: %s: stopping", "shutdown" if shutdown
                     else signal.Signals(signum or 0).name)
            self.stop.set()
        elif signum:
            log.info("cellblock-eg-launcher: signal %d ignored (not sent into the jail)",
                     signum)

    def close(self) -> None:
        import shutil

        shutil.rmtree(self._tmp, ignore_errors=True)


async def _run(args: LaunchArgs, profile: str, ip: str) -> int:
    launcher = Launcher(args, profile, ip)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # the pod stopping
        loop.add_signal_handler(sig, launcher.stop.set)
    try:
        try:
            await launcher.start()
        except CellblockError as e:
            print(f"cellblock-eg-launcher: kernel {args.kernel_id} did not start: {e}",
                  file=sys.stderr)
            return 1
        return await launcher.serve()
    finally:
        if launcher.km is not None and await launcher.km.is_alive():
            await launcher.km.shutdown_kernel(now=False)
        launcher.close()


def _parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="cellblock-eg-launcher",
        description="Start one jailed cellblock kernel for Jupyter Enterprise Gateway or "
        "gateway_provisioners (the remote launcher protocol).")
    p.add_argument("--kernel-id", default=env("KERNEL_ID"))
    p.add_argument("--response-address", default=env("RESPONSE_ADDRESS"), metavar="IP:PORT")
    p.add_argument("--public-key", default=env("PUBLIC_KEY"))
    p.add_argument("--port-range", default=env("PORT_RANGE"), metavar="LOW..HIGH")
    p.add_argument("--profile", default=env("CELLBLOCK_PROFILE") or "agent",
                   help="the cellblock profile (default $CELLBLOCK_PROFILE, else agent)")
    p.add_argument("--ip", default="0.0.0.0",  # noqa: S104  (the pod's addresses)
                   help="address the gate's client-facing sockets bind (default all)")
    p.add_argument("--pod-resources", metavar="PROFILE",
                   help="print the pod limits one kernel of PROFILE needs (JSON) and exit")
    # Accepted for the gateways' kernelspecs; a cellblock kernel has no Spark context,
    # its class is cellblock's, and its transport is the gate's.
    for ignored in ("--spark-context-initialization-mode", "--cluster-type",
                    "--kernel-class-name", "--transport-encryption"):
        p.add_argument(ignored, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    opts = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)1.1s %(asctime)s %(name)s] "
                        "%(message)s")
    try:
        if opts.pod_resources:
            print(json.dumps(pod_resources(opts.pod_resources)))
            return 0
        if opts.transport_encryption and opts.transport_encryption.lower() == "required":
            raise PolicyError("--transport-encryption required: a cellblock kernel's "
                              "client sockets are the gate's, without CurveZMQ; use a "
                              "NetworkPolicy that lets only the gateway reach the pod")
        args = LaunchArgs.check(opts.kernel_id, opts.response_address, opts.public_key,
                                opts.port_range)
    except CellblockError as e:
        print(f"cellblock-eg-launcher: {e}", file=sys.stderr)
        return 2
    return asyncio.run(_run(args, opts.profile, opts.ip))


if __name__ == "__main__":
    sys.exit(main())
