"""The host uid (and gid) each jail runs as: one per kernel, from ``[host] jail_uids``.

As root, every kernel's jail maps its one uid (1000 inside) to a host uid of its own, so
no two jails and no host account share a uid. Unprivileged, nsjail can map only the
caller's own uid, so the jail runs as ours and the range does not apply.

``jail_uids`` (or ``$CELLBLOCK_JAIL_UIDS``) is ``"auto"`` or ``"FIRST-LAST"`` (inclusive,
decimal or 0x-hex). ``auto`` is what works both on a host and in a pod with a user
namespace of its own (Kubernetes ``hostUsers: false``, podman ``--uidmap``), which maps only
65536 ids (0-65535):

- ``0x40000000-0x40ffffff`` (2**24 ids) when this user namespace maps them, as the initial
  one on a host does. No distribution allocates accounts there (systemd's container
  ranges start at 524288, and nothing is allocated from 0x40000000 up), so a jail never
  shares a uid with a host account.
- else ``10000-59999``, inside 0-65535: above the image's system accounts (< 1000) and
  the first accounts a Containerfile's ``useradd`` makes, below Debian's reserved
  60000-64999, systemd's DynamicUser range and ``nobody`` (65534). Only used inside a user
  namespace that lacks the wide range, i.e. a container, whose accounts are the image's.

Whatever the range, a uid that has a passwd entry is skipped. A uid is claimed for one
kernel by a symlink ``<runtime base>-uids/<uid>`` naming its run dir (created atomically:
two wardens starting at once never get the same uid; beside the runtime base, not in it,
where every entry is a run dir); the warden releases it as it ends, and the sweep removes
claims whose run dir is gone.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import time
from collections.abc import Mapping
from pathlib import Path

from .errors import HostUnsupported

__all__ = [
    "AUTO",
    "JAIL_UIDS_ENV",
    "POD_RANGE",
    "WIDE_RANGE",
    "claim_uid",
    "claims_dir",
    "jail_uid_range",
    "mapped_ranges",
    "parse_uid_range",
    "release_uids",
    "sweep_claims",
]

JAIL_UIDS_ENV = "CELLBLOCK_JAIL_UIDS"
AUTO = "auto"
WIDE_RANGE = (0x40000000, 0x40000000 + (1 << 24) - 1)
POD_RANGE = (10000, 59999)
MAX_ID = 0xFFFFFFFE  # (uid_t)-1 is "no uid"
CLAIMS_SUFFIX = "-uids"
STALE_CLAIM = 60.0  # seconds a claim may name a run dir not made yet (claimed just before)
_RANGE_RE = re.compile(r"\s*(0x[0-9a-fA-F]+|\d+)\s*-\s*(0x[0-9a-fA-F]+|\d+)\s*")
_ALLOWED = '"auto" or "FIRST-LAST" (inclusive, 1 <= FIRST <= LAST <= 4294967294, e.g. ' \
    '"10000-59999")'


def parse_uid_range(value: str) -> tuple[int, int] | None:
    """``"auto"`` -> None; ``"FIRST-LAST"`` -> (FIRST, LAST). Raises ``ValueError`` naming
    the value and the allowed forms."""
    if value.strip() == AUTO:
        return None
    match = _RANGE_RE.fullmatch(value)
    if not match:
        raise ValueError(f"jail_uids {value!r} is not a range: give {_ALLOWED}")
    first, last = (int(g, 0) for g in match.groups())
    if not 1 <= first <= last <= MAX_ID:
        raise ValueError(f"jail_uids {value!r} is out of order or bounds: give {_ALLOWED}; "
                         "uid 0 is the host's root and never a jail's")
    return first, last


def mapped_ranges(path: str = "/proc/self/uid_map") -> list[tuple[int, int]]:
    """The ids this process's user namespace maps (inclusive ranges, merged, sorted)."""
    spans = []
    for line in Path(path).read_text().splitlines():
        inside, _outside, count = (int(f) for f in line.split())
        spans.append((inside, inside + count - 1))
    merged: list[tuple[int, int]] = []
    for first, last in sorted(spans):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


def _covered(span: tuple[int, int], ranges: list[tuple[int, int]]) -> bool:
    return any(a <= span[0] and span[1] <= b for a, b in ranges)


def _describe(ranges: list[tuple[int, int]]) -> str:
    return ", ".join(f"{a}-{b}" for a, b in ranges) or "none"


def jail_uid_range(setting: str, env: Mapping[str, str] | None = None,
                   maps: tuple[str, str] = ("/proc/self/uid_map", "/proc/self/gid_map"),
                   ) -> tuple[int, int, str]:
    """The range jails take their uids from: (FIRST, LAST, where it came from).

    ``$CELLBLOCK_JAIL_UIDS`` overrides the policy's ``setting``. Raises HostUnsupported,
    naming the setting and the fix, when this user namespace does not map the whole range
    (nsjail could not write the jail's uid map)."""
    env = os.environ if env is None else env
    source = f"${JAIL_UIDS_ENV}" if env.get(JAIL_UIDS_ENV) else "host.jail_uids"
    value = env.get(JAIL_UIDS_ENV) or setting
    try:
        explicit = parse_uid_range(value)
    except ValueError as exc:
        raise HostUnsupported(f"{source}: {exc}") from None
    uids, gids = mapped_ranges(maps[0]), mapped_ranges(maps[1])
    if explicit is None:
        for span in (WIDE_RANGE, POD_RANGE):
            if _covered(span, uids) and _covered(span, gids):
                return span[0], span[1], f"{source} = \"auto\""
        raise HostUnsupported(
            f"{source} = \"auto\": this user namespace maps neither {WIDE_RANGE[0]}-"
            f"{WIDE_RANGE[1]} nor {POD_RANGE[0]}-{POD_RANGE[1]} (uids {_describe(uids)}, gids "
            f"{_describe(gids)}). Fix: set [host] jail_uids (or ${JAIL_UIDS_ENV}) to a range "
            "inside the mapped ids, or run with a larger uid map")
    for kind, ranges in (("uids", uids), ("gids", gids)):
        if not _covered(explicit, ranges):
            raise HostUnsupported(
                f"{source} = \"{value}\": ids {explicit[0]}-{explicit[1]} are not all mapped "
                f"in this user namespace (mapped {kind}: {_describe(ranges)}), so nsjail "
                f"cannot map a jail to them. Fix: set [host] jail_uids (or ${JAIL_UIDS_ENV}) "
                "to a range inside the mapped ids, e.g. \"10000-59999\" in a pod with "
                "hostUsers: false")
    return explicit[0], explicit[1], f"{source} = \"{value}\""


def _account(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def claim_uid(base: Path, slot: str, first: int, last: int) -> int:
    """A uid from FIRST-LAST that no account has and no other kernel holds, claimed for
    run dir ``slot`` under ``base``. Raises HostUnsupported when every uid is taken."""
    claims = claims_dir(base)
    claims.mkdir(mode=0o700, parents=True, exist_ok=True)
    size = last - first + 1
    start = secrets.randbelow(size)
    for i in range(size):
        uid = first + (start + i) % size
        if _account(uid):
            continue
        try:
            os.symlink(slot, claims / str(uid))
        except FileExistsError:
            continue
        return uid
    raise HostUnsupported(f"every jail uid in {first}-{last} is held by a kernel or an account; "
                          "widen [host] jail_uids or stop some kernels")


def release_uids(base: Path, slot: str, uid: int | None = None) -> None:
    """Drop the claims that name ``slot`` (just ``uid``'s when it is known)."""
    claims = claims_dir(base)
    names = [str(uid)] if uid is not None else _names(claims)
    for name in names:
        with contextlib.suppress(OSError):
            if os.readlink(claims / name) == slot:
                os.unlink(claims / name)


def sweep_claims(base: Path) -> None:
    """Drop claims whose run dir is gone (a warden killed before it removed its own)."""
    claims = claims_dir(base)
    now = time.time()
    for name in _names(claims):
        with contextlib.suppress(OSError):
            link = claims / name
            slot = os.readlink(link)
            if not (base / slot).exists() and now - link.lstat().st_mtime > STALE_CLAIM:
                os.unlink(link)


def claims_dir(base: Path) -> Path:
    """Where the claims of the kernels under runtime base ``base`` are: beside it."""
    return base.parent / f"{base.name}{CLAIMS_SUFFIX}"


def _names(claims: Path) -> list[str]:
    try:
        return [n for n in os.listdir(claims) if n.isdigit()]
    except OSError:
        return []
