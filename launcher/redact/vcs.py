"""Source-host and CI tokens: GitHub, GitLab, Bitbucket and Atlassian."""

from __future__ import annotations

from cellblock.redact.rule import Rule

RULES: tuple[Rule, ...] = (
    Rule("github-pat", r"\bghp_[A-Za-z0-9]{36}\b", 40),
    Rule("github-oauth-token", r"\bgho_[A-Za-z0-9]{36}\b", 40),
    # ghu_ user-to-server, ghs_ server-to-server (GitHub App installation), ghr_ refresh.
    Rule("github-app-token", r"\bgh[usr]_[A-Za-z0-9]{36}\b", 40),
    Rule("github-fine-grained-pat", r"\bgithub_pat_[A-Za-z0-9_]{82}\b", 93),
    Rule("gitlab-pat", r"\bglpat-[A-Za-z0-9_-]{20,}", 80),
    Rule("gitlab-pipeline-trigger-token", r"\bglptt-[0-9a-f]{40}\b", 46),
    Rule("gitlab-runner-token", r"\bglrt-[A-Za-z0-9_-]{20,}", 80),
    Rule("bitbucket-app-password", r"\bATBB[A-Za-z0-9_=.-]{28,}", 64),
    Rule("atlassian-api-token", r"\bATATT3[A-Za-z0-9_=.-]{100,}", 256),
)
