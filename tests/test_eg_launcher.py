"""cellblock-eg-launcher, driven the way Enterprise Gateway and gateway_provisioners drive
a remote launcher, with their own server-side code:

- gateway_provisioners' ``ResponseManager`` (the same as Enterprise Gateway 3's) hands out
  the response address and public key, and decrypts what the launcher sends; a real
  jupyter_client connects to the ports it names and executes in the jail; the comm port
  takes an interrupt (SIGINT becomes an interrupt_request through the gate) and a
  shutdown, and nothing is left;
- Jupyter Kernel Gateway with gateway_provisioners' ``DistributedProvisioner`` (its
  remote provisioner for hosts; on the local host it runs the kernelspec's argv without
  ssh) starts the launcher from a kernelspec, and a client executes over the gateway's
  WebSocket;
- bad arguments are named (exit 2), a profile from the request's ``KERNEL_*`` values is
  not taken.

The container path (the same launcher as the image's command, started by Enterprise
Gateway's Docker process proxy against podman) is deploy/eg-demo.sh,
tests/test_container.py (opt-in).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient

from conftest import BIN, audit_events, free_port, jail_processes, jupyter_app, wait_for
from jupyter_ws import execute, open_channels

pytestmark = [pytest.mark.jail, pytest.mark.nonroot]
LAUNCHER = str(BIN / "cellblock-eg-launcher")
# In the jail: its own hostname, a scratch home, the host's files out of reach.
PROBE = ("import os, socket; print(socket.gethostname(), os.path.expanduser('~'), "
         "os.path.exists('/etc/shadow'), sum(range(10)))")


@pytest.fixture
async def responses() -> AsyncIterator[Any]:
    """gateway_provisioners' response manager, as a gateway holds it (a singleton on a
    tornado PeriodicCallback), on this test's event loop."""
    from gateway_provisioners.response_manager import ResponseManager

    rm = ResponseManager.instance()
    yield rm
    rm.stop_response_manager()
    ResponseManager.clear_instance()


async def connection_info(rm: Any, kernel_id: str, proc: subprocess.Popen[bytes],
                          log: Path) -> Any:
    """Wait as RemoteProvisionerBase.receive_connection_info does (its short waits,
    retried), while the launcher runs."""
    for _ in range(3000):
        try:
            return await rm.get_connection_info(kernel_id)
        except TimeoutError:
            assert proc.poll() is None, \
                f"the launcher exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
    raise AssertionError("no connection info from the launcher")


async def send_request(port: int, request: dict[str, Any]) -> None:
    """What RemoteProvisionerBase._send_listener_request sends: one JSON object, then EOF."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(json.dumps(request).encode())
    writer.write_eof()
    await writer.drain()
    writer.close()
    await writer.wait_closed()


async def run_cell(kc: Any, code: str) -> tuple[str, str]:
    """(stdout, the reply's status) of one cell."""
    msg_id = kc.execute(code)
    out = []
    while True:
        msg = await kc.get_iopub_msg(timeout=60)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    reply = await kc.get_shell_msg(timeout=60)
    return "".join(out), str(reply["content"]["status"])


async def test_launcher_speaks_the_gateway_protocol(responses: Any, no_leftovers: None,
                                                    tmp_path: Path) -> None:
    from jupyter_client.asynchronous.client import AsyncKernelClient

    kernel_id = str(uuid.uuid4())
    responses.register_event(kernel_id)
    env = {**os.environ, "KERNEL_ID": kernel_id, "RESPONSE_ADDRESS": responses.response_address,
           "PUBLIC_KEY": responses.public_key, "PORT_RANGE": "0..0",
           "KERNEL_CELLBLOCK_PROFILE": "analyst", "KERNEL_MEMORY": "64Gi"}
    log = (tmp_path / "launcher.log").open("wb")
    proc = subprocess.Popen([LAUNCHER], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        info = await connection_info(responses, kernel_id, proc, tmp_path / "launcher.log")
        assert info["kernel_id"] == kernel_id and info["comm_port"] > 0
        assert info["pid"] == proc.pid
        assert {"shell_port", "iopub_port", "stdin_port", "hb_port", "control_port",
                "key", "signature_scheme", "transport"} <= set(info)
        kc = AsyncKernelClient()
        kc.load_connection_info({**info, "ip": "127.0.0.1"})  # the server's own ip for it
        kc.start_channels(hb=False)  # no heartbeat race: wait_for_ready asks kernel_info
        try:
            await kc.wait_for_ready(timeout=60)
            out, status = await run_cell(kc, PROBE)
            assert status == "ok"
            host, home, shadow, total = out.split()
            assert (host, shadow, total) == ("cellblock", "False", "45"), out
            assert home != os.path.expanduser("~")
            # the launcher's profile (agent), not the request's KERNEL_* values
            starts = [e for e in audit_events(kernel_id) if e.event == "kernel.start"]
            assert [e.fields["profile"] for e in starts] == ["agent"], starts
            # SIGINT on the comm port: an interrupt_request through the gate
            msg_id = kc.execute("import time\nfor _ in range(600): time.sleep(0.1)")
            while True:
                msg = await kc.get_iopub_msg(timeout=60)
                if msg["parent_header"].get("msg_id") == msg_id and \
                        msg["msg_type"] == "status" and \
                        msg["content"]["execution_state"] == "busy":
                    break
            await send_request(info["comm_port"], {"signum": int(signal.SIGINT)})
            reply = await kc.get_shell_msg(timeout=60)
            assert reply["content"]["status"] == "error"
            assert reply["content"]["ename"] == "KeyboardInterrupt"
            await send_request(info["comm_port"], {"signum": 0})  # a poll: nothing happens
            out, status = await run_cell(kc, "print('still here')")
            assert (out, status) == ("still here\n", "ok")
        finally:
            kc.stop_channels()
        await send_request(info["comm_port"], {"shutdown": 1})
        assert await asyncio.get_running_loop().run_in_executor(None, proc.wait, 60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert wait_for(lambda: not jail_processes(kernel_id), timeout=30)
    text = (tmp_path / "launcher.log").read_text()
    assert "SIGINT: interrupt_request through the gate" in text
    assert responses.public_key not in text and str(info["key"]) not in text


def test_bad_arguments_are_named(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("KERNEL_ID", "RESPONSE_ADDRESS", "PUBLIC_KEY", "PORT_RANGE")}
        return subprocess.run([LAUNCHER, *args], capture_output=True, text=True, env=env,
                              timeout=60, check=False)

    out = run("--kernel-id", "k1")
    assert out.returncode == 2
    assert "--response-address, --public-key missing" in out.stderr
    out = run("--kernel-id", "../etc", "--response-address", "10.0.0.1:8877",
              "--public-key", "x")
    assert out.returncode == 2 and "kernel id '../etc' is not allowed" in out.stderr
    out = run("--kernel-id", "k1", "--response-address", "10.0.0.1", "--public-key", "x")
    assert out.returncode == 2 and "public key: not a base64 RSA public key" in out.stderr
    from Cryptodome.PublicKey import RSA

    pem = RSA.generate(1024).publickey().export_key().decode()
    key = "".join(line for line in pem.splitlines() if "-----" not in line)
    out = run("--kernel-id", "k1", "--response-address", "10.0.0.1", "--public-key", key)
    assert out.returncode == 2 and "response address '10.0.0.1' is not IP:PORT" in out.stderr
    out = run("--kernel-id", "k1", "--response-address", "10.0.0.1:1", "--public-key", key,
              "--port-range", "5000..5010")
    assert out.returncode == 2 and "port range '5000..5010'" in out.stderr
    out = run("--kernel-id", "k1", "--response-address", "10.0.0.1:1", "--public-key", key,
              "--transport-encryption", "required")
    assert out.returncode == 2 and "--transport-encryption required" in out.stderr


def test_comm_requests_are_checked() -> None:
    from cellblock.eg_protocol import MAX_REQUEST, parse_request

    assert parse_request(b'{"signum": 2}') == (2, False)
    assert parse_request(b'{"shutdown": 1}') == (None, True)
    assert parse_request(b'{"signum": 0}') == (0, False)
    for bad in (b'{"signum": "9"}', b'{"signum": true}', b'{"signum": 99}',
                b'{"signum": -1}', b'{"exec": "rm -rf /"}', b'[2]', b'not json',
                b'{"signum": 2, "x": ' + b"1" * MAX_REQUEST + b"}"):
        with pytest.raises(ValueError):
            parse_request(bad)


def test_the_request_and_the_protocol_never_reach_the_warden(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What the gateway sets in the launcher's environment (the request's KERNEL_* values,
    the protocol's address and key, its own EG_/GP_ settings) is not the warden's env."""
    from cellblock.eg_launcher import _warden_env

    for name in ("KERNEL_MEMORY", "KERNEL_IMAGE", "RESPONSE_ADDRESS", "PUBLIC_KEY",
                 "PORT_RANGE", "EG_DOCKER_NETWORK", "GP_DOCKER_NETWORK"):
        monkeypatch.setenv(name, "from-the-request")
    monkeypatch.setenv("CELLBLOCK_PROFILE", "agent")
    env = _warden_env()
    assert "from-the-request" not in env.values()
    assert env["CELLBLOCK_PROFILE"] == "agent" and env["PATH"] == os.environ["PATH"]


def test_connection_info_round_trip_with_the_gateways_decoder() -> None:
    """The payload decodes with gateway_provisioners' own _decode_payload (the gateway's
    side), and not with another key."""
    from gateway_provisioners.response_manager import ResponseManager

    from cellblock.eg_protocol import decrypt_payload, encrypt_payload

    rm = ResponseManager.instance()
    try:
        info = {"kernel_id": "k1", "key": "k3y", "shell_port": 1, "comm_port": 2}
        payload = encrypt_payload(info, rm.public_key)
        assert rm._decode_payload(payload) == {**info, "key": b"k3y"}
        from Cryptodome.PublicKey import RSA

        with pytest.raises(ValueError):
            decrypt_payload(payload, RSA.generate(1024))
    finally:
        rm.stop_response_manager()
        ResponseManager.clear_instance()


def test_pod_resources_are_the_profile_and_its_warden() -> None:
    out = subprocess.run([LAUNCHER, "--pod-resources", "agent"], capture_output=True,
                         text=True, check=True, timeout=60)
    assert json.loads(out.stdout) == {"memory": 2 * 1024**3, "cpus": 2.0, "pids": 192,
                                      "memory_mib": 2048}
    out = subprocess.run([LAUNCHER, "--pod-resources", "nope"], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 2 and "nope" in out.stderr


@pytest.fixture
def kernel_gateway(tmp_path: Path, jupyter_env: dict[str, str],
                   no_leftovers: None) -> Iterator[str]:
    """Kernel Gateway whose only kernelspec starts cellblock-eg-launcher through
    gateway_provisioners' DistributedProvisioner on this host."""
    spec = Path(jupyter_env["JUPYTER_PATH"]) / "kernels" / "cellblock-eg"
    spec.mkdir(parents=True)
    spec.joinpath("kernel.json").write_text(json.dumps({
        "display_name": "cellblock via a remote launcher", "language": "python",
        "metadata": {"kernel_provisioner": {"provisioner_name": "distributed-provisioner",
                                            "config": {"remote_hosts": ["localhost"]}}},
        "argv": [LAUNCHER, "--kernel-id", "{kernel_id}", "--port-range", "{port_range}",
                 "--response-address", "{response_address}", "--public-key", "{public_key}",
                 "--profile", "agent"],
        # The gateway launches with the request's env, not its own: the host's cellblock
        # settings (this session's policy, run dir, cgroup parent) come from the spec, as an
        # operator's would.
        "env": {k: v for k, v in os.environ.items() if k.startswith("CELLBLOCK_")}}))
    port = free_port()
    token = uuid.uuid4().hex
    argv = [str(BIN / "jupyter"), "kernelgateway", "--KernelGatewayApp.ip=127.0.0.1",
            f"--KernelGatewayApp.port={port}", "--KernelGatewayApp.port_retries=0",
            f"--KernelGatewayApp.auth_token={token}",
            "--KernelSpecManager.allowed_kernelspecs=cellblock-eg"]
    env_before = dict(os.environ)
    os.environ["GP_RESPONSE_PORT"] = str(free_port())  # not the shared default 8877
    os.environ["GP_KERNEL_LOG_DIR"] = str(tmp_path)  # the launcher's output (not /tmp)
    try:
        with jupyter_app(argv, port, token, tmp_path, "kernelgateway",
                         ready="/api/kernelspecs"):
            yield f"127.0.0.1:{port} {token}"
    finally:
        os.environ.clear()
        os.environ.update(env_before)


async def test_kernel_gateway_starts_it_through_gateway_provisioners(
        kernel_gateway: str, tmp_path: Path) -> None:
    base, token = kernel_gateway.split()
    http = AsyncHTTPClient()
    auth = {"Authorization": f"token {token}"}
    # gateway_provisioners refuses a kernel for the user root (its unauthorized_users):
    # the request names its user, as a gateway client does
    try:
        resp = await http.fetch(f"http://{base}/api/kernels", method="POST", headers=auth,
                                body=json.dumps({"name": "cellblock-eg",
                                                 "env": {"KERNEL_USERNAME": "analyst1"}}),
                                request_timeout=120)
    except Exception as e:
        logs = "".join(f"--- {p.name}\n{p.read_text()[-3000:]}\n"
                       for p in sorted(tmp_path.glob("*.log")))
        raise AssertionError(f"POST /api/kernels: {e}\n{logs}") from None
    kernel_id = json.loads(resp.body)["id"]
    try:
        ws = await open_channels(base, kernel_id, token, "eg")
        try:
            got = await execute(ws, PROBE, "eg")
            assert got["reply"] == "ok", got
            host, _, shadow, total = got["stdout"].split()
            assert (host, shadow, total) == ("cellblock", "False", "45"), got
            secret = "AKIA" + "QWERTYUIOPASDFGH"  # the gate's redaction is on the way
            got = await execute(ws, 'print("AKIA" + "QWERTYUIOPASDFGH")', "eg")
            assert got["stdout"] == "[REDACTED:aws-access-key-id]\n", got
            assert secret not in json.dumps(got)
        finally:
            ws.close()
    finally:
        resp = await http.fetch(f"http://{base}/api/kernels/{kernel_id}", method="DELETE",
                                headers=auth)
    assert resp.code == 204
    assert wait_for(lambda: not jail_processes(kernel_id), timeout=30), \
        jail_processes(kernel_id)
    http.close()
