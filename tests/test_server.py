"""Jupyter Server (REST + WebSocket) on cellblock-agent, and the death of a client.

Both start real processes: a `jupyter server` on 127.0.0.1 and, for the kill
test, a client process that starts a kernel and is then SIGKILLed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

from conftest import jail_processes, wait_for

pytestmark = [pytest.mark.jail, pytest.mark.nonroot, pytest.mark.usefixtures("no_leftovers")]
TOKEN = uuid.uuid4().hex


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(tmp_path: Path, jupyter_env: dict[str, str]) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter_server", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
         f"--IdentityProvider.token={TOKEN}", "--ServerApp.open_browser=False",
         f"--ServerApp.root_dir={tmp_path}",
         *(["--allow-root"] if os.geteuid() == 0 else [])],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path,
    )

    def up() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return True
        except OSError:
            return proc.poll() is not None

    try:
        assert wait_for(up, timeout=60) and proc.poll() is None, "jupyter server did not start"
        yield f"127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def execute_request(code: str, session: str) -> str:
    return json.dumps({
        "header": {"msg_id": uuid.uuid4().hex, "msg_type": "execute_request", "session": session,
                   "username": "test", "version": "5.3", "date": "2026-01-01T00:00:00Z"},
        "parent_header": {}, "metadata": {}, "channel": "shell",
        "content": {"code": code, "silent": False, "store_history": True,
                    "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
    })


async def test_jupyter_server_rest_and_websocket(server: str) -> None:
    http = AsyncHTTPClient()
    auth = {"Authorization": f"token {TOKEN}"}
    resp = await http.fetch(f"http://{server}/api/kernelspecs", headers=auth)
    assert "cellblock-agent" in json.loads(resp.body)["kernelspecs"]
    resp = await http.fetch(f"http://{server}/api/kernels", method="POST", headers=auth,
                            body=json.dumps({"name": "cellblock-agent"}))
    kernel = json.loads(resp.body)
    try:
        ws = await websocket_connect(HTTPRequest(
            f"ws://{server}/api/kernels/{kernel['id']}/channels?session_id=s1", headers=auth))
        request = execute_request("import os; print('uid', os.getuid()); 6 * 7", "s1")
        msg_id = json.loads(request)["header"]["msg_id"]
        await ws.write_message(request)
        got: dict[str, object] = {}
        while not ("reply" in got and got.get("idle")):
            raw = await ws.read_message()
            assert raw is not None, "websocket closed"
            msg = json.loads(raw)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                got["stdout"] = str(got.get("stdout", "")) + msg["content"]["text"]
            elif msg["msg_type"] == "execute_result":
                got["result"] = msg["content"]["data"]["text/plain"]
            elif msg["msg_type"] == "execute_reply":
                got["reply"] = msg["content"]["status"]
            elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                got["idle"] = True
        ws.close()
        assert got["stdout"] == "uid 1000\n"
        assert got["result"] == "42"
        assert got["reply"] == "ok"
    finally:
        await http.fetch(f"http://{server}/api/kernels/{kernel['id']}", method="DELETE",
                         headers=auth)
    http.close()


CLIENT = """
import asyncio, sys
from jupyter_client.manager import AsyncKernelManager
async def main():
    km = AsyncKernelManager(kernel_name="cellblock-agent")
    await km.start_kernel()
    kc = km.client(); kc.start_channels(); await kc.wait_for_ready(timeout=60)
    print("READY", km.kernel_id, flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


@pytest.mark.parametrize("round_", range(3))
def test_kill_9_client_leaves_nothing(round_: int, tmp_path: Path,
                                      jupyter_env: dict[str, str]) -> None:
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(CLIENT))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("READY"), line
    kernel_id = line.split()[1]
    run_dir = Path(jupyter_env["CELLBLOCK_RUNTIME_DIR"]) / kernel_id
    assert run_dir.is_dir()
    assert jail_processes(kernel_id)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert wait_for(lambda: not jail_processes(kernel_id), timeout=20), jail_processes(kernel_id)
    assert wait_for(lambda: not run_dir.exists(), timeout=10)
