"""A kernel's files through every client surface on real jails: ``cellblock mcp`` with the
official MCP client, Jupyter Server's REST (the cellblock extension, behind its token), and
the CLI (``cellblock upload|files|download``). Each uploads a CSV, analyses it with pandas,
writes a chart and a CSV to the outbox, fetches both; planted secrets arrive redacted and
refusals say why."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.types import ImageContent, TextContent
from test_files import ANALYSE, SALES, SECRET
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from cellblock.sandbox import SyncSandbox

from conftest import BIN, free_port, jupyter_app
from jupyter_ws import execute, open_channels

pytestmark = [pytest.mark.jail, pytest.mark.nonroot, pytest.mark.usefixtures("no_leftovers")]

PLANT = ("s = 'ghp_' + 'aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dE3fG5'\n"
         "open('/outbox/secret.txt', 'w').write('the token is ' + s)")


def texts(result: Any) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, TextContent))


async def test_mcp_tools_upload_list_and_read(jupyter_env: dict[str, str]) -> None:
    params = StdioServerParameters(command=str(BIN / "cellblock"),
                                   args=["mcp", "--profile", "agent"],
                                   env={k: v for k, v in jupyter_env.items() if v})
    async with stdio_client(params) as (read, write), ClientSession(read, write) as client:
        await client.initialize()
        names = sorted(t.name for t in (await client.list_tools()).tools)
        assert {"upload_file", "list_files", "read_file"} <= set(names)
        r = await client.call_tool("upload_file", {"name": "sales.csv", "text": SALES})
        assert not r.is_error and texts(r) == f"uploaded /inbox/sales.csv ({len(SALES)} bytes)"
        r = await client.call_tool("run_python", {"code": ANALYSE + PLANT})
        assert not r.is_error and texts(r).startswith("['sales.csv']\n100")
        r = await client.call_tool("list_files", {})
        assert not r.is_error and r.structured_content is not None
        assert r.structured_content["inbox"] == [{"name": "sales.csv", "size": len(SALES)}]
        assert sorted(f["name"] for f in r.structured_content["outbox"]) == [
            "chart.png", "secret.txt", "totals.csv"]
        r = await client.call_tool("read_file", {"name": "totals.csv"})
        assert not r.is_error and texts(r) == "region,amount\nnorth,40\nsouth,60\n"
        r = await client.call_tool("read_file", {"name": "chart.png"})
        assert not r.is_error and len(r.content) == 1
        image = r.content[0]
        assert isinstance(image, ImageContent) and image.mime_type == "image/png"
        assert base64.b64decode(image.data).startswith(b"\x89PNG\r\n\x1a\n")
        # an outbox image over the agent's image budget never reaches the model's context
        r = await client.call_tool("run_python", {"code": (
            "import matplotlib; matplotlib.use('agg'); import matplotlib.pyplot as plt\n"
            "fig = plt.figure(figsize=(10, 6)); plt.plot([1, 2])\n"
            "fig.savefig('/outbox/big.png', dpi=300)")})
        assert not r.is_error, texts(r)
        r = await client.call_tool("read_file", {"name": "big.png"})
        assert r.is_error and not any(isinstance(c, ImageContent) for c in r.content)
        assert "image/png 3000x1800 px" in texts(r) and "image budget" in texts(r)
        r = await client.call_tool("read_file", {"name": "secret.txt"})
        assert not r.is_error and SECRET not in texts(r)
        assert texts(r).startswith("the token is [REDACTED:")
        assert "[cellblock policy: redacted" in texts(r)
        # refusals are tool errors that say why
        r = await client.call_tool("upload_file", {"name": "../x.csv", "text": "1"})
        assert r.is_error and "is not allowed: use 1-128 characters" in texts(r)
        r = await client.call_tool("upload_file", {"name": "big.csv",
                                                   "text": "x" * (16 * 1024**2 + 1)})
        assert r.is_error and "files.max_upload" in texts(r)
        r = await client.call_tool("upload_file", {"name": "b.bin", "base64": "%%%"})
        assert r.is_error and "not valid base64" in texts(r)
        r = await client.call_tool("run_python", {"code": "import os; os.mkfifo('/outbox/p.txt')"})
        r = await client.call_tool("read_file", {"name": "p.txt"})
        assert r.is_error and "is a fifo, not a plain file" in texts(r)


TOKEN = uuid.uuid4().hex


@pytest.fixture
def server(tmp_path: Path, jupyter_env: dict[str, str]) -> Iterator[str]:
    port = free_port()
    argv = [str(BIN / "jupyter-server"), "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0", f"--IdentityProvider.token={TOKEN}",
            "--ServerApp.open_browser=False", f"--ServerApp.root_dir={tmp_path}",
            "--ServerApp.jpserver_extensions=cellblock=True",
            *(["--allow-root"] if os.geteuid() == 0 else [])]
    with jupyter_app(argv, port, TOKEN, tmp_path, "jupyter-server"):
        yield f"http://127.0.0.1:{port}"


async def test_rest_routes_behind_jupyter_server_auth(server: str) -> None:
    http = AsyncHTTPClient()
    auth = {"Authorization": f"token {TOKEN}"}

    async def fetch(path: str, method: str = "GET", body: bytes | None = None,
                    headers: dict[str, str] | None = None) -> Any:
        # a kernel's start under load may take longer than tornado's default 20 s
        return await http.fetch(HTTPRequest(f"{server}{path}", method=method, body=body,
                                            headers={**auth, **(headers or {})},
                                            request_timeout=180), raise_error=False)

    for _ in range(3):  # a port jupyter_client chose may be taken before the gate binds it
        resp = await fetch("/api/kernels", "POST",
                           json.dumps({"name": "cellblock-agent"}).encode())
        if resp.code != 500:
            break
    assert resp.code == 201, resp.body
    kernel = json.loads(resp.body)["id"]
    base = f"/api/cellblock/kernels/{kernel}"
    try:
        # no token: Jupyter Server's own auth refuses, before cellblock runs
        for method, path, body in (("PUT", f"{base}/inbox/a.csv", b"1"),
                                   ("GET", f"{base}/outbox", None),
                                   ("GET", f"{base}/outbox/a.csv", None)):
            with pytest.raises(HTTPClientError) as info:
                await http.fetch(HTTPRequest(f"{server}{path}", method=method, body=body,
                                             request_timeout=180))
            assert info.value.code == 403, path
        resp = await fetch(f"{base}/inbox/sales.csv", "PUT", SALES.encode())
        assert resp.code == 201 and json.loads(resp.body)["size"] == len(SALES)
        resp = await fetch(f"{base}/inbox")
        assert json.loads(resp.body) == {"files": [{"name": "sales.csv", "size": len(SALES)}]}
        ws = await open_channels(server.removeprefix("http://"), kernel, TOKEN, "s1")
        try:
            got = await execute(ws, ANALYSE + PLANT, "s1")
        finally:
            ws.close()
        assert got["reply"] == "ok" and got["stdout"] == "['sales.csv']\n100\n", got
        resp = await fetch(f"{base}/outbox")
        assert sorted(f["name"] for f in json.loads(resp.body)["files"]) == [
            "chart.png", "secret.txt", "totals.csv"]
        resp = await fetch(f"{base}/outbox/totals.csv")
        assert resp.code == 200 and resp.body == b"region,amount\nnorth,40\nsouth,60\n"
        assert resp.headers["Content-Type"] == "text/csv; charset=utf-8"
        resp = await fetch(f"{base}/outbox/chart.png")
        assert resp.code == 200 and resp.body.startswith(b"\x89PNG\r\n\x1a\n")
        assert resp.headers["Content-Type"] == "image/png"
        resp = await fetch(f"{base}/outbox/secret.txt")
        assert resp.code == 200 and SECRET.encode() not in resp.body
        assert resp.headers["X-Cellblock-Redactions"]
        # refusals: the status follows the reason, the message says it
        cases = [
            ("GET", f"{base}/outbox/nothere.txt", None, 404, "no file 'nothere.txt'"),
            ("GET", f"{base}/outbox/..", None, 400, "is not allowed"),
            ("GET", f"{base}/outbox/.env", None, 400, "is not allowed"),
            ("PUT", f"{base}/inbox/big.csv", b"x" * (16 * 1024**2 + 1), 413, "max_upload"),
            ("GET", "/api/cellblock/kernels/not-a-kernel/outbox", None, 404, "no kernel"),
            ("GET", "/api/cellblock/kernels/..%2F..%2Fetc/outbox", None, 404, ""),
        ]
        for method, path, body, code, words in cases:
            resp = await fetch(path, method, body)
            assert resp.code == code, (path, resp.code, resp.body[:300])
            assert words.encode() in resp.body, (path, resp.body[:300])
    finally:
        await fetch(f"/api/kernels/{kernel}", "DELETE")


def cli(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "cellblock"), *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120, check=False)


def test_cli_upload_files_download(tmp_path: Path, jupyter_env: dict[str, str]) -> None:
    env = {**os.environ, **{k: v for k, v in jupyter_env.items() if v}}
    (tmp_path / "sales.csv").write_text(SALES)
    with SyncSandbox("agent") as sb:
        kernel = sb.kernel_id
        assert kernel is not None
        done = cli(env, "upload", kernel[:8], str(tmp_path / "sales.csv"), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"uploaded sales.csv ({len(SALES)} bytes, sha256 ")
        assert cli(env, "files", kernel, "--inbox", cwd=tmp_path).stdout == \
            f"sales.csv\t{len(SALES)}\n"
        r = sb.run(ANALYSE + PLANT + "\nimport os; os.symlink('/etc/os-release', "
                   "'/outbox/link.txt')")
        assert r.ok, r.errors
        listed = cli(env, "files", kernel, cwd=tmp_path).stdout.splitlines()
        assert [line.split("\t")[0] for line in listed] == [
            "chart.png", "link.txt", "secret.txt", "totals.csv"]
        assert "link.txt\t15\tsymlink" in listed
        done = cli(env, "download", kernel, "chart.png", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "chart.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        done = cli(env, "download", kernel, "totals.csv", "-o", "-", cwd=tmp_path)
        assert done.stdout == "region,amount\nnorth,40\nsouth,60\n"
        done = cli(env, "download", kernel, "secret.txt", "-o", "-", cwd=tmp_path)
        assert SECRET not in done.stdout and "[REDACTED:" in done.stdout
        done = cli(env, "download", kernel, "link.txt", cwd=tmp_path)
        assert done.returncode == 2 and not (tmp_path / "link.txt").exists()
        assert "is a symbolic link, not a plain file; it was not followed" in done.stderr
        done = cli(env, "upload", kernel, str(tmp_path / "sales.csv"), "--name", "../x",
                   cwd=tmp_path)
        assert done.returncode == 2 and "file name '../x' is not allowed" in done.stderr
