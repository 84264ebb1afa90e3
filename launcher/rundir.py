"""Per-kernel run directories on the host, and the sweep that removes leftovers.

Layout of one kernel's run dir (``<runtime base>/<slot>/``; the slot is the kernel id,
or ``pool-<hex>`` for a kernel started ahead of time for the warm pool, whose kernel id is
only known when a client adopts it: ``warden.json`` always names the current kernel id)::

    owner         the pid and start time of the warden that made it, written first: the
                  sweep tells a warden that died before writing warden.json from one
                  that is still starting
    warden.json   who owns this kernel: kernel id, warden pid and start time, profile,
                  ports, cgroup, jail uid
    ipc/          bound read-only at /run/cellblock in the jail; owned by the warden,
                  mode 0711 (0700 unprivileged); holds the inner connection file and the
                  five ZMQ ipc sockets the warden binds and the kernel connects to (each
                  owned by the jail's uid, mode 0600). Nothing in it is the jail's: no
                  host operation follows a path the jail could have written
    pkg/          a copy of cellblock_kernel, bound read-only at /opt/cellblock-kernel
    passwd group  one-line files bound read-only at /etc/passwd and /etc/group
    broker/       the dataset broker's socket, bound read-only at /run/cellblock-broker
    inbox/        the client's uploads (cellblock.files), bound read-only at /inbox; mode
                  0750 and the jail's group as root (0700 unprivileged), files 0640 likewise
    inbox.tmp/    0700, never mounted: an upload is written here, then renamed into inbox/
    files.sock    the client's file requests to the warden (0600), never mounted in the jail
    control.sock  the operator's grant/revoke socket (0600), never mounted in the jail
    output/       stream text the budget cut, kept redacted for read_output (0700, the
                  warden's, never mounted in the jail; cellblock.output.spool)
    egress.ctl    with network only: the operator's lock socket (0600, cellblock.egress);
                  the proxy's own socket is ipc/egress.sock, owned by the jail's uid
    mnt/<name>    empty on the host; as root, a directory dataset's read-only view is
                  attached here in nsjail's private mount namespace (cellblock.broker)

The runtime base is ``$CELLBLOCK_RUNTIME_DIR``, else ``/run/cellblock`` for root,
else ``$XDG_RUNTIME_DIR/cellblock``, else ``/tmp/cellblock-<uid>``. It is mode
0711: the jail's uid may traverse it but not list it. Every entry in it is a run dir; as
root, the jail uids the kernels hold are claimed beside it, in ``<base>-uids/`` (mode 0700,
cellblock.jailuids).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import stat
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from .errors import HostUnsupported
from .jailcmd import (
    JAIL_HOME,
    JAIL_UID,
    RUN_INBOX,
    RUN_INBOX_TMP,
    JailLayout,
    run_dir_layout,
)
from .jailuids import AUTO, claim_uid, jail_uid_range, release_uids, sweep_claims
from .names import KERNEL_ID, check_kernel_id

__all__ = [
    "STOP_REASON_FILE",
    "RunDir",
    "WardenRecord",
    "is_warden_alive",
    "jail_ids",
    "process_start",
    "release_uid",
    "runtime_base",
    "sweep_slot",
    "sweep_stale",
]

RUNTIME_ENV = "CELLBLOCK_RUNTIME_DIR"
MAX_SOCKET_PATH = 100  # AF_UNIX sun_path is 108 bytes with the NUL
MNT_DETACH = 2  # umount2 flag: how remove() detaches a tmpfs left by an older cellblock
OWNER_FILE = "owner"
STOP_REASON_FILE = "stop-reason"  # written by `cellblock kill` before it signals the warden


def runtime_base(env: Mapping[str, str] | None = None) -> Path:
    """Where run dirs live, for the environment ``env`` (default: this process's)."""
    env = os.environ if env is None else env
    explicit = env.get(RUNTIME_ENV)
    if explicit:
        return Path(explicit)
    if os.geteuid() == 0:
        return Path("/run/cellblock")
    xdg = env.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "cellblock"
    return Path(f"/tmp/cellblock-{os.getuid()}")  # noqa: S108 - private, 0711, owned by us


def jail_ids(setting: str = AUTO, claim_for: RunDir | None = None) -> tuple[int, int]:
    """Host uid/gid the jail's uid maps to: as root, one of ``[host] jail_uids``
    (cellblock.jailuids) held by no account and, when ``claim_for`` names the kernel's
    run dir, claimed for it until :func:`release_uid`; else our own (an unprivileged user
    can map only itself without newuidmap). Raises HostUnsupported for a range this user
    namespace does not map."""
    if os.geteuid() != 0:
        return os.getuid(), os.getgid()
    first, last, _ = jail_uid_range(setting)
    if claim_for is None:
        uid = first + secrets.randbelow(last - first + 1)
    else:
        uid = claim_uid(claim_for.path.parent, claim_for.path.name, first, last)
    return uid, uid


def release_uid(run: RunDir, uid: int) -> None:
    """Give back the uid :func:`jail_ids` claimed for ``run`` (a no-op unprivileged)."""
    release_uids(run.path.parent, run.path.name, uid)


@dataclass
class WardenRecord:
    """Contents of warden.json; read by `cellblock ps`, `kill` and the sweep."""

    kernel_id: str
    profile: str
    warden_pid: int
    jail_uid: int
    cgroup_version: str | None
    cgroup_parent: str
    started: float
    client_ports: dict[str, int]
    nsjail_pid: int | None = None
    state: str = "starting"  #: pooled, starting, idle, busy, restarting, stopping (`cellblock ps`)
    slot: str = ""  #: the run dir's and cgroup's name (the kernel id unless it was pooled)
    warden_start: int = 0  #: the warden's start time (/proc/<pid>/stat field 22), against pid reuse

    @property
    def cgroup_name(self) -> str:
        return self.slot or self.kernel_id


class RunDir:
    """One kernel's run dir. :meth:`create` makes it; :meth:`remove` deletes it (idempotent)."""

    def __init__(self, base: Path, kernel_id: str) -> None:
        self.path = base / check_kernel_id(kernel_id)
        self.kernel_id = kernel_id
        self.created = False  #: create() made the directory (it was not there before)

    @property
    def ipc(self) -> Path:
        return self.path / "ipc"

    @property
    def record_path(self) -> Path:
        return self.path / "warden.json"

    def create(self, uid: int, gid: int) -> JailLayout:
        base = self.path.parent
        base.mkdir(parents=True, exist_ok=True)
        os.chmod(base, 0o711)  # noqa: S103 - traversable by the jail's uid, not listable
        if len(str(self.ipc / "k-65535")) > MAX_SOCKET_PATH:
            raise HostUnsupported(
                f"run dir {self.path} is too long for unix socket paths; set "
                f"${RUNTIME_ENV} to a shorter directory"
            )
        self.path.mkdir(mode=0o711)
        self.created = True
        (self.path / OWNER_FILE).write_text(f"{os.getpid()} {process_start(os.getpid())}\n")
        # The warden's, read-only in the jail: the jail's uid may traverse it (as root it is
        # another uid) to reach the connection file and the sockets, and write nothing.
        self.ipc.mkdir(mode=0o711 if os.geteuid() == 0 else 0o700)
        pkg = self.path / "pkg" / "cellblock_kernel"
        src = resources.files("cellblock_kernel")
        pkg.mkdir(parents=True)
        for item in src.iterdir():
            if item.name.endswith(".py") or item.name == "py.typed":
                (pkg / item.name).write_bytes(item.read_bytes())
        passwd = self.path / "passwd"
        passwd.write_text(f"jovyan:x:{JAIL_UID}:{JAIL_UID}:jovyan:{JAIL_HOME}:/bin/sh\n")
        group = self.path / "group"
        group.write_text(f"jovyan:x:{JAIL_UID}:\n")
        hosts = self.path / "hosts"
        hosts.write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n")
        # The inbox: the jail's group reads it (as root the jail's uid and gid are its own),
        # nobody else; the jail's uid unprivileged is ours. Uploads are written in inbox.tmp.
        (self.path / RUN_INBOX).mkdir(mode=0o700)
        (self.path / RUN_INBOX_TMP).mkdir(mode=0o700)
        if os.geteuid() == 0:
            os.chown(self.path / RUN_INBOX, 0, gid)
            os.chmod(self.path / RUN_INBOX, 0o750)  # noqa: S103 - owner rwx, jail group rx
        for p in (self.path / "pkg", pkg, *pkg.iterdir(), passwd, group, hosts):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        return run_dir_layout(self.path, uid, gid)

    def write_connection_file(self, info: dict[str, object], uid: int, gid: int) -> Path:
        """The inner connection file: readable only by the jail's uid (and us). Written
        anew (a temporary file renamed over it) for a restart in place with a fresh key;
        the directory is the warden's, so no name in it is the jail's to choose."""
        path = self.ipc / "kernel.json"
        tmp = self.ipc / f".kernel.json.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
            if os.geteuid() == 0:
                os.chown(tmp, uid, gid)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return path

    def write_record(self, record: WardenRecord) -> None:
        tmp = self.path / "warden.json.tmp"
        tmp.write_text(json.dumps(asdict(record)))
        tmp.replace(self.record_path)

    def read_record(self) -> WardenRecord | None:
        try:
            return WardenRecord(**json.loads(self.record_path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def read_text(self, name: str, limit: int) -> str:
        """First line of a small file in the run dir (at most ``limit`` characters), or ""."""
        try:
            with open(self.path / name, encoding="utf-8", errors="replace") as f:
                return f.read(limit).splitlines()[0].strip() if limit else ""
        except (OSError, IndexError):
            return ""

    def remove(self) -> None:
        """Delete the run dir; idempotent. Call it once the jail is gone.

        The ipc dir's tmpfs (root) is unmounted first. Unprivileged, the jail runs as our
        own uid and may leave directories without permissions (mode 000 under a 0500
        parent) that rmtree cannot enter: those are opened up and the removal retried.
        Only real directories are changed, never what a symlink points at."""
        if os.path.ismount(self.ipc):
            _umount(self.ipc)
        shutil.rmtree(self.path, ignore_errors=True)
        if os.path.lexists(self.path):
            _open_up(self.path)
            shutil.rmtree(self.path, ignore_errors=True)


def process_start(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot, or None if it is gone.

    A pid and its start time name one process for good: a recycled pid has another. A
    zombie is gone too: it has ended, and is only waiting to be reaped (a warden orphaned
    by a dead spawner waits on whoever adopted it, which may take long or never happen)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):  # field 3, the state: zombie or dead
        return None
    return int(fields[19])  # field 22 of stat(5); fields[0] is field 3


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _umount(path: Path) -> None:
    _libc().umount2(str(path).encode(), MNT_DETACH)


def _open_up(top: Path) -> None:
    """Give every real directory under ``top`` mode 0700 (we own them all), top down."""
    stack = [str(top)]
    while stack:
        path = stack.pop()
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                continue
            os.chmod(path, 0o700)
            with os.scandir(path) as entries:
                stack += [e.path for e in entries if e.is_dir(follow_symlinks=False)]
        except OSError:
            continue


def is_warden_alive(record: WardenRecord) -> bool:
    """True when the warden pid is alive and is still that kernel's warden (same start
    time: wardens are forked by the spawner, so their command lines do not tell them apart)."""
    return record.warden_start != 0 and process_start(record.warden_pid) == record.warden_start


def sweep_stale(base: Path | None = None) -> list[str]:
    """Remove run dirs and cgroups of kernels whose warden is gone (SIGKILLed, host crash).

    Called when a warden starts and by the provisioner's cleanup; returns the
    kernel ids it removed.
    """
    base = runtime_base() if base is None else base
    removed: list[str] = []
    if not base.is_dir():
        return removed
    for entry in base.iterdir():
        if not entry.is_dir() or not KERNEL_ID.fullmatch(entry.name):
            continue  # not a run dir cellblock made
        gone = _sweep_one(RunDir(base, entry.name))
        if gone is not None:
            removed.append(gone)
    sweep_claims(base)
    return removed


def sweep_slot(base: Path, slot: str) -> bool:
    """:func:`sweep_stale` for one slot: what the spawner does when it reaps a warden
    (one SIGKILLed cleaned up nothing, and no other start may come to sweep after it).
    True if something was removed."""
    if not KERNEL_ID.fullmatch(slot) or not (base / slot).is_dir():
        return False
    gone = _sweep_one(RunDir(base, slot)) is not None
    sweep_claims(base)
    return gone


def _sweep_one(run: RunDir) -> str | None:
    """Remove ``run`` and its cgroups if its warden is gone; the kernel id (or slot)
    removed, else None."""
    from .cgroups import KernelCgroup

    record = run.read_record()
    if record is None:
        # No record: a warden that died before writing it, or one starting now. Its
        # owner file tells which; without one (killed between mkdir and that write),
        # only remove it once it is clearly old.
        with contextlib.suppress(OSError):
            owner = run.read_text(OWNER_FILE, 64).split()
            if owner and len(owner) == 2 and owner[0].isdigit() and owner[1].isdigit():
                gone = process_start(int(owner[0])) != int(owner[1])
            else:
                gone = time.time() - run.path.stat().st_mtime > 300
            if gone:
                run.remove()
                return run.path.name
        return None
    if is_warden_alive(record):
        return None
    if record.cgroup_version:
        KernelCgroup.for_kernel(
            record.cgroup_version, record.cgroup_parent, record.cgroup_name
        ).remove()
        KernelCgroup.for_warden(  # empty once that warden is gone; never killed here
            record.cgroup_version, record.cgroup_parent, record.cgroup_name
        ).remove_empty()
    run.remove()
    return record.kernel_id
