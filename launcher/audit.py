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
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["SCHEMA_VERSION", "AuditEvent", "AuditLog", "audit_dir", "read_events"]

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
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{kernel_id}.jsonl"
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
