"""Redaction of secrets and personal data in what a kernel says (issue 3).

    from cellblock.redact import Redactor
    r = Redactor(secrets=True, pii=("email",), exact=("s3cr3t-value",))
    r.redact(text).text        # normalised text with [REDACTED:<rule>] markers
    r.redact(text).findings    # Finding(rule, start, end, sha256_prefix): never the secret

One detector family per module (cloud, vcs, registry, chat, payment, llm, keys, urls, generic,
jwt, pii, exact), each a declarative list of `Rule`/`Block`; `engine` scans them all in one
hyperscan pass; `normalise` makes what is scanned what is shown.
"""

from cellblock.redact.engine import Finding, Redactor, RedactResult
from cellblock.redact.normalise import normalise

__all__ = ["Finding", "RedactResult", "Redactor", "normalise"]
