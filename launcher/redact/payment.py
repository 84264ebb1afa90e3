"""Payment APIs: Stripe and Square."""

from __future__ import annotations

from cellblock.redact.rule import Rule

RULES: tuple[Rule, ...] = (
    Rule("stripe-secret-key", r"\bsk_(?:live|test)_[A-Za-z0-9]{24,}", 128),
    Rule("stripe-restricted-key", r"\brk_(?:live|test)_[A-Za-z0-9]{24,}", 128),
    Rule("stripe-webhook-secret", r"\bwhsec_[A-Za-z0-9]{32,}", 96),
    Rule("square-access-token", r"\b(?:EAAA[A-Za-z0-9_-]{60}|sq0atp-[A-Za-z0-9_-]{22})\b", 64),
    Rule("square-oauth-secret", r"\bsq0csp-[A-Za-z0-9_-]{43}\b", 50),
)
