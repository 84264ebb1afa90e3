"""Canary secrets through every carrier, read off raw ZMQ sockets as a client would.

A kernel on the ``canary`` test profile (analyst-like: HTML, stdin and history
allowed, so every carrier exists) is given canary secrets of many formats in its
code, and made to say them in every way a kernel can: stdout, stderr, split across
flushes, one character per flush, exceptions, reprs, DataFrames as text and HTML,
JSON, markdown, metadata, ``obj?``, user_expressions, an ``input()`` prompt,
completion of dict keys, history. The client side is raw sockets: every frame that
arrives is kept, and no canary may appear in any of them. Ordinary analysis output
must come through unchanged.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import zmq
import zmq.asyncio
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.session import Session

pytestmark = [pytest.mark.jail, pytest.mark.nonroot, pytest.mark.usefixtures("no_leftovers")]

EXACT_ENV = "CELLBLOCK_TEST_EXACT_SECRET"
EXACT = "opreg-" + "7h3-v4lu3-0f-a-s3cr3t-q9z"


def fake(prefix: str, alphabet: str, n: int, seed: int) -> str:
    """A token in a credential's format; deterministic, never a live key."""
    out, x = [], seed
    for _ in range(n):
        x = (x * 1103515245 + 12345) % (1 << 31)
        out.append(alphabet[x % len(alphabet)])
    return prefix + "".join(out)


UP = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
ALNUM = UP + UP.lower() + "0123456789"
HEX = "0123456789abcdef"
_jwt_head = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=").decode()
_jwt_body = base64.urlsafe_b64encode(b'{"sub":"canary","iat":1700000000}').rstrip(b"=").decode()

CANARIES = {
    "aws": fake("AKIA", UP + "234567", 16, 1),
    "github": fake("ghp_", ALNUM, 36, 2),
    "github-fine": fake("github_pat_", ALNUM + "_", 82, 3),
    "gitlab": fake("glpat-", ALNUM + "-_", 20, 4),
    "slack": fake("xoxb-", "0123456789", 12, 5) + "-" + fake("", "0123456789", 13, 6) + "-"
             + fake("", ALNUM, 24, 7),
    "stripe": fake("sk_live_", ALNUM, 24, 8),
    "openai": fake("sk-proj-", ALNUM + "-_", 48, 9),
    "anthropic": fake("sk-ant-api03-", ALNUM + "-_", 93, 10) + "AA",
    "huggingface": fake("hf_", ALNUM, 34, 11),
    "google-api": fake("AIza", ALNUM + "-_", 35, 12),
    "npm": fake("npm_", ALNUM, 36, 13),
    "pypi": "pypi-AgEIcHlwaS5vcmc" + fake("", ALNUM + "-_", 60, 14),
    "jwt": f"{_jwt_head}.{_jwt_body}." + fake("", ALNUM + "-_", 43, 15),
    "url-password": "postgres://analyst:" + fake("", ALNUM, 18, 16) + "@db.internal:5432/x",
    "exact": EXACT,
}
PEM = ("-----BEGIN RSA PRIVATE KEY-----\n" + "\n".join(
    fake("", ALNUM + "+/", 64, 20 + i) for i in range(5)) + "\n-----END RSA PRIVATE KEY-----")
# What must never appear in a frame: each canary, and the PEM body's distinctive lines.
NEEDLES = [*CANARIES.values(), *PEM.splitlines()[1:-1]]


class RawClient:
    """A Jupyter client on raw zmq sockets that keeps every frame it receives."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.ctx = zmq.asyncio.Context()
        key = info["key"] if isinstance(info["key"], bytes) else info["key"].encode()
        self.session = Session(key=key, signature_scheme=info["signature_scheme"])
        ident = uuid.uuid4().hex.encode()
        self.frames: list[bytes] = []
        self.socks: dict[str, zmq.asyncio.Socket] = {}
        for channel, kind in (("shell", zmq.DEALER), ("stdin", zmq.DEALER),
                              ("iopub", zmq.SUB)):
            sock = self.ctx.socket(kind)
            sock.linger = 0
            if kind == zmq.DEALER:
                sock.setsockopt(zmq.IDENTITY, ident)
            else:
                sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.connect(f"tcp://{info['ip']}:{info[channel + '_port']}")
            self.socks[channel] = sock

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close(0)
        self.ctx.term()

    async def recv(self, channel: str, timeout: float = 30) -> dict[str, Any]:
        sock = self.socks[channel]
        if not await sock.poll(timeout * 1000):
            raise TimeoutError(f"nothing on {channel} in {timeout} s")
        frames = await sock.recv_multipart()
        self.frames.extend(frames)
        _, msg_frames = self.session.feed_identities(frames)
        return self.session.deserialize(msg_frames)

    def send(self, channel: str, msg_type: str, content: dict[str, Any]) -> str:
        msg = self.session.msg(msg_type, content)
        self.session.send(self.socks[channel], msg)
        return str(msg["header"]["msg_id"])

    async def request(self, msg_type: str, content: dict[str, Any],
                      stdin: str | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Send on shell; return the reply and the iopub messages of the request."""
        msg_id = self.send("shell", msg_type, content)
        iopub: list[dict[str, Any]] = []
        reply = None
        idle = False
        while reply is None or not idle:
            if stdin is not None and await self.socks["stdin"].poll(0):
                req = await self.recv("stdin")
                assert req["msg_type"] == "input_request"
                self.send("stdin", "input_reply", {"value": stdin})
                continue
            if reply is None and await self.socks["shell"].poll(0):
                reply = await self.recv("shell")
                continue
            if not await self.socks["iopub"].poll(50):
                continue
            msg = await self.recv("iopub")
            if msg["parent_header"].get("msg_id") == msg_id:
                iopub.append(msg)
                if msg["msg_type"] == "status" and \
                        msg["content"]["execution_state"] == "idle":
                    idle = True
        return reply, iopub

    async def execute(self, code: str, **kw: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        stdin = kw.pop("stdin", None)
        content = {"code": code, "silent": False, "store_history": True,
                   "user_expressions": kw.pop("user_expressions", {}),
                   "allow_stdin": stdin is not None, "stop_on_error": False}
        return await self.request("execute_request", content, stdin=stdin)


@pytest.fixture
async def raw(jupyter_env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
              ) -> AsyncIterator[RawClient]:
    monkeypatch.setenv(EXACT_ENV, EXACT)  # the launching process's env: read by the warden
    km = AsyncKernelManager(kernel_name="cellblock-canary")
    await km.start_kernel()
    client = None
    try:
        client = RawClient(km.get_connection_info(session=False))
        await client.request("kernel_info_request", {})
        yield client
    finally:
        if client is not None:
            client.close()
        await km.shutdown_kernel(now=False)


def leaked(frames: list[bytes]) -> list[str]:
    blob = b"\n".join(frames)
    return [n for n in NEEDLES if n.encode() in blob]


CARRIERS = {
    "print": "for name, c in C.items(): print(name, c)",
    "stderr": "import sys\nfor c in C.values(): print(c, file=sys.stderr)",
    "split": "for c in C.values():\n    print(c[:9], end='', flush=True); print(c[9:], flush=True)",
    "per-char": "import sys\nfor ch in C['github']: sys.stdout.write(ch); sys.stdout.flush()",
    "pem": "print(PEM)",
    "exception": "raise KeyError(C['stripe'] + ' ' + C['aws'])",
    "repr": "C",
    "dataframe": "import pandas as pd\n"
                 "df = pd.DataFrame({'name': list(C), 'secret': list(C.values())})\n"
                 "display(df)",
    "json": "from IPython.display import JSON, display\ndisplay(JSON({'api_key': C['openai']}))",
    "markdown": "from IPython.display import Markdown, display\n"
                "display(Markdown(f\"token `{C['huggingface']}`\"))",
    "metadata": "display({'text/plain': 'img'}, metadata={'alt': C['google-api']}, raw=True)",
    "html": "from IPython.display import HTML, display\n"
            "display(HTML(f\"<td>{C['slack']}</td><td>{C['jwt']}</td>\"))",
    "exact-b64": "import base64\nprint(base64.b64encode(C['exact'].encode()).decode())",
    "exact-hex": "print(C['exact'].encode().hex())",
    "update-display": "h = display('placeholder', display_id=True)\nh.update(C['npm'])",
}


async def test_no_canary_in_any_frame(raw: RawClient) -> None:
    define = f"C = {json.dumps(CANARIES)}\nPEM = {json.dumps(PEM)}\nx = C['pypi']\n" \
             "d = {C['gitlab']: 1}"
    reply, _ = await raw.execute(define)
    assert reply["content"]["status"] == "ok"
    redactions = 0
    for name, code in CARRIERS.items():
        reply, iopub = await raw.execute(code)
        shown = json.dumps([m["content"] for m in iopub if m["msg_type"] != "execute_input"])
        assert not leaked(raw.frames), (name, leaked(raw.frames))
        if "[REDACTED:" in shown:
            redactions += 1
        else:
            pytest.fail(f"carrier {name!r}: no redaction marker in {shown[:500]}")
    # obj? (inspect_reply), user_expressions (execute_reply), dict-key completion,
    # history, an input() prompt
    await raw.request("inspect_request", {"code": "x", "cursor_pos": 1, "detail_level": 0})
    await raw.execute("1", user_expressions={"e": "C['anthropic']"})
    await raw.request("complete_request", {"code": "d['", "cursor_pos": 3})
    await raw.request("history_request", {"output": True, "raw": True,
                                           "hist_access_type": "tail", "n": 50})
    reply, _ = await raw.execute("v = input(C['url-password'])", stdin="fine")
    assert reply["content"]["status"] == "ok"
    assert not leaked(raw.frames), leaked(raw.frames)
    assert redactions == len(CARRIERS)


async def test_ordinary_output_unchanged(raw: RawClient) -> None:
    code = """
import hashlib, uuid, datetime, pandas as pd
u = uuid.UUID("3f2b6c1e-8f55-4a43-9d7c-2f1f0f5b9b10")
df = pd.DataFrame({"day": pd.date_range("2024-01-01", periods=3), "amount": [1.5, 2.25, 3.0]})
print(u, hashlib.sha256(b"data").hexdigest(), datetime.date(2024, 2, 29), 3.14159, 10**12)
print(df.to_string())
df.describe().loc["mean", "amount"]
"""
    _, iopub = await raw.execute(code)
    stdout = "".join(m["content"]["text"] for m in iopub if m["msg_type"] == "stream")
    assert stdout == (
        "3f2b6c1e-8f55-4a43-9d7c-2f1f0f5b9b10 "
        "3a6eb0790f39ac87c94f3856b2dd2c5d110e6811602261a9a923d3bb23adc8b7 2024-02-29 "
        "3.14159 1000000000000\n"
        "         day  amount\n0 2024-01-01    1.50\n1 2024-01-02    2.25\n2 2024-01-03    3.00\n"
    )
    result = [m for m in iopub if m["msg_type"] == "execute_result"]
    assert result[0]["content"]["data"] == {"text/plain": "np.float64(2.25)"}


async def test_flood_reaches_client_as_head_marker_tail(raw: RawClient) -> None:
    code = ("import sys\n"
            "for i in range(1_000_000): sys.stdout.write(f'row {i:07d} ' + 'x' * 88 + '\\n')")
    reply, iopub = await raw.execute(code)
    assert reply["content"]["status"] == "ok"
    text = "".join(m["content"]["text"] for m in iopub if m["msg_type"] == "stream")
    assert text.startswith("row 0000000 ")
    assert text.rstrip().endswith("row 0999999 " + "x" * 88)
    assert "bytes, " in text and "lines of stdout truncated; the rest is kept: " in text
    assert len(text.encode()) < 64 * 1024 + 16 * 1024 + 300  # head + tail + the marker
    reply, iopub = await raw.execute("print('still here')")
    assert [m["content"]["text"] for m in iopub if m["msg_type"] == "stream"] == ["still here\n"]

