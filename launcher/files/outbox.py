"""The host's reader of a jail's outbox: what the jail wrote, without following anything.

Who calls it: the warden's file service (:mod:`cellblock.files.service`), once per client
request, in the warden process (which started nsjail and is the only host process that can
name its jail for sure). Every name, link, file type and size in the outbox is the jail's
to choose, so:

1. The jail's first process is named for sure by :func:`cellblock.jailproc.jail_proc_dir`
   (from nsjail, the warden's own child, with nsjail's pidfd). ``root`` beneath that
   handle is the jail's root, which the jail cannot change (no capabilities, no mount or
   chroot in its seccomp policy, a read-only ``/``).
2. ``outbox`` is opened beneath that root with openat2 (RESOLVE_BENEATH |
   RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS); it must be a directory on another mount
   than the root (the tmpfs the jail command mounted).
3. A file is opened beneath the outbox with openat2 and every RESOLVE_ flag plus
   O_NOFOLLOW | O_NONBLOCK | O_NOCTTY (a symlink fails, a FIFO does not block), and kept
   only if ``fstat`` says it is a regular file no larger than the cap. The cap is checked
   again on the bytes read, which stop at cap + 1 (a file that grows while read is refused).
   A 10 GB sparse file is refused by its size, unread.
4. Names must pass :data:`cellblock_kernel.files.NAME_RULE`; a listing counts the others
   without showing them (a name is the jail's text too).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from cellblock_kernel.files import NAME, NAME_RULE

from ..errors import FileRefused, HostUnsupported
from ..jailproc import jail_proc_dir
from ..roview import (
    RESOLVE_BENEATH,
    RESOLVE_NO_MAGICLINKS,
    RESOLVE_NO_SYMLINKS,
    openat2_beneath,
)

__all__ = ["OutboxEntry", "jail_outbox", "list_outbox", "read_outbox"]

OUTBOX_NAME = "outbox"  # below the jail's root (cellblock_kernel.files.OUTBOX)
READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class OutboxEntry:
    name: str
    size: int
    kind: str  #: "file", or what else it is ("symlink", "fifo", "directory", ...)


def _kind(mode: int) -> str:
    for test, word in ((stat.S_ISREG, "file"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "fifo"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "device"),
                       (stat.S_ISBLK, "device")):
        if test(mode):
            return word
    return "unknown"


def _jail_root(nsjail_pid: int, nsjail_pidfd: int) -> int:
    """An O_PATH descriptor of the root directory of nsjail ``nsjail_pid``'s jail."""
    proc = jail_proc_dir(nsjail_pid, nsjail_pidfd)
    if proc is None:
        raise FileRefused("the kernel's jail is not running", "not_running")
    try:
        return os.open("root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=proc)
    except OSError:
        raise FileRefused("the kernel's jail is not running", "not_running") from None
    finally:
        os.close(proc)


def jail_outbox(nsjail_pid: int, nsjail_pidfd: int) -> int:
    """A descriptor (O_RDONLY | O_DIRECTORY) of the jail's outbox; the caller closes it.
    Raises FileRefused (``not_running``, ``no_outbox``) or HostUnsupported (no openat2)."""
    root = _jail_root(nsjail_pid, nsjail_pidfd)
    try:
        try:  # the outbox is a mount point: RESOLVE_NO_XDEV would refuse it
            fd = openat2_beneath(root, OUTBOX_NAME, os.O_RDONLY | os.O_DIRECTORY
                                 | os.O_CLOEXEC | os.O_NOFOLLOW,
                                 RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
        except OSError as exc:
            if exc.errno == errno.ENOSYS:
                raise HostUnsupported("this Linux has no openat2 (5.6 or later is needed "
                                      "to read an outbox safely)") from None
            raise FileRefused("this kernel has no outbox (its profile's files.outbox is "
                              "off)", "no_outbox") from None
        if os.fstat(fd).st_dev == os.fstat(root).st_dev:
            os.close(fd)
            raise FileRefused("this kernel has no outbox (its profile's files.outbox is off)",
                              "no_outbox")
        return fd
    finally:
        os.close(root)


def list_outbox(outbox: int) -> tuple[list[OutboxEntry], int]:
    """The entries of the outbox with allowed names (lstat: nothing followed), sorted, and
    how many others there were (their names are not shown)."""
    entries: list[OutboxEntry] = []
    hidden = 0
    for name in sorted(os.listdir(outbox)):
        if not NAME.fullmatch(name):
            hidden += 1
            continue
        try:
            st = os.stat(name, dir_fd=outbox, follow_symlinks=False)
        except OSError:
            continue  # gone since the listing
        entries.append(OutboxEntry(name, st.st_size, _kind(st.st_mode)))
    return entries, hidden


def read_outbox(outbox: int, name: str, cap: int) -> bytes:
    """The bytes of the regular file ``name`` in the outbox, at most ``cap``; FileRefused
    (``bad_name``, ``not_found``, ``not_regular``, ``too_large``) otherwise."""
    if not NAME.fullmatch(name):
        raise FileRefused(f"file name {name!r} is not allowed: use {NAME_RULE}", "bad_name")
    try:
        fd = openat2_beneath(outbox, name)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise FileRefused(f"no file {name!r} in the outbox", "not_found") from None
        if exc.errno in (errno.ELOOP, errno.EXDEV):
            raise FileRefused(f"{name!r} in the outbox is a symbolic link, not a plain "
                              "file; it was not followed", "not_regular") from None
        if exc.errno == errno.ENOSYS:
            raise HostUnsupported("this Linux has no openat2 (5.6 or later)") from None
        raise FileRefused(f"{name!r} in the outbox cannot be opened ({exc.strerror})",
                          "not_regular") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileRefused(f"{name!r} in the outbox is a {_kind(st.st_mode)}, not a plain "
                              "file; it was not read", "not_regular")
        if st.st_size > cap:
            raise FileRefused(f"{name!r} in the outbox is {st.st_size} bytes; this profile "
                              f"lets files of at most {cap} bytes out (files.max_download)",
                              "too_large")
        data = b"".join(_read_upto(fd, cap + 1))
        if len(data) > cap:
            raise FileRefused(f"{name!r} in the outbox grew past {cap} bytes while it was "
                              "read (files.max_download); it was not sent", "too_large")
        return data
    finally:
        os.close(fd)


def _read_upto(fd: int, limit: int) -> Iterator[bytes]:
    left = limit
    while left > 0:
        try:
            chunk = os.read(fd, min(READ_CHUNK, left))
        except BlockingIOError:
            return
        if not chunk:
            return
        left -= len(chunk)
        yield chunk

