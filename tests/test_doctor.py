"""`cellblock doctor` through a real subprocess: it passes on this host, and it fails
precisely when the kernel environment or nsjail is unusable."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.jail


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CELLBLOCK_", "JUPYTER_"))}
    empty = tmp_path / "empty-policy.toml"
    empty.write_text("")
    clean.update(CELLBLOCK_POLICY=str(empty), JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
                 JUPYTER_DATA_DIR=str(tmp_path / "data"), JUPYTER_PLATFORM_DIRS="1")
    if os.geteuid() != 0:  # root uses /run/cellblock; others get a private runtime dir
        clean["CELLBLOCK_RUNTIME_DIR"] = str(tmp_path / "run")
    return clean


def doctor(env: dict[str, str], *profiles: str, under: tuple[str, ...] = ()
           ) -> subprocess.CompletedProcess[str]:
    """``cellblock doctor``, run by the command ``under`` (a namespace or filter) if given."""
    return subprocess.run([*under, str(BIN / "cellblock"), "doctor", *profiles],
                          capture_output=True, text=True, env=env, timeout=120, check=False)


def test_doctor_passes_here(env: dict[str, str]) -> None:
    out = doctor(env)
    assert out.returncode == 0, out.stdout + out.stderr
    *checks, summary = out.stdout.splitlines()
    assert checks, out.stdout
    assert [line for line in checks if not line.startswith("[ok] ")] == []
    names = [line[5:].split(":")[0] for line in checks]
    assert names == ["nsjail", "seccomp", "run dir", "cgroups", "jail uids", "user namespaces",
                     "/proc", "python (agent)"]  # agent and analyst share python = "auto"
    assert summary == f"{len(checks)} of {len(checks)} checks passed"
    assert out.stderr == ""


@pytest.fixture
def locked_venv(tmp_path: Path) -> Path:
    """A venv under a mode 0700 directory: only its owner may traverse it."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    venv = locked / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    os.chmod(locked, 0o700)  # mkdir's mode is filtered by the umask; make sure
    return venv


@pytest.mark.skipif(os.geteuid() != 0, reason="unprivileged, the jail maps to the caller's own "
                    "uid, which can read its own 0700 directory")
def test_doctor_fails_on_an_environment_the_jail_cannot_read(
    env: dict[str, str], tmp_path: Path, locked_venv: Path
) -> None:
    python = locked_venv / "bin" / "python"
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[profiles.agent]\npython = "{python}"\n')
    out = doctor({**env, "CELLBLOCK_POLICY": str(policy)}, "agent")
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    failed = [i for i, line in enumerate(lines) if line.startswith("[FAIL]")]
    assert len(failed) == 1, out.stdout
    fail, fix = lines[failed[0]], lines[failed[0] + 1]
    # the first failure is the unreadable path, not the import that would fail after it
    assert fail.startswith(f"[FAIL] python (agent): {python}: {locked_venv} is not readable by "
                           "the jail's host uid ")
    # the topmost directory others may not search: pytest's own 0700 base, or ours
    blocker = next(d for d in reversed(locked_venv.parents)
                   if d != Path("/") and not d.stat().st_mode & 0o001)
    assert blocker in (locked_venv.parent, *locked_venv.parent.parents)
    assert fail.endswith(f" ({blocker} is not searchable by it)")
    assert "ipykernel" not in fail
    assert fix.startswith(f"       fix: {locked_venv} must be readable by uid ")
    assert f"let it search {blocker} (chmod o+x {blocker})" in fix
    assert lines[-1] == "7 of 8 checks passed"


def test_doctor_names_the_closed_directory_then_the_missing_package(
    env: dict[str, str], tmp_path: Path
) -> None:
    """A venv in an open directory but itself 0700: the venv is named, with chmod o+rx.
    Once opened, the next failure is the import of ipykernel, with its own fix."""
    if os.geteuid() != 0:
        pytest.skip("unprivileged, the jail maps to the caller's own uid")
    # outside tmp_path, whose base pytest makes 0700: here only the venv itself is closed
    top = Path(tempfile.mkdtemp(prefix="cellblock-doctor-test-", dir="/tmp"))
    try:
        os.chmod(top, 0o755)
        venv = top / "venv"
        subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(venv)],
                       check=True, timeout=120)
        policy = tmp_path / "policy.toml"
        policy.write_text(f'[profiles.agent]\npython = "{venv}/bin/python"\n')
        env = {**env, "CELLBLOCK_POLICY": str(policy)}
        os.chmod(venv, 0o700)
        closed = doctor(env, "agent")
        os.chmod(venv, 0o755)
        opened = doctor(env, "agent")
    finally:
        shutil.rmtree(top)
    assert closed.returncode == 1, closed.stdout + closed.stderr
    fail = next(line for line in closed.stdout.splitlines() if line.startswith("[FAIL]"))
    assert fail.startswith(f"[FAIL] python (agent): {venv}/bin/python: {venv} is not readable")
    assert "not searchable" not in fail
    assert f"fix: {venv} must be readable by uid " in closed.stdout
    assert f"chmod o+rx {venv};" in closed.stdout

    assert opened.returncode == 1, opened.stdout + opened.stderr
    fail = next(line for line in opened.stdout.splitlines() if line.startswith("[FAIL]"))
    assert fail.startswith(f"[FAIL] python (agent): {venv}/bin/python cannot import ipykernel "
                           "inside the jail as host uid ")
    assert fail.endswith(": ModuleNotFoundError: No module named 'ipykernel'")
    assert (f"fix: install the kernel's packages into that environment: {venv}/bin/python -m "
            "pip install ipykernel pyzmq") in opened.stdout


def test_doctor_reports_a_bad_nsjail(env: dict[str, str], tmp_path: Path) -> None:
    missing = tmp_path / "bin" / "nsjail"
    out = doctor({**env, "CELLBLOCK_NSJAIL": str(missing)})
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == (f"[FAIL] nsjail: nsjail '{missing}' (from $CELLBLOCK_NSJAIL) is not an "
                        "executable file")
    assert lines[1] == "       fix: point $CELLBLOCK_NSJAIL at an executable nsjail binary, " \
                       "or unset it"
    # without nsjail, the checks that start a jail are not run
    assert not any(line.split(":")[0].endswith(("user namespaces", "python (agent)"))
                   for line in lines)
    assert "Traceback" not in out.stderr


def test_doctor_reports_a_bad_host_nsjail(env: dict[str, str], tmp_path: Path) -> None:
    missing = tmp_path / "nsjail"
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[host]\nnsjail = "{missing}"\n')
    out = doctor({**env, "CELLBLOCK_POLICY": str(policy)})
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"[FAIL] nsjail: nsjail '{missing}' (from host.nsjail) is not an " \
                       "executable file"
    assert lines[1].startswith("       fix: set host.nsjail in the policy to an executable")


# -- in a container: each failure is named with the setting that fixes it -----------------

HERE = Path(__file__).parent
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: writes a user namespace "
                               "map of 65536 ids or mounts in a private mount namespace")


def _failures(out: subprocess.CompletedProcess[str]) -> list[tuple[str, str]]:
    """(the [FAIL] line, its fix line) for each failed check; no traceback allowed."""
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stdout.splitlines()
    return [(line, lines[i + 1].strip()) for i, line in enumerate(lines)
            if line.startswith("[FAIL]")]


@root_only
def test_doctor_in_a_pod_user_namespace(env: dict[str, str]) -> None:
    """Only ids 0-65535 exist (hostUsers: false): the default range fits; a range outside
    it is a named uid problem, not the OSError [Errno 22] the old doctor died with."""
    pod = (sys.executable, str(HERE / "podns.py"))
    out = doctor(env, under=pod)
    assert out.returncode == 0, out.stdout + out.stderr
    assert ('[ok] jail uids: 10000-59999 (host.jail_uids = "auto"), mapped in this user '
            "namespace") in out.stdout.splitlines()
    assert ("[ok] user namespaces: nsjail started a jail with a new user namespace as host "
            "uid 10000") in out.stdout.splitlines()
    out = doctor({**env, "CELLBLOCK_JAIL_UIDS": "0x40000000-0x40ffffff"}, under=pod)
    assert out.returncode == 1
    assert _failures(out) == [(
        '[FAIL] jail uids: $CELLBLOCK_JAIL_UIDS = "0x40000000-0x40ffffff": ids '
        "1073741824-1090519039 are not all mapped in this user namespace (mapped uids: "
        "0-65535), so nsjail cannot map a jail to them",
        'fix: set [host] jail_uids (or $CELLBLOCK_JAIL_UIDS) to a range inside '
        '/proc/self/uid_map\'s ids, e.g. "10000-59999" in a pod with hostUsers: false')]


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the test's seccomp filter is "
                    "written for x86_64 syscall numbers")
def test_doctor_names_a_seccomp_filter_that_blocks_namespaces(env: dict[str, str]) -> None:
    """A container runtime's default seccomp profile refuses clone(CLONE_NEWUSER...): that
    is a seccomp problem with the profile as its fix, not a sysctl one."""
    out = doctor(env, under=(sys.executable, str(HERE / "seccomp_block.py")))
    assert out.returncode == 1
    [(fail, fix)] = _failures(out)
    assert fail.startswith("[FAIL] seccomp filter: a seccomp filter on this process (a "
                           "container's runtime default) blocks the namespaces nsjail creates: "
                           "clone(flags=CLONE_NEWNS|"), fail
    assert fail.endswith("failed: Operation not permitted | Couldn't launch the child process")
    assert fix == (
        "fix: run the container with cellblock's seccomp profile, the runtime default plus "
        "what nsjail needs (deploy/seccomp.json): podman/docker --security-opt "
        "seccomp=deploy/seccomp.json; Kubernetes: securityContext.seccompProfile {type: "
        "Localhost, localhostProfile: cellblock-seccomp.json} (RuntimeDefault blocks them)")


MASK_PROC = ("mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && "
             "mount --bind /dev/null /proc/timer_list && exec \"$@\"")


@root_only
def test_doctor_names_a_masked_proc(env: dict[str, str]) -> None:
    """A container's masked and read-only /proc paths (here /proc/sys read-only and
    /dev/null over /proc/timer_list) stop nsjail's new procfs: a /proc problem."""
    if not Path("/proc/timer_list").exists():
        pytest.skip("this kernel has no /proc/timer_list to mask")
    mask = ("unshare", "--mount", "--propagation", "private", "sh", "-c", MASK_PROC, "sh")
    out = doctor(env, under=mask)
    assert out.returncode == 1
    [(fail, fix)] = _failures(out)
    assert fail.startswith("[FAIL] /proc: nsjail cannot mount a new /proc: this /proc is "
                           "masked (mounts over /proc/sys, /proc/timer_list): "), fail
    assert "Failed to mount mandatory point: '/proc'" in fail
    assert fix == ("fix: run the container with /proc unmasked: podman --security-opt "
                   "unmask=/proc/* (docker --security-opt systempaths=unconfined); Kubernetes: "
                   "securityContext.procMount: Unmasked, which needs hostUsers: false")


READONLY_CGROUPS = ("for m in $(findmnt -rn -o TARGET | grep '^/sys/fs/cgroup'); do "
                    "mount -o remount,bind,ro \"$m\" || exit 9; done; exec \"$@\"")


@root_only
def test_doctor_with_a_read_only_cgroup_fs(env: dict[str, str], tmp_path: Path) -> None:
    """As in a container: cgroups = "off" passes; a profile that requires them fails with
    the fixes that apply to a read-only hierarchy."""
    from cellblock.cgroups import detect

    if detect().version is None:
        pytest.skip("no usable cgroup hierarchy here to make read-only")
    ro = ("unshare", "--mount", "--propagation", "private", "sh", "-c", READONLY_CGROUPS, "sh")
    off = tmp_path / "off.toml"
    off.write_text('[profiles.agent]\ncgroups = "off"\n')
    out = doctor({**env, "CELLBLOCK_POLICY": str(off)}, "agent", under=ro)
    assert out.returncode == 0, out.stdout + out.stderr
    assert ('[ok] cgroups: not used: cgroups = "off" in every profile checked (the kernels '
            "are bound by the limits of the cgroup cellblock runs in)") in out.stdout
    out = doctor(env, "agent", under=ro)
    assert out.returncode == 1
    [(fail, fix)] = _failures(out)
    assert fail.startswith("[FAIL] cgroups: cgroup v"), fail
    assert fail.endswith(": Read-only file system; profiles needing them: ['agent']"), fail
    assert fix == (
        "fix: the cgroup fs is read-only here (a container's); set cgroups = \"off\" in "
        "profiles ['agent'] and bound the kernels with the container's or pod's own limits, "
        "or give cellblock a writable, delegated cgroup subtree ($CELLBLOCK_CGROUP_ROOT / "
        "host.cgroup_parent)")


@root_only
def test_doctor_names_the_capability_directory_datasets_need(
        env: dict[str, str], tmp_path: Path) -> None:
    """A container without CAP_SYS_ADMIN runs jails, but the warden cannot attach a
    directory dataset's read-only view (open_tree): named before a kernel fails on it."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    data = tmp_path / "data"
    data.mkdir()
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[datasets.sales]\npath = "{data}"\n\n[profiles.agent]\n'
                      'datasets = ["sales"]\n')
    env = {**env, "CELLBLOCK_POLICY": str(policy)}
    out = doctor(env, "agent")
    assert "[ok] dataset views: CAP_SYS_ADMIN for directory datasets ['sales']" in out.stdout
    drop = ("setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin")
    out = doctor(env, "agent", under=drop)
    assert out.returncode == 1
    assert _failures(out) == [(
        "[FAIL] dataset views: no CAP_SYS_ADMIN: read-only views of directory datasets "
        "['sales'] cannot be made (open_tree: Operation not permitted)",
        "fix: give the container CAP_SYS_ADMIN, which the warden needs to attach a read-only "
        "view of a directory dataset (open_tree) in the jail's mount namespace: podman "
        "--cap-add SYS_ADMIN; Kubernetes: securityContext.capabilities.add: [SYS_ADMIN] (with "
        "hostUsers: false it is the pod's user namespace's, not the node's); or allow only "
        "file datasets")]


@root_only
def test_doctor_names_the_capabilities_a_jail_uid_needs(env: dict[str, str]) -> None:
    """--cap-drop ALL: nsjail cannot map the jail to a uid of its own. That is a uid
    problem with the capabilities as its fix (it was reported as a sysctl one)."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    drop = ("setpriv", "--bounding-set=-setuid,-setgid", "--inh-caps=-setuid,-setgid")
    out = doctor(env, under=drop)
    assert out.returncode == 1
    [(fail, fix)] = _failures(out)
    assert fail.startswith("[FAIL] jail uids: nsjail could not write the jail's uid/gid map: "
                           "writing "), fail
    assert fail.endswith("_map failed (mapping jail uid 1000 to host uid 1073741824)"), fail
    assert fix == (
        "fix: as root, mapping a jail to a uid of its own needs CAP_SETUID and CAP_SETGID "
        "(podman's and Kubernetes' default capabilities have them; --cap-drop ALL removes "
        "them): podman --cap-add SETUID --cap-add SETGID; Kubernetes: securityContext."
        "capabilities.add: [SETUID, SETGID]")
