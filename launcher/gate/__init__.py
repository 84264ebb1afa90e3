"""The gate: the message relay between Jupyter clients and a jailed, hostile kernel.

Who calls it: the warden (one Gate per kernel), and the output rules (:mod:`cellblock.output`),
which use only what this package exports. Modules, one concern each:

- :mod:`cellblock.gate.wire`: frame layout, HMAC sign/verify, strict JSON.
- :mod:`cellblock.gate.connection`: caps (GateLimits), addresses and signers of a
  connection.
- :mod:`cellblock.gate.kernelside`: the kernel-facing sockets the warden binds.
- :mod:`cellblock.gate.tracker`: msg_type allowlists and the open-request state machine.
- :mod:`cellblock.gate.replay`: the bounded replay window over kernel msg_ids.
- :mod:`cellblock.gate.schema`: what a kernel message may say once the gate rebuilt it.
- :mod:`cellblock.gate.rules`: the output-rule seam (truncation, redaction plug in here).
- :mod:`cellblock.gate.observe`: the observer hook (budgets) and its typed Verdict.
- :mod:`cellblock.gate.relay`: the :class:`Gate`, its sockets and loop; what the loop does
  is in :mod:`~cellblock.gate.forward` (the relay), :mod:`~cellblock.gate.own` (the gate's
  own messages), :mod:`~cellblock.gate.links` (kernel connections, faults) and
  :mod:`~cellblock.gate.heartbeat`.

The public interface for output rules: :class:`OutputRule`, :data:`WITHHOLD` (a rule's
"hold this back") and :func:`load_object` (the strict JSON object parser the gate uses, so a
rule reads what the gate would forward exactly as the gate reads it).
"""

from cellblock.gate.connection import GateLimits
from cellblock.gate.observe import ALLOW, Observed, Verdict, refuse
from cellblock.gate.relay import Gate
from cellblock.gate.rules import WITHHOLD, OutputRule
from cellblock.gate.wire import load_object

__all__ = [
    "ALLOW", "WITHHOLD", "Gate", "GateLimits", "Observed", "OutputRule", "Verdict",
    "load_object", "refuse",
]
