"""The Enterprise Gateway demo, end to end (deploy/eg-demo.sh runs it; root, podman).

1. `podman system service` on a socket of its own: the Docker API, answered by podman.
2. A kernelspec `cellblock-agent-container` whose kernels are containers of
   localhost/cellblock-kernel:dev, started by deploy/gateway/launch_container.py with
   the limits `cellblock-eg-launcher --pod-resources agent` prints.
3. The gateway: Jupyter Enterprise Gateway 3.3 with its DockerProcessProxy (ENGINE=eg), or
   Jupyter Kernel Gateway 3 with gateway_provisioners' DockerProvisioner (ENGINE=gp).
4. A client over the gateway's REST API and WebSocket: start a kernel, execute in the jail
   (hostname, home, host files, the profile's redaction), interrupt a running cell
   through the gateway (the comm port's SIGINT), delete the kernel.
5. Checks that no container of the kernel is left, and stops everything it started.

Prints what happened; exits 1 on the first thing that did not.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

REPO = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("KERNEL_IMAGE", "localhost/cellblock-kernel:dev")
ENGINE = os.environ.get("ENGINE", "eg")
GATEWAY_PY = Path(os.environ["GATEWAY_PYTHON"])  # the gateway's venv's python
CELLBLOCK_BIN = Path(sys.executable).parent
SPEC = "cellblock-agent-container"
PROXY = {"eg": {"process_proxy": {
    "class_name": "enterprise_gateway.services.processproxies.docker_swarm.DockerProcessProxy",
    "config": {"image_name": IMAGE}}},
    "gp": {"kernel_provisioner": {"provisioner_name": "docker-provisioner",
                                  "config": {"image_name": IMAGE}}}}


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def wait_until(cond: Any, timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(0.2)  # polling a condition
    raise SystemExit(f"FAILED: {what} within {timeout:.0f} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def containers(kernel_id: str, env: dict[str, str]) -> list[str]:
    out = subprocess.run(["podman", "ps", "-a", "--filter", f"label=kernel_id={kernel_id}",
                          "--format", "{{.Names}} {{.Status}}"], capture_output=True,
                         text=True, env=env, check=True)
    return out.stdout.splitlines()


async def execute(ws: WebSocketClientConnection, code: str,
                  on_busy: Any = None) -> dict[str, str]:
    """Run one cell; what it said. ``on_busy``: awaited once the kernel is busy with it."""
    msg_id = uuid.uuid4().hex
    await ws.write_message(json.dumps({
        "header": {"msg_id": msg_id, "msg_type": "execute_request", "session": "demo",
                   "username": "analyst1", "version": "5.3", "date": "2026-01-01T00:00:00Z"},
        "parent_header": {}, "metadata": {}, "channel": "shell",
        "content": {"code": code, "silent": False, "store_history": True,
                    "user_expressions": {}, "allow_stdin": False, "stop_on_error": True}}))
    got: dict[str, str] = {"stdout": "", "stderr": ""}
    idle = False
    while not ("reply" in got and idle):
        raw = await asyncio.wait_for(ws.read_message(), 120)
        if raw is None:
            raise SystemExit(f"FAILED: the WebSocket closed; got {got}")
        msg = json.loads(raw)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            got[content["name"]] += content["text"]
        elif kind == "execute_result":
            got["result"] = content["data"]["text/plain"]
        elif kind == "error":
            got["error"] = f"{content['ename']}: {content['evalue']}"
        elif kind == "execute_reply":
            got["reply"] = content["status"]
        elif kind == "status" and content["execution_state"] == "busy" and on_busy:
            await on_busy()
        elif kind == "status" and content["execution_state"] == "idle":
            idle = True
    return got


def check(cond: bool, text: str) -> None:
    if not cond:
        raise SystemExit(f"FAILED: {text}")
    say(f"ok: {text}")


async def client(base: str, token: str, env: dict[str, str]) -> None:
    http = AsyncHTTPClient()
    auth = {"Authorization": f"token {token}"}
    specs = json.loads((await http.fetch(f"http://{base}/api/kernelspecs", headers=auth)).body)
    check(set(specs["kernelspecs"]) == {SPEC}, f"the gateway lists only {SPEC}")
    started = time.monotonic()
    resp = await http.fetch(f"http://{base}/api/kernels", method="POST", headers=auth,
                            request_timeout=300, body=json.dumps({
                                "name": SPEC, "env": {
                                    "KERNEL_USERNAME": "analyst1", "KERNEL_MEMORY": "64Gi",
                                    "KERNEL_IMAGE": "localhost/cellblock-base:bookworm"}}))
    kernel_id = json.loads(resp.body)["id"]
    say(f"kernel {kernel_id} started in {time.monotonic() - started:.1f} s; containers: "
        f"{containers(kernel_id, env)}")
    inspect = json.loads(subprocess.run(
        ["podman", "inspect", f"cellblock-{kernel_id}"], capture_output=True, text=True,
        env=env, check=True).stdout)[0]
    hc = inspect["HostConfig"]
    say(f"container limits: memory {hc['Memory']} B, cpus {hc['NanoCpus'] / 1e9}, "
        f"pids {hc['PidsLimit']}; user {inspect['Config']['User']!r}; env keys "
        f"{sorted(k.split('=')[0] for k in inspect['Config']['Env'])}")
    check(hc["Memory"] == 2 * 1024**3, "the memory limit is the profile's (kernel + warden), "
          "not the request's KERNEL_MEMORY=64Gi")
    check(inspect["ImageName"] == IMAGE, f"the image is the kernelspec's {IMAGE}, not the "
          "request's KERNEL_IMAGE")
    ws = await websocket_connect(HTTPRequest(
        f"ws://{base}/api/kernels/{kernel_id}/channels?session_id=demo", headers=auth))
    try:
        got = await execute(ws, "import os, socket; print(socket.gethostname(), "
                            "os.path.expanduser('~'), os.getuid(), "
                            "os.path.exists('/etc/shadow'))")
        say(f"cell 1 -> {got}")
        host, home, _uid, shadow = got["stdout"].split()
        check((host, home, shadow) == ("cellblock", "/home/jovyan", "False"),
              "the cell ran in the jail (its hostname, a scratch home, no /etc/shadow)")
        got = await execute(ws, 'print("key:", "AKIA" + "QWERTYUIOPASDFGH")')
        say(f"cell 2 -> {got}")
        check(got["stdout"] == "key: [REDACTED:aws-access-key-id]\n",
              "the gate redacted a secret printed in the jail")
        async def interrupt() -> None:
            await http.fetch(f"http://{base}/api/kernels/{kernel_id}/interrupt",
                             method="POST", headers=auth, body="")

        got = await execute(ws, "import time\nfor _ in range(600): time.sleep(0.1)",
                            on_busy=interrupt)
        say(f"cell 3 (interrupted through the gateway) -> {got}")
        check(got.get("error", "").startswith("KeyboardInterrupt"),
              "an interrupt from the gateway stopped the cell")
        got = await execute(ws, "print(6 * 7)")
        check(got["stdout"] == "42\n", "the kernel still runs after the interrupt")
    finally:
        ws.close()
        started = time.monotonic()
        resp = await http.fetch(f"http://{base}/api/kernels/{kernel_id}", method="DELETE",
                                headers=auth, request_timeout=120)
    say(f"DELETE -> {resp.code} in {time.monotonic() - started:.1f} s")
    try:
        await http.fetch(f"http://{base}/api/kernels/{kernel_id}", headers=auth)
        check(False, "the gateway forgot the kernel")
    except HTTPClientError as e:
        check(e.code == 404, "the gateway forgot the kernel")
    wait_until(lambda: not containers(kernel_id, env), 60,
               "the kernel's container to be gone")
    check(not containers(kernel_id, env), "no container of the kernel is left "
          f"(podman ps -a --filter label=kernel_id={kernel_id}: none)")
    http.close()


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="cellblock-eg-demo-"))
    procs: list[subprocess.Popen[bytes]] = []
    env = {**os.environ, "CONTAINERS_CONF": str(REPO / "deploy" / "containers.conf")}
    try:
        sock = work / "podman.sock"
        with (work / "podman.log").open("wb") as log:
            procs.append(subprocess.Popen(["podman", "system", "service", "--time=0",
                                           f"unix://{sock}"], env=env, stdout=log,
                                          stderr=subprocess.STDOUT))
        wait_until(sock.exists, 30, "podman system service to listen")
        say(f"podman system service (Docker API) on {sock}")
        pod = json.loads(subprocess.run([str(CELLBLOCK_BIN / "cellblock-eg-launcher"),
                                         "--pod-resources", "agent"], capture_output=True,
                                        text=True, check=True).stdout)
        say(f"profile agent: pod limits {pod}")
        spec_dir = work / "share" / "jupyter" / "kernels" / SPEC
        spec_dir.mkdir(parents=True)
        spec_dir.joinpath("kernel.json").write_text(json.dumps({
            "display_name": "Python (cellblock: agent, a container per kernel)",
            "language": "python", "metadata": PROXY[ENGINE],
            "env": {"DOCKER_HOST": f"unix://{sock}"},  # for launch_container.py
            "argv": [str(GATEWAY_PY), str(REPO / "deploy" / "gateway" / "launch_container.py"),
                     "--kernel-id", "{kernel_id}", "--port-range", "{port_range}",
                     "--response-address", "{response_address}",
                     "--public-key", "{public_key}", "--memory", str(pod["memory"]),
                     "--cpus", str(pod["cpus"]), "--pids", str(pod["pids"]),
                     "--seccomp", str(REPO / "deploy" / "seccomp.json"),
                     "--image", IMAGE]}, indent=1))
        port, token = free_port(), uuid.uuid4().hex
        gw_env = {**env, "DOCKER_HOST": f"unix://{sock}",
                  "JUPYTER_PATH": str(work / "share" / "jupyter"),
                  "JUPYTER_RUNTIME_DIR": str(work / "runtime"),
                  "JUPYTER_CONFIG_DIR": str(work / "config"), "JUPYTER_PLATFORM_DIRS": "1",
                  # podman lists its default network as "bridge" but names it "podman" in a
                  # container's NetworkSettings, where the gateways look for the address
                  "EG_DOCKER_NETWORK": "podman", "GP_DOCKER_NETWORK": "podman",
                  "EG_RESPONSE_PORT": str(free_port()), "GP_RESPONSE_PORT": str(free_port())}
        if ENGINE == "eg":
            argv = [str(GATEWAY_PY.parent / "jupyter"), "enterprisegateway",
                    "--ip=127.0.0.1", f"--port={port}", "--port_retries=0",
                    f"--EnterpriseGatewayApp.auth_token={token}",
                    f"--KernelSpecManager.allowed_kernelspecs={SPEC}"]
        else:
            argv = [str(GATEWAY_PY.parent / "jupyter"), "kernelgateway",
                    "--KernelGatewayApp.ip=127.0.0.1", f"--KernelGatewayApp.port={port}",
                    "--KernelGatewayApp.port_retries=0",
                    f"--KernelGatewayApp.auth_token={token}",
                    f"--KernelSpecManager.allowed_kernelspecs={SPEC}"]
        with (work / "gateway.log").open("wb") as log:
            procs.append(subprocess.Popen(argv, env=gw_env, stdout=log,
                                          stderr=subprocess.STDOUT, cwd=work))
        version = subprocess.run([str(GATEWAY_PY), "-c", "import importlib.metadata as m; "
                                  "print(*(f'{p} {m.version(p)}' for p in ("
                                  + ("'jupyter-enterprise-gateway', 'jupyter-client'"
                                     if ENGINE == "eg" else
                                     "'jupyter-kernel-gateway', 'gateway-provisioners', "
                                     "'jupyter-client'") + ", 'docker')), sep=', ')"],
                                 capture_output=True, text=True, check=True).stdout.strip()

        def up() -> bool:
            if procs[-1].poll() is not None:
                raise SystemExit("FAILED: the gateway exited:\n"
                                 + (work / "gateway.log").read_text()[-3000:])
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return True
            except OSError:
                return False

        wait_until(up, 120, "the gateway to listen")
        say(f"gateway ({ENGINE}): {version}; on 127.0.0.1:{port}")
        asyncio.run(client(f"127.0.0.1:{port}", token, env))
        say("demo passed")
        return 0
    except (SystemExit, Exception) as e:
        print(f"FAILED: {type(e).__name__}: {e}" if not isinstance(e, SystemExit) else e,
              flush=True)
        log = work / "gateway.log"
        if log.exists():
            print("--- gateway log (tail) ---\n" + log.read_text()[-4000:], flush=True)
        return 1
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
