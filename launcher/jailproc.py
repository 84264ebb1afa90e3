"""The jail's first process, named for sure from the host.

Who calls it: the warden's file service (:mod:`cellblock.files.outbox`: the jail's root)
and its network sink (:mod:`cellblock.egress.sink`: the jail's namespaces). Both need a
handle on a process inside the jail that cannot be a recycled pid or a process the jail
chose, so:

- the jail is found from nsjail, the warden's own child: nsjail's one child is the jail's
  first process;
- that process's ``/proc/<pid>`` directory is opened (a pinned handle: a recycled pid makes
  later lookups beneath it fail, never point elsewhere), and its parent is checked to be
  nsjail;
- nsjail's pidfd (taken while it was surely the warden's unreaped child) is checked to be
  alive, so the pid read as the parent was not reused.
"""

from __future__ import annotations

import os
import signal

__all__ = ["jail_proc_dir"]


def jail_proc_dir(nsjail_pid: int, nsjail_pidfd: int) -> int | None:
    """An O_PATH descriptor of ``/proc/<pid>`` of nsjail ``nsjail_pid``'s jail (the caller
    closes it), or None when that jail is not running."""
    try:
        with open(f"/proc/{nsjail_pid}/task/{nsjail_pid}/children", encoding="ascii") as f:
            children = f.read().split()
    except OSError:
        return None
    if len(children) != 1 or not children[0].isdigit():
        return None
    try:
        proc = os.open(f"/proc/{children[0]}", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fd = os.open("stat", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc)
        try:
            raw = os.read(fd, 4096)
        finally:
            os.close(fd)
        ppid = int(raw[raw.rindex(b")") + 2:].split()[1])  # field 4 of stat(5)
        # nsjail alive now means its pid was not reused, so the parent read above was it
        signal.pidfd_send_signal(nsjail_pidfd, 0)
    except (OSError, ValueError, IndexError):
        os.close(proc)
        return None
    if ppid != nsjail_pid:
        os.close(proc)
        return None
    return proc
