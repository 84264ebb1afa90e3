"""Reading audit logs: filters, time parsing and ``--follow``, for `cellblock audit`.

Who calls this: the CLI. Logs are the ``<kernel id>.jsonl`` files of one audit directory
(:func:`cellblock.audit.audit_dir`). Events come out file by file in write order, each file
oldest first by modification time; with ``follow`` the directory is watched for new lines
and new files (polled every ``interval`` seconds) until the caller stops iterating.
A torn last line (a warden that crashed mid-write) is skipped, and a line that is still
being written is read once it is complete.
"""

from __future__ import annotations

import fnmatch
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from .audit import AuditEvent

__all__ = ["Filter", "format_event", "parse_since", "query"]

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``"10m"``, ``"2h"``, ``"30s"``, ``"1d"`` ago, or an ISO 8601 time (UTC if no zone).
    Raises ValueError naming the accepted forms."""
    now = now or datetime.now(UTC)
    m = _RELATIVE.match(text.strip())
    if m:
        return now - timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--since {text!r}: expected a duration such as 30s, 10m, 2h, 1d "
                         "or an ISO 8601 time such as 2026-11-23T10:00:00") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Filter:
    """Which events to show: kernel id prefix, event glob (``kernel.*``), not before ``since``."""

    kernel: str = ""
    event: str = ""
    since: datetime | None = None

    def files(self, directory: Path) -> list[Path]:
        paths = [p for p in directory.glob("*.jsonl") if p.stem.startswith(self.kernel)]
        return sorted(paths, key=lambda p: (p.stat().st_mtime, p.name))

    def matches(self, event: AuditEvent) -> bool:
        if self.event and not fnmatch.fnmatchcase(event.event, self.event):
            return False
        if self.since is not None:
            try:
                return datetime.fromisoformat(event.ts) >= self.since
            except ValueError:
                return False
        return True


def _lines(path: Path, offset: int) -> tuple[list[str], int]:
    """Complete lines of ``path`` from byte ``offset``; the new offset (after the last \\n)."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return [], offset
    end = data.rfind(b"\n") + 1
    return data[:end].decode("utf-8", "replace").splitlines(), offset + end


def query(directory: Path, flt: Filter, follow: bool = False,
          interval: float = 0.2) -> Iterator[AuditEvent]:
    """Matching events from every log in ``directory``; with ``follow``, forever."""
    offsets: dict[Path, int] = {}
    while True:
        if directory.is_dir():
            for path in flt.files(directory):
                lines, offsets[path] = _lines(path, offsets.get(path, 0))
                for line in lines:
                    try:
                        event = AuditEvent.model_validate(json.loads(line))
                    except ValueError:
                        continue
                    if flt.matches(event):
                        yield event
        if not follow:
            return
        time.sleep(interval)  # polling the files for appended lines


def format_event(event: AuditEvent) -> str:
    """One line for people: time, kernel (8 chars), event, session/parent (8), fields."""
    ids = " ".join(x[:8] for x in (event.session, event.parent_msg_id) if x)
    fields = " ".join(f"{k}={json.dumps(v, separators=(',', ':'))}"
                      for k, v in event.fields.items())
    return f"{event.ts} {event.kernel_id[:8]} {event.event:<18} {ids:<17} {fields}".rstrip()
