"""A launch's datasets, staged before the jail starts: the broker prepared with the grants,
directory datasets as read-only views for nsjail's command line (as root, attached in
nsjail's own mount namespace before it execs), and the checks that refuse what cannot be
made read-only.

Who calls it: the warden (:func:`setup_datasets` in ``_prepare_jail``; the
:class:`DatasetSetup` it returns is attached between fork and exec of nsjail).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .broker import Audit, Broker
from .datasets import check_grants
from .errors import HostUnsupported
from .roview import move_mount_to, private_mount_namespace, readonly_view

if TYPE_CHECKING:
    from .policy import Policy

__all__ = ["DatasetSetup", "setup_datasets"]


@dataclass
class DatasetSetup:
    """What the warden needs for one launch: the broker (prepared, not started), the
    directory datasets for nsjail's command line, and (as root) the read-only views
    to attach in nsjail's own mount namespace before it execs."""

    broker: Broker
    granted: tuple[str, ...]
    data_mounts: tuple[tuple[str, Path], ...] = ()
    staged: list[tuple[int, str]] = field(default_factory=list)

    def attach_in_child(self) -> None:
        """Between fork and exec of nsjail: a private mount namespace with each view
        attached at its staging dir. The mounts die with nsjail; the host never sees
        them (its staging dirs stay empty)."""
        if self.staged:
            private_mount_namespace()
            for fd, target in self.staged:
                move_mount_to(fd, target)

    def close_staged(self) -> None:
        for fd, _ in self.staged:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.staged.clear()


def _submounts(path: str) -> list[str]:
    prefix = path.rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            point = line.split(" ")[4].encode().decode("unicode_escape")
            if point.startswith(prefix):
                found.append(point)
    return found


def setup_datasets(*, run_path: Path, policy: Policy, profile_name: str,
                   requested: tuple[str, ...], jail_uid: int, audit: Audit) -> DatasetSetup:
    """Pin the launch's datasets, bind the broker's sockets, and plan the /data mounts.

    ``requested`` is the launch's final selection (the provisioner applied the profile's
    ``default_datasets``); it is checked against the profile again here (the policy may
    have changed). Raises PolicyError or HostUnsupported naming the dataset.
    """
    profile = policy.profile(profile_name)
    granted = check_grants(policy, profile_name, requested)
    dirs = [n for n in granted if os.path.isdir(policy.datasets[n].path)]
    broker = Broker(run_path=run_path, datasets=dict(policy.datasets),
                    allowed=tuple(profile.datasets), jail_uid=jail_uid, audit=audit)
    setup = DatasetSetup(broker, granted)
    try:
        broker.prepare(granted, tuple(dirs))
        mounts: list[tuple[str, Path]] = []
        for name in dirs:
            source = policy.datasets[name].path
            if os.geteuid() == 0:
                target = run_path / "mnt" / name
                target.mkdir(mode=0o711, parents=True)
                os.chmod(target.parent, 0o711)  # noqa: S103 - the jail uid traverses it
                setup.staged.append((readonly_view(source), str(target)))
                mounts.append((name, target))
            else:
                inner = _submounts(source)
                if inner:
                    raise HostUnsupported(
                        f"dataset {name!r}: {source} contains mount points ({inner[0]}); "
                        "without root cellblock cannot make them read-only. Grant the "
                        "inner directories as datasets of their own, or run as root")
                mounts.append((name, Path(source)))
        setup.data_mounts = tuple(mounts)
    except BaseException:
        setup.close_staged()
        broker.close()
        raise
    audit("broker.start", granted=list(granted), mounted=dirs)
    return setup
