"""What the bytes say and what a terminal shows (issue 13, findings 7 and 9).

A profile that sends the original text (the analyst: ``normalise = false``) scans it as it is
and as a terminal shows it (ANSI stripped, ``\\r`` and ``\\b`` rendered, NFKC). Neither finds
anything: the original leaves untouched, colours and all. Either finds something: the
redacted text as a terminal shows it leaves, with the findings of the original replaced
before rendering, so a secret hidden (or half hidden) behind backspaces, a carriage return
or an OSC title is not sent. ``input()`` prompts start with a fixed marker.

Exact values through the output filter, then through a real jailed analyst kernel.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from cellblock.gate.rules import Withheld, apply_rules
from cellblock.output.filter import PROMPT_MARK, OutputFilter, build_redactor
from cellblock.policy import load_policy

AKIA = "AKIA" + "QWERTYUIOPASDFGH"  # AWS access key id format, not a real key
RED = "[REDACTED:aws-access-key-id]"
COLOURS = "\x1b[0;31mKeyError\x1b[0m: 'x' \uff21 10%\r 50%"


def run(profile: str, msg_type: str, content: dict[str, Any],
        channel: str = "iopub") -> tuple[dict[str, Any], bytes, bytes]:
    """(content out, bytes in, bytes out) of one message through the profile's filter."""
    policy = load_policy().profile(profile).output
    f = OutputFilter(policy, build_redactor(policy, env={}), audit=None, nonce="abc123")
    raw = json.dumps(content).encode()
    try:
        out, _ = apply_rules((f,), channel, msg_type, {"msg_type": msg_type}, {"msg_id": "p"},
                             raw, b"{}")
    except Withheld:  # a stream's text may be held back until the cell's end
        out = b""
    if msg_type == "stream":
        text = json.loads(out)["text"] if out else ""
        text += "".join(c["text"] for _, c in f.flush("p"))
        return {"name": content["name"], "text": text}, raw, out
    return json.loads(out), raw, out


def bundle(text: str) -> dict[str, Any]:
    return {"data": {"text/plain": text}, "metadata": {}}


# (message type, content in, content out on the analyst). The last column of the leaking rows
# is what the analyst got before: the original, secret and all.
ANALYST = [
    ("display_data", bundle(AKIA + "\b" * 20), bundle("[REDACTE")),
    ("display_data", bundle(f"\x1b]0;{AKIA}\x07title"), bundle("title")),
    ("execute_result", {**bundle(f"{AKIA}\b\b\b"), "execution_count": 1},
     {**bundle(RED[:-3]), "execution_count": 1}),
    ("error", {"ename": "E", "evalue": f"{AKIA}\rshort", "traceback": [f"x {AKIA}\r" + " " * 30]},
     {"ename": "E", "evalue": "short" + RED[5:], "traceback": [" " * 30]}),
    ("execute_reply", {"status": "error", "execution_count": 2, "ename": "E",
                       "evalue": f"\x1b]2;{AKIA}\x1b\\gone", "traceback": []},
     {"status": "error", "execution_count": 2, "ename": "E", "evalue": "gone", "traceback": []}),
    ("execute_reply", {"status": "ok", "execution_count": 3, "payload": [],
                       "user_expressions": {"k": {"status": "ok", **bundle(f"{AKIA}\b")}}},
     {"status": "ok", "execution_count": 3, "payload": [],
      "user_expressions": {"k": {"status": "ok", **bundle(RED[:-1])}}}),
    ("stream", {"name": "stdout", "text": f"{AKIA}\b\b\b\n"},
     {"name": "stdout", "text": RED[:-3] + "\n"}),
    ("stream", {"name": "stdout", "text": f"\x1b]0;{AKIA}\x07ok\n"},
     {"name": "stdout", "text": "ok\n"}),
    # what a terminal shows holds it (ANSI between its halves): redacted, as before
    ("display_data", bundle(f"\x1b[1m{AKIA[:8]}\x1b[0m{AKIA[8:]}"), bundle(RED)),
]


@pytest.mark.parametrize(("msg_type", "content", "expected"), ANALYST)
def test_analyst_scans_the_original_and_what_a_terminal_shows(
        msg_type: str, content: dict[str, Any], expected: dict[str, Any]) -> None:
    out, _, _ = run("analyst", msg_type, content)
    assert out == expected
    assert AKIA[4:14] not in json.dumps(out)


@pytest.mark.parametrize("msg_type", ["display_data", "error"])
def test_analyst_gets_the_original_when_nothing_is_found(msg_type: str) -> None:
    """Colours, a carriage return and a fullwidth letter: the original bytes, untouched."""
    content = bundle(COLOURS) if msg_type == "display_data" else {
        "ename": "KeyError", "evalue": COLOURS, "traceback": [COLOURS, "\x1b[0;32m----> 1\x1b[0m"]}
    out, raw, sent = run("analyst", msg_type, content)
    assert sent is raw and out == content


def test_agent_half_hidden_secret_is_redacted() -> None:
    """The agent always gets what a terminal shows: before, three backspaces left 17 of the
    20 characters on screen, no longer a match."""
    out, _, _ = run("agent", "display_data", bundle(f"{AKIA}\b\b\b"))
    assert out == bundle(RED[:-3])


@pytest.mark.parametrize("profile", ["agent", "analyst"])
def test_input_prompt_is_marked_after_redaction(profile: str) -> None:
    out, _, _ = run(profile, "input_request", {"prompt": f"key {AKIA}: ", "password": False},
                    channel="stdin")
    assert out == {"prompt": f"{PROMPT_MARK}key {RED}: ", "password": False}
    out, _, _ = run(profile, "input_request", {"prompt": "", "password": True}, channel="stdin")
    assert out == {"prompt": PROMPT_MARK, "password": True}


# -- through a real kernel ---------------------------------------------------------------------

SECRET_CODE = "S = 'AKIA' + 'QWERTYUIOPASDFGH'\n"  # the whole key only exists in the jail


async def _cell(kc: Any, code: str, stdin: str | None = None) -> dict[str, Any]:
    """Run `code`; every message of the cell by type (and the reply), and the stdin
    prompts it asked (answered with `stdin`)."""
    msg_id = kc.execute(code, allow_stdin=stdin is not None, stop_on_error=False)
    got: dict[str, Any] = {"prompts": [], "reply": None}
    while True:
        if stdin is not None:
            try:
                req = await kc.get_stdin_msg(timeout=0.05)
            except Exception:  # queue.Empty: nothing asked yet
                req = None
            if req is not None:
                got["prompts"].append(req["content"]["prompt"])
                kc.input(stdin)
                continue
        try:
            msg = await kc.get_iopub_msg(timeout=0.05 if stdin is not None else 60)
        except Exception:
            if stdin is not None:
                continue
            raise
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        got.setdefault(msg["msg_type"], []).append(msg["content"])
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    got["reply"] = (await kc.get_shell_msg(timeout=60))["content"]
    return got


@pytest.mark.jail
@pytest.mark.nonroot
@pytest.mark.profile("analyst")
@pytest.mark.parametrize("case", ["display_data", "error", "stream", "original", "input"])
async def test_analyst_kernel(kernel: tuple[Any, Any], case: str) -> None:
    """Each case through a real jailed analyst kernel (one kernel per case, so each fails on
    its own against the old code)."""
    _, kc = kernel
    await _cell(kc, SECRET_CODE)
    if case == "display_data":  # a secret followed by as many backspaces
        got = await _cell(kc, "display({'text/plain': S + '\\b' * 20}, raw=True)")
        assert [d["data"] for d in got["display_data"]] == [{"text/plain": "[REDACTE"}]
    elif case == "error":  # overwritten with \r in the exception message; its execute_reply
        got = await _cell(kc, "raise ValueError(S + '\\r' + 'x' * 40)")
        [error] = got["error"]
        assert error["ename"] == "ValueError" and error["evalue"] == "x" * 40
        assert got["reply"]["evalue"] == "x" * 40
        assert "QWERTYUIOP" not in json.dumps(got)
    elif case == "stream":  # inside an OSC title
        got = await _cell(kc, "print('\\x1b]0;' + S + '\\x07title')")
        assert [s["text"] for s in got["stream"]] == ["title\n"]
    elif case == "original":  # nothing found: colours as the kernel wrote them
        got = await _cell(kc, "display({'text/plain': '\\x1b[31mred\\x1b[0m \\uff21'}, raw=True)")
        assert [d["data"]["text/plain"] for d in got["display_data"]] == [
            "\x1b[31mred\x1b[0m \uff21"]
    else:  # input(): the prompt says who asks; a secret in it is redacted first
        got = await _cell(kc, "v = input('AWS secret access key (required by the cluster): ')\n"
                              "w = input('confirm ' + S + ': ')\nprint(v, w)", stdin="no")
        assert got["prompts"] == [
            f"{PROMPT_MARK}AWS secret access key (required by the cluster): ",
            f"{PROMPT_MARK}confirm {RED}: "]
        assert "".join(s["text"] for s in got["stream"]) == "no no\n"
