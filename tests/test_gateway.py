"""cellblock behind Jupyter Kernel Gateway, the way a remote LLM backend uses it.

Starts a real `jupyter kernelgateway` on 127.0.0.1 (token auth, a free port) with the
test session's kernelspecs, creates a `cellblock-agent` kernel over REST, executes over the
kernel's WebSocket with the Jupyter message protocol (JSON frames), checks the output and
that a planted secret comes back redacted by the gate, then deletes the kernel and checks
that nothing of it is left.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from conftest import BIN, free_port, jail_processes, jupyter_app, wait_for

pytestmark = [pytest.mark.jail, pytest.mark.nonroot]
TOKEN = uuid.uuid4().hex
AUTH = {"Authorization": f"token {TOKEN}"}


@pytest.fixture
def gateway(tmp_path: Path, no_leftovers: None) -> Iterator[str]:
    """A Kernel Gateway on 127.0.0.1 (jupyter-websocket API); yields ``host:port``.
    Requesting ``no_leftovers`` first makes its check run after the gateway stopped."""
    port = free_port()
    argv = [str(BIN / "jupyter"), "kernelgateway", "--KernelGatewayApp.ip=127.0.0.1",
            f"--KernelGatewayApp.port={port}", "--KernelGatewayApp.port_retries=0",
            f"--KernelGatewayApp.auth_token={TOKEN}"]
    with jupyter_app(argv, port, TOKEN, tmp_path, "kernelgateway", ready="/api/kernelspecs"):
        yield f"127.0.0.1:{port}"


def message(code: str, session: str) -> dict[str, Any]:
    """An execute_request as the WebSocket carries it (JSON, channel named in the frame)."""
    return {
        "header": {"msg_id": uuid.uuid4().hex, "msg_type": "execute_request",
                   "session": session, "username": "backend", "version": "5.3",
                   "date": "2026-01-01T00:00:00Z"},
        "parent_header": {}, "metadata": {}, "channel": "shell",
        "content": {"code": code, "silent": False, "store_history": True,
                    "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
    }


async def execute(ws: WebSocketClientConnection, code: str, session: str) -> dict[str, str]:
    """Send one cell; collect its stdout, result and reply status until the kernel is idle."""
    request = message(code, session)
    await ws.write_message(json.dumps(request))
    got: dict[str, str] = {"stdout": ""}
    while not ("reply" in got and "idle" in got):
        raw = await ws.read_message()
        assert raw is not None, f"websocket closed, got so far: {got}"
        msg = json.loads(raw)
        if msg["parent_header"].get("msg_id") != request["header"]["msg_id"]:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            got["stdout"] += content["text"]
        elif kind == "execute_result":
            got["result"] = content["data"]["text/plain"]
        elif kind == "execute_reply":
            got["reply"] = content["status"]
        elif kind == "status" and content["execution_state"] == "idle":
            got["idle"] = "yes"
    return got


async def test_kernel_gateway_rest_and_websocket(gateway: str) -> None:
    http = AsyncHTTPClient()
    with pytest.raises(HTTPClientError) as refused:
        await http.fetch(f"http://{gateway}/api/kernelspecs")
    assert refused.value.code == 401, "the gateway answered without the token"
    specs = json.loads((await http.fetch(f"http://{gateway}/api/kernelspecs",
                                         headers=AUTH)).body)
    assert {"cellblock-agent", "cellblock-analyst"} <= set(specs["kernelspecs"])

    resp = await http.fetch(f"http://{gateway}/api/kernels", method="POST", headers=AUTH,
                            body=json.dumps({"name": "cellblock-agent"}))
    kernel_id = json.loads(resp.body)["id"]
    assert jail_processes(kernel_id), "no warden/nsjail for the gateway's kernel"
    try:
        ws = await websocket_connect(HTTPRequest(
            f"ws://{gateway}/api/kernels/{kernel_id}/channels?session_id=llm", headers=AUTH))
        try:
            got = await execute(ws, "print(sum(range(10))); 6 * 7", "llm")
            assert got == {"stdout": "45\n", "result": "42", "reply": "ok", "idle": "yes"}
            secret = "AKIA" + "IOSFODNN7EXAMPLE"
            got = await execute(ws, 'key = "AKIA" + "IOSFODNN7EXAMPLE"; print("key:", key)',
                                "llm")
            assert got["reply"] == "ok", got
            assert got["stdout"] == "key: [REDACTED:aws-access-key-id]\n", got
            assert secret not in json.dumps(got)
        finally:
            ws.close()
    finally:
        resp = await http.fetch(f"http://{gateway}/api/kernels/{kernel_id}", method="DELETE",
                                headers=AUTH)
    assert resp.code == 204
    with pytest.raises(HTTPClientError) as gone:
        await http.fetch(f"http://{gateway}/api/kernels/{kernel_id}", headers=AUTH)
    assert gone.value.code == 404, "the gateway still knows the deleted kernel"
    assert wait_for(lambda: not jail_processes(kernel_id), timeout=30), \
        jail_processes(kernel_id)
    http.close()
