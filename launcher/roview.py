"""Read-only views of host directories, and the system calls Python has no wrapper for.

A *view* is a detached bind mount (``open_tree(OPEN_TREE_CLONE | AT_RECURSIVE)``)
of a dataset's directory, made read-only, nosuid, nodev and noexec with
``mount_setattr(AT_RECURSIVE)``. It is an fd, not a path: it appears in no mount
table, needs no cleanup beyond ``close`` (the kernel unmounts a detached tree when
its last reference goes), and a file opened beneath it is on a read-only mount, so
reopening the file through ``/proc/self/fd/N`` for writing fails with EROFS even
when the host file is world-writable (THREATS F12). ``readlink`` of such a file
shows its path relative to the view, not the host path.

Making a view needs CAP_SYS_ADMIN over the caller's mount namespace. Root has it.
An unprivileged warden gets it in a user namespace of its own: a short-lived helper
(``python -m cellblock.roview``) unshares a user and a mount namespace, makes the
view there, and passes the fd back over a socketpair; the warden itself never
changes namespace. (The warden cannot unshare a user namespace itself once it has
threads.)

Files are opened beneath a view with ``openat2`` (syscall 437):
RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
import sys

__all__ = ["SAFE_OPEN_FLAGS", "move_mount_to", "openat2_beneath", "readonly_view"]

SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_OPENAT2 = 437
SYS_MOUNT_SETATTR = 442
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_ALL = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
# What the broker opens with; the client never chooses (THREATS B10, B11, B14).
SAFE_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
HELPER_TIMEOUT = 10.0

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def openat2_beneath(dirfd: int, relative: str, flags: int = SAFE_OPEN_FLAGS,
                    resolve: int = RESOLVE_ALL) -> int:
    """Open ``relative`` beneath ``dirfd`` with every RESOLVE_ restriction (or ``resolve``);
    return the fd."""
    how = _OpenHow(flags, 0, resolve)
    return _check(_libc.syscall(SYS_OPENAT2, dirfd, os.fsencode(relative), ctypes.byref(how),
                                ctypes.sizeof(how)), "openat2")


def _view_here(path: str) -> int:
    fd = _check(_libc.syscall(SYS_OPEN_TREE, AT_FDCWD, os.fsencode(path),
                              OPEN_TREE_CLONE | AT_RECURSIVE | os.O_CLOEXEC), "open_tree")
    attr = _MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
                      | MOUNT_ATTR_NOEXEC, 0, 0, 0)
    try:
        _check(_libc.syscall(SYS_MOUNT_SETATTR, fd, b"", AT_EMPTY_PATH | AT_RECURSIVE,
                             ctypes.byref(attr), ctypes.sizeof(attr)), "mount_setattr")
    except OSError:
        os.close(fd)
        raise
    return fd


def _view_via_helper(path: str) -> int:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        proc = subprocess.run(
            [sys.executable, "-m", "cellblock.roview", str(theirs.fileno()), path],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, capture_output=True,
            timeout=HELPER_TIMEOUT, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8",
                                         "PYTHONPATH": os.pathsep.join(sys.path)},
            check=False,
        )
        theirs.close()
        if proc.returncode != 0:
            detail = proc.stderr.decode("utf-8", "replace").strip().splitlines()
            raise OSError(f"cannot make a read-only view in a user namespace: "
                          f"{detail[-1] if detail else proc.returncode}")
        ours.settimeout(HELPER_TIMEOUT)
        _msg, fds, _flags, _addr = socket.recv_fds(ours, 16, 4)
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise OSError("the read-only view helper sent no descriptor")
    return fds[0]


def readonly_view(path: str) -> int:
    """A detached, recursively read-only, nosuid, nodev, noexec bind mount of directory
    ``path``, as an O_PATH-like fd. Raises OSError with the reason."""
    try:
        return _view_here(path)
    except PermissionError:
        if os.geteuid() == 0:
            raise
    return _view_via_helper(path)


def move_mount_to(view_fd: int, target: str) -> None:
    """Attach a detached view at ``target`` in the caller's mount namespace."""
    _check(_libc.syscall(SYS_MOVE_MOUNT, view_fd, b"", AT_FDCWD, os.fsencode(target),
                         MOVE_MOUNT_F_EMPTY_PATH), "move_mount")


def private_mount_namespace() -> None:
    """Enter a new mount namespace whose mounts do not propagate back to the host's.
    For a child between fork and exec (nsjail's), with CAP_SYS_ADMIN."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(_libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount(MS_PRIVATE)")


def _helper(argv: list[str]) -> int:
    """``python -m cellblock.roview FD PATH``: unshare, make the view, send it on FD."""
    sock = socket.socket(fileno=int(argv[0]))
    _check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNS), "unshare(CLONE_NEWUSER|CLONE_NEWNS)")
    view = _view_here(argv[1])
    with contextlib.closing(sock):
        socket.send_fds(sock, [b"v"], [view])
    return 0


if __name__ == "__main__":
    sys.exit(_helper(sys.argv[1:]))
