"""Remote URLs out of markdown, HTML and SVG, by parsing them (THREATS N16).

**HTML and SVG are rebuilt from their parse** (:mod:`.htmltok`, entities decoded): every
start tag is written again from its name and attributes, values double-quoted and escaped,
text escaped, comments, processing instructions and declarations dropped. What a browser parses
from the result is what the gate parsed and checked, whatever tricks the input played on a
parser (``<!-->``, entities, odd quoting). On the way:

- an attribute a browser fetches or navigates to (`URL_ATTRS`: ``src``, ``href``,
  ``xlink:href``, ``action``, ``formaction``, ``poster``, ``data``, ``background``...) keeps
  its value only if `urls.is_local` says so; ``srcset`` and the like, each candidate; SVG
  animation values (``to``, ``from``, ``values``, ``by``: ``<set attributeName="href"
  to=...>``), each ``;`` part;
- ``style`` and any value with ``url(`` in it, and ``<style>`` content, are CSS: dropped when
  they hold ``@import`` or a ``url()`` or string that is not local (after CSS escapes and
  entities are decoded), or, for ``<style>`` content, a ``<`` outside a CDATA marker (in SVG
  a browser parses tags there); CDATA markers are dropped from it;
- ``<script>`` (with its content), ``<link>``, ``<meta>`` (``http-equiv=refresh``),
  ``<base>``, event handlers (``on*``) and ``srcdoc`` are dropped; ``xmlns`` keeps the
  namespace names of SVG, XLink, XHTML and MathML (identifiers, never fetched);
- every other attribute value and all text go through the plain-text pass
  (`urls.neutralize_urls`), as before.

Tag and attribute names keep their case (SVG's ``viewBox`` and ``linearGradient``).

**Markdown** cannot be rebuilt without changing what a person or a model reads, so it is
checked: the plain-text pass first, then a CommonMark parse (markdown-it-py, raw HTML on, the
way JupyterLab renders it) whose HTML goes through the rebuild above, and a look for URLs that
only entity, backslash or percent decoding reveals (another renderer may decode what
markdown-it does not). If either finds a reference left, the whole markdown is sent as a
fenced code block (nothing in it is rendered), after a line that says so.

The text handed here is already capped by the profile's ``max_text``; the parsers and every
regular expression here are linear in it.
"""

from __future__ import annotations

import functools
import html
import re
from typing import Any

from .htmltok import tokens
from .urls import REMOVED_URL, decoded_hits, is_local, neutralize_urls

__all__ = ["neutralize_html", "neutralize_markdown"]

#: Attributes whose value is one URL a browser fetches or navigates to.
URL_ATTRS = frozenset({
    "src", "href", "xlink:href", "action", "formaction", "poster", "data", "background",
    "lowsrc", "dynsrc", "longdesc", "cite", "codebase", "classid", "usemap", "manifest",
    "profile", "icon", "archive", "code", "xml:base", "ping", "itemtype", "itemid",
})
#: ... and those where it is fetched as an image (``data:image/...`` stays).
IMAGE_ATTRS = frozenset({"src", "lowsrc", "dynsrc", "poster", "background", "srcset",
                         "imagesrcset", "href", "xlink:href"})
_LIST_ATTRS = {"srcset": r"[\s,]+", "imagesrcset": r"[\s,]+", "to": ";", "from": ";",
               "values": ";", "by": ";"}
_DROP_TAGS = frozenset({"script", "link", "meta", "base"})
_DROP_ATTRS = frozenset({"srcdoc"})
_NAMESPACES = frozenset({
    "http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink",
    "http://www.w3.org/1999/xhtml", "http://www.w3.org/1998/Math/MathML",
    "http://www.w3.org/XML/1998/namespace",
})
_NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:.\-]*\Z")
_TAG = re.compile(r"[A-Za-z][A-Za-z0-9_:.\-]*\Z")
_DESCRIPTOR = re.compile(r"[0-9.]+[wxh]\Z", re.I)
_CSS_ESCAPE = re.compile(r"\\(?:([0-9a-fA-F]{1,6})[ \t\n\r\f]?|(.))", re.S)
_CSS_REF = re.compile(r"""(?i)url\(\s*([^\s"')]*)|"([^"\n]*)"|'([^'\n]*)'""")
_CDATA = re.compile(r"<!\[CDATA\[|\]\]>")
_BACKTICKS = re.compile(r"`+")
FENCE_NOTE = ("[cellblock: shown as text: it held a remote URL the gate could not remove "
              "in place]")


def _css_char(m: re.Match[str]) -> str:
    if m.group(1) is not None:
        cp = int(m.group(1), 16)
        return chr(cp) if 0 < cp <= 0x10FFFF and not 0xD800 <= cp <= 0xDFFF else "\ufffd"
    return "" if m.group(2) == "\n" else m.group(2)


def css_is_local(css: str, data_images: bool = True) -> bool:
    """True when `css` (a style attribute, a ``<style>`` element, an attribute with
    ``url(``) makes a browser fetch nothing from another host (nor a ``data:`` image,
    unless `data_images`)."""
    view = _CSS_ESCAPE.sub(_css_char, html.unescape(css))
    parts, pos = [], 0  # comments out, with str.find (a lazy regex is quadratic unclosed)
    while (start := view.find("/*", pos)) >= 0:
        parts.append(view[pos:start])
        end = view.find("*/", start + 2)
        pos = len(view) if end < 0 else end + 2
    view = "".join(parts) + view[pos:]
    if "@import" in view.lower():
        return False
    return all(is_local(next(g for g in m.groups() if g is not None), image=data_images)
               for m in _CSS_REF.finditer(view))


def _list_is_local(value: str, sep: str, image: bool) -> bool:
    for part in re.split(sep, value):
        if part and not _DESCRIPTOR.match(part) and not is_local(part, image):
            return False
    return True


class _Rebuild:
    """The rebuilt text of one HTML or SVG value, and how many references it removed."""

    def __init__(self, data_images: bool = True) -> None:
        self.out: list[str] = []
        self.removed = 0
        self.data_images = data_images

    def feed(self, text: str) -> None:
        for event in tokens(text):
            kind = event[0]
            if kind == "start":
                self._start(event[1], event[2], event[3])
            elif kind == "end":
                if event[1].lower() not in _DROP_TAGS and _TAG.match(event[1]):
                    self.out.append(f"</{event[1]}>")
            elif kind == "raw":
                self._raw(event[1].lower(), event[2])
            else:  # text, cdata: escaped text
                self._text(event[1])

    def _start(self, name: str, attrs: list[tuple[str, str | None]], empty: bool) -> None:
        if name.lower() in _DROP_TAGS or not _TAG.match(name):
            self.removed += 1
            return
        parts = [name]
        for attr, value in attrs:
            lowered = attr.lower()
            if lowered.startswith("on") or lowered in _DROP_ATTRS:
                self.removed += 1
                continue
            if not _NAME.match(attr):
                continue
            if value is None:
                parts.append(attr)
            elif (kept := self._attr(lowered, value)) is not None:
                parts.append(f'{attr}="{html.escape(kept)}"')
        self.out.append("<" + " ".join(parts) + (" />" if empty else ">"))

    def _attr(self, name: str, value: str) -> str | None:
        """The value to write, or None to drop the attribute."""
        image = name in IMAGE_ATTRS and self.data_images
        if name in URL_ATTRS or name in _LIST_ATTRS:
            sep = _LIST_ATTRS.get(name)
            local = is_local(value, image) if sep is None else _list_is_local(value, sep, image)
            if not local:
                self.removed += 1
                return REMOVED_URL
        if (name == "xmlns" or name.startswith("xmlns:")) and value in _NAMESPACES:
            return value
        if (name == "style" or "url(" in value.lower()) and not css_is_local(
                value, self.data_images):
            self.removed += 1
            return None
        value, n = neutralize_urls(value)
        self.removed += n
        return value

    def _raw(self, name: str, content: str) -> None:
        """The content of a raw text element: ``<style>`` is CSS, kept when it fetches
        nothing and holds no ``<`` (SVG parses tags there); the others' content is text."""
        if name == "script":
            self.removed += 1
        elif name == "style":
            css = _CDATA.sub("", content)
            if "<" in css or not css_is_local(css, self.data_images):
                self.removed += 1
            else:
                self.out.append(css)
        else:
            self._text(content)

    def _text(self, text: str) -> None:
        text, n = neutralize_urls(text)
        self.removed += n
        self.out.append(html.escape(text, quote=False))


def neutralize_html(text: str, data_images: bool = True) -> tuple[str, int]:
    """`text` (HTML or SVG) rebuilt without remote references (nor ``data:`` images, unless
    `data_images`: a profile with an image budget, whose size check they would bypass);
    and how many were removed."""
    rebuild = _Rebuild(data_images)
    rebuild.feed(text)
    return "".join(rebuild.out), rebuild.removed


@functools.cache
def markdown_parser() -> Any:
    """The CommonMark parser (markdown-it-py), built once per process."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])


def neutralize_markdown(text: str, data_images: bool = True) -> tuple[str, int]:
    """`text` (markdown) with its remote URLs replaced in place, or, when a parse or a decoded
    view still finds one (or a ``data:`` image, unless `data_images`), as a fenced code
    block; and how many were removed."""
    text, count = neutralize_urls(text)
    if not any(c in text for c in ":/\\&%<"):
        return text, count  # nothing can name another host: no scheme, slash, entity, tag
    left = neutralize_html(markdown_parser().render(text), data_images)[1] + decoded_hits(text)
    if not left:
        return text, count
    fence = "`" * max(3, 1 + max((len(run) for run in _BACKTICKS.findall(text)), default=0))
    return f"{FENCE_NOTE}\n\n{fence}text\n{text}\n{fence}\n", count + left
