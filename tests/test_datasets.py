"""Datasets inside a real jailed kernel, through AsyncKernelManager.

Real files and directories on the host, the real warden, broker, nsjail and ipykernel.
Probes run in the kernel and print a JSON verdict; the assertions are made here, on
the host, and the host files are checked after each test.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import AsyncKernelManager
from test_lifecycle import run_cell

from cellblock.errors import PolicyError

from conftest import BIN, TEST_POLICY

pytestmark = [pytest.mark.jail, pytest.mark.nonroot, pytest.mark.usefixtures("no_leftovers")]

SALES = "day,amount\n1,10\n2,20\n"
ROOT = os.geteuid() == 0


@pytest.fixture
def data(tmp_path: Path, jupyter_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Path:
    """A dataset tree and a policy naming it; CELLBLOCK_POLICY points at that policy."""
    d = tmp_path / "data"
    (d / "weather" / "sub").mkdir(parents=True)
    (d / "archive").mkdir()
    (d / "sales.csv").write_text(SALES)
    (d / "notes.txt").write_text("meeting notes\n")
    (d / "hr.csv").write_text("name,salary\nalice,1\n")
    (d / "weather" / "jan.csv").write_text("jan\n")
    (d / "weather" / "sub" / "feb.csv").write_text("feb\n")
    (d / "weather" / "shadow").symlink_to("/etc/shadow")
    (d / "archive" / "2023.csv").write_text("old\n")
    (d / "leak.csv").symlink_to("/etc/shadow")
    os.mkfifo(d / "pipe.csv")
    for p in [d, *d.rglob("*")]:
        if not p.is_symlink():
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
    # world-writable on the host: only the read-only mount and view stand in the way
    os.chmod(d / "sales.csv", 0o666)
    for p in [d / "weather", *(d / "weather").rglob("*")]:
        if not p.is_symlink():
            os.chmod(p, 0o777 if p.is_dir() else 0o666)
    policy = tmp_path / "policy.toml"
    policy.write_text(TEST_POLICY + f"""
[datasets.sales]
path = "{d / 'sales.csv'}"
description = "Daily sales, 2024"
[datasets.weather]
path = "{d / 'weather'}"
description = "Weather by month"
[datasets.archive]
path = "{d / 'archive'}"
[datasets.notes]
path = "{d / 'notes.txt'}"
[datasets.leak]
path = "{d / 'leak.csv'}"
[datasets.pipe]
path = "{d / 'pipe.csv'}"
[datasets.hr]
path = "{d / 'hr.csv'}"

[profiles.agent]
datasets = ["sales", "weather", "archive", "notes", "leak", "pipe"]
default_datasets = ["sales", "weather"]
""")
    monkeypatch.setenv("CELLBLOCK_POLICY", str(policy))
    return d


async def start(profile: str = "agent", datasets: str | None = None
                ) -> tuple[AsyncKernelManager, Any]:
    km = AsyncKernelManager(kernel_name=f"cellblock-{profile}")
    env = dict(os.environ)
    if datasets is not None:
        env["CELLBLOCK_DATASETS"] = datasets
    await km.start_kernel(env=env)
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=60)
    return km, kc


async def stop(km: AsyncKernelManager, kc: Any) -> None:
    kc.stop_channels()
    await km.shutdown_kernel(now=False)


@pytest.fixture
async def kernel(data: Path) -> AsyncIterator[tuple[AsyncKernelManager, Any]]:
    km, kc = await start(datasets="sales,weather,leak,pipe")
    try:
        yield km, kc
    finally:
        await stop(km, kc)


async def probe(kc: Any, code: str) -> dict[str, Any]:
    out = await run_cell(kc, code)
    assert out["reply"]["status"] == "ok", out
    line = [ln for ln in out["stdout"].splitlines() if ln.startswith("RESULT ")]
    assert line, out
    return json.loads(line[-1][len("RESULT "):])


PRELUDE = """
import errno, json, os, socket, struct
from cellblock_kernel import datasets
R = {}
def attempt(key, fn):
    try:
        fn()
        R[key] = "ok"
    except OSError as e:
        R[key] = errno.errorcode.get(e.errno, str(e)) if e.errno else str(e)
"""


def audit_events(env: dict[str, str], km: AsyncKernelManager) -> list[dict[str, Any]]:
    path = Path(env["CELLBLOCK_AUDIT_DIR"]) / f"{km.kernel_id}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- 1. granted files and directories, read-only ------------------------------------------

async def test_granted_file_is_readable_and_stays_read_only(
        kernel: tuple[AsyncKernelManager, Any], data: Path, jupyter_env: dict[str, str]) -> None:
    km, kc = kernel
    r = await probe(kc, PRELUDE + """
import fcntl, mmap, stat
f = datasets.open("sales")
fd = f.fileno()
R["text"] = f.read().decode()
R["isreg"] = stat.S_ISREG(os.fstat(fd).st_mode)
R["accmode_rdonly"] = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
R["readlink"] = os.readlink(f"/proc/self/fd/{fd}")
attempt("write", lambda: os.write(fd, b"x"))                                   # F11
attempt("reopen_rw", lambda: open(f"/proc/self/fd/{fd}", "r+b"))               # F12
attempt("reopen_append", lambda: open(f"/proc/self/fd/{fd}", "ab"))
attempt("mmap_write", lambda: mmap.mmap(fd, 0, access=mmap.ACCESS_WRITE))      # F13
attempt("ftruncate", lambda: os.ftruncate(fd, 0))
attempt("fallocate", lambda: os.posix_fallocate(fd, 0, 1))
attempt("fchmod", lambda: os.fchmod(fd, 0o777))
attempt("fchown", lambda: os.fchown(fd, 0, 0))
attempt("setxattr", lambda: os.setxattr(f"/proc/self/fd/{fd}", "user.x", b"1"))
attempt("link", lambda: os.link(f"/proc/self/fd/{fd}", "/tmp/alias", follow_symlinks=True))
R["env_has_selection"] = "CELLBLOCK_DATASETS" in os.environ
R["list"] = [list(i) for i in datasets.list()]
import pandas as pd
f.seek(0)
R["pandas_total"] = int(pd.read_csv(f)["amount"].sum())
print("RESULT", json.dumps(R))
""")
    assert r["text"] == SALES
    assert r["isreg"] and r["accmode_rdonly"]  # B9, B10
    assert r["readlink"] == "/sales.csv"  # not the host path
    assert r["write"] == "EBADF"
    assert r["reopen_rw"] == "EROFS" and r["reopen_append"] == "EROFS"
    assert r["mmap_write"] == "EACCES"
    assert r["ftruncate"] in ("EINVAL", "EBADF")
    assert r["fallocate"] == "EBADF"
    assert r["fchmod"] in ("EROFS", "EPERM")
    assert r["fchown"] in ("EROFS", "EPERM", "EINVAL")
    assert r["setxattr"] in ("EROFS", "EPERM")
    assert r["link"] in ("EXDEV", "EPERM", "ENOENT")  # F15
    assert r["env_has_selection"] is False  # the selection never enters the jail's env
    assert r["list"] == [["sales", "Daily sales, 2024", "file", None],
                         ["weather", "Weather by month", "directory", "/data/weather"],
                         ["leak", "", "file", None], ["pipe", "", "file", None]]
    assert r["pandas_total"] == 30
    assert (data / "sales.csv").read_text() == SALES
    assert oct(os.stat(data / "sales.csv").st_mode & 0o777) == "0o666"
    events = [e["fields"] for e in audit_events(jupyter_env, km) if e["event"] == "broker.open"]
    assert {"dataset": "sales", "decision": "granted"}.items() <= events[0].items()
    assert all("day,amount" not in json.dumps(e) for e in events)


async def test_granted_directory_is_mounted_read_only(
        kernel: tuple[AsyncKernelManager, Any], data: Path) -> None:
    _, kc = kernel
    r = await probe(kc, PRELUDE + """
import ctypes
base = datasets.path("weather")
R["path"] = base
R["listing"] = sorted(os.listdir(base))
R["jan"] = open(f"{base}/jan.csv").read()
R["member"] = datasets.open("weather", "sub/feb.csv").read().decode()
attempt("write", lambda: open(f"{base}/jan.csv", "a"))
attempt("create", lambda: open(f"{base}/new.csv", "w"))
attempt("chmod", lambda: os.chmod(f"{base}/jan.csv", 0o777))
attempt("rename", lambda: os.rename(f"{base}/jan.csv", f"{base}/x.csv"))
attempt("unlink", lambda: os.unlink(f"{base}/jan.csv"))
attempt("mkdir", lambda: os.mkdir(f"{base}/d"))
attempt("rmdir", lambda: os.rmdir(f"{base}/sub"))
attempt("symlink_in_tree", lambda: open(f"{base}/shadow").read())
libc = ctypes.CDLL(None, use_errno=True)
rc = libc.mount(None, base.encode(), None, 0x20 | 0x1000, None)  # MS_REMOUNT|MS_BIND
R["remount"] = errno.errorcode.get(ctypes.get_errno()) if rc != 0 else "ok"   # F14
info = [l.split() for l in open("/proc/self/mountinfo") if l.split()[4] == base]
R["mount_opts"] = info[0][5].split(",") if info else []
print("RESULT", json.dumps(R))
""")
    assert r["path"] == "/data/weather"
    assert r["listing"] == ["jan.csv", "shadow", "sub"]
    assert r["jan"] == "jan\n" and r["member"] == "feb\n"
    for key in ("write", "create", "chmod", "rename", "unlink", "mkdir", "rmdir"):
        assert r[key] == "EROFS", key
    assert r["symlink_in_tree"] == "ENOENT"  # resolves inside the jail, which has no shadow
    assert r["remount"] == "EPERM"
    assert "ro" in r["mount_opts"]
    if ROOT:  # as root the warden staged a nosuid, nodev, noexec view (docs/datasets.md)
        assert {"nosuid", "nodev", "noexec"} <= set(r["mount_opts"]), r["mount_opts"]
    assert sorted(p.name for p in (data / "weather").iterdir()) == ["jan.csv", "shadow", "sub"]
    assert (data / "weather" / "jan.csv").read_text() == "jan\n"


# -- 1. refusals speak to the user and leak no host path -------------------------------------

async def test_refusals(kernel: tuple[AsyncKernelManager, Any], data: Path,
                        jupyter_env: dict[str, str]) -> None:
    km, kc = kernel
    r = await probe(kc, PRELUDE + """
import time
def msg(*a):
    try:
        datasets.open(*a)
        return "OPENED"
    except Exception as e:
        return f"{type(e).__name__}: {e}"
R["hr"] = msg("hr")
R["nosuch"] = msg("nosuch")
R["dotdot"] = msg("../../etc/shadow")
R["member_dotdot"] = msg("weather", "../sales.csv")
R["leak"] = msg("leak")
t = time.monotonic(); R["pipe"] = msg("pipe"); R["pipe_seconds"] = time.monotonic() - t
R["dir"] = msg("weather")
try:
    datasets.path("sales")
except Exception as e:
    R["path_of_file"] = str(e)
print("RESULT", json.dumps(R))
""")
    assert r["hr"] == ("DatasetError: dataset 'hr' is not granted to this kernel; granted: "
                       "leak, pipe, sales, weather")
    assert r["nosuch"] == r["hr"].replace("'hr'", "'nosuch'")  # B1: no existence oracle
    assert r["dotdot"].startswith("DatasetError: a dataset name is")
    assert r["member_dotdot"].startswith("DatasetError: a file name is a relative path")
    assert r["leak"] == "DatasetError: dataset 'leak' is not available"  # F17
    assert r["pipe"] == "DatasetError: dataset 'pipe' is not available"  # B11
    assert r["pipe_seconds"] < 5
    assert "is a directory (mounted at /data/weather)" in r["dir"]
    assert "is a file, not a mounted directory" in r["path_of_file"]
    assert str(data) not in json.dumps(r)  # no host path in any message
    assert "shadow" not in r["leak"] + r["pipe"]  # nor where a symlink points
    refused = [(e["fields"]["dataset"], e["fields"]["reason"])
               for e in audit_events(jupyter_env, km) if e["event"] == "broker.open"]
    assert ("leak", "ELOOP") in refused and ("hr", "not granted") in refused
    assert ("pipe", "not a regular file") in refused


# -- 2. a hostile client inside the jail ----------------------------------------------------

async def test_hostile_client_leaves_the_broker_serving(
        kernel: tuple[AsyncKernelManager, Any]) -> None:
    _, kc = kernel
    r = await probe(kc, PRELUDE + """
import array
def raw(payload, fds=()):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(datasets.BROKER_SOCKET)
    try:
        if fds:
            s.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                   array.array("i", fds).tobytes())])
        else:
            s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    buf = b""
    try:
        while chunk := s.recv(65536):
            buf += chunk
    except OSError:
        pass
    s.close()
    return json.loads(buf[4:]).get("error", "ok") if len(buf) > 4 else "dropped"
def frame(obj):
    b = json.dumps(obj).encode()
    return struct.pack(">I", len(b)) + b
R["huge_prefix"] = raw(b"\\xff\\xff\\xff\\xff")                                    # B7
R["oversized"] = raw(struct.pack(">I", 65536) + b"x" * 65536)
R["bad_json"] = raw(struct.pack(">I", 8) + b"not json")
R["nul"] = raw(frame({"v": 1, "op": "open", "dataset": "sales\\x00"}))              # F18
R["nfd"] = raw(frame({"v": 1, "op": "open", "dataset": "cafe\\u0301"}))
R["path"] = raw(frame({"v": 1, "op": "open", "dataset": "/etc/shadow"}))             # F16
R["traversal"] = raw(frame({"v": 1, "op": "open", "dataset": "ds1/../../root"}))
R["injection"] = raw(frame({"v": 1, "op": "open", "dataset": "sales",             # B14
                            "path": "x", "flags": "O_RDWR"}))
r, w = os.pipe()
R["fds_to_broker"] = raw(frame({"v": 1, "op": "open", "dataset": "sales"}), [r, w])  # B8
R["flood"] = sorted(set(raw(frame({"v": 1, "op": "list"})) for _ in range(300)))   # B6
import time
deadline = time.monotonic() + 20
while True:  # wait for the rate limit to refill, then a good request is served
    try:
        R["after"] = datasets.open("sales").read().decode()
        break
    except datasets.DatasetError as e:
        if time.monotonic() > deadline:
            R["after"] = str(e)
            break
attempt("unlink_socket", lambda: os.unlink(datasets.BROKER_SOCKET))               # B12
attempt("plant_socket", lambda: socket.socket(socket.AF_UNIX).bind(
    datasets.BROKER_DIR + "/evil.sock"))
print("RESULT", json.dumps(R))
""")
    assert r["huge_prefix"] == "too_large" and r["oversized"] in ("too_large", "dropped")
    for key in ("bad_json", "nul", "nfd", "path", "traversal", "injection", "fds_to_broker"):
        assert r[key] == "malformed", key
    assert "rate_limited" in r["flood"]
    assert r["after"] == SALES
    assert r["unlink_socket"] == "EROFS" and r["plant_socket"] == "EROFS"


# -- selection at launch ------------------------------------------------------------------

async def test_launch_asking_for_a_dataset_outside_the_profile_fails(data: Path) -> None:
    km = AsyncKernelManager(kernel_name="cellblock-agent")
    with pytest.raises(PolicyError) as info:
        await km.start_kernel(env={**os.environ, "CELLBLOCK_DATASETS": "sales,hr"})
    assert str(info.value) == ("dataset 'hr' (from $CELLBLOCK_DATASETS) is not allowed by "
                               "profile 'agent'; it allows: sales, weather, archive, notes, "
                               "leak, pipe")
    assert km.provisioner is None or not km.has_kernel


async def test_defaults_and_the_socket_is_per_kernel(data: Path) -> None:
    """Defaults apply when nothing is asked; B2: another kernel (profile tiny, no datasets)
    cannot use this kernel's grants, since its broker socket is its own."""
    a = await start()
    b = await start(profile="tiny")
    try:
        ra = await probe(a[1], PRELUDE + "R['names'] = [i.name for i in datasets.list()]\n"
                                         "print('RESULT', json.dumps(R))\n")
        rb = await probe(b[1], PRELUDE + """
R["names"] = [i.name for i in datasets.list()]
try:
    datasets.open("sales")
except datasets.DatasetError as e:
    R["sales"] = str(e)
R["socket"] = os.path.exists(datasets.BROKER_SOCKET)
print("RESULT", json.dumps(R))
""")
    finally:
        await stop(*a)
        await stop(*b)
    assert ra["names"] == ["sales", "weather"]
    assert rb["names"] == []
    assert rb["sales"] == "dataset 'sales' is not granted to this kernel; granted: none"
    assert rb["socket"] is True  # its own broker, which holds no grants


# -- 3. grant and revoke on a running kernel ------------------------------------------------

def cellblock(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "cellblock"), *args], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ))


async def test_grant_and_revoke_without_a_restart(data: Path,
                                                  jupyter_env: dict[str, str]) -> None:
    km, kc = await start()
    try:
        prefix = km.kernel_id[:8]
        before = await probe(kc, PRELUDE + """
try:
    datasets.open("notes")
except datasets.DatasetError as e:
    R["before"] = str(e)
print("RESULT", json.dumps(R))
""")
        assert before["before"] == ("dataset 'notes' is not granted to this kernel; "
                                    "granted: sales, weather")
        out = cellblock("grant", prefix, "notes")
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == f"kernel {km.kernel_id}: granted 'notes'"
        out = cellblock("grant", prefix, "archive")  # a directory, granted while running
        assert out.returncode == 0 and "is not mounted" in out.stdout, out
        during = await probe(kc, PRELUDE + """
kept = datasets.open("notes")
R["notes"] = kept.read(7).decode()
R["archive"] = datasets.open("archive", "2023.csv").read().decode()
try:
    datasets.path("archive")
except datasets.DatasetError as e:
    R["archive_path"] = str(e)
print("RESULT", json.dumps(R))
""")
        assert during == {"notes": "meeting", "archive": "old\n", "archive_path": (
            "dataset 'archive' was granted after the kernel started, so it is not mounted; "
            "read its files with datasets.open('archive', 'relative/path')")}
        out = cellblock("revoke", prefix, "notes")
        assert out.returncode == 0 and "descriptors already passed stay readable" in out.stdout
        after = await probe(kc, PRELUDE + """
try:
    datasets.open("notes")
except datasets.DatasetError as e:
    R["again"] = str(e)
R["kept"] = kept.read().decode()   # B13: the descriptor passed before stays readable
print("RESULT", json.dumps(R))
""")
        assert after["again"].startswith("dataset 'notes' is not granted to this kernel")
        assert after["kept"] == " notes\n"
        refused = cellblock("grant", prefix, "hr")
        assert refused.returncode == 2
        assert "dataset 'hr' is not allowed by this kernel's profile" in refused.stderr
        assert cellblock("revoke", "nosuch-kernel", "notes").returncode == 2
    finally:
        await stop(km, kc)
    ops = [(e["event"], e["fields"]["dataset"], e["fields"]["decision"])
           for e in audit_events(jupyter_env, km) if e["event"] in ("broker.grant",
                                                                    "broker.revoke")]
    assert ops == [("broker.grant", "notes", "done"), ("broker.grant", "archive", "done"),
                   ("broker.revoke", "notes", "done"), ("broker.grant", "hr", "refused")]
