"""The output filter: the gate rule that applies a profile's output policy to every
message the kernel sends (DESIGN decision 4).

Every string leaf of every kernel message passes the text cleaner (redaction, then
a head+tail cap), dict keys included, in content and in metadata: stream,
display_data, update_display_data, execute_result (every MIME type), error (ename,
evalue, every traceback line), execute_input, execute_reply (payload,
user_expressions), inspect_reply, complete_reply, history_reply, is_complete_reply,
kernel_info_reply, input_request (whose prompt is then marked as the sandbox's),
comm messages. ``status`` (already validated by
the relay) is the one message passed without parsing. Stream text has a per-cell
budget and a carry-over window (:mod:`.streams`); MIME bundles have their own
limits (:mod:`.rich`).

Redaction runs before truncation, so a cut never turns a secret into a prefix that
no longer matches (THREATS O17). A message whose content the policy leaves as it was
is forwarded as the original bytes, without re-encoding.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Callable, Mapping
from typing import Any

from ..gate import WITHHOLD, load_object
from ..policy import OutputPolicy
from ..redact.normalise import normalise
from .markup import markdown_parser
from .report import CellReport, label
from .rich import filter_bundle
from .spool import Spool
from .streams import CellStreams
from .text import cap_text

__all__ = ["PROMPT_MARK", "OutputFilter", "build_output_rules", "build_redactor"]

_BUNDLE_TYPES = {"display_data", "update_display_data", "execute_result", "inspect_reply"}
_COMM_TYPES = {"comm_open", "comm_msg", "comm_close"}
Audit = Callable[[str, dict[str, Any]], None]
CARRY_LATENCY = 0.2  # seconds held-back stream text may wait for the rest of a match
#: What every ``input_request`` prompt starts with (docs/output.md, docs/policy.md).
PROMPT_MARK = "[sandboxed code asks] "
#: Cells whose report waits for its flush, at most; past this the oldest is written early (a
#: request the relay stopped tracking, never flushed, costs no more than this).
MAX_OPEN_REPORTS = 1024


def build_redactor(policy: OutputPolicy, env: Mapping[str, str] | None = None) -> Any:
    """A Redactor for the profile, or None when the profile redacts nothing.

    Exact secrets come from the policy and from the named environment variables of
    the launching process (read here, on the host; they never enter the jail)."""
    env = os.environ if env is None else env
    exact = [v for v in policy.redact_values if v]
    exact += [env[name] for name in policy.redact_env if env.get(name)]
    if not (policy.redact_secrets or policy.pii or exact):
        return None
    from ..redact import Redactor

    return Redactor(secrets=policy.redact_secrets, pii=tuple(policy.pii), exact=tuple(exact))


class OutputFilter:
    """One per kernel. Called only from the gate's thread (no locks needed)."""

    name = "output"

    def __init__(self, policy: OutputPolicy, redactor: Any, audit: Audit | None = None,
                 nonce: str | None = None) -> None:
        self.policy = policy
        self.redactor = redactor
        self.audit = audit
        self.nonce = nonce or secrets.token_hex(3)
        self.cells: dict[str, CellStreams] = {}
        self._changed = False
        self._quiet = False  # every string of the message part being walked is left as it is
        self._clean_only = False  # ... or only normalised and capped: nothing to redact in it
        self._findings: list[Any] = []  # of the message being filtered
        self._msg: CellReport | None = None  # what else happened to it
        self._reports: dict[str, CellReport] = {}  # per parent msg_id, until its flush
        #: where cut stream text is kept (the warden attaches it), the execution number of
        #: each open execute_request, and what each closed cell's streams cost
        self.spool: Spool | None = None
        self.numbers: dict[str, int] = {}
        self.streamed: dict[str, dict[str, int]] = {}

    # -- the rule ----------------------------------------------------------

    def apply(self, channel: str, msg_type: str, header: dict[str, Any],
              parent: dict[str, Any], content_bytes: bytes,
              metadata_bytes: bytes) -> bytes | tuple[bytes, bytes] | None:
        if msg_type == "status":
            return content_bytes
        if msg_type in _COMM_TYPES and not self.policy.allow_comms:
            return None
        self._changed = False
        self._findings = []
        self._msg = None
        parent_id = str(parent.get("msg_id", ""))
        # Strict (no NaN, duplicate keys, lone surrogates, UTF-16, non-objects): the original
        # bytes are forwarded when nothing changes, so they must mean what was scanned.
        content = load_object(content_bytes, "content")
        self._quiet = self._clean_only = False
        if msg_type != "stream":
            self._survey(content, msg_type in _BUNDLE_TYPES)
        if msg_type == "stream":
            held = self._stream(parent_id, content)
            if held:
                self._report(parent_id, msg_type)
                return WITHHOLD
        elif msg_type in _BUNDLE_TYPES:
            content = {key: self._bundle(value) if key == "data" else value
                       for key, value in self._walk_keys(content, skip="data")}
        elif msg_type == "execute_reply":
            content = self._execute_reply(content)
        elif msg_type == "kernel_info_reply" and self.policy.neutralize_urls:
            if content.pop("help_links", None):
                self._changed = True
                self._current().note("help_links removed")
            content = self._walk(content, "kernel_info")
        else:
            content = self._walk(content, msg_type)
            if msg_type == "input_request":
                content = self._mark_prompt(content)
        metadata_out = metadata_bytes
        if metadata_bytes not in (b"{}", b""):
            before = self._changed
            self._changed = False
            metadata = load_object(metadata_bytes, "metadata")
            self._survey(metadata)
            metadata = self._walk(metadata, "metadata")
            if self._changed:
                metadata_out = _dump(metadata)
            self._changed = self._changed or before
        self._quiet = self._clean_only = False
        self._report(parent_id, msg_type)
        if not self._changed:
            return content_bytes if metadata_out is metadata_bytes else (content_bytes,
                                                                         metadata_out)
        return _dump(content), metadata_out

    def number(self, msg_id: str, execution: int) -> None:
        """The warden's count of this execute_request (its cut text is kept under it)."""
        self.numbers[msg_id] = execution
        while len(self.numbers) > MAX_OPEN_REPORTS:
            del self.numbers[next(iter(self.numbers))]

    def flush(self, parent_msg_id: str) -> list[tuple[str, dict[str, Any]]]:
        """Called by the relay before the cell's idle: held-back text, markers, tails; and
        the cell's ``output.cell`` audit event, if the policy did anything to it."""
        cell = self.cells.pop(parent_msg_id, None)
        self.numbers.pop(parent_msg_id, None)
        out: list[tuple[str, dict[str, Any]]] = []
        if cell is not None:
            out = [("stream", {"name": name, "text": text}) for name, text in cell.flush()]
            self._streamed(parent_msg_id, cell)
            self._findings = cell.findings
            cell.findings = []
            for name, cut in cell.cut.items():
                self._current().truncated(name, cut)
            self._report(parent_msg_id, "stream")
        report = self._reports.pop(parent_msg_id, None)
        if report and self.audit is not None:
            self.audit("output.cell", report.fields(parent_msg_id))
        return out

    def release(self, parent_msg_id: str) -> list[tuple[str, dict[str, Any]]]:
        """Called by the relay before any other output of the cell (an error, a figure, a
        result): the stream text the carry-over holds, released as the timer would, so that
        nothing overtakes the text printed before it."""
        cell = self.cells.get(parent_msg_id)
        if cell is None or not cell.since:
            return []
        out = [("stream", {"name": name, "text": text})
               for name, text in cell.release_due(math.inf, 0.0)]
        if cell.findings:
            self._findings = cell.findings
            cell.findings = []
            self._report(parent_msg_id, "stream")
        return out

    def _streamed(self, parent_msg_id: str, cell: CellStreams) -> None:
        """What the cell's streams cost, for its ``execution.end`` (taken by the warden)."""
        self.streamed[parent_msg_id] = {
            "cut": sum(cell.cut.values()), "kept": sum(cell.kept.values()),
            "dropped": sum(cell.dropped.values())}
        while len(self.streamed) > MAX_OPEN_REPORTS:
            del self.streamed[next(iter(self.streamed))]

    def tick(self, now: float) -> list[tuple[str, str, dict[str, Any]]]:
        """Called by the relay every ~50 ms: carried-over text that waited long enough."""
        out: list[tuple[str, str, dict[str, Any]]] = []
        for parent_id, cell in self.cells.items():
            if not cell.since:
                continue
            for name, text in cell.release_due(now, CARRY_LATENCY):
                out.append((parent_id, "stream", {"name": name, "text": text}))
            if cell.findings:
                self._findings = cell.findings
                cell.findings = []
                self._report(parent_id, "stream")
        return out

    # -- pieces --------------------------------------------------------------

    def _stream(self, parent_id: str, content: dict[str, Any]) -> bool:
        """Apply the cell's stream budget; True when the whole message is held back."""
        text = content.get("text")
        name = content.get("name")
        if not isinstance(text, str) or name not in ("stdout", "stderr"):
            content.clear()
            content.update({"name": "stderr", "text": ""})
            self._changed = True
            return True
        cell = self.cells.get(parent_id)
        if cell is None:
            cell = self.cells[parent_id] = CellStreams(
                self.policy.stream_head, self.policy.stream_tail, self.redactor,
                self.policy.normalise, self.nonce, self.spool, self.numbers.get(parent_id),
            )
        out = cell.feed(name, text)
        self._findings.extend(cell.findings)
        cell.findings = []
        if not out:
            return True
        if out != text or len(content) != 2:
            self._changed = True
            content.clear()
            content.update({"name": name, "text": out})
        return False

    def _survey(self, obj: Any, bundle: bool = False) -> None:
        """Set how the strings of `obj` (keys included) are walked, from one look at them all
        instead of one scan per string: `_quiet` when none would change (none needs a cap, the
        redactor finds nothing to redact in any, nor to normalise if the profile sends the
        normalised text), `_clean_only` when there is nothing to redact but something to
        normalise (`Redactor.survey`). In a `bundle` message, the images of its ``data`` are
        left out, as filter_bundle leaves them unscanned (R20)."""
        self._quiet = self._clean_only = False
        strings: list[str] = []
        data = obj.get("data") if bundle else None
        if type(data) is dict and any(_is_image(k) for k in data):
            obj = {**obj, "data": {k: ("" if _is_image(k) and type(v) is str else v)
                                   for k, v in data.items()}}
        _strings(obj, strings)
        if not strings:
            self._quiet = True
            return
        if max(map(len, strings)) * 4 > self.policy.max_text:
            return  # cap_text may have something to cut: every string on its own
        if self.redactor is None:
            joined = "\n".join(strings)
            self._quiet = not self.policy.normalise or normalise(joined) is joined
            return
        clean, normalised = self.redactor.survey(strings)
        # Without `normalise` a string is sent as it came unless something is redacted in it.
        self._quiet = clean and (normalised or not self.policy.normalise)
        self._clean_only = clean

    def _clean(self, text: str, what: str) -> str:
        """`text` redacted (normalised, if the profile says so) and capped; `what` names it in
        a cut marker and the audit log, so it is a label (report.label), never kernel text
        that was not cleaned."""
        if self._quiet:
            return text
        out = text
        if self.redactor is not None and not self._clean_only:
            result = self.redactor.redact(text)
            if result.findings:
                self._findings.extend(result.findings)
                out = str(result.text)
            elif self.policy.normalise:
                out = str(result.text)
        elif self.policy.normalise:  # the redactor's normalise, so a benchmark counts it there
            out = normalise(text) if self.redactor is None else self.redactor.normalise(text)
        out, cut = cap_text(out, self.policy.max_text, self.nonce, what)
        if cut:
            report = self._current()
            report.truncated(what, cut)
            report.note(f"{cut} bytes of {what} truncated")
        if out is not text and out != text:
            self._changed = True
        return out

    def _walk(self, obj: Any, what: str) -> Any:
        if self._quiet:
            return obj
        if isinstance(obj, str):
            return self._clean(obj, what)
        if isinstance(obj, list):
            return [self._walk(v, what) for v in obj]
        if isinstance(obj, dict):
            return dict(self._walk_keys(obj))
        return obj

    def _walk_keys(self, obj: dict[str, Any], skip: str | None = None) -> list[tuple[Any, Any]]:
        """(cleaned key, walked value) for each item of `obj`; the value of key `skip` is left
        as it is. A value is named after its *cleaned* key: a secret used as a key must not
        come back in the value's cut marker."""
        out: list[tuple[Any, Any]] = []
        for k, v in obj.items():
            if k == skip:
                out.append((k, v))
            elif isinstance(k, str):
                key = self._clean(k, "key")
                out.append((key, self._walk(v, label(key))))
            else:
                out.append((k, self._walk(v, "key")))
        return out

    def _mark_prompt(self, content: Any) -> Any:
        """An ``input()`` prompt, redacted, starts with `PROMPT_MARK`: a person is asked by
        code in the sandbox, not by Jupyter or cellblock (THREATS P12). A prompt that is not
        a string becomes the marker alone."""
        prompt = content.get("prompt") if isinstance(content, dict) else None
        content = dict(content) if isinstance(content, dict) else {}
        content["prompt"] = PROMPT_MARK + (prompt if isinstance(prompt, str) else "")
        self._changed = True
        return content

    def _bundle(self, data: Any) -> Any:
        out, changed = filter_bundle(data, self.policy, self._clean, self._walk, self._current())
        if changed:
            self._changed = True
        return out

    def _execute_reply(self, content: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in content.items():
            if key == "user_expressions" and isinstance(value, dict):
                exprs = {}
                for name, result in value.items():
                    if isinstance(result, dict) and "data" in result:
                        result = {**self._walk({k: v for k, v in result.items() if k != "data"},
                                               "user_expressions"),
                                  "data": self._bundle(result["data"])}
                    else:
                        result = self._walk(result, "user_expressions")
                    exprs[self._clean(name, "key")] = result
                out[key] = exprs
            elif key == "payload" and isinstance(value, list):
                items = []
                for item in value:
                    if isinstance(item, dict) and isinstance(item.get("data"), dict):
                        item = {**self._walk({k: v for k, v in item.items() if k != "data"},
                                             "payload"), "data": self._bundle(item["data"])}
                    else:
                        item = self._walk(item, "payload")
                    items.append(item)
                out[key] = items
            else:
                key = self._clean(key, "key")
                out[key] = self._walk(value, label(key))
        return out

    def _current(self) -> CellReport:
        """The report of the message being filtered (made when something happens)."""
        if self._msg is None:
            self._msg = CellReport()
        return self._msg

    def _report(self, parent_id: str, msg_type: str) -> None:
        """Add what happened to the message just filtered to its cell's report, which `flush`
        writes (one ``output.cell`` event per cell, however many messages it had)."""
        findings, msg = self._findings, self._msg
        self._findings, self._msg = [], None
        if self.audit is None or not (findings or msg):
            return
        cell = self._reports.get(parent_id)
        if cell is None:
            cell = self._reports[parent_id] = msg or CellReport()
            while len(self._reports) > MAX_OPEN_REPORTS:  # never flushed: write it now
                oldest = next(iter(self._reports))
                self.audit("output.cell", self._reports.pop(oldest).fields(oldest))
        elif msg:
            cell.merge(msg)
        if findings:
            cell.findings(findings, code_echo=msg_type == "execute_input")


def _is_image(mime: str) -> bool:
    """An image type whose value filter_bundle passes as it is (size-capped, never scanned)."""
    return mime.startswith("image/") and mime != "image/svg+xml"


def _strings(obj: Any, out: list[str]) -> None:
    """Append every string in a JSON value to `out`, dict keys included."""
    if type(obj) is str:
        out.append(obj)
    elif type(obj) is dict:
        for key, value in obj.items():
            out.append(key)
            if type(value) is str:
                out.append(value)
            elif type(value) in (dict, list):
                _strings(value, out)
    elif type(obj) is list:
        for value in obj:
            if type(value) is str:
                out.append(value)
            elif type(value) in (dict, list):
                _strings(value, out)


def _dump(obj: Any) -> bytes:
    if type(obj) is dict and all(type(v) is str and v.isascii() and k.isascii()
                                 for k, v in obj.items()):
        # a stream message: with only ASCII both modes write the same bytes, this one faster
        return json.dumps(obj).encode("ascii")
    return json.dumps(obj, ensure_ascii=False).encode("utf-8", "replace")


def build_output_rules(policy: OutputPolicy, audit: Audit | None = None,
                       env: Mapping[str, str] | None = None) -> tuple[OutputFilter]:
    """The gate's rules for one kernel of a profile. With ``neutralize_urls`` the markdown
    parser is built here too (30-150 ms the first time), while the kernel boots or in the
    spawner's warm-up, not on the first markdown output."""
    if policy.neutralize_urls:
        markdown_parser()
    return (OutputFilter(policy, build_redactor(policy, env), audit),)

