"""Chat and messaging APIs: Slack, Discord, Telegram, Twilio, SendGrid, Mailgun."""

from __future__ import annotations

from cellblock.redact.rule import Rule

RULES: tuple[Rule, ...] = (
    Rule("slack-bot-token", r"\bxoxb-[0-9]{10,13}-[0-9]{10,13}-[A-Za-z0-9]{24,34}\b", 70),
    Rule(
        "slack-user-token",
        r"\bxox[pe]-[0-9]{10,13}-[0-9]{10,13}-[0-9]{10,13}-[A-Za-z0-9]{28,34}\b",
        90,
    ),
    Rule("slack-app-token", r"\bxapp-[0-9]-[A-Z0-9]{9,12}-[0-9]{10,13}-[a-f0-9]{64}\b", 100),
    Rule(
        "slack-webhook-url",
        r"https://hooks\.slack\.com/(?:services|workflows|triggers)/T[A-Z0-9]{8,12}/[A-Za-z0-9]{8,12}/[A-Za-z0-9]{24}",
        120,
    ),
    # base64(user id) . base64(timestamp) . HMAC
    Rule(
        "discord-bot-token",
        r"\b[MNO][A-Za-z0-9_-]{23,27}\.[A-Za-z0-9_-]{6}\.[A-Za-z0-9_-]{27,40}\b",
        80,
        prefilter=r"\.[A-Za-z0-9_-]{6}\.[A-Za-z0-9_-]{27}",
        prefilter_slack=13,
    ),
    Rule(
        "discord-webhook-url",
        r"https://(?:ptb\.|canary\.)?discord(?:app)?\.com/api/webhooks/[0-9]{17,20}/[A-Za-z0-9_-]{60,68}",
        140,
    ),
    Rule("telegram-bot-token", r"\b[0-9]{8,10}:AA[A-Za-z0-9_-]{33}\b", 46),
    Rule("twilio-api-key", r"\bSK[0-9a-fA-F]{32}\b", 34),
    Rule("sendgrid-api-key", r"\bSG\.[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43}\b", 69),
    Rule("mailgun-api-key", r"\bkey-[0-9a-f]{32}\b", 36),
)
