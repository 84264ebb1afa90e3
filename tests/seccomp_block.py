"""Run a command under a seccomp filter that refuses new namespaces the way a container
runtime's default profile does (unshare and clone with CLONE_NEW* get EPERM, clone3 gets
ENOSYS so libc falls back to clone). x86_64 only.

    python tests/seccomp_block.py COMMAND [ARG ...]
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
AUDIT_ARCH_X86_64 = 0xC000003E
NR_CLONE, NR_UNSHARE, NR_CLONE3 = 56, 272, 435
CLONE_NEW_ANY = 0x7E020000  # NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
LD_ABS, JEQ, JSET, RET = 0x20, 0x15, 0x45, 0x06
ALLOW, ERRNO = 0x7FFF0000, 0x00050000
EPERM, ENOSYS = 1, 38

PROGRAM = [  # (code, jump if true, jump if false, k); jumps are relative to the next one
    (LD_ABS, 0, 0, 4),  # 0: arch
    (JEQ, 0, 6, AUDIT_ARCH_X86_64),  # 1: another arch -> 8 allow
    (LD_ABS, 0, 0, 0),  # 2: syscall number
    (JEQ, 5, 0, NR_UNSHARE),  # 3: -> 9 EPERM
    (JEQ, 5, 0, NR_CLONE3),  # 4: -> 10 ENOSYS
    (JEQ, 0, 2, NR_CLONE),  # 5: not clone -> 8 allow
    (LD_ABS, 0, 0, 16),  # 6: clone's flags (args[0], low 32 bits)
    (JSET, 1, 0, CLONE_NEW_ANY),  # 7: a new namespace -> 9 EPERM
    (RET, 0, 0, ALLOW),  # 8
    (RET, 0, 0, ERRNO | EPERM),  # 9
    (RET, 0, 0, ERRNO | ENOSYS),  # 10
]


def install() -> None:
    code = b"".join(struct.pack("HBBI", *ins) for ins in PROGRAM)
    buf = ctypes.create_string_buffer(code, len(code))
    prog = struct.pack("HxxxxxxP", len(PROGRAM), ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    fprog = ctypes.create_string_buffer(prog, len(prog))
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, fprog, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


if __name__ == "__main__":
    install()
    os.execvp(sys.argv[1], sys.argv[1:])
