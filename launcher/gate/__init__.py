"""The gate: the message relay between Jupyter clients and a jailed, hostile kernel.

Who calls it: the warden (one Gate per kernel). Modules, one concern each:

- :mod:`cellblock.gate.wire`: frame layout, HMAC sign/verify, strict header JSON.
- :mod:`cellblock.gate.connection`: caps (GateLimits), addresses and signers of a
  connection, and the warden's kernel_info probe of a pooled kernel.
- :mod:`cellblock.gate.tracker`: msg_type allowlists and the open-request state machine.
- :mod:`cellblock.gate.replay`: the bounded replay window over kernel msg_ids.
- :mod:`cellblock.gate.rules`: the output-rule seam (truncation, redaction plug in here).
- :mod:`cellblock.gate.relay`: the sockets, the poll loop, and the :class:`Gate` itself.
"""

from cellblock.gate.relay import Gate, GateLimits
from cellblock.gate.rules import OutputRule

__all__ = ["Gate", "GateLimits", "OutputRule"]
