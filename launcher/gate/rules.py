"""The seam where output rules (truncation, redaction, rich-output limits) plug into the gate.

Who calls what: the warden builds a sequence of rules from the profile and passes it to
``Gate(rules=...)``. The relay calls :func:`apply_rules` on every kernel message it is
about to forward (after every protocol check passed, before re-signing); messages the gate
makes itself (``Gate.announce``) do not pass through rules.

A rule receives the content and metadata frames as raw bytes and parses them only if it
needs to: the relay never parses content for rules, so an empty rule list costs nothing.
A rule returns

- the *same* content bytes object: unchanged (the relay re-signs the original frames),
- new bytes: the replacement content (a JSON object, UTF-8; the relay re-signs it),
- a ``(content, metadata)`` tuple of bytes: both replaced (metadata is text too, O15),
- ``WITHHOLD`` (``b""``): hold the message back silently, without an audit event (a stream
  message whose text is kept back as redaction carry-over, or past the budget),
- ``None``: drop the message (the relay audits ``reason="rule:<name>"``).

A rule may also define ``flush(parent_msg_id) -> list[tuple[str, dict]]``: the relay calls
it right before it releases a request's ``status: idle`` (and before announcing a dead
kernel), and publishes each ``(msg_type, content)`` as an iopub message of that request,
signed with the client key. This is how held-back text and truncation markers reach the
client before the client stops collecting the cell's output.

And ``tick(now) -> list[tuple[str, str, dict]]``: the relay calls it about every 50 ms with
``time.monotonic()``, and publishes each ``(parent_msg_id, msg_type, content)`` for a request
still open. This is how carried-over text that waited long enough reaches the client while a
cell is still running (a short ``print`` in a long loop).

And ``release(parent_msg_id) -> list[tuple[str, dict]]``: the relay calls it before it
relays any iopub message of that request other than a stream (an error, a figure, a
result), and publishes what it returns first: text printed before a traceback arrives
before it.

Rules run in order; each sees the previous rule's output. A rule that raises is treated
as a drop (fail closed), audited as ``rule_error:<name>``. ``header`` and ``parent`` are the
parsed, validated dicts: rules must not mutate them. Rules are called from the gate's one
background thread only, so per-stream state (a redaction carry-over window) needs no lock.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from cellblock.gate.wire import Dropped

__all__ = [
    "WITHHOLD", "OutputRule", "Withheld", "apply_rules", "flush_rules", "release_rules",
    "rule_name", "tick_rules",
]

WITHHOLD = b""


class Withheld(Exception):
    """A rule withheld the message on purpose; nothing is sent and nothing is audited."""


@runtime_checkable
class OutputRule(Protocol):
    """One output rule. ``channel`` is "shell", "control", "stdin" or "iopub"."""

    def apply(
        self,
        channel: str,
        msg_type: str,
        header: dict[str, Any],
        parent: dict[str, Any],
        content_bytes: bytes,
        metadata_bytes: bytes,
    ) -> bytes | tuple[bytes, bytes] | None:
        """Return the content unchanged (same object), replaced (new bytes), content and
        metadata replaced (a tuple), WITHHOLD, or None to drop."""
        ...


def rule_name(rule: OutputRule) -> str:
    """The name audited for ``rule``: its ``name`` attribute if a str, else its class name."""
    name = getattr(rule, "name", None)
    return name if isinstance(name, str) else type(rule).__name__


def apply_rules(
    rules: Sequence[OutputRule],
    channel: str,
    msg_type: str,
    header: dict[str, Any],
    parent: dict[str, Any],
    content: bytes,
    metadata: bytes = b"{}",
) -> tuple[bytes, bytes]:
    """Run ``rules`` in order; return the final ``(content, metadata)`` bytes.

    Raises Dropped("rule:<name>") when a rule drops the message,
    Dropped("rule_error:<name>") when a rule raises or returns something else, and
    Withheld when a rule withholds it.
    """
    for rule in rules:
        try:
            result = rule.apply(channel, msg_type, header, parent, content, metadata)
        except Exception:
            raise Dropped(f"rule_error:{rule_name(rule)}", msg_type) from None
        if result is None:
            raise Dropped(f"rule:{rule_name(rule)}", msg_type)
        if type(result) is tuple and len(result) == 2 and all(type(x) is bytes for x in result):
            content, metadata = result
        elif type(result) is bytes:
            content = result
        else:
            raise Dropped(f"rule_error:{rule_name(rule)}", msg_type)
        if content == WITHHOLD:
            raise Withheld
    return content, metadata


def _collect(rules: Sequence[OutputRule], hook: str, arg: object) -> list[tuple[Any, ...]]:
    """Call ``rule.<hook>(arg)`` on every rule that has it; content dicts become bytes.

    A rule that raises loses what it held (fail closed: nothing unscanned is sent).
    """
    out: list[tuple[Any, ...]] = []
    for rule in rules:
        method = getattr(rule, hook, None)
        if method is None:
            continue
        try:
            items = method(arg)
        except Exception:  # noqa: S112 - fail closed: held text is discarded
            continue
        for *head, content in items:
            out.append((*head, json.dumps(content, ensure_ascii=False).encode(
                "utf-8", "replace")))
    return out


def flush_rules(rules: Sequence[OutputRule], parent_msg_id: str) -> list[tuple[str, bytes]]:
    """What the rules kept back for ``parent_msg_id``, as (msg_type, content bytes)."""
    return _collect(rules, "flush", parent_msg_id)


def release_rules(rules: Sequence[OutputRule], parent_msg_id: str) -> list[tuple[str, bytes]]:
    """What the rules hold back for ``parent_msg_id`` that must leave before its next
    output (the stream carry-over), as (msg_type, content bytes)."""
    return _collect(rules, "release", parent_msg_id)


def tick_rules(rules: Sequence[OutputRule], now: float) -> list[tuple[str, str, bytes]]:
    """What the rules release on a timer, as (parent_msg_id, msg_type, content bytes)."""
    return _collect(rules, "tick", now)
