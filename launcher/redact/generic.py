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
from collections.abc import Callable

from cellblock.redact.rule import Rule
from cellblock.redact.urls import plausible_password
from cellblock.redact.values import key_allowed, plausible_secret, shannon_entropy

__all__ = ["RULES", "shannon_entropy"]

# (``api_key``, ``access_token``, ``session_token`` hold ``key`` or ``token``; ``api``,
# ``access`` and ``session`` alone would cost the decode hints a thousand more literals)
_KEYWORDS = r"pass(?:w(?:or)?d|phrase)|pwd|secret|token|key|auth|cred(?:ential|s)"
_KEY = r"[A-Za-z0-9_.$-]*(?:" + _KEYWORDS + r")[A-Za-z0-9_.-]*"
_Q = r"""(?:\\?["'`])?"""
# (hyperscan refuses bounded repeats here, with start of match: `max_len` bounds them)
_ASSIGN = (
    r"(?:" + _Q + r"[ \t]*(?::{1,3}=|[?+.|]=|\|\|=|=>|=|:|\|)[ \t]*" + _Q + r"[ \t]*"
    + r"|" + _Q + r"[ \t]+(?:-|is|was)[ \t]+" + _Q
    + r"|" + _Q + r"[ \t]*:?=[ \t]*\r?\n[ \t]*[\"'`]"
    + r"|" + _Q + r"(?:[ \t]*:[ \t]*|[ \t]+)[A-Za-z][A-Za-z0-9_.\[\]<>]*[ \t]*=[ \t]*" + _Q
    + r"""|["'][ \t]*,[ \t]*["'])"""
)
_VALUE = r"""[^\s'"`,;<>(){}\[\]\\&]"""
# a quoted value may hold any character but its quote, a blank or a backslash
_QUOTED = r"""[ \t]*(?::{1,3}=|[?+.]=|=>|=|:)[ \t]*(?:"[^"\s\\]{8,}"|'[^'\s\\]{8,}')"""
# In Python, the key is one run of name characters, taken whole (possessive: no
# backtracking over where the keyword sits in it, quadratic on a long run); `_assigned`
# then checks it holds a keyword, as hyperscan's match did.
_PY_KEY = r"[A-Za-z0-9_.$-]++"
_KEYWORD = re.compile(r"(?i)" + _KEYWORDS)
_GENERIC_QUOTED = re.compile(r"(?i)(?P<k>" + _PY_KEY + r")"
                             r"""["']?[ \t]*(?::{1,3}=|[?+.]=|=>|=|:)"""
                             r"""[ \t]*["'](?P<v>[^"'\s\\]{8,})["']""")


def _assigned(pattern: re.Pattern[str]) -> Callable[[str], tuple[int, int] | None]:
    def span(candidate: str) -> tuple[int, int] | None:
        match = pattern.match(candidate)
        if match is None:
            return None
        key = match.group("k")
        if not _KEYWORD.search(key) or not key_allowed(key):
            return None
        return match.span("v")
    return span


_GENERIC = re.compile(r"(?i)(?P<k>" + _PY_KEY + r")" + _ASSIGN + r"(?P<v>" + _VALUE + r"{8,})")
_XML = r"<(?P<k>" + _KEY + r")>[ \t\r\n]*"
_PY_XML = r"<(?P<k>" + _PY_KEY + r")>[ \t\r\n]*"
_XML_CONTENT = r"[^<\r\n]"
_AUTH_HEADER = (
    r"(?:[Pp]roxy-)?(?:[Aa]uthorization|AUTHORIZATION)(?:\\?[\"'])?[ \t]*[:=][ \t]*(?:\\?[\"'])?"
    r"[A-Za-z][A-Za-z0-9_-]{1,24}[ \t]+"  # the scheme: Bearer, Basic, Token, Api-Token...
)
_WORDS = re.compile(r"[\s{}]+")
_DOCKER_LOGIN = r"docker[ \t]+login[^\n]*[ \t](?:-p|--password)[ \t=]+[\"']?"
_CONNECTION = (
    r"(?:Endpoint|DefaultEndpointsProtocol|HostName|AccountName)=[^;\s'\"]+(?:;[A-Za-z]+=[^;\s'\"]*)*"
    r";(?:Secret|AccountKey|SharedAccessKey|SharedAccessSignature|Password)=[^;\s'\"]{8,}"
)
# curl's -u/--user, the command continued over lines ending with a backslash; the password,
# or the user when the password is empty (an API key given as the user name: -u "key:")
_CURL = r"curl(?:[^\n]|\\\r?\n)*[ \t](?:-u|--user)[ \t=]*[\"']?"
# (the last -u of the candidate, found by a forward search: no backtracking over the line)
_CURL_SECRET = re.compile(r"[ \t](?:-u|--user)[ \t=]*[\"']?"
                          r"(?P<u>[^\s'\":]{0,128}):[\"']?(?P<p>[^\s'\"]{0,128})")

def _holds_secret(content: str) -> bool:
    return any(plausible_secret(word) for word in _WORDS.split(content.strip()))


def _curl_secret(candidate: str) -> tuple[int, int] | None:
    match = None
    for match in _CURL_SECRET.finditer(candidate):  # noqa: B007 - the last one is wanted
        pass
    if match is None or not candidate.startswith("curl"):
        return None
    return match.span("p") if match.group("p") else match.span("u")


def _curl_password(value: str) -> bool:
    """Not a placeholder, a variable, a number (``-u 1000:1000``) or a word (``user:token``)."""
    return (plausible_password(value) and not value.isdigit() and not value.isalpha()
            and value[0] not in "$[<{%" and value[-1] not in ">]}")


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
    Rule(
        "generic-secret",
        _KEY + r"""["']?""" + _QUOTED,
        512,
        caseless=True,
        secret=_assigned(_GENERIC_QUOTED),
        validate=plausible_secret,
    ),
    # an XML element's content: redacted whole if a part of it is a secret
    # (``<secret>{name AQAAABAAA value}</secret>``, as Jenkins stores credentials)
    Rule(
        "generic-secret",
        _XML.replace("(?P<k>", "(?:") + _XML_CONTENT + r"{8,}",
        512,
        caseless=True,
        secret=_assigned(re.compile(r"(?i)" + _PY_XML + r"(?P<v>" + _XML_CONTENT + r"{8,})")),
        validate=_holds_secret,
    ),
    Rule(
        "authorization-header",
        _AUTH_HEADER + r"[A-Za-z0-9+/=_.~-]{8,}",
        400,
        secret=re.compile(_AUTH_HEADER + r"(?P<v>[A-Za-z0-9+/=_.~-]{8,})"),
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
        512,
    ),
    Rule(
        "curl-user-password",
        _CURL + r"[^\s'\":]*:[\"']?[^\s'\"]*",
        400,
        secret=_curl_secret,
        validate=_curl_password,
    ),
)
