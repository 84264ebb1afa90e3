"""The jailed kernel end to end, through jupyter_client's AsyncKernelManager.

Every test starts the real warden, nsjail and ipykernel, and checks from the
client's side what a user would see. Probes inside the kernel print a verdict;
the assertion is made here, on the host, so a kernel cannot fake a pass by
raising early.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import resource
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.session import Session

from conftest import BIN, CANARY_ENV, audit_events, wait_dead, wait_for

pytestmark = [pytest.mark.jail, pytest.mark.nonroot, pytest.mark.usefixtures("no_leftovers")]



async def run_cell(kc: Any, code: str, timeout: float = 60, **kw: Any) -> dict[str, Any]:
    """Execute ``code``; collect stdout, stderr, results and errors until idle."""
    msg_id = kc.execute(code, **kw)
    out: dict[str, Any] = {"stdout": "", "stderr": "", "results": [], "errors": [],
                           "reply": None}
    while True:
        msg = await kc.get_iopub_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            out[content["name"]] += content["text"]
        elif kind in ("execute_result", "display_data"):
            out["results"].append(content["data"])
        elif kind == "error":
            out["errors"].append(content)
        elif kind == "status" and content["execution_state"] == "idle":
            break
    reply = await kc.get_shell_msg(timeout=timeout)
    out["reply"] = reply["content"]
    return out



def test_kernelspecs_listed(jupyter_env: dict[str, str]) -> None:
    out = subprocess.run([str(BIN / "jupyter"), "kernelspec", "list", "--json"],
                         capture_output=True, text=True, check=True)
    specs = json.loads(out.stdout)["kernelspecs"]
    for name in ("cellblock-agent", "cellblock-analyst"):
        spec = specs[name]["spec"]
        assert spec["interrupt_mode"] == "message"
        assert spec["metadata"]["kernel_provisioner"]["provisioner_name"] == "cellblock-provisioner"


async def test_execute(kernel: tuple[AsyncKernelManager, Any]) -> None:
    _, kc = kernel
    out = await run_cell(kc, "1+1")
    assert out["reply"]["status"] == "ok"
    assert out["results"] == [{"text/plain": "2"}]
    out = await run_cell(kc, "import sys; print(sys.prefix)")
    assert out["stdout"].strip() == sys.prefix


async def test_network_is_unreachable(kernel: tuple[AsyncKernelManager, Any]) -> None:
    _, kc = kernel
    with socket.socket() as listener:  # a service on the host's loopback
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        code = f"""
import socket, errno
for target in [("1.1.1.1", 53), ("127.0.0.1", {port})]:
    try:
        socket.create_connection(target, 3).close()
        print("CONNECTED", target)
    except OSError as e:
        print("refused", target, errno.errorcode.get(e.errno, e))
"""
        out = await run_cell(kc, code)
    assert "CONNECTED" not in out["stdout"]
    assert "refused ('1.1.1.1', 53) ENETUNREACH" in out["stdout"]
    assert f"refused ('127.0.0.1', {port}) ECONNREFUSED" in out["stdout"]


async def test_host_files_and_env_invisible(kernel: tuple[AsyncKernelManager, Any]) -> None:
    _, kc = kernel
    code = f"""
import os
print("root", os.path.exists("/root"))
print("home", sorted(os.listdir("/home")))
print("shadow", os.path.exists("/etc/shadow"))
print("etc", sorted(os.listdir("/etc")))
print("canary_env", {CANARY_ENV!r} in os.environ)
print("environ_file", b"canary-env-value" in open("/proc/self/environ", "rb").read())
print("env_keys", sorted(os.environ))
"""
    out = (await run_cell(kc, code))["stdout"]
    assert "root False" in out
    assert "home ['jovyan']" in out
    assert "shadow False" in out
    assert "canary_env False" in out and "environ_file False" in out
    etc = json.loads(out.split("etc ", 1)[1].splitlines()[0].replace("'", '"'))
    assert "shadow" not in etc and "ssh" not in etc
    keys = json.loads(out.split("env_keys ", 1)[1].splitlines()[0].replace("'", '"'))
    assert not any(k.startswith(("JPY_", "AWS_", "SSH_", "JUPYTER")) for k in keys), keys


async def test_writes_outside_scratch_fail(kernel: tuple[AsyncKernelManager, Any]) -> None:
    _, kc = kernel
    code = """
import errno, os, sys
for path in ["/x", "/etc/passwd", "/usr/lib/evil", sys.prefix + "/evil.pth",
             "/opt/cellblock-kernel/x", "/proc/sys/kernel/core_pattern"]:
    try:
        open(path, "a").write("x")
        print("WROTE", path)
    except OSError as e:
        print("denied", path, errno.errorcode.get(e.errno))
for path in ["/tmp/ok", os.path.expanduser("~/ok")]:
    open(path, "w").write("fine")
    print("scratch", path, open(path).read())
"""
    out = (await run_cell(kc, code))["stdout"]
    assert "WROTE" not in out, out
    assert out.count("denied") == 6
    assert "scratch /tmp/ok fine" in out and "scratch /home/jovyan/ok fine" in out


@pytest.mark.profile("tiny")
async def test_tmpfs_full_is_enospc(kernel: tuple[AsyncKernelManager, Any]) -> None:
    _, kc = kernel
    code = """
import errno
try:
    with open("/tmp/fill", "wb") as f:
        for _ in range(64):
            f.write(b"\\0" * (1 << 20))
    print("NOT FULL")
except OSError as e:
    print("full", errno.errorcode.get(e.errno))
"""
    out = await run_cell(kc, code)
    assert out["stdout"].strip() == "full ENOSPC"


async def test_not_root_on_host(kernel: tuple[AsyncKernelManager, Any]) -> None:
    _, kc = kernel
    out = (await run_cell(kc, "import os; print(os.getuid(), open('/proc/self/uid_map').read())"))
    inside, *mapping = out["stdout"].split()
    assert inside == "1000"
    assert mapping[0] == "1000" and mapping[2] == "1"
    outside = int(mapping[1])
    assert outside != 0
    if os.geteuid() == 0:
        assert outside >= 0x40000000  # a per-kernel uid, not a host account
    else:
        assert outside == os.getuid()  # unprivileged: only our own uid can be mapped


@pytest.mark.profile("tiny")
async def test_memory_limit_names_the_limit(kernel: tuple[AsyncKernelManager, Any]) -> None:
    km, kc = kernel
    code = "x = bytearray(512 * 1024 * 1024)\nfor i in range(0, len(x), 4096): x[i] = 1"
    msg_id = kc.execute(code)
    errors = []
    while True:
        msg = await kc.get_iopub_msg(timeout=60)
        if msg["msg_type"] == "error":
            errors.append(msg)
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle" \
                and msg["parent_header"].get("msg_id") == msg_id:
            break
    assert errors, "no error reached the client"
    err = errors[-1]
    assert err["parent_header"]["msg_id"] == msg_id
    assert err["content"]["evalue"] == "cellblock: kernel stopped, memory limit 256 MiB exceeded"
    assert await wait_dead(km)
    exits = wait_for(lambda: [e for e in audit_events(km.kernel_id) if e.event == "kernel.exit"])
    assert exits and exits[0].fields["reason"] == "memory limit 256 MiB exceeded"






MULTIPART_BOMB = """
import zmq
sock = get_ipython().kernel.iopub_thread.socket   # the kernel's own socket to the gate
frame = zmq.Frame(b"x" * (32 << 20))             # one 32 MiB buffer, sent 128 times
sock.send_multipart([b"stream"] + [frame] * 128, copy=False)
print("sent")
"""


@pytest.mark.profile("analyst")
async def test_one_multipart_of_many_big_frames_cannot_swell_the_warden(
    kernel: tuple[AsyncKernelManager, Any],
) -> None:
    """THREATS R10/P6: libzmq buffers a whole multipart (4 GiB here, from 32 MiB of the
    kernel's memory) before the gate can refuse it; MAXMSGSIZE caps frames, not messages.
    Under the warden's address-space cap (the profile's ``warden_memory``, also its
    cgroup's limit) the allocation fails, libzmq drops that connection, the kernel
    reconnects: the warden stays bounded and keeps serving."""
    km, kc = kernel
    warden = km.provisioner.process.pid

    def rss() -> int:
        status = Path(f"/proc/{warden}/status").read_text()
        return next(int(line.split()[1]) * 1024 for line in status.splitlines()
                    if line.startswith("VmRSS:"))

    peak = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                peak[0] = max(peak[0], rss())
            stop.wait(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    kc.execute(MULTIPART_BOMB)
    try:
        swelled = wait_for(lambda: peak[0] > 256 * 1024**2, timeout=60)
        settled = wait_for(lambda: peak[0] > 256 * 1024**2 and rss() < 200 * 1024**2,
                           timeout=60)
    finally:
        stop.set()
        watcher.join()
    assert swelled, f"the attack did not reach the warden (peak {peak[0] >> 20} MiB)"
    assert peak[0] <= 1024**3, f"the warden reached {peak[0] >> 20} MiB (warden_memory 1 GiB)"
    assert settled, f"the warden kept {rss() >> 20} MiB"
    msg_id = kc.kernel_info()  # the gate still relays
    while (reply := await kc.get_shell_msg(timeout=60))["parent_header"]["msg_id"] != msg_id:
        pass
    assert reply["content"]["status"] == "ok"
    assert await km.is_alive()



@pytest.mark.profile("tiny")
async def test_fork_bomb_stopped_by_pids_limit(kernel: tuple[AsyncKernelManager, Any]) -> None:
    _, kc = kernel
    code = """
import os, signal, time
children = []
try:
    while True:
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        children.append(pid)
except BlockingIOError as e:
    print("stopped", len(children), e.errno)
finally:
    for pid in children:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
"""
    out = await run_cell(kc, code)
    verdict = out["stdout"].split()
    assert verdict[0] == "stopped", out
    assert 0 < int(verdict[1]) < 48  # the tiny profile's pids limit
    again = await run_cell(kc, "print('alive')")
    assert again["stdout"] == "alive\n"


async def test_interrupt_restart_keeps_ports(kernel: tuple[AsyncKernelManager, Any]) -> None:
    km, kc = kernel
    msg_id = kc.execute("x = 41\nprint('spinning', flush=True)\nwhile True: pass")
    await wait_for_stream(kc, msg_id, "spinning")  # x is set; the loop is running
    await km.interrupt_kernel()
    reply = await kc.get_shell_msg(timeout=30)
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    out = await run_cell(kc, "x + 1")
    if out["reply"]["status"] == "aborted":  # ipykernel aborts requests that reach it
        out = await run_cell(kc, "x + 1")    # before it has finished aborting its queue
    assert out["results"] == [{"text/plain": "42"}]

    before = km.get_connection_info()
    await km.restart_kernel()
    await kc.wait_for_ready(timeout=60)
    after = km.get_connection_info()
    ports = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
    assert [before[p] for p in ports] == [after[p] for p in ports]
    out = await run_cell(kc, "print('x' in globals())")
    assert out["stdout"] == "False\n"


async def wait_for_stream(kc: Any, msg_id: str, text: str) -> None:
    while True:
        msg = await kc.get_iopub_msg(timeout=30)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream" \
                and text in msg["content"]["text"]:
            return


@pytest.mark.profile("analyst")
async def test_stdin(kernel: tuple[AsyncKernelManager, Any]) -> None:
    _, kc = kernel
    msg_id = kc.execute("name = input('who? ')\nprint('hello', name)", allow_stdin=True)
    req = await kc.get_stdin_msg(timeout=30)
    assert req["msg_type"] == "input_request"
    assert req["content"]["prompt"] == "[sandboxed code asks] who? "  # PROMPT_MARK
    kc.input("cellblock")
    text = ""
    while True:
        msg = await kc.get_iopub_msg(timeout=30)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            text += msg["content"]["text"]
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    assert text == "hello cellblock\n"


@pytest.mark.parametrize("profile", ["agent", "cell"])  # allowlist set / unset, no stdin
async def test_no_stdin_profile_refuses_input_at_once(
    profile: str, jupyter_env: dict[str, str], no_leftovers: None,
) -> None:
    """THREATS P12: a client asking for stdin on a profile without it gets
    StdinNotImplementedError from input() at once (the gate sends allow_stdin false),
    not a prompt, and not a cell that hangs until its budget."""
    km = AsyncKernelManager(kernel_name=f"cellblock-{profile}")
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        out = await run_cell(kc, "input('AWS secret key? ')", allow_stdin=True)
        assert [e["ename"] for e in out["errors"]] == ["StdinNotImplementedError"], out
        with pytest.raises(queue.Empty):  # no prompt was forwarded
            await kc.get_stdin_msg(timeout=0.5)
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=False)


async def test_a_client_holding_many_descriptors_starts_kernels(
    jupyter_env: dict[str, str], no_leftovers: None,
) -> None:
    """A server with a few hundred kernels holds descriptors past 1024, where select()
    fails: the provisioner's launch socket there must still work (found by the capacity
    benchmark at ~150 kernels)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"the hard RLIMIT_NOFILE is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (2048, hard))
    ballast = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    km = AsyncKernelManager(kernel_name="cellblock-agent")
    try:
        await km.start_kernel()
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=60)
            assert (await run_cell(kc, "1 + 1"))["results"] == [{"text/plain": "2"}]
        finally:
            kc.stop_channels()
            await km.shutdown_kernel(now=False)
    finally:
        for fd in ballast:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_two_clients_see_iopub(kernel: tuple[AsyncKernelManager, Any]) -> None:
    km, kc = kernel
    # A second client has its own session (and so its own zmq identity), as a second
    # browser tab or a second backend process would.
    other = km.client(session=Session(key=km.session.key))
    other.start_channels()
    try:
        await other.wait_for_ready(timeout=30)
        msg_id = kc.execute("print('to everyone')")
        seen = ""
        while True:
            msg = await other.get_iopub_msg(timeout=30)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                seen += msg["content"]["text"]
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        assert seen == "to everyone\n"
        await kc.get_shell_msg(timeout=30)
        assert (await run_cell(other, "6*7"))["results"] == [{"text/plain": "42"}]
    finally:
        other.stop_channels()


async def test_client_key_not_in_jail(kernel: tuple[AsyncKernelManager, Any]) -> None:
    km, kc = kernel
    key = km.session.key.decode()
    assert len(key) >= 32
    # The cell must not carry the key itself (IPython's history would then hold it):
    # send it XOR-masked, so only the kernel's memory ever has the real value.
    mask = os.urandom(len(key))
    masked = bytes(a ^ b for a, b in zip(key.encode(), mask, strict=True))
    code = f"""
import os, stat, sys
needle = bytes(a ^ b for a, b in zip({masked!r}, {mask!r}))
hits, scanned = [], 0
# /usr and the Python environment are the host's read-only system files, bound
# whole; everything else the jail can see is scanned (/etc, /run, /tmp, /home,
# /dev/shm, the kernel package), and for every jail process its cmdline and
# environment.
skip = ("/proc", "/sys", "/dev", "/usr", sys.prefix)
paths = [f"/proc/{{p}}/{{n}}" for p in os.listdir("/proc") if p.isdigit()
         for n in ("cmdline", "environ")]
for root, dirs, files in os.walk("/"):
    if root != "/" and root.startswith(skip) and not root.startswith("/dev/shm"):
        dirs[:] = []
        continue
    paths += [os.path.join(root, name) for name in files]
for path in paths:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        continue
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            continue
        data = os.read(fd, 4 << 20)
    except OSError:
        continue
    finally:
        os.close(fd)
    scanned += 1
    if needle in data:
        hits.append(path)
print("scanned", scanned, "hits", hits)
"""
    out = await run_cell(kc, code, timeout=120)
    words = out["stdout"].split()
    assert words[0] == "scanned" and int(words[1]) > 10, out
    assert out["stdout"].rstrip().endswith("hits []"), out


async def test_forged_kernel_messages_never_reach_client(
    kernel: tuple[AsyncKernelManager, Any],
) -> None:
    km, kc = kernel
    code = """
from jupyter_client.session import Session
k = get_ipython().kernel
parent = k.get_parent("shell")
wrong = Session(key=b"not-the-kernel-key", username="kernel")
tag = "FOR" + "GED"  # built at run time: the code itself comes back in execute_input
wrong.send(k.iopub_socket, "stream", {"name": "stdout", "text": tag + "-WRONG-KEY"}, parent=parent)
right = Session(key=k.session.key, username="kernel")
fake_parent = dict(parent["header"], msg_id="not-a-request-the-gate-forwarded")
right.send(k.iopub_socket, "stream", {"name": "stdout", "text": tag + "-PARENT"},
           parent=fake_parent)
right.send(k.iopub_socket, "execute_reply", {"status": "ok"}, parent=parent)
print("sent")
"""
    msg_id = kc.execute(code)
    seen = []
    while True:
        msg = await kc.get_iopub_msg(timeout=30)
        seen.append(msg)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status" \
                and msg["content"]["execution_state"] == "idle":
            break
    texts = json.dumps([m["content"] for m in seen if m["msg_type"] != "execute_input"])
    assert "sent" in texts
    assert "FORGED" not in texts
    assert not [m for m in seen if m["msg_type"] == "execute_reply"]
    reply = await kc.get_shell_msg(timeout=30)
    assert reply["content"]["status"] == "ok"
    reasons = {e.fields.get("reason") for e in audit_events(km.kernel_id)
               if e.event == "gate.drop"}
    assert {"bad_signature", "unknown_parent"} <= reasons, reasons
