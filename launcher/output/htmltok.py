"""A linear HTML tokenizer for the URL neutraliser (:mod:`.markup`).

`html.parser` of the standard library rescans unclosed constructs: 256 KiB of ``<a`` took it
38 s, of ``<!--`` 27 s (Python 3.11.2), so it cannot read text a kernel chose. This follows
the states of the WHATWG tokenizer closely enough for a rebuild (what it gets wrong is
re-emitted canonically, never passed through) and looks at each character a bounded number of
times: every scan is a ``str.find`` or an anchored regular expression over one character
class, and the position only moves forward.

Events: ``("text", str)`` (entities decoded), ``("start", name, attrs, self_closing)`` with
``attrs`` a list of ``(name, value or None)`` (names as written, values decoded as in an
attribute), ``("end", name)``, ``("raw", name, content)`` for the content of a raw text
element (``script``, ``style``, ``xmp``, ``iframe``, ``noembed``, ``noframes``, ``noscript``,
``plaintext``; ``textarea`` and ``title`` come decoded, as a browser reads them) and
``("cdata", str)``. Comments, declarations and processing instructions make no event. A
start tag cut off by the end of the input makes none either (a browser drops it too).
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from html.entities import html5
from typing import Any

__all__ = ["tokens"]

RAW = frozenset({"script", "style", "xmp", "iframe", "noembed", "noframes", "noscript"})
RCDATA = frozenset({"textarea", "title"})
_WS = "\t\n\f\r "
_NAME = re.compile(r"[^\t\n\f\r />]*")
_ATTR_NAME = re.compile(r".[^\t\n\f\r />=]*", re.S)  # the first may be "=" (WHATWG 13.2.5.32)
_SKIP = re.compile(r"[\t\n\f\r /]*")
_SPACE = re.compile(r"[\t\n\f\r ]*")
_UNQUOTED = re.compile(r"[^\t\n\f\r >]*")
_COMMENT_END = re.compile(r"--!?>")
_REF = re.compile(r"&(?:#[xX][0-9a-fA-F]+;?|#[0-9]+;?|[A-Za-z][A-Za-z0-9]*;?)")


def _attr_ref(m: re.Match[str]) -> str:
    """A character reference in an attribute value: a named one without ``;`` stays as
    written unless it is a whole legacy name not followed by ``=`` (WHATWG 13.2.5.73)."""
    ref = m.group()
    if ref[1] == "#":
        return html.unescape(ref)
    if ref.endswith(";"):
        return html5[ref[1:]] if ref[1:] in html5 else ref
    following = m.string[m.end():m.end() + 1]
    return html5[ref[1:]] if ref[1:] in html5 and following != "=" else ref


def unescape_attr(value: str) -> str:
    return _REF.sub(_attr_ref, value) if "&" in value else value


def tokens(text: str) -> Iterator[tuple[Any, ...]]:
    pos, n = 0, len(text)
    while pos < n:
        lt = text.find("<", pos)
        if lt < 0:
            yield ("text", html.unescape(text[pos:]))
            return
        if lt > pos:
            yield ("text", html.unescape(text[pos:lt]))
        pos = lt
        nxt = text[pos + 1:pos + 2]
        if nxt.isascii() and nxt.isalpha():
            tag = _start_tag(text, pos)
            if tag is None:
                return  # cut off by the end: dropped
            pos, name, attrs, closing = tag
            yield ("start", name, attrs, closing)
            lowered = name.lower()
            if closing:
                continue
            if lowered == "plaintext":
                yield ("raw", name, text[pos:])
                return
            if lowered in RAW or lowered in RCDATA:
                end = re.compile(r"</" + re.escape(lowered) + r"[\t\n\f\r />]",
                                 re.I).search(text, pos)
                stop = n if end is None else end.start()
                content = text[pos:stop]
                if lowered in RCDATA:
                    yield ("text", html.unescape(content))
                else:
                    yield ("raw", name, content)
                if end is None:
                    return
                pos = text.find(">", end.end() - 1)
                pos = n if pos < 0 else pos + 1
                yield ("end", name)
        elif nxt == "/":
            after = text[pos + 2:pos + 3]
            if after.isascii() and after.isalpha():
                tag = _start_tag(text, pos + 1)
                if tag is None:
                    return
                pos = tag[0]
                yield ("end", tag[1])
            elif after == ">":
                pos += 3
            else:
                pos = _past(text, ">", pos + 2)
        elif text.startswith("<!--", pos):
            if text.startswith(">", pos + 4) or text.startswith("->", pos + 4):
                pos = pos + 5 if text[pos + 4] == ">" else pos + 6  # <!--> and <!--->
            else:
                close = _COMMENT_END.search(text, pos + 4)
                pos = n if close is None else close.end()
        elif text.startswith("<![CDATA[", pos):
            stop = text.find("]]>", pos + 9)
            yield ("cdata", text[pos + 9:n if stop < 0 else stop])
            pos = n if stop < 0 else stop + 3
        elif nxt in ("!", "?"):
            pos = _past(text, ">", pos + 2)
        else:
            yield ("text", "<")
            pos += 1


def _past(text: str, what: str, start: int) -> int:
    end = text.find(what, start)
    return len(text) if end < 0 else end + len(what)


def _run(pattern: re.Pattern[str], text: str, pos: int) -> str:
    """The run `pattern` (one character class, possibly empty) matches at `pos`."""
    m = pattern.match(text, pos)
    return "" if m is None else m.group()


def _start_tag(text: str, lt: int) -> tuple[int, str, list[tuple[str, str | None]], bool] | None:
    """A start (or end) tag whose ``<`` is at `lt`: (position after it, name, attributes,
    self-closing), or None when the input ends inside it."""
    name = _run(_NAME, text, lt + 1)
    pos, n = lt + 1 + len(name), len(text)
    attrs: list[tuple[str, str | None]] = []
    while True:
        skipped = pos
        pos += len(_run(_SKIP, text, pos))
        if pos >= n:
            return None
        if text[pos] == ">":
            return pos + 1, name, attrs, pos > skipped and text[pos - 1] == "/"
        attr = _run(_ATTR_NAME, text, pos)
        pos += len(attr)
        pos += len(_run(_SPACE, text, pos))
        if not text.startswith("=", pos):
            attrs.append((attr, None))
            continue
        pos += 1 + len(_run(_SPACE, text, pos + 1))
        quote = text[pos:pos + 1]
        if quote in ('"', "'"):
            end = text.find(quote, pos + 1)
            if end < 0:
                return None
            attrs.append((attr, unescape_attr(text[pos + 1:end])))
            pos = end + 1
        else:
            value = _run(_UNQUOTED, text, pos)
            attrs.append((attr, unescape_attr(value)))
            pos += len(value)
