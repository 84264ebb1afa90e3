"""Files from the client, and files for it, inside the jail.

    from cellblock_kernel import files
    files.list()                    # [FileInfo(name='sales.csv', size=1234, path=...)]
    pd.read_csv(files.path("sales.csv"))     # /inbox/sales.csv, read-only
    fig.savefig(files.outbox("chart.png"))   # /outbox/chart.png, for the client to fetch

The client (never this kernel) puts files into :data:`INBOX`, a directory of the host's
bind-mounted read-only here. This kernel writes what the client should fetch into
:data:`OUTBOX`, a small tmpfs (its size and number of files are capped by the profile).
The client lists and fetches them through the warden, which opens them without following
any link and refuses anything that is not a plain file (docs/quickstart-llm.md).

The rule for a file name is defined here once; the host (``cellblock.files``) imports it.
Nothing here is a security control: the host checks everything again.
"""

from __future__ import annotations

import builtins
import os
import re
import stat
from typing import NamedTuple

__all__ = ["INBOX", "NAME_RULE", "OUTBOX", "FileInfo", "check_name", "list", "outbox",
           "path"]

INBOX = "/inbox"  #: read-only here; the client's uploads
OUTBOX = "/outbox"  #: writable here (a capped tmpfs); what the client may download
MAX_NAME = 128
#: A file name: letters, digits, '.', '_' and '-', not starting with '.', at most 128.
NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
NAME_RULE = ("1-128 characters of A-Z a-z 0-9 . _ -, not starting with '.' (no '/', no "
             "'..', no spaces or control characters)")


class FileInfo(NamedTuple):
    name: str
    size: int
    path: str


def check_name(name: object) -> str:
    """``name`` if it is a valid file name (:data:`NAME_RULE`), else ValueError naming it."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValueError(f"file name {name!r} is not allowed: use {NAME_RULE}")
    return name


def list(where: str = INBOX) -> builtins.list[FileInfo]:
    """The plain files in the inbox (or ``where``, e.g. :data:`OUTBOX`), sorted by name."""
    try:
        entries = os.listdir(where)
    except FileNotFoundError:
        raise FileNotFoundError(f"{where} does not exist: this kernel's profile has no "
                                "files (profiles.NAME.files in the policy)") from None
    out: builtins.list[FileInfo] = []
    for name in sorted(entries):
        full = os.path.join(where, name)
        st = os.lstat(full)
        if stat.S_ISREG(st.st_mode):
            out.append(FileInfo(name, st.st_size, full))
    return out


def path(name: str) -> str:
    """The path of the inbox file ``name`` (FileNotFoundError if it was not uploaded)."""
    full = os.path.join(INBOX, check_name(name))
    if not os.path.isfile(full):
        have = ", ".join(f.name for f in list()) or "none"
        raise FileNotFoundError(f"no file {name!r} in {INBOX}; uploaded: {have}")
    return full


def outbox(name: str) -> str:
    """Where to write ``name`` for the client: ``/outbox/<name>`` (the name checked)."""
    return os.path.join(OUTBOX, check_name(name))
