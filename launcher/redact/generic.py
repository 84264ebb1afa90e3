"""Generic secrets: a secret keyword assigned a value, in the syntaxes real output holds.

Like gitleaks' ``generic-api-key``, extended to the syntaxes its sample generator writes and
real output holds (issue 14): a key holding a keyword (``password``, ``token``, ``secret``,
``key``, ``auth``, ``credential``...), then one of

- an assignment: ``=``, ``:``, ``:=``, ``::=``, ``:::=``, ``?=``, ``+=``, ``.=`` (PHP), ``=>``
  (Perl, PHP, logstash), ``||=``, with optional quotes, escaped quotes (``\\"``) and blanks,
  never across a line end (INI, env, YAML, JSON, Python, C#, Java, make, log lines);
- a declared type: ``var apiToken string = "..."`` (Go), ``val token: String = "..."``;
- a call's next argument: ``System.setProperty("API_TOKEN", "...")``, ``put("key", "...")``;
- an XML element: ``<apiToken>value</apiToken>``, the value on the next line or not;

then a value of at least 8 characters that `values.plausible_secret` accepts (not a
placeholder, not code, random enough), under a key `values.key_allowed` accepts (not
``credentialsId``, ``secret_length``, ``public_key``). Also ``Authorization:`` headers (the
credential after the scheme) and ``curl -u user:password``. Short human passwords
(``password=hunter2``) are not random enough: by design, the rule has no other way to tell a
secret from a word.
"""

from __future__ import annotations

import re

from cellblock.redact.rule import Rule
from cellblock.redact.urls import plausible_password
from cellblock.redact.values import key_allowed, plausible_secret, shannon_entropy

__all__ = ["RULES", "shannon_entropy"]

_KEYWORDS = (
    r"passw(?:or)?d|passphrase|pwd|secret|token|key|auth|credential|creds|api|access"
    r"|session"
)
_KEY = r"[A-Za-z0-9_.$-]*(?:" + _KEYWORDS + r")[A-Za-z0-9_.-]*"
_Q = r"""(?:\\?["'`])?"""
# (hyperscan refuses bounded repeats here, with start of match: `max_len` bounds them)
_ASSIGN = (
    r"(?:" + _Q + r"[ \t]*(?::{1,3}=|[?+.|]=|\|\|=|=>|=|:)[ \t]*" + _Q + r"[ \t]*"
    + r"|" + _Q + r"[ \t]*:?=[ \t]*\r?\n[ \t]*[\"'`]"
    + r"|" + _Q + r"(?:[ \t]*:[ \t]*|[ \t]+)[A-Za-z][A-Za-z0-9_.\[\]<>]*[ \t]*=[ \t]*" + _Q
    + r"""|["'][ \t]*,[ \t]*["'])"""
)
_VALUE = r"""[^\s'"`,;<>(){}\[\]\\&]"""


def _assigned(pattern: re.Pattern[str]):
    def span(candidate: str) -> tuple[int, int] | None:
        match = pattern.match(candidate)
        if match is None or not key_allowed(match.group("k")):
            return None
        return match.span("v")
    return span


_GENERIC = re.compile(r"(?i)(?P<k>" + _KEY + r")" + _ASSIGN + r"(?P<v>" + _VALUE + r"{8,})")
_XML = r"<(?P<k>" + _KEY + r")>[ \t\r\n]*"
_XML_CONTENT = r"[^<\r\n]"
_AUTH_HEADER = (
    r"(?:proxy-)?authorization(?:\\?[\"'])?[ \t]*[:=][ \t]*(?:\\?[\"'])?"
    r"(?:bearer|basic|token|digest|apikey|api-key|sso-key|key|otoken|negotiate)[ \t]+"
)
_WORDS = re.compile(r"[\s{}]+")
_DOCKER_LOGIN = r"docker[ \t]+login[^\n]*[ \t](?:-p|--password)[ \t=]+[\"']?"
_CONNECTION = (
    r"(?:Endpoint|DefaultEndpointsProtocol|HostName|AccountName)=[^;\s'\"]+(?:;[A-Za-z]+=[^;\s'\"]*)*"
    r";(?:Secret|AccountKey|SharedAccessKey|SharedAccessSignature|Password)=[^;\s'\"]{8,}"
)
_CURL_USER = r"curl[^\n]*[ \t](?:-u|--user)[ \t=]*[\"']?[A-Za-z0-9_.@+-]+:"

def _holds_secret(content: str) -> bool:
    return any(plausible_secret(word) for word in _WORDS.split(content.strip()))


def _curl_password(value: str) -> bool:
    """Not a placeholder, a variable, a number (``-u 1000:1000``) or a word (``user:token``)."""
    return (plausible_password(value) and not value.isdigit() and not value.isalpha()
            and value[0] not in "$[<{%")


RULES: tuple[Rule, ...] = (
    Rule(
        "generic-secret",
        _KEY + _ASSIGN + _VALUE + r"{8,}",
        512,
        caseless=True,
        extend=True,
        secret=_assigned(_GENERIC),
        validate=plausible_secret,
    ),
    # an XML element's content: redacted whole if a part of it is a secret
    # (``<secret>{name AQAAABAAA value}</secret>``, as Jenkins stores credentials)
    Rule(
        "generic-secret",
        _XML.replace("(?P<k>", "(?:") + _XML_CONTENT + r"{8,}",
        512,
        caseless=True,
        secret=_assigned(re.compile(r"(?i)" + _XML + r"(?P<v>" + _XML_CONTENT + r"{8,})")),
        validate=_holds_secret,
    ),
    Rule(
        "authorization-header",
        _AUTH_HEADER + r"[A-Za-z0-9+/=_.~-]{8,}",
        400,
        caseless=True,
        secret=re.compile(r"(?i)" + _AUTH_HEADER + r"(?P<v>[A-Za-z0-9+/=_.~-]{8,})"),
        validate=plausible_secret,
    ),
    Rule(
        "docker-login-password",
        _DOCKER_LOGIN + r"[^\s'\"]{8,}",
        400,
        secret=re.compile(_DOCKER_LOGIN + r"(?P<v>[^\s'\"]{8,})"),
        validate=_curl_password,
    ),
    # a connection string with a secret part is redacted whole (endpoint, name and key)
    Rule(
        "connection-string",
        _CONNECTION + r"(?:;[A-Za-z]+=[^;\s'\"]*)*",
        1024,
        caseless=True,
    ),
    Rule(
        "curl-user-password",
        _CURL_USER + r"[^\s'\"@]+",
        400,
        secret=re.compile(_CURL_USER + r"(?P<v>[^\s'\"@]{1,128})"),
        validate=_curl_password,
    ),
)
