"""The host's writer of a kernel's inbox: uploads, checked and capped, renamed in whole.

Who calls it: the warden's file service (:mod:`cellblock.files.service`), for each upload
a client sends. The inbox is ``<run dir>/inbox``, the warden's directory, bound read-only
at ``/inbox`` in the jail: the jail can read it and change nothing in it. An upload is
written to a new file in ``<run dir>/inbox.tmp`` (0700, never mounted), then renamed into
the inbox in one step, so the kernel sees a file whole or not at all. Both directories are
opened once and used by descriptor.

The caps (``[profiles.NAME.files]``: one file's size, the number of files, all files'
bytes) are checked from the declared size before a byte is written, and again on the bytes
that arrive: more than declared is refused, and the partial file is removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import stat
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from cellblock_kernel.files import NAME, NAME_RULE

from ..errors import FileRefused
from ..jailcmd import RUN_INBOX, RUN_INBOX_TMP
from ..policy import FilesPolicy, human_bytes

__all__ = ["Inbox", "check_name"]


def check_name(name: object) -> str:
    """``name`` if it may name an inbox or outbox file, else FileRefused (``bad_name``)."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        shown = repr(name)[:80]
        raise FileRefused(f"file name {shown} is not allowed: use {NAME_RULE}", "bad_name")
    return name


class Inbox:
    """One kernel's inbox (see the module docstring). Thread-safe; :meth:`close` it."""

    def __init__(self, run_path: Path, policy: FilesPolicy) -> None:
        self.policy = policy
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        self._dir = os.open(run_path / RUN_INBOX, flags)
        self._tmp = os.open(run_path / RUN_INBOX_TMP, flags)
        # files get the inbox's group (the jail's, as root: cellblock.rundir), read-only
        self._group = os.fstat(self._dir).st_gid if os.geteuid() == 0 else -1
        self._lock = threading.Lock()
        self._reserved: dict[str, int] = {}  # uploads under way: their declared sizes

    def close(self) -> None:
        for fd in (self._dir, self._tmp):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._dir = self._tmp = -1

    def files(self) -> list[tuple[str, int]]:
        """The inbox's files and sizes, sorted by name."""
        out = []
        for name in sorted(os.listdir(self._dir)):
            st = os.stat(name, dir_fd=self._dir, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):
                out.append((name, st.st_size))
        return out

    def _reserve(self, name: str, size: int) -> None:
        pol = self.policy
        if size > pol.max_upload:
            raise FileRefused(f"upload {name!r} is {size} bytes; this profile takes files of "
                              f"at most {human_bytes(pol.max_upload)} ({pol.max_upload} bytes, "
                              "files.max_upload)", "too_large")
        with self._lock:
            if name in self._reserved:
                raise FileRefused(f"upload {name!r} is already under way", "busy")
            others = [(n, s) for n, s in self.files() if n != name]
            others += [(n, s) for n, s in self._reserved.items()]
            if len(others) + 1 > pol.max_inbox_files:
                raise FileRefused(f"upload {name!r}: the inbox holds {len(others)} files, the "
                                  f"most this profile allows (files.max_inbox_files = "
                                  f"{pol.max_inbox_files})", "too_many")
            total = sum(s for _, s in others)
            if total + size > pol.max_inbox_bytes:
                raise FileRefused(
                    f"upload {name!r} ({size} bytes) would bring the inbox to {total + size} "
                    f"bytes; this profile allows {human_bytes(pol.max_inbox_bytes)} in all "
                    "(files.max_inbox_bytes)", "too_large")
            self._reserved[name] = size

    def receive(self, name: str, size: int, chunks: Iterable[bytes],
                accepted: Callable[[], None] = lambda: None) -> str:
        """Write ``size`` bytes from ``chunks`` as the inbox file ``name`` (replacing one of
        that name); return their sha256. ``accepted`` is called once the caps allow it,
        before ``chunks`` is read. Raises FileRefused, or OSError from the source."""
        check_name(name)
        if size < 0:
            raise FileRefused(f"upload {name!r}: a size of {size} bytes", "bad_request")
        self._reserve(name, size)
        tmp = f"up-{secrets.token_hex(8)}"
        digest = hashlib.sha256()
        try:
            accepted()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=self._tmp)
            try:
                got = 0
                for chunk in chunks:
                    got += len(chunk)
                    if got > size:
                        raise FileRefused(f"upload {name!r} sent more than the {size} bytes "
                                          "it declared", "too_large")
                    digest.update(chunk)
                    _write_all(fd, chunk)
                if got != size:
                    raise FileRefused(f"upload {name!r} ended after {got} of the {size} bytes "
                                      "it declared", "incomplete")
                if self._group >= 0:
                    os.fchown(fd, -1, self._group)
                os.fchmod(fd, 0o640)  # the jail reads it (by its group, as root)
            finally:
                os.close(fd)
            os.replace(tmp, name, src_dir_fd=self._tmp, dst_dir_fd=self._dir)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self._tmp)
            raise
        finally:
            with self._lock:
                self._reserved.pop(name, None)
        return digest.hexdigest()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
