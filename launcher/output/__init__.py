"""Output rules: everything the kernel says passes these before it reaches a client.

One module per concern: :mod:`.text` (caps and markers), :mod:`.streams` (the per-cell
stream budget, head and tail, and the redaction carry-over window), :mod:`.rich`
(MIME allowlist, image caps, remote-URL neutralisation) and :mod:`.filter` (the
gate rule that walks every message type and applies them). Redaction detectors
live in :mod:`cellblock.redact`.
"""

from .filter import OutputFilter, build_output_rules

__all__ = ["OutputFilter", "build_output_rules"]
