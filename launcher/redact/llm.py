"""LLM provider keys: OpenAI, Anthropic, Hugging Face, Groq, Replicate, xAI."""

from __future__ import annotations

from cellblock.redact.rule import Rule

RULES: tuple[Rule, ...] = (
    # Project, service-account and admin keys; and the legacy sk-<20>T3BlbkFJ<20> shape
    # ("T3BlbkFJ" is base64 of "OpenAI").
    Rule("openai-api-key", r"\bsk-(?:proj|svcacct|admin)-[A-Za-z0-9_-]{20,}", 256),
    Rule("openai-api-key", r"\bsk-[A-Za-z0-9]{20}T3BlbkFJ[A-Za-z0-9]{20}\b", 51),
    Rule("openai-api-key", r"\bsk-[A-Za-z0-9]{48}\b", 51),
    Rule("anthropic-api-key", r"\bsk-ant-[a-z]{3,8}[0-9]{2}-[A-Za-z0-9_-]{80,}", 160),
    Rule("huggingface-token", r"\bhf_[A-Za-z0-9]{34}\b", 37),
    Rule("groq-api-key", r"\bgsk_[A-Za-z0-9]{52}\b", 56),
    Rule("replicate-api-token", r"\br8_[A-Za-z0-9]{37}\b", 40),
    Rule("xai-api-key", r"\bxai-[A-Za-z0-9]{80}\b", 84),
)
