"""``cellblock mcp`` through its real interface: the MCP SDK's own stdio client and
ClientSession start ``cellblock mcp`` as a subprocess and call its tools; behind it a real
warden, nsjail and ipykernel. After each session nothing may be left (``no_leftovers``)."""

from __future__ import annotations

import base64
import json
import os
import struct
import subprocess
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.types import ImageContent, TextContent

from conftest import BIN, TEST_POLICY

pytestmark = [pytest.mark.jail, pytest.mark.nonroot, pytest.mark.usefixtures("no_leftovers")]

SECRET_CODE = "print('token:', 'ghp_' + 'aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dE3fG5')"
SECRET = "ghp_aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dE3fG5"


def tiny_png() -> bytes:
    """A 2x1 RGB PNG built with the standard library only (zlib and struct)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 2, 1, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" + b"\xff\x00\x00" + b"\x00\x00\xff")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + \
        chunk(b"IEND", b"")


# The same function, sent to the kernel as source.
PNG_CODE = f"""
import struct, zlib
from IPython.display import Image, display
{__import__('inspect').getsource(tiny_png)}
display(Image(data=tiny_png(), format='png'))
"""


def texts(result: Any) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, TextContent))


@asynccontextmanager
async def session(env: dict[str, str], *args: str) -> AsyncIterator[ClientSession]:
    params = StdioServerParameters(command=str(BIN / "cellblock"), args=["mcp", *args],
                                   env={k: v for k, v in env.items() if v})
    async with stdio_client(params) as (read, write), ClientSession(read, write) as client:
        await client.initialize()
        yield client


async def test_tools_state_errors_images_and_redaction(jupyter_env: dict[str, str]) -> None:
    async with session(jupyter_env, "--profile", "agent") as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert sorted(tools) == ["list_datasets", "list_files", "read_file", "read_output",
                                 "restart", "run_python", "upload_file"]
        assert tools["run_python"].input_schema["required"] == ["code"]

        r = await client.call_tool("run_python", {"code": "x = 41"})
        assert not r.is_error and texts(r) == "(no output)"
        r = await client.call_tool("run_python", {"code": "print('hello')\nx + 1"})
        assert not r.is_error
        assert [c.text for c in r.content] == ["hello\n", "42"]  # type: ignore[union-attr]

        r = await client.call_tool("run_python", {"code": "def f():\n    1 / 0\nf()"})
        assert r.is_error
        text = texts(r)
        assert text.startswith("ZeroDivisionError: division by zero\n")
        assert "----> 2     1 / 0" in text and "\x1b" not in text

        r = await client.call_tool("run_python", {"code": PNG_CODE})
        assert not r.is_error
        (image,) = [c for c in r.content if isinstance(c, ImageContent)]
        assert image.mime_type == "image/png"
        assert base64.b64decode(image.data) == tiny_png()
        assert texts(r) == ""  # the bundle's text/plain stand-in is not sent with its image

        r = await client.call_tool("run_python", {"code": SECRET_CODE})
        assert not r.is_error
        assert SECRET not in texts(r)
        assert texts(r) == ("token: [REDACTED:github-pat]\n\n"
                            "[cellblock policy: 1 redaction (github-pat)]")

        r = await client.call_tool("restart", {})
        assert not r.is_error and "fresh kernel" in texts(r)
        r = await client.call_tool("run_python", {"code": "x"})
        assert r.is_error and texts(r).startswith("NameError: name 'x' is not defined")


async def test_bad_arguments_are_tool_errors(jupyter_env: dict[str, str]) -> None:
    async with session(jupyter_env) as client:
        r = await client.call_tool("run_python", {"source": "1"})
        assert r.is_error
        assert texts(r) == "run_python needs a string argument 'code' (the Python source)"


@pytest.mark.timeout(180)
async def test_a_stopped_kernel_is_a_tool_error_until_restart(
        jupyter_env: dict[str, str]) -> None:
    async with session(jupyter_env, "--profile", "tiny") as client:
        r = await client.call_tool("run_python", {"code": (
            "x = bytearray(512 * 1024 * 1024)\nfor i in range(0, len(x), 4096): x[i] = 1")})
        assert r.is_error
        text = texts(r)
        assert "cellblock: kernel stopped, memory limit 256 MiB exceeded" in text
        assert "call the `restart` tool" in text
        assert text.endswith("[cellblock policy: limits hit: memory]")
        r = await client.call_tool("run_python", {"code": "1"})
        assert r.is_error
        assert texts(r) == ("cellblock: kernel stopped, memory limit 256 MiB exceeded. The "
                            "sandbox kernel has stopped and its state is lost; call the "
                            "`restart` tool for a fresh one.")
        assert not (await client.call_tool("restart", {})).is_error
        r = await client.call_tool("run_python", {"code": "1 + 1"})
        assert not r.is_error and texts(r) == "2"


@pytest.fixture
def datasets_env(tmp_path: Path, jupyter_env: dict[str, str]) -> dict[str, str]:
    (tmp_path / "weather").mkdir()
    (tmp_path / "weather" / "jan.csv").write_text("jan\n")
    (tmp_path / "sales.csv").write_text("day,amount\n1,10\n")
    for p in [tmp_path, *tmp_path.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    policy = tmp_path / "policy.toml"
    policy.write_text(TEST_POLICY + f"""
[datasets.sales]
path = "{tmp_path / 'sales.csv'}"
description = "Daily sales"
[datasets.weather]
path = "{tmp_path / 'weather'}"
description = "Weather by month"
[datasets.hr]
path = "{tmp_path / 'sales.csv'}"
[profiles.agent]
datasets = ["sales", "weather"]
default_datasets = ["weather"]
""")
    return {**jupyter_env, "CELLBLOCK_POLICY": str(policy)}


async def test_list_datasets_and_read_one(datasets_env: dict[str, str]) -> None:
    async with session(datasets_env, "--profile", "agent", "--datasets", "sales") as client:
        r = await client.call_tool("list_datasets", {})
        assert not r.is_error
        shown = json.loads(texts(r))
        assert shown["profile"] == "agent" and shown["granted"] == ["sales"]
        assert shown["datasets"] == [
            {"name": "sales", "description": "Daily sales", "kind": "file", "granted": True},
            {"name": "weather", "description": "Weather by month", "kind": "directory",
             "granted": False},
        ]
        assert r.structured_content == shown
        assert str(Path(datasets_env["CELLBLOCK_POLICY"]).parent) not in texts(r)
        r = await client.call_tool("run_python", {"code": (
            "from cellblock_kernel import datasets\n"
            "print(datasets.open('sales').read().decode(), end='')")})
        assert not r.is_error and texts(r) == "day,amount\n1,10\n"


def run_cli(env: dict[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "cellblock"), "mcp", *args], input=stdin, env={
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/"),
        **{k: v for k, v in env.items() if v}}, capture_output=True, text=True, timeout=60)


def test_bad_input_exits_2_naming_what_is_allowed(datasets_env: dict[str, str]) -> None:
    out = run_cli(datasets_env, "--profile", "nope")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("cellblock: unknown profile 'nope'; known profiles: ")
    assert "agent" in out.stderr
    out = run_cli(datasets_env, "--datasets", "sales,hr")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == ("cellblock: dataset 'hr' is not allowed by profile 'agent'; it "
                          "allows: sales, weather\n")


def test_stdout_carries_only_json_rpc(tmp_path: Path, jupyter_env: dict[str, str]) -> None:
    """Raw JSON-RPC on the pipes: a run, and a kernel start that fails (jupyter_client logs
    a traceback for it); every line on stdout must be a JSON-RPC message."""
    policy = tmp_path / "policy.toml"
    policy.write_text(TEST_POLICY + '[profiles.broken]\npython = "/nonexistent/bin/python3"\n')
    lines = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "raw", "version": "0"}}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
            "name": "run_python", "arguments": {"code": "print('out'); import sys; "
                                                        "print('err', file=sys.stderr)"}}},
    ]
    env = {**jupyter_env, "CELLBLOCK_POLICY": str(policy)}
    for profile, expect in (("agent", "out\n"), ("broken", "does not exist")):
        with subprocess.Popen(
                [str(BIN / "cellblock"), "mcp", "--profile", profile], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}) as proc:
            assert proc.stdin and proc.stdout and proc.stderr
            replies = []
            for message in lines:
                proc.stdin.write(json.dumps(message) + "\n")
                proc.stdin.flush()
                if "id" in message:
                    replies.append(json.loads(proc.stdout.readline()))
            proc.stdin.close()  # the session ends: the server closes its sandbox and exits
            rest = proc.stdout.read()
            err = proc.stderr.read()
            assert proc.wait(timeout=60) == 0, err
        assert [json.loads(line) for line in rest.splitlines()] == []
        assert [r["id"] for r in replies] == [1, 2]
        assert all(r["jsonrpc"] == "2.0" for r in replies)
        result = replies[1]["result"]
        assert expect in result["content"][0]["text"]
        if profile == "broken":
            assert result["content"][0]["text"].startswith("the sandbox did not start: ")
        assert result["isError"] is (profile == "broken")
        if profile == "broken":
            assert "Traceback" in err  # jupyter_client's log went to stderr, not stdout


def audit_logs(env: dict[str, str]) -> set[Path]:
    return set(Path(env["CELLBLOCK_AUDIT_DIR"]).glob("*.jsonl"))


def test_sigterm_closes_the_sandbox_before_exiting(jupyter_env: dict[str, str]) -> None:
    """What an MCP client does to a server slow to exit after stdin closed; here with stdin
    still open. The server shuts its kernel down through jupyter_client (the audit log says
    "shutdown requested", not the SIGTERM a warden gets when its parent dies), then exits."""
    import signal

    from cellblock.audit import read_events

    before = audit_logs(jupyter_env)
    with subprocess.Popen(
            [str(BIN / "cellblock"), "mcp"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                            **{k: v for k, v in jupyter_env.items() if v}}) as proc:
        assert proc.stdin and proc.stdout
        for message in (
                {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                    "protocolVersion": "2025-06-18", "capabilities": {},
                    "clientInfo": {"name": "raw", "version": "0"}}},
                {"jsonrpc": "2.0", "method": "notifications/initialized"},
                {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
                    "name": "run_python", "arguments": {"code": "6 * 7"}}}):
            proc.stdin.write(json.dumps(message) + "\n")
            proc.stdin.flush()
            if "id" in message:
                reply = json.loads(proc.stdout.readline())
        assert reply["result"]["content"][0]["text"] == "42"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    (log,) = audit_logs(jupyter_env) - before
    exits = [e for e in read_events(log) if e.event == "kernel.exit"]
    assert [e.fields["reason"] for e in exits] == ["shutdown requested"]
