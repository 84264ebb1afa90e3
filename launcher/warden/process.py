"""What a cellblock host process does to itself: its name in ``ps``, the signals that
stop it, dying with its parent, and the cap on its address space.

Who calls it: the spawner (titles, the stop signals it blocks across ``fork()``), a forked
warden's life (:mod:`cellblock.warden.life`) and the jail process (``PR_SET_PDEATHSIG``
between fork and exec of nsjail).
"""

from __future__ import annotations

import ctypes
import resource
import signal
from pathlib import Path

__all__ = ["STOP_SIGNALS", "cap_address_space", "set_pdeathsig", "set_title"]

STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1}
PR_SET_PDEATHSIG = 1

# Loaded at import (in the spawner, before any fork): the call between fork and exec of
# nsjail must never run the dynamic loader, since the gate's threads run by then.
_LIBC = ctypes.CDLL(None, use_errno=True)


def set_pdeathsig(sig: int) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent thread dies."""
    if _LIBC.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def cap_address_space(limit: int) -> None:
    """Cap this process's address space (RLIMIT_AS, soft; nsjail sets the jail's own).

    A warden's cap is the profile's ``warden_memory``, the same figure as its cgroup's
    memory limit: resident memory cannot pass the address space, so a flood that makes
    libzmq allocate (one multipart of many big frames) fails that allocation and libzmq
    drops the connection, instead of the cgroup's OOM killer ending the warden without a
    word."""
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    soft = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def set_title(title: bytes) -> None:
    """Show ``title`` as this process's command line in ``ps`` (best effort).

    A forked warden would otherwise show the spawner's command line. The title is written
    over the original argv area (as setproctitle does), so it is at most that long: the
    client starts the spawner with room to spare (see :mod:`cellblock.warden.client`)."""
    try:
        fields = Path("/proc/self/stat").read_bytes().rsplit(b")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end (stat 48, 49)
        text = title[: end - start - 1]
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(start)
            mem.write(text + b"\0" * (end - start - len(text)))
        comm = title.split(b" ", 1)[0][:15]
        Path("/proc/self/comm").write_bytes(comm)
    except (OSError, ValueError, IndexError):
        pass
