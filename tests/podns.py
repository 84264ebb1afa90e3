"""Run a command in a new user namespace that maps only ids 0-65535 (each to the same host
id), as a Kubernetes pod with ``hostUsers: false`` or ``podman run --uidmap 0:N:65536``
sees it. Root only (writing a multi-id map needs CAP_SETUID on the host).

    python tests/podns.py COMMAND [ARG ...]

Exits with the command's status.
"""

from __future__ import annotations

import ctypes
import os
import sys

CLONE_NEWUSER = 0x10000000
COUNT = 65536


def main(argv: list[str]) -> int:
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        os.close(go_w)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWUSER) != 0:
            os.write(2, f"unshare: errno {ctypes.get_errno()}\n".encode())
            os._exit(125)
        os.write(ready_w, b"1")
        if os.read(go_r, 1) != b"1":
            os._exit(125)
        os.execvp(argv[0], argv)
    os.close(ready_w)
    os.close(go_r)
    if os.read(ready_r, 1) == b"1":
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(f"0 0 {COUNT}\n")
        os.write(go_w, b"1")
    os.close(go_w)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
