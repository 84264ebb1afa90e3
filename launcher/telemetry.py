"""OpenTelemetry spans for executions and lifecycle events: the optional extra ``cellblock[otel]``.

Who calls what: the warden makes one :class:`Telemetry` per kernel with
:meth:`Telemetry.from_env` and passes it every audit event it writes
(:meth:`Telemetry.record`); it calls :meth:`Telemetry.close` on exit. Nothing from
``opentelemetry`` is imported unless ``$CELLBLOCK_OTEL`` asks for it, so a host without the
extra pays nothing (a test pins that ``import cellblock.warden`` imports no opentelemetry).

``$CELLBLOCK_OTEL`` (read when the warden starts, from the environment of the process that
launches kernels):

- unset, empty or ``off``: no telemetry;
- ``otlp``: OTLP over HTTP, configured by the standard ``OTEL_EXPORTER_OTLP_*`` variables
  (needs ``opentelemetry-exporter-otlp-proto-http``);
- ``console``: spans as JSON on the warden's stderr;
- ``file:PATH``: spans as JSON lines appended to PATH (one per span, written as it ends).

Spans follow the OpenTelemetry GenAI conventions where they fit: a cell is a tool call, so
each ``execution.end`` becomes a span named ``execute_tool cellblock.execute`` with
``gen_ai.operation.name = "execute_tool"``, ``gen_ai.tool.name``, ``gen_ai.tool.type`` and
``gen_ai.tool.call.id`` (the execute_request's msg_id), its real start and end time,
``error.type`` when the cell did not end ``ok``, and cellblock's own attributes (kernel id,
profile, session, output bytes, limits hit, code sha256). Every other audit event (start,
ready, interrupt, restart, exit, refusals, gate drops) becomes a zero-length span named
``cellblock <event>`` with its scalar fields as ``cellblock.*`` attributes. Like the audit
log, spans never carry code text or output: only hashes, sizes and reasons.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from .audit import AuditEvent

__all__ = ["OTEL_ENV", "Telemetry"]

OTEL_ENV = "CELLBLOCK_OTEL"
TOOL_NAME = "cellblock.execute"
log = logging.getLogger("cellblock.telemetry")

_SCALARS = (str, int, float, bool)
_NEVER = frozenset({"code"})  # audit_code_text keeps code in the log, never in spans


class Telemetry:
    """Turns audit events into spans on ``tracer`` (an OpenTelemetry Tracer)."""

    def __init__(self, tracer: Any, kernel_id: str, profile: str, provider: Any = None) -> None:
        self._tracer = tracer
        self._provider = provider
        self._base = {"cellblock.kernel.id": kernel_id, "cellblock.profile": profile}

    @classmethod
    def from_env(cls, kernel_id: str, profile: str,
                 env: Mapping[str, str] | None = None) -> Telemetry | None:
        """A Telemetry configured by ``$CELLBLOCK_OTEL``, or None when it is off or the
        extra is not installed (logged once, never an error: telemetry is not a control)."""
        spec = (os.environ if env is None else env).get(OTEL_ENV, "").strip()
        if not spec or spec == "off":
            return None
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import (
                BatchSpanProcessor,
                ConsoleSpanExporter,
                SimpleSpanProcessor,
            )
        except ImportError:
            log.warning("%s=%s but opentelemetry-sdk is not installed: "
                        "pip install 'cellblock[otel]'", OTEL_ENV, spec)
            return None
        processor: Any
        if spec == "otlp":
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                    OTLPSpanExporter,
                )
            except ImportError:
                log.warning("%s=otlp needs opentelemetry-exporter-otlp-proto-http", OTEL_ENV)
                return None
            processor = BatchSpanProcessor(OTLPSpanExporter())
        elif spec == "console":
            processor = SimpleSpanProcessor(ConsoleSpanExporter())
        elif spec.startswith("file:"):
            out = open(spec[5:], "a", encoding="utf-8")  # closed by shutdown()
            processor = SimpleSpanProcessor(ConsoleSpanExporter(
                out=out, formatter=lambda span: span.to_json(indent=None) + "\n"))
        else:
            log.warning("%s=%r: expected otlp, console, file:PATH or off", OTEL_ENV, spec)
            return None
        provider = TracerProvider(resource=Resource.create(
            {"service.name": "cellblock", "cellblock.kernel.id": kernel_id}))
        provider.add_span_processor(processor)
        return cls(provider.get_tracer("cellblock"), kernel_id, profile, provider)

    def record(self, event: AuditEvent) -> None:
        """Emit the span for one audit event. Never raises."""
        try:
            self._record(event)
        except Exception:  # telemetry must never break the warden
            log.debug("telemetry: span for %s failed", event.event, exc_info=True)

    def _record(self, event: AuditEvent) -> None:
        attrs: dict[str, Any] = dict(self._base)
        attrs["cellblock.event"] = event.event
        if event.session:
            attrs["session.id"] = event.session
        if event.parent_msg_id:
            attrs["cellblock.parent_msg_id"] = event.parent_msg_id
        for key, value in event.fields.items():
            if key in _NEVER:
                continue
            if isinstance(value, _SCALARS):
                attrs[f"cellblock.{key}"] = value
            elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                attrs[f"cellblock.{key}"] = list(value)
        end_ns = time.time_ns()
        if event.event == "execution.end":
            attrs.update({
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": TOOL_NAME,
                "gen_ai.tool.type": "extension",
                "gen_ai.tool.description": "Python code run in a cellblock sandbox",
            })
            if event.parent_msg_id:
                attrs["gen_ai.tool.call.id"] = event.parent_msg_id
            status = event.fields.get("status", "unknown")
            if status != "ok":
                attrs["error.type"] = str(status)
            duration = float(event.fields.get("duration_seconds", 0.0))
            span = self._tracer.start_span(f"execute_tool {TOOL_NAME}",
                                           start_time=end_ns - int(duration * 1e9),
                                           attributes=attrs)
            if status != "ok":
                from opentelemetry.trace import Status, StatusCode

                span.set_status(Status(StatusCode.ERROR, str(status)))
            span.end(end_time=end_ns)
            return
        span = self._tracer.start_span(f"cellblock {event.event}", start_time=end_ns,
                                       attributes=attrs)
        span.end(end_time=end_ns)

    def close(self) -> None:
        """Flush and shut the exporter down. Idempotent."""
        provider, self._provider = self._provider, None
        if provider is not None:
            with contextlib.suppress(Exception):
                provider.shutdown()
