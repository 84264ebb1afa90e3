"""Which URLs leave the page: the rule the URL neutraliser applies (THREATS N16).

An LLM-facing profile renders markdown, HTML and SVG somewhere: JupyterLab in a browser on
``http://127.0.0.1:8888/lab``, a chat front end, a notebook viewer. Whatever the renderer
fetches or navigates to carries data out in its URL, so every URL it would resolve to another
host is replaced by :data:`REMOVED_URL`. What a browser does with a reference (WHATWG URL
standard, checked with Chromium and recorded in docs/output.md):

- leading and trailing C0 controls and spaces are ignored, tabs and line feeds anywhere in it
  are removed (``ht<TAB>tps://h`` is ``https://h``);
- ``\\`` is ``/`` in http(s), ws(s), ftp and file URLs: ``/\\host``, ``\\\\host`` and
  ``https:\\\\host`` all go to ``host``;
- ``http:host/x`` resolves against a page of the *same* scheme (``http://127.0.0.1:8888/host/x``)
  but goes to ``http://host/x`` from a page of any other scheme: so whether a scheme-prefixed
  reference stays local depends on how the page is served, which the gate does not know;
- a percent-encoded scheme (``%68ttps://h``) is a relative path: the browser does not decode it.

So the rule, conservative: a reference is *local* only when, so cleaned, it is empty, a
fragment (``#...``), a relative path or query without a scheme, without a backslash and not
starting with two slashes, or (where an image is fetched) a ``data:image/...`` URL. Anything
else, any scheme included, is neutralised; so is a reference whose percent-decoded form is not
local (a renderer that decodes it would fetch it).

:func:`neutralize_urls` is the plain-text pass (every URL-shaped run in any text, in place);
:func:`decoded_hits` looks for URL-shaped runs that only appear once HTML entities, backslash
escapes and controls are decoded. Both are single regular expressions without nested
quantifiers: an attempt that fails stops within the run it started on (linear time).
"""

from __future__ import annotations

import html
import re
from urllib.parse import unquote

__all__ = ["REMOVED_URL", "decoded_hits", "is_local", "neutralize_urls"]

REMOVED_URL = "#cellblock-remote-url-removed"

#: Schemes a renderer fetches or runs, spelled out in text: ``scheme:`` followed at once by the
#: rest of the URL (``http:host``, ``https://h``, ``https:\\h``), or by two slashes with spaces
#: between (the form the first neutraliser caught). ``HTTP: the protocol`` is not a URL.
_SCHEMES = r"(?:https?|ftps?|wss?|gopher|file|javascript|vbscript|blob|filesystem)"
#: Two slashes (either way round) where a reference starts: after a quote, a bracket, ``=``,
#: ``,`` (srcset), whitespace or at the start of the text, followed by a host character.
_TEXT_URL = re.compile(
    rf"(?i)(?:\b{_SCHEMES}[\t\n\r]*:(?:\s*[/\\]\s*[/\\]|(?=[^\s\"'<>]))"
    r"|(?:(?<=[\"'(=\s,<\[])|^)[/\\][\t\n\r]*[/\\](?=[^\s\"'<>/\\])"
    r"|(?<![\w.@/-])www\.(?=[\w-]))"
    r"[^\s\"'<>()\[\]{}`]*"
)
_CONTROLS = re.compile(r"[\x00-\x1f]+")
_MD_ESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_C0_SPACE = "".join(chr(c) for c in range(0x21))
_TAB_NEWLINE = str.maketrans("", "", "\t\n\r")


def neutralize_urls(text: str) -> tuple[str, int]:
    """Replace every URL-shaped run of `text` (a scheme a renderer fetches, ``//host``, a bare
    ``www.`` name a markdown renderer links); return the text and how many were replaced."""
    count = 0

    def sub(_m: re.Match[str]) -> str:
        nonlocal count
        count += 1
        return REMOVED_URL

    return _TEXT_URL.sub(sub, text), count


def decoded_hits(text: str) -> int:
    """How many URL-shaped runs `text` holds once decoded as a renderer may decode it: HTML
    entities (``https&#58;//``), markdown backslash escapes (``https\\://``), percent escapes,
    and C0 controls removed (a browser drops tabs and line feeds inside a URL) or read as
    spaces. Zero for text :func:`neutralize_urls` left nothing in, unless decoding makes one."""
    views = {html.unescape(text)}
    views |= {_MD_ESCAPE.sub(r"\1", v) for v in views}
    views |= {unquote(v) for v in views if "%" in v}
    views |= {_CONTROLS.sub(r, v) for v in views for r in ("", " ")}
    return max(len(_TEXT_URL.findall(v)) for v in views)


def is_local(value: str, image: bool = False) -> bool:
    """True when a browser on the page resolves `value` (an attribute value or markdown
    destination, entities already decoded) to the page's own host: see the module doc.
    `image`: the reference is fetched as an image, where ``data:image/...`` stays local."""
    value = value.strip(_C0_SPACE).translate(_TAB_NEWLINE)
    if not _local_form(value, image):
        return False
    return "%" not in value or _local_form(unquote(value).strip(_C0_SPACE), image)


def _local_form(value: str, image: bool) -> bool:
    if not value or value[0] == "#":
        return True
    if "\\" in value or value.startswith("//"):
        return False
    scheme = _SCHEME.match(value)
    if scheme is None:
        return True
    return (image and scheme.group().lower() == "data:"
            and value[5:].lstrip().lower().startswith("image/"))
