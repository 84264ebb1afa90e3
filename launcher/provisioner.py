"""The jupyter_client kernel provisioner: ``cellblock-provisioner``.

A kernelspec names it in ``metadata.kernel_provisioner`` with the profile in its
``config`` stanza (``cellblock install`` writes these). It enforces nothing
itself: it resolves the profile, asks this process's spawner (:mod:`cellblock.warden.client`)
for a warden (which owns the jail and the gate; from the warm pool when the profile keeps
one), and hands jupyter_client the connection info of the gate's client-facing sockets,
so every client talks to the gate and never to the kernel.

Hooks that differ from :class:`~jupyter_client.provisioning.LocalProvisioner`:

- ``pre_launch``: validates the profile (errors surface before anything starts; a
  disabled profile raises :class:`~cellblock.errors.ProfileDisabled`), picks the
  datasets, and lets LocalProvisioner choose the client-facing ports and write the
  client's connection file;
- ``launch_kernel``: asks the spawner for a warden and waits for it to say ``ready`` or
  why not; ``process`` is then a :class:`~cellblock.warden.client.WardenProcess`;
- ``send_signal`` / ``terminate`` / ``kill``: signal the warden only, never the
  process group, since a signal reaching nsjail ends the whole jail. ``kill``
  gives the warden a grace period to clean up before SIGKILL;
- ``cleanup``: removes what a SIGKILLed warden left behind.

Interrupts are messages (``interrupt_mode: "message"`` in the kernelspec), relayed
by the gate, so no SIGINT is ever sent here.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.local_provisioner import LocalProvisioner
from traitlets import Float, Unicode

from .datasets import DATASETS_ENV, select_datasets
from .errors import JailStartError, JailStartTimeout, PolicyError
from .names import check_kernel_id
from .policy import load_policy
from .rundir import sweep_stale
from .warden.client import SpawnerClient
from .warden.request import LaunchRequest

__all__ = ["CellblockProvisioner"]

# jupyter_client closes the kernel manager's control socket with a 100 ms linger; a
# message still queued on it is dropped once this much time has passed.
CONTROL_LINGER = 0.25


def _jsonable(info: Any) -> dict[str, Any]:
    """The connection info as JSON types (jupyter_client keeps the key as bytes)."""
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in dict(info).items()}


class CellblockProvisioner(LocalProvisioner):
    """Starts each kernel inside nsjail behind a per-kernel warden and gate."""

    profile = Unicode(
        "agent",
        help="The cellblock profile (a name in the policy) this kernelspec starts.",
    ).tag(config=True)
    stop_grace = Float(
        5.0,
        help="Seconds the warden gets after SIGTERM to clean up before SIGKILL.",
    ).tag(config=True)
    start_timeout = Float(
        0.0,
        help="Seconds to wait for the warden to be ready; 0 uses the profile's "
        "startup_timeout.",
    ).tag(config=True)

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Called by KernelManager before launch_kernel. Validates the profile, lets
        LocalProvisioner pick and cache the client-facing ports and write the client's
        connection file, then replaces the command with the warden's."""
        check_kernel_id(str(self.kernel_id))  # it becomes a run dir, cgroup and file name
        policy = load_policy()
        profile = policy.startable(self.profile)  # UnknownProfile, ProfileDisabled
        # CELLBLOCK_DATASETS from the kernel's env (jupyter_client and Jupyter Server pass
        # `env`): refused here, before anything starts, if the profile does not allow it.
        # The warden gets the selection in its launch request; the jail's env never has it.
        launch_env = kwargs.get("env")  # jupyter_client's default is os.environ
        launch_env = os.environ if launch_env is None else launch_env
        granted = select_datasets(policy, self.profile, launch_env.get(DATASETS_ENV))
        self._startup_timeout = self.start_timeout or profile.startup_timeout
        km = self.parent
        if km is not None and km.transport != "tcp":
            raise PolicyError(
                f"cellblock needs the client-facing transport 'tcp' (got {km.transport!r}); "
                "jupyter_client deletes ipc socket files on restart"
            )
        kwargs = await super().pre_launch(**kwargs)
        connection_file = km.connection_file if km is not None else ""
        if not connection_file:
            raise PolicyError("cellblock needs a KernelManager with a connection file")
        self._granted = granted
        # What a tool that ignores provisioners would run: not a kernel (kernelspec argv).
        kwargs["cmd"] = ["cellblock-warden", "--kernel-id", str(self.kernel_id),
                         "--profile", self.profile]
        return kwargs

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        """Called by KernelManager after pre_launch. Asks the spawner for a warden and waits
        until it reports ready; raises JailStartError with the warden's reason otherwise."""
        env = kwargs.get("env")
        request = LaunchRequest(
            kernel_id=str(self.kernel_id), profile=self.profile,
            client_conn=_jsonable(self.connection_info), datasets=self._granted,
            env={str(k): str(v) for k, v in (os.environ if env is None else env).items()},
        )
        process, status = await SpawnerClient.instance().launch(request,
                                                                self._startup_timeout)
        if process is None:
            if "exit" in status:
                raise JailStartError(
                    f"cellblock kernel {self.kernel_id} (profile {self.profile!r}): the warden "
                    f"exited with status {status['exit']} before reporting; see its log above"
                )
            if not status.get("error"):
                raise JailStartTimeout(
                    f"cellblock kernel {self.kernel_id} (profile {self.profile!r}) did not "
                    f"report ready within {self._startup_timeout:.0f} s"
                )
            raise JailStartError(
                f"cellblock kernel {self.kernel_id} (profile {self.profile!r}) failed to "
                f"start: {status.get('error')}"
            )
        # LocalProvisioner annotates .process as a Popen; it only uses what WardenProcess
        # has (poll, wait, send_signal, kill, terminate, pid, the std streams).
        self.process = process  # type: ignore[assignment]
        self.pid = process.pid
        self.pgid = None  # never signal a group: the warden has its own session
        self.cwd = kwargs.get("cwd", os.getcwd())
        return self.connection_info

    async def send_signal(self, signum: int) -> None:
        """Signal the warden only. SIGINT is refused: interrupts are messages, and a
        SIGINT reaching nsjail would end the whole jail."""
        if signum == signal.SIGINT:
            self.log.warning("cellblock: not sending SIGINT; interrupts are messages")
            return
        if self.process is not None:
            try:
                self.process.send_signal(signum)
            except ProcessLookupError:
                pass

    async def terminate(self, restart: bool = False) -> None:
        """Ask the warden to stop the jail and clean up (SIGTERM)."""
        await self.send_signal(signal.SIGTERM)

    async def kill(self, restart: bool = False) -> None:
        """Stop the warden: SIGTERM, then SIGKILL after ``stop_grace`` seconds."""
        await self._stop_warden()

    async def _stop_warden(self) -> None:
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        await self.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)  # poll the condition; the warden exits when clean
        if proc.poll() is None:
            await self.send_signal(signal.SIGKILL)
            await asyncio.get_running_loop().run_in_executor(None, proc.wait)

    async def shutdown_requested(self, restart: bool = False) -> None:
        """Called by KernelManager right after it sent ``shutdown_request`` on its control
        socket. If the warden was already gone, no gate took that message: jupyter_client
        keeps it queued for the socket's linger (100 ms) after closing it, and a restart
        whose new gate binds the same port within that time (an adoption from the warm
        pool takes ~50 ms) delivers it to the new kernel, which then shuts down before
        it is ever used. :meth:`cleanup` waits that linger out (also when the warden
        ended otherwise than by that request: its gate may have closed first)."""
        proc = self.process
        self._shutdown_of = proc  # the warden that request was meant for
        self._unheard_shutdown = proc is None or proc.poll() is not None
        await super().shutdown_requested(restart=restart)

    async def cleanup(self, restart: bool = False) -> None:
        """Called by KernelManager after the kernel stopped: remove anything a warden
        that was SIGKILLed could not, then let LocalProvisioner return the ports. Before a
        restart whose ``shutdown_request`` reached nobody, wait until jupyter_client has
        dropped it (see :meth:`shutdown_requested`)."""
        sweep_stale()
        asked = getattr(self, "_shutdown_of", None)
        ended_badly = asked is not None and asked.poll() not in (0, None)  # not by request
        if restart and (getattr(self, "_unheard_shutdown", False) or ended_badly):
            await asyncio.sleep(CONTROL_LINGER)  # outlasts the closed socket's linger
        await super().cleanup(restart=restart)
