"""The host is never steered by the jail (issue 12): attacks from inside a real jailed kernel
on the paths, connections and names the warden uses.

- H1, H3: the kernel-facing ipc dir (``/run/cellblock``) is the warden's, read-only in the jail:
  no file, symlink, mode or xattr can be planted, and a kernel that drops its own sockets
  makes the *kernel* reconnect: a host unix socket the jail names is never connected to.
- H2: a kernel that keeps making connections to the warden's sockets (each one a host
  cost) is stopped, with the reason shown to the client and audited once.
- H6: kernel ids that cannot be names (``..``, ``/``, a leading dot) are refused before
  anything starts, through jupyter_client and through Jupyter Server's REST API.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from containment import start_kernel
from jupyter_client.manager import AsyncKernelManager
from test_containment import collect, jailed

from conftest import audit_events, free_port, jupyter_app, wait_dead, wait_for


@pytest.fixture
def host_socket() -> Any:
    """A unix socket listening on the host in a private directory (mode 0700), as an
    ssh-agent or a Docker socket would; yields (path, accepted-connection counter)."""
    top = tempfile.mkdtemp(prefix="cbsock-", dir="/tmp")
    os.chmod(top, 0o700)
    path = os.path.join(top, "agent.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen(64)
    listener.setblocking(False)

    def accepted() -> int:
        n = 0
        while True:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                return n
            conn.close()
            n += 1

    yield path, accepted
    listener.close()
    os.unlink(path)
    os.rmdir(top)


PLANT = """
import errno, os
results = {}
def attempt(name, fn):
    try:
        fn()
        results[name] = "DONE"
    except OSError as exc:
        results[name] = errno.errorcode[exc.errno]
attempt("write", lambda: open("/run/cellblock/fill", "wb").write(b"x"))
attempt("symlink", lambda: os.symlink(%(target)r, "/run/cellblock/k-9"))
attempt("replace", lambda: os.replace("/run/cellblock/kernel.json", "/run/cellblock/k-3"))
attempt("unlink", lambda: os.unlink("/run/cellblock/k-3"))
attempt("chmod", lambda: os.chmod("/run/cellblock", 0o777))
attempt("xattr", lambda: os.setxattr("/run/cellblock", "user.cb", b"1"))
attempt("mkdir", lambda: os.mkdir("/run/cellblock/trap"))
print(__import__("json").dumps(results))
"""

# Close the kernel's own stdin and shell sockets' connections and reconnect them: the
# first version's gate reconnected by path then, following whatever the jail had put there.
DROP_SOCKETS = """
from ipykernel.kernelapp import IPKernelApp
app = IPKernelApp.instance()
for sock in (app.stdin_socket,):
    endpoint = "ipc:///run/cellblock/k-3"
    sock.disconnect(endpoint)
    sock.connect(endpoint)
print("dropped")
"""


@jailed
async def test_ipc_dir_cannot_be_written_and_never_steers_the_warden(
        jupyter_env: dict[str, str], host_socket: Any) -> None:
    """H1, H3 (issue 12 findings 1 and 3): every write to the ipc dir fails, and after the
    kernel dropped and remade its connections the host socket saw nothing, the warden
    made no connection of its own, and the kernel still works."""
    path, accepted = host_socket
    km = await start_kernel("agent")
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        out = await collect(kc, PLANT % {"target": path})
        assert out["errors"] == [], out
        results = json.loads(out["stdout"])
        assert set(results) == {"write", "symlink", "replace", "unlink", "chmod", "xattr",
                                "mkdir"}
        assert all(v in ("EROFS", "EACCES", "EPERM") for v in results.values()), results
        out = await collect(kc, DROP_SOCKETS)
        # (the gate's "connection broke and came back" marker may reach this cell, or not:
        # libzmq may report the new connection before the old one's end, and then nothing
        # was ever down)
        assert out["errors"] == [] and "dropped\n" in out["stdout"], out
        again = await collect(kc, "print(6 * 7)")
        assert again == {"stdout": "42\n", "errors": []}, again
        assert accepted() == 0, "the warden connected to a host socket the jail named"
        run_dir = Path(os.environ["CELLBLOCK_RUNTIME_DIR"]) / str(km.kernel_id)
        names = sorted(p.name for p in (run_dir / "ipc").iterdir())
        assert names == ["k-1", "k-2", "k-3", "k-4", "k-5", "kernel.json"], names
        assert not any((run_dir / "ipc" / n).is_symlink() for n in names)
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=False)


STORM = """
import socket
n = 0
for _ in range(200):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect("/run/cellblock/k-3")
        n += 1
    except OSError:
        pass
    finally:
        s.close()
print("connected", n)
import time
while True:  # the cell lasts until the warden has stopped the kernel (it counts the
    time.sleep(0.05)  # connections on its own thread, maybe after the loop above ended)
"""


@jailed
async def test_connection_storm_stops_the_kernel_with_a_reason(
        jupyter_env: dict[str, str]) -> None:
    """H2 (issue 12 finding 2): connections to the warden's sockets are the kernel's to
    make, and each is counted; past the bound (GateLimits.max_kernel_connections) the
    kernel is stopped, the client is told why, and the audit log says it once."""
    km = await start_kernel("agent")
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        out = await collect(kc, STORM)
        assert len(out["errors"]) == 1, out
        assert out["errors"][0].startswith(
            "cellblock: kernel stopped, its stdin connection to the warden was made 33 times"
        ), out
        assert await wait_dead(km)
        events = audit_events(str(km.kernel_id))
        faults = [e for e in events if e.event == "gate.fault"]
        assert len(faults) == 1 and faults[0].fields["reason"] == "too_many_connections"
        exits = [e for e in events if e.event == "kernel.exit"]
        assert exits[-1].fields["budget"] == "connections"
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)


BAD_IDS = ["../escape", "a/b", ".hidden", "-x", "", "x" * 65, "k\x00", "name with space"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_kernel_ids_are_refused_by_name(bad: str) -> None:
    """Issue 12 finding 6: every place a kernel id becomes a name refuses it, naming it."""
    from cellblock.audit import AuditLog
    from cellblock.errors import BadKernelId
    from cellblock.names import check_kernel_id
    from cellblock.rundir import RunDir

    for make in (check_kernel_id, lambda k: RunDir(Path("/nonexistent"), k),
                 lambda k: AuditLog(Path("/nonexistent"), k)):
        with pytest.raises(BadKernelId, match=r"kernel id .* is not allowed"):
            make(bad)


@pytest.mark.parametrize("good", [str(uuid.uuid4()), "pool-0123456789ab", "k_1", "A"])
def test_good_kernel_ids_pass(good: str) -> None:
    from cellblock.names import check_kernel_id

    assert check_kernel_id(good) == good


@pytest.mark.jail
@pytest.mark.nonroot
async def test_jupyter_client_with_a_bad_kernel_id_starts_nothing(
        jupyter_env: dict[str, str], no_leftovers: None) -> None:
    km = AsyncKernelManager(kernel_name="cellblock-agent")
    with pytest.raises(Exception, match=r"kernel id '\.\./x' is not allowed"):
        await km.start_kernel(kernel_id="../x")
    assert not (Path(os.environ["CELLBLOCK_RUNTIME_DIR"]) / "x").exists()


@pytest.mark.jail
@pytest.mark.nonroot
def test_jupyter_server_refuses_a_client_chosen_bad_kernel_id(
        jupyter_env: dict[str, str], tmp_path: Path, no_leftovers: None) -> None:
    """Jupyter Server accepts a client-chosen ``kernel_id`` in POST /api/kernels: a bad one
    is refused with the reason, and no run dir, cgroup or audit file is made."""
    port, token = free_port(), uuid.uuid4().hex
    argv = [sys.executable, "-m", "jupyter_server", "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={token}", "--ServerApp.open_browser=False",
            f"--ServerApp.root_dir={tmp_path}", *(["--allow-root"] if os.geteuid() == 0 else [])]
    with jupyter_app(argv, port, token, tmp_path, "server"):
        body = json.dumps({"name": "cellblock-agent", "kernel_id": "..x"}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/kernels", data=body, method="POST",
            headers={"Authorization": f"token {token}", "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(req, timeout=60)
        assert raised.value.code >= 400
        raised.value.close()
    log = (tmp_path / "server.log").read_text()
    assert "kernel id '..x' is not allowed" in log, log[-3000:]
    audit = Path(jupyter_env["CELLBLOCK_AUDIT_DIR"])
    assert not wait_for(lambda: list(audit.glob("..x*")), timeout=0.1)
