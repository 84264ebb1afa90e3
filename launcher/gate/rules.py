"""The seam where output rules (truncation, redaction, rich-output limits) plug into the gate.

Who calls what: the warden builds a sequence of rules from the profile and passes it to
``Gate(rules=...)``. The relay calls :func:`apply_rules` on every kernel message it is
about to forward (after every protocol check passed, before re-signing); messages the gate
makes itself (``Gate.announce``) do not pass through rules.

A rule receives the content frame as raw bytes and parses it only if it needs to: the relay
never parses content for rules, so an empty rule list costs nothing. A rule returns

- the *same* bytes object: unchanged (the relay re-signs the original frames),
- new bytes: the replacement content (it must be a JSON object, UTF-8; the relay re-signs it),
- ``None``: drop the message (the relay audits ``reason="rule:<name>"``).

Rules run in order; each sees the previous rule's output. A rule that raises is treated
as a drop (fail closed), audited as ``rule_error:<name>``. ``header`` and ``parent`` are the
parsed, validated dicts: rules must not mutate them. Rules are called from the gate's one
background thread only, so per-stream state (a redaction carry-over window) needs no lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from cellblock.gate.wire import Dropped

__all__ = ["OutputRule", "apply_rules", "rule_name"]


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
    ) -> bytes | None:
        """Return the content unchanged (same object), replaced (new bytes), or None to drop."""
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
) -> bytes:
    """Run ``rules`` in order over ``content``; return the final content bytes.

    Raises Dropped("rule:<name>") when a rule drops the message, or
    Dropped("rule_error:<name>") when a rule raises or returns something other than bytes.
    """
    for rule in rules:
        try:
            result = rule.apply(channel, msg_type, header, parent, content)
        except Exception:
            raise Dropped(f"rule_error:{rule_name(rule)}", msg_type) from None
        if result is None:
            raise Dropped(f"rule:{rule_name(rule)}", msg_type)
        if type(result) is not bytes:
            raise Dropped(f"rule_error:{rule_name(rule)}", msg_type)
        content = result
    return content
