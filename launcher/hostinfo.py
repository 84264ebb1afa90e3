"""What ``cellblock doctor`` reads about the process it runs in, to name why a jail
failed and which setting fixes it: in a container, the runtime's seccomp filter, a masked
/proc and a read-only cgroup fs block nsjail where a host's sysctls would not.

deploy/README.md has the least privileges a container needs and why each one.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = [
    "PROC_FIX",
    "SECCOMP_FIX",
    "cgroup_fix",
    "has_cap",
    "proc_overmounts",
    "seccomp_filtered",
    "userns_sysctl_block",
]

CAP_SYS_ADMIN = 21
SECCOMP_FIX = (
    "run the container with cellblock's seccomp profile, the runtime default plus what "
    "nsjail needs (deploy/seccomp.json): podman/docker --security-opt "
    "seccomp=deploy/seccomp.json; Kubernetes: securityContext.seccompProfile {type: "
    "Localhost, localhostProfile: cellblock-seccomp.json} (RuntimeDefault blocks them)"
)
VIEWS_FIX = (
    "give the container CAP_SYS_ADMIN, which the warden needs to attach a read-only view "
    "of a directory dataset (open_tree) in the jail's mount namespace: podman --cap-add "
    "SYS_ADMIN; Kubernetes: securityContext.capabilities.add: [SYS_ADMIN] (with hostUsers: "
    "false it is the pod's user namespace's, not the node's); or allow only file datasets"
)
PROC_FIX = (
    "run the container with /proc unmasked: podman --security-opt unmask=/proc/* (docker "
    "--security-opt systempaths=unconfined); Kubernetes: securityContext.procMount: Unmasked, "
    "which needs hostUsers: false"
)
# A mount on an empty procfs directory hides nothing (the kernel allows a new procfs
# then); these are the ones hosts have.
_HARMLESS = ("/proc/sys/fs/binfmt_misc",)


def _status() -> dict[str, str]:
    out = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def has_cap(bit: int) -> bool:
    """This process has capability ``bit`` (e.g. CAP_SYS_ADMIN) in its effective set."""
    return bool(int(_status().get("CapEff", "0"), 16) >> bit & 1)


def seccomp_filtered() -> bool:
    """This process runs under a seccomp filter (mode 2), as container runtimes set."""
    return _status().get("Seccomp") == "2"


def _sysctl(name: str) -> str | None:
    try:
        return Path("/proc/sys", name).read_text().strip()
    except OSError:
        return None


def userns_sysctl_block() -> str:
    """Why this host's sysctls refuse a new user namespace to us, or ""."""
    if _sysctl("user/max_user_namespaces") == "0":
        return "user.max_user_namespaces = 0"
    if not has_cap(CAP_SYS_ADMIN) and _sysctl("kernel/unprivileged_userns_clone") == "0":
        return "kernel.unprivileged_userns_clone = 0 and no CAP_SYS_ADMIN"
    return ""


def proc_overmounts(mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Mount points under /proc (a container runtime's masked and read-only paths)."""
    found = []
    with contextlib.suppress(OSError):
        for line in Path(mountinfo).read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point.startswith("/proc/") and point not in _HARMLESS:
                found.append(point)
    return found


def cgroup_fix(needed: list[str]) -> str:
    """The fix for a cgroup hierarchy cellblock cannot create cgroups in."""
    where = "/sys/fs/cgroup"
    readonly = not os.access(where, os.W_OK) or _readonly_mount(where)
    return (
        ("the cgroup fs is read-only here (a container's); " if readonly else "")
        + f"set cgroups = \"off\" in profiles {needed} and bound the kernels with the "
        "container's or pod's own limits, or give cellblock a writable, delegated cgroup "
        "subtree ($CELLBLOCK_CGROUP_ROOT / host.cgroup_parent)"
    )


def _readonly_mount(point: str) -> bool:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            if fields[4] == point:
                return "ro" in fields[5].split(",")
    return False
