"""The audit log: one JSONL stream per kernel, one validated event per line.

Every event is an :class:`AuditEvent` (schema version 1): when, which kernel,
which event, the correlation ids (session, parent msg_id) and event-specific
fields. Writers flush every event, so a warden that crashes leaves a readable log
(at worst a truncated last line, which readers skip). Events never carry a
secret: redaction findings are a rule name and a sha256 prefix, code is a sha256
unless the profile says to keep its text.

The directory is ``$CELLBLOCK_AUDIT_DIR``, else the policy's ``[audit] dir``,
else ``/var/log/cellblock`` for root and ``$XDG_STATE_HOME/cellblock/audit``
(``~/.local/state/cellblock/audit``) for everyone else. Files are
``<kernel id>.jsonl``, mode 0600.

The fields of each known event are a model in :data:`EVENT_FIELDS`; :func:`json_schema`
publishes the whole thing as one JSON Schema (``cellblock audit --schema``), in which an
event named there must carry those fields. Events not named there (a new subsystem's) are
valid with any fields until they are added. docs/operations.md lists every event.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "EVENT_FIELDS",
    "SCHEMA_VERSION",
    "AuditEvent",
    "AuditLog",
    "audit_dir",
    "json_schema",
    "read_events",
]

SCHEMA_VERSION = 1
AUDIT_ENV = "CELLBLOCK_AUDIT_DIR"


class AuditEvent(BaseModel):
    """One line of the audit log. ``fields`` depends on ``event`` (docs/operations.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = SCHEMA_VERSION
    ts: str = Field(description="UTC time, ISO 8601 with microseconds")
    kernel_id: str
    event: str = Field(pattern=r"^[a-z][a-z0-9_.]*$")
    session: str | None = None
    parent_msg_id: str | None = None
    fields: dict[str, Any] = {}


class _Open(BaseModel):
    """Fields of an event other subsystems may extend: the named ones are required."""

    model_config = ConfigDict(extra="allow")


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KernelStart(_Open):
    """The jail is about to start. Hashes, never the command or the policy text."""

    profile: str
    policy_sha256: str
    nsjail_argv_sha256: str
    jail_uid: int
    cgroup: str | None
    warden_pid: int
    budgets: dict[str, float] = Field(description="the profile's budgets")
    pooled: bool = Field(False, description="started ahead of time for the warm pool")


class KernelAdopt(_Closed):
    """A launch adopted a kernel from the warm pool (its earlier events are the pool's)."""

    pool_slot: str = Field(description="the run dir's and cgroup's name, pool-<hex>")
    pooled_seconds: float = Field(description="how long it waited in the pool")


class KernelReady(_Closed):
    startup_seconds: float = Field(description="warden start (or adoption) to the kernel's "
                                   "sockets bound and its iopub subscription welcomed")


class KernelStartFailed(_Open):
    error: str


class KernelInterrupt(_Closed):
    origin: Literal["client", "budget"]
    budget: str | None = None
    limit_seconds: float | None = None


class KernelRestart(_Closed):
    """The jail was killed after a cell's grace and started again in place."""

    reason: str
    budget: str
    status: int | None = Field(description="the killed jail's exit status")
    restarts: int


class KernelExit(_Open):
    reason: str = Field(description="'shutdown requested', 'stopped by operator', a budget "
                        "('lifetime limit 3600 s reached') or a death ('memory limit ...')")
    status: int | None
    budget: str | None = None
    executions: int = 0
    output_bytes: int = 0
    restarts: int = 0
    lifetime_seconds: float = 0.0


_LIMITS = Literal["cell_seconds", "grace_seconds", "output_bytes"]


class ExecutionStart(_Closed):
    """An execute_request was forwarded (``parent_msg_id`` is its msg_id)."""

    code_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    queued: bool = Field(description="true: another cell was running; its clock starts later")
    code: str | None = Field(None, description="only with the profile's audit_code_text")


class ExecutionEnd(_Closed):
    status: Literal["ok", "error", "aborted", "unknown", "killed", "stopped", "lost"]
    duration_seconds: float
    queued_seconds: float
    code_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    output_bytes_in: int = Field(description="output content bytes the kernel sent")
    output_bytes_out: int = Field(description="what the client got, after truncation")
    output_messages: int
    limits_hit: list[_LIMITS]
    # what the cell cost (cellblock.warden.cost, the output filter's spool)
    execution: int = Field(0, description="the gate's number of the cell, 1, 2, ...")
    cpu_seconds: float | None = Field(None, description="the kernel cgroup's CPU time")
    peak_memory_bytes: int | None = Field(None, description="the cgroup's peak in the cell")
    peak_memory_scope: Literal["cell", "kernel", "sampled"] | None = None
    memory_start_bytes: int | None = None
    output_bytes_cut: int = Field(0, description="stream bytes the budget cut")
    output_bytes_kept: int = Field(0, description="bytes kept for read_output")
    output_bytes_not_kept: int = Field(0, description="cut bytes past spool_bytes")


class ExecutionRefused(_Closed):
    budget: str
    executions: int


class GateEvent(_Open):
    reason: str
    channel: str | None = None
    direction: str | None = None
    msg_type: str | None = None


class GateDropCounts(_Closed):
    counts: dict[str, int]


class OutputCell(_Closed):
    """What the output policy did to one request's output (cellblock.output.report), written
    once, right before the gate releases its idle; only when the policy changed something.
    Labels (MIME types, JSON keys) are the redacted strings, at most 64 characters."""

    redactions: dict[str, int] = Field(description="rule -> findings in the output")
    input_redactions: dict[str, int] = Field(
        description="rule -> findings in execute_input, the kernel's echo of the code")
    hashes: list[str] = Field(description="'rule:<first 12 hex of the sha256 of the secret>', "
                              "distinct, at most 50")
    hashes_omitted: int = 0
    truncated_bytes: dict[str, int] = Field(
        description="bytes cut: 'stdout'/'stderr' by the stream budget, else by max_text, "
                    "by the MIME type or JSON key of the value")
    images_withheld: dict[str, int] = Field(description="MIME type -> images over max_image")
    mime_dropped: dict[str, int] = Field(description="MIME type -> values not in allowed_mime")
    urls_neutralised: int = Field(description="remote URLs replaced in markdown, HTML and SVG")
    notes: list[str] = Field(description="what was withheld, cut or removed, in words; "
                             "distinct, at most 20")
    notes_omitted: int = 0


class FilesUpload(_Closed):
    """A client's upload reached the inbox (cellblock.files): never its contents."""

    name: str
    size: int
    sha256: str


class FilesDownload(_Closed):
    """An outbox file was sent: what was sent, and what the kernel wrote (before redaction)."""

    name: str
    size: int
    sha256: str
    read_size: int
    read_sha256: str
    kind: Literal["text", "image"]
    redactions: list[str]


class FilesRefused(_Closed):
    op: Literal["upload", "download"]
    name: str | None = Field(description="null when the name was refused or holds a finding")
    code: str
    size: int | None = None


class NetConnection(_Closed):
    """One connection through the egress proxy (cellblock.egress.proxy); never a payload."""

    verdict: Literal["allowed", "denied"]
    host: str = Field(description="the normalised host asked for ('' before it was read)")
    port: int
    address: str = Field(description="the checked address connected to ('' if none)")
    bytes_up: int
    bytes_down: int
    seconds: float
    reason: str | None = Field(None, description="denied: why, in words")
    status: int | None = Field(None, description="denied: the HTTP status answered")
    end: str | None = Field(None, description="allowed: the error that ended it, if one did")


class NetDeniedCount(_Closed):
    """At exit, when more refusals happened than were written one by one."""

    denied: int
    not_written: int


class NetLock(_Closed):
    reason: str
    open: int = Field(description="connections closed by the lock")
    bytes: int
    connections: int


#: event name -> the model of its ``fields``
EVENT_FIELDS: dict[str, type[BaseModel]] = {
    "kernel.start": KernelStart,
    "kernel.adopt": KernelAdopt,
    "kernel.ready": KernelReady,
    "kernel.start_failed": KernelStartFailed,
    "kernel.interrupt": KernelInterrupt,
    "kernel.restart": KernelRestart,
    "kernel.exit": KernelExit,
    "execution.start": ExecutionStart,
    "execution.end": ExecutionEnd,
    "execution.refused": ExecutionRefused,
    "gate.drop": GateEvent,
    "gate.strip": GateEvent,
    "gate.reconnect": GateEvent,
    "gate.evict": GateEvent,
    "gate.error": GateEvent,
    "gate.refuse": GateEvent,
    "gate.drop_counts": GateDropCounts,
    "output.cell": OutputCell,
    "files.upload": FilesUpload,
    "files.download": FilesDownload,
    "files.refused": FilesRefused,
    "net.connection": NetConnection,
    "net.denied": NetConnection,
    "net.denied_count": NetDeniedCount,
    "net.lock": NetLock,
}


def json_schema() -> dict[str, Any]:
    """The published JSON Schema of one audit line: the envelope, and for each known event
    the model its ``fields`` must match (``if event == X then fields: X``)."""
    schema = AuditEvent.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = f"cellblock audit event, schema version {SCHEMA_VERSION}"
    defs = schema.setdefault("$defs", {})
    rules = []
    for event, model in EVENT_FIELDS.items():
        sub = model.model_json_schema(ref_template="#/$defs/{model}")
        defs.update(sub.pop("$defs", {}))
        defs[model.__name__] = sub
        rules.append({
            "if": {"properties": {"event": {"const": event}}, "required": ["event"]},
            "then": {"properties": {"fields": {"$ref": f"#/$defs/{model.__name__}"}}},
        })
    schema["allOf"] = rules
    return schema


def audit_dir(configured: str = "") -> Path:
    explicit = os.environ.get(AUDIT_ENV) or configured
    if explicit:
        return Path(explicit).expanduser()
    if os.geteuid() == 0:
        return Path("/var/log/cellblock")
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "cellblock" / "audit"


class AuditLog:
    """Appends events for one kernel. Thread-safe; ``close`` is idempotent."""

    def __init__(self, directory: Path, kernel_id: str) -> None:
        from .names import check_kernel_id

        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{check_kernel_id(kernel_id)}.jsonl"
        self.kernel_id = kernel_id
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file = os.fdopen(fd, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, event: str, *, session: str | None = None,
              parent_msg_id: str | None = None, **fields: Any) -> AuditEvent:
        record = AuditEvent(
            ts=datetime.now(UTC).isoformat(timespec="microseconds"),
            kernel_id=self.kernel_id, event=event, session=session,
            parent_msg_id=parent_msg_id, fields=fields,
        )
        line = record.model_dump_json() + "\n"
        with self._lock:
            if not self._file.closed:
                self._file.write(line)
                self._file.flush()
        return record

    def close(self) -> None:
        with self._lock, contextlib.suppress(OSError):
            self._file.close()


def read_events(path: Path) -> Iterator[AuditEvent]:
    """Events of one log file; a torn last line (a crash mid-write) is skipped."""
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                yield AuditEvent.model_validate(json.loads(line))
            except ValueError:
                continue
