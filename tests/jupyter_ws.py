"""Run a cell over a Jupyter kernel's WebSocket (``/api/kernels/<id>/channels``), the way a
browser or a remote backend does: JSON frames with the channel named in each message.

Used by tests/test_gateway.py (Kernel Gateway) and tests/test_quickstarts.py (the
JupyterLab that docs/quickstart-analyst.md starts).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect


def execute_message(code: str, session: str) -> dict[str, Any]:
    """An execute_request as the WebSocket carries it."""
    return {
        "header": {"msg_id": uuid.uuid4().hex, "msg_type": "execute_request",
                   "session": session, "username": "test", "version": "5.3",
                   "date": "2026-01-01T00:00:00Z"},
        "parent_header": {}, "metadata": {}, "channel": "shell",
        "content": {"code": code, "silent": False, "store_history": True,
                    "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
    }


async def execute(ws: WebSocketClientConnection, code: str, session: str) -> dict[str, str]:
    """Send one cell; return what it said once the kernel is idle again: ``stdout`` and
    ``stderr`` (stream text), ``result`` (the execute_result's text/plain), ``error``
    (``ename: evalue``) and ``reply`` (the execute_reply's status); absent keys were not
    sent (the streams are always present)."""
    request = execute_message(code, session)
    await ws.write_message(json.dumps(request))
    got: dict[str, str] = {"stdout": "", "stderr": ""}
    idle = False
    while not ("reply" in got and idle):
        raw = await ws.read_message()
        assert raw is not None, f"websocket closed, got so far: {got}"
        msg = json.loads(raw)
        if msg["parent_header"].get("msg_id") != request["header"]["msg_id"]:
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
        elif kind == "status" and content["execution_state"] == "idle":
            idle = True
    return got


async def open_channels(base: str, kernel_id: str, token: str,
                        session: str) -> WebSocketClientConnection:
    """The kernel's channels WebSocket on a Jupyter Server or Kernel Gateway at ``base``
    (``host:port``)."""
    return await websocket_connect(HTTPRequest(
        f"ws://{base}/api/kernels/{kernel_id}/channels?session_id={session}",
        headers={"Authorization": f"token {token}"}))


async def start_kernel(http: AsyncHTTPClient, base: str, name: str, token: str) -> str:
    """POST /api/kernels for kernelspec ``name``; the new kernel's id."""
    resp = await http.fetch(f"http://{base}/api/kernels", method="POST",
                            headers={"Authorization": f"token {token}"},
                            body=json.dumps({"name": name}))
    return str(json.loads(resp.body)["id"])
