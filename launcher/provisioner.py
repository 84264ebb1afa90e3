"""The jupyter_client kernel provisioner: ``cellblock-provisioner``.

A kernelspec names it in ``metadata.kernel_provisioner`` with the profile in its
``config`` stanza (``cellblock install`` writes these). It enforces nothing
itself: it resolves the profile, starts one warden per kernel (which owns the
jail and the gate), and hands jupyter_client the connection info of the gate's
client-facing sockets, so every client talks to the gate and never to the kernel.

Hooks that differ from :class:`~jupyter_client.provisioning.LocalProvisioner`:

- ``pre_launch``: validates the profile (errors surface before anything starts; a
  disabled profile raises :class:`~cellblock.errors.ProfileDisabled`)
  and replaces the kernelspec's argv with the warden's command;
- ``launch_kernel``: starts the warden and waits for it to say ``ready`` or why not;
- ``send_signal`` / ``terminate`` / ``kill``: signal the warden only, never the
  process group, since a signal reaching nsjail ends the whole jail. ``kill``
  gives the warden a grace period to clean up before SIGKILL;
- ``cleanup``: removes what a SIGKILLed warden left behind.

Interrupts are messages (``interrupt_mode: "message"`` in the kernelspec), relayed
by the gate, so no SIGINT is ever sent here.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import sys
import time
from typing import Any

from jupyter_client.provisioning import LocalProvisioner
from traitlets import Float, Unicode

from .datasets import DATASETS_ENV, select_datasets
from .errors import JailStartError, JailStartTimeout, PolicyError, ProfileDisabled
from .policy import load_policy
from .rundir import sweep_stale

__all__ = ["CellblockProvisioner"]


def _read_status(fd: int, timeout: float) -> dict[str, Any] | None:
    """Read the warden's one-line status from ``fd``; None on timeout or EOF."""
    deadline = time.monotonic() + timeout
    buf = b""
    try:
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
    finally:
        os.close(fd)
    try:
        line = buf.split(b"\n", 1)[0]
        return json.loads(line) if line else None
    except ValueError:
        return None


class CellblockProvisioner(LocalProvisioner):  # type: ignore[misc]
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
        policy = load_policy()
        profile = policy.profile(self.profile)  # UnknownProfile names the known ones
        if not profile.enabled:
            raise ProfileDisabled(
                f"cellblock profile {self.profile!r} is disabled by the operator (enabled = "
                f"false in [profiles.{self.profile}] of {' + '.join(policy.sources)}); no new "
                "kernel starts on it"
            )
        # CELLBLOCK_DATASETS from the kernel's env (jupyter_client and Jupyter Server pass
        # `env`): refused here, before anything starts, if the profile does not allow it.
        # The warden gets the selection on its command line; the jail's env never has it.
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
        kwargs["cmd"] = [
            sys.executable, "-m", "cellblock.warden",
            "--kernel-id", str(self.kernel_id),
            "--profile", self.profile,
            "--connection-file", connection_file,
            "--parent-pid", str(os.getpid()),
            "--datasets", ",".join(granted),
        ]
        return kwargs

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> dict[str, Any]:
        """Called by KernelManager after pre_launch. Starts the warden and waits until it
        reports ready; raises JailStartError with the warden's reason otherwise."""
        rfd, wfd = os.pipe()
        try:
            kwargs["pass_fds"] = (*kwargs.get("pass_fds", ()), wfd)
            connection_info = await super().launch_kernel([*cmd, "--status-fd", str(wfd)],
                                                          **kwargs)
        except BaseException:
            os.close(rfd)
            raise
        finally:
            os.close(wfd)
        status = await asyncio.get_running_loop().run_in_executor(
            None, _read_status, rfd, self._startup_timeout
        )
        if status is None or not status.get("ok"):
            exited = self.process.poll() if self.process is not None else None
            await self._stop_warden()
            if status is None and exited is not None:
                raise JailStartError(
                    f"cellblock kernel {self.kernel_id} (profile {self.profile!r}): the warden "
                    f"exited with status {exited} before reporting; see its log above"
                )
            if status is None:
                raise JailStartTimeout(
                    f"cellblock kernel {self.kernel_id} (profile {self.profile!r}) did not "
                    f"report ready within {self._startup_timeout:.0f} s"
                )
            raise JailStartError(
                f"cellblock kernel {self.kernel_id} (profile {self.profile!r}) failed to "
                f"start: {status.get('error')}"
            )
        return connection_info  # type: ignore[no-any-return]

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

    async def cleanup(self, restart: bool = False) -> None:
        """Called by KernelManager after the kernel stopped: remove anything a warden
        that was SIGKILLed could not, then let LocalProvisioner return the ports."""
        sweep_stale()
        await super().cleanup(restart=restart)
