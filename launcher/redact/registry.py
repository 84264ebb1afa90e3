"""Package-registry tokens: npm, PyPI, Docker Hub."""

from __future__ import annotations

from cellblock.redact.rule import Rule

RULES: tuple[Rule, ...] = (
    Rule("npm-token", r"\bnpm_[A-Za-z0-9]{36}\b", 40),
    # A PyPI token is a macaroon whose base64 always opens with the location "pypi.org".
    Rule("pypi-token", r"\bpypi-AgEIcHlwaS5vcmc[A-Za-z0-9_-]{50,}", 512),
    Rule("dockerhub-token", r"\bdckr_(?:pat|oat)_[A-Za-z0-9_-]{27,}", 64),
)
