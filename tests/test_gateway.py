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

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from conftest import BIN, REPO, free_port, jail_processes, jupyter_app, wait_for
from jupyter_ws import execute, open_channels, start_kernel

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
            f"--KernelGatewayApp.auth_token={TOKEN}",
            # Only jailed kernels, as docs/scaling.md recommends for every host: the listing
            # shows cellblock-agent alone, and a spec without a provisioner of its own (such
            # as ipykernel's built-in python3, which jupyter_client starts by name whatever
            # the listing shows) runs under cellblock's provisioner, on the agent profile.
            "--KernelSpecManager.allowed_kernelspecs=cellblock-agent",
            "--KernelProvisionerFactory.default_provisioner_name=cellblock-provisioner"]
    with jupyter_app(argv, port, TOKEN, tmp_path, "kernelgateway", ready="/api/kernelspecs"):
        yield f"127.0.0.1:{port}"


async def test_kernel_gateway_rest_and_websocket(gateway: str) -> None:
    http = AsyncHTTPClient()
    with pytest.raises(HTTPClientError) as refused:
        await http.fetch(f"http://{gateway}/api/kernelspecs")
    assert refused.value.code == 401, "the gateway answered without the token"
    specs = json.loads((await http.fetch(f"http://{gateway}/api/kernelspecs",
                                         headers=AUTH)).body)
    assert set(specs["kernelspecs"]) == {"cellblock-agent"}

    kernel_id = await start_kernel(http, gateway, "cellblock-agent", TOKEN)
    try:
        ws = await open_channels(gateway, kernel_id, TOKEN, "llm")
        try:
            got = await execute(ws, "print(sum(range(10))); 6 * 7", "llm")
            assert got == {"stdout": "45\n", "stderr": "", "result": "42", "reply": "ok"}
            # a fake in the key id format; AWS's documented AKIAIOSFODNN7EXAMPLE is left
            # alone as an example key since issue 14
            secret = "AKIA" + "QWERTYUIOPASDFGH"
            got = await execute(ws, 'key = "AKIA" + "QWERTYUIOPASDFGH"; print("key:", key)',
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


async def test_gateway_jails_a_kernel_asked_for_by_another_name(gateway: str) -> None:
    """`{"name": "python3"}` is not in the listing, yet jupyter_client finds ipykernel's
    built-in spec by that name; it must start jailed, not as a plain kernel on the host."""
    http = AsyncHTTPClient()
    kernel_id = await start_kernel(http, gateway, "python3", TOKEN)
    try:
        ws = await open_channels(gateway, kernel_id, TOKEN, "other")
        try:
            host_file = REPO / "pyproject.toml"  # readable by whoever runs the tests
            got = await execute(ws, f"import os; print(os.getcwd()); open({str(host_file)!r})",
                                "other")
        finally:
            ws.close()
    finally:
        await http.fetch(f"http://{gateway}/api/kernels/{kernel_id}", method="DELETE",
                         headers=AUTH)
        http.close()
    assert got["stdout"] == "/home/jovyan\n", got
    assert got.get("error", "").startswith("FileNotFoundError"), got
