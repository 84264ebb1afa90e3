"""What a kernel message may say once the gate rebuilt it (DESIGN decision 4).

Who calls this: the relay (:mod:`cellblock.gate.forward`), for every kernel message it
forwards, after the protocol checks and before the output rules. Pure functions over bytes
and parsed dicts, no sockets; the tests drive them directly too.

Nothing the kernel wrote is copied through unexamined:

- **header**: rebuilt by the gate. ``msg_id`` is the gate's own (``<session>_<n>``), the
  ``session`` the gate's, ``username`` a constant; ``msg_type`` is the checked type,
  ``version`` the kernel's if it is ``5.x``, ``date`` the kernel's if it is an ISO 8601
  timestamp (ipykernel's, JupyterLab and nbclient time cells with it), else the gate's clock.
  No other key survives (a secret in an extra header key never leaves).
- **parent**: not built here: the relay puts the client's own request header bytes there.
- **metadata frame**: only the keys ipykernel and ipywidgets send (:data:`METADATA`), each
  value of the one type and form it has (``started`` a timestamp, ``dependencies_met`` a
  bool, ``engine`` a uuid, ``status`` ok/error/aborted, comm ``version`` digits and dots).
- **content**: the top-level keys of the messaging spec for that type (:data:`CONTENT`,
  spec 5.4, with what ipykernel adds: ``engine_info`` on an error reply, usage_reply's
  fields); a ``transient`` keeps ``display_id`` only. Values are not judged here: the output
  policy walks every string of them. ``status`` is rebuilt from ``execution_state`` alone.

Cost: stream and status are the hot path. A stream content is checked by one scan of its
bytes for the exact layout jupyter_client writes (``{"name": "stdout", "text": "..."}``)
and forwarded as it came; anything else is parsed and re-encoded only if a key was dropped.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

from cellblock.gate.wire import Dropped, load_object

__all__ = ["CONTENT", "METADATA", "STATUS", "content", "header", "metadata", "now"]

_ERROR = ("status", "ename", "evalue", "traceback")
_BUNDLE = ("data", "metadata", "transient")

#: msg_type -> the content keys that may leave the gate (everything else is dropped).
CONTENT: dict[str, frozenset[str]] = {
    name: frozenset(keys)
    for name, keys in {
        "stream": ("name", "text"),
        "display_data": _BUNDLE,
        "update_display_data": _BUNDLE,
        "execute_result": ("execution_count", *_BUNDLE),
        "execute_input": ("code", "execution_count"),
        "error": ("ename", "evalue", "traceback", "execution_count"),
        "status": ("execution_state",),
        "clear_output": ("wait",),
        "comm_open": ("comm_id", "target_name", "data", "target_module"),
        "comm_msg": ("comm_id", "data"),
        "comm_close": ("comm_id", "data"),
        "debug_event": ("seq", "type", "event", "body"),
        "input_request": ("prompt", "password"),
        "execute_reply": (*_ERROR, "execution_count", "payload", "user_expressions",
                          "engine_info"),
        "inspect_reply": (*_ERROR, "found", "data", "metadata"),
        "complete_reply": (*_ERROR, "matches", "cursor_start", "cursor_end", "metadata"),
        "history_reply": (*_ERROR, "history"),
        "is_complete_reply": (*_ERROR, "indent"),
        "kernel_info_reply": (*_ERROR, "protocol_version", "implementation",
                              "implementation_version", "language_info", "banner", "debugger",
                              "help_links", "supported_features"),
        "comm_info_reply": (*_ERROR, "comms"),
        "shutdown_reply": (*_ERROR, "restart"),
        "interrupt_reply": _ERROR,
        "debug_reply": (*_ERROR, "seq", "type", "request_seq", "success", "command",
                        "message", "body"),
        "usage_reply": (*_ERROR, "hostname", "pid", "kernel_cpu", "kernel_memory",
                        "host_cpu_percent", "cpu_count", "host_virtual_memory"),
    }.items()
}

_DATE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-]\d\d:\d\d)?")
_UUID = re.compile(r"[0-9a-fA-F]{8}-?(?:[0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}")
_VERSION = re.compile(r"5\.\d{1,3}")
_COMM_VERSION = re.compile(r"\d{1,4}(?:\.\d{1,4}){0,3}")


def _date(value: Any) -> bool:
    return type(value) is str and _DATE.fullmatch(value) is not None


_REPLY_METADATA = {
    "started": _date,
    "dependencies_met": lambda v: type(v) is bool,
    "engine": lambda v: type(v) is str and _UUID.fullmatch(v) is not None,
    "status": lambda v: v in ("ok", "error", "aborted"),
}
_COMM_METADATA = {"version": lambda v: type(v) is str and _COMM_VERSION.fullmatch(v) is not None}

#: msg_type -> metadata-frame key -> the check its value must pass (else the key is dropped).
METADATA: dict[str, dict[str, Any]] = {
    "execute_reply": _REPLY_METADATA,
    "comm_open": _COMM_METADATA,
    "comm_msg": _COMM_METADATA,
    "comm_close": _COMM_METADATA,
}

#: execution_state -> the status content the gate sends (the only one it ever sends).
STATUS = {state: json.dumps({"execution_state": state}).encode()
          for state in ("busy", "idle", "starting")}

_STREAM_HEADS = (b'{"name": "stdout", "text": "', b'{"name": "stderr", "text": "')
_HEAD_LEN = len(_STREAM_HEADS[0])


def now() -> str:
    """The gate's clock as a Jupyter header date (UTC, microseconds, ``Z``)."""
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def header(msg_type: str, kernel_header: dict[str, Any], msg_id: str, session: str) -> bytes:
    """The header the client gets. ``kernel_header`` was parsed and checked by
    :func:`cellblock.gate.wire.parse_header` (so ``version`` is ``5.x``); ``msg_type`` is
    allowlisted; ``msg_id`` and ``session`` are the gate's, of a safe alphabet."""
    date = kernel_header.get("date")
    if not _date(date):
        date = now()
    version = kernel_header["version"]
    return (
        f'{{"msg_id": "{msg_id}", "msg_type": "{msg_type}", "username": "kernel", '
        f'"session": "{session}", "date": "{date}", "version": "{version}"}}'
    ).encode()


def metadata(msg_type: str, raw: bytes) -> bytes:
    """The metadata frame reduced to :data:`METADATA`. Raises Dropped("bad_metadata")."""
    if raw == b"{}":
        return raw
    allowed = METADATA.get(msg_type)
    if allowed is None:
        return b"{}"
    obj = load_object(raw, "metadata")
    kept = {k: v for k, v in obj.items() if k in allowed and allowed[k](v)}
    if not kept:
        return b"{}"
    return json.dumps(kept).encode()


def _one_json_string(raw: bytes, start: int) -> bool:
    """True if ``raw[start:]`` is the rest of one JSON string literal followed by ``}``
    and nothing else: the first unescaped quote is the one before the final ``}``."""
    end = len(raw) - 2
    if end < start or raw[end:] != b'"}':
        return False
    find = raw.find
    i = find(b'"', start)
    while i != end:
        if i < 0:
            return False
        j = i - 1
        while raw[j] == 0x5C:  # backslashes before the quote: odd means it is escaped
            j -= 1
        if (i - j) % 2:  # an even number of backslashes: the string ends here, too early
            return False
        i = find(b'"', i + 1)
    j = end - 1
    while raw[j] == 0x5C:
        j -= 1
    return (end - j) % 2 == 1


def content(msg_type: str, raw: bytes) -> bytes:
    """The content reduced to :data:`CONTENT`: the original bytes when nothing had to go,
    else re-encoded. Raises Dropped("bad_content") for anything but one JSON object."""
    if msg_type == "stream" and raw[:_HEAD_LEN] in _STREAM_HEADS and _one_json_string(
            raw, _HEAD_LEN):
        return raw  # exactly name and text, as jupyter_client writes them
    allowed = CONTENT[msg_type]
    obj = load_object(raw, "content")
    changed = False
    if not obj.keys() <= allowed:
        obj = {k: v for k, v in obj.items() if k in allowed}
        changed = True
    transient = obj.get("transient")
    if transient is not None and (type(transient) is not dict or transient.keys() - {
            "display_id"}):
        display_id = transient.get("display_id") if type(transient) is dict else None
        obj["transient"] = {"display_id": display_id} if type(display_id) is str else {}
        changed = True
    if not changed:
        return raw
    return json.dumps(obj, ensure_ascii=False).encode("utf-8", "replace")


def status(raw: bytes) -> str:
    """The ``execution_state`` of a status content (busy, idle or starting).
    Raises Dropped("bad_status")."""
    if len(raw) > 256:
        raise Dropped("bad_status", "status")
    state = load_object(raw, "content").get("execution_state")
    if state not in STATUS:
        raise Dropped("bad_status", "status")
    return str(state)
