"""Remote-URL neutralisation by parsing (issue 13, finding 6): exact values through the
output filter, as the gate applies it with ``neutralize_urls`` (the agent profile).

The hostile rows are the forms the first neutraliser (one regular expression) let through:
a scheme without slashes (``http:host`` goes to ``host`` from a page of another scheme),
entities and backslash escapes a renderer decodes, backslashes a browser reads as slashes,
tabs it drops, srcset, CSS ``url()`` and its escapes, ``<meta refresh>``, ``<base>``, event
handlers, SVG animation. Markdown that still names a remote host once decoded comes back
fenced (nothing rendered); HTML and SVG are rebuilt. tests/test_jupyterlab.py renders such
outputs in JupyterLab and records the page's requests.
"""

from __future__ import annotations

import json

import pytest

from cellblock.gate.rules import apply_rules
from cellblock.output.filter import OutputFilter, build_redactor
from cellblock.output.markup import FENCE_NOTE, neutralize_html, neutralize_markdown
from cellblock.output.urls import is_local
from cellblock.policy import OutputPolicy, load_policy

R = "#cellblock-remote-url-removed"


def fenced(text: str) -> str:
    return f"{FENCE_NOTE}\n\n```text\n{text}\n```\n"


def agent_all_mime() -> OutputPolicy:
    """The agent's output policy with every MIME type allowed, so HTML and SVG reach the
    neutraliser (the shipped agent withholds them before it), and without its image budget
    (which withholds SVG and removes data: images: tests/test_images.py)."""
    return load_policy().profile("agent").output.model_copy(update={
        "allowed_mime": None, "image_max_side": 0, "image_max_pixels": 0, "image_max_bytes": 0})


def shown(mime: str, text: str) -> str:
    """What the client gets of a display_data holding `text` as `mime`."""
    policy = agent_all_mime()
    f = OutputFilter(policy, build_redactor(policy, env={}), audit=None, nonce="abc123")
    content = json.dumps({"data": {mime: text}, "metadata": {}}).encode()
    out, _ = apply_rules((f,), "iopub", "display_data", {}, {"msg_id": "p"}, content, b"{}")
    return json.loads(out)["data"][mime]


MARKDOWN = [
    # decoded by a CommonMark renderer into https://host/x
    ("![b](https&#58;//host/x)", fenced("![b](https&#58;//host/x)")),
    ("![d](&#x68;ttps://host/x)", fenced("![d](&#x68;ttps://host/x)")),
    ("[z](https\\://host/x)", fenced("[z](https\\://host/x)")),
    ("![h](<ht\ttps://host/x>)", fenced("![h](<ht\ttps://host/x>)")),
    ('<img src="ht&#9;tps://host/x">', fenced('<img src="ht&#9;tps://host/x">')),
    # a scheme without slashes, backslashes for slashes: replaced in place
    ("![c](http:host/x)", f"![c]({R})"),
    ("![c](HTTPS:host/x)", f"![c]({R})"),
    ("![e](/\\host/x)", f"![e]({R})"),
    ("![f](\\\\host/x)", f"![f]({R})"),
    ("![g](https:\\\\host\\x)", f"![g]({R})"),
    ('<img src="//host/x">', f'<img src="{R}">'),
    ('<img srcset="a.png 1x, //host/x 2x">', f'<img srcset="a.png 1x, {R} 2x">'),
    ('a <span style="background:url(//host/x)">b</span>',
     f'a <span style="background:url({R})">b</span>'),
    ("<https://host/x>", f"<{R}>"),
    ("[r]: https://host/x\n\n![x][r]", f"[r]: {R}\n\n![x][r]"),
    ("see www.host.example/x", f"see {R}"),
    # raw HTML the rebuild would change: the whole markdown fenced
    ('<img src="x.png" onerror="fetch(1)">', fenced('<img src="x.png" onerror="fetch(1)">')),
    # local: unchanged
    ("![i](data:image/png;base64,AAAA)", "![i](data:image/png;base64,AAAA)"),
    ("# T\n\n[doc](other.md) ![p](plot.png) [s](#sec) <b>ok</b>",
     "# T\n\n[doc](other.md) ![p](plot.png) [s](#sec) <b>ok</b>"),
    ("| a | b |\n|---|---|\n| 1 | 2:3 |", "| a | b |\n|---|---|\n| 1 | 2:3 |"),
]

HTML = [
    ('<img src="//host/x">', f'<img src="{R}">'),
    ('<img src="https&#58;//host/x">', f'<img src="{R}">'),
    ('<img src=" \x01https:host/x">', f'<img src="{R}">'),
    ('<img srcset="a.png 1x, https:host/x 2x">', f'<img srcset="{R}">'),
    ('<img/src=//host/x>', f'<img src="{R}">'),
    ('<video poster="//host/p"></video>', f'<video poster="{R}"></video>'),
    ('<form action="https:host"><button formaction="//host">b</button></form>',
     f'<form action="{R}"><button formaction="{R}">b</button></form>'),
    ('<object data="//host/o"></object>', f'<object data="{R}"></object>'),
    ('<table background="//host/t"></table>', f'<table background="{R}"></table>'),
    ('<a href="https://host/x" ping="//host/p">a</a>', f'<a href="{R}" ping="{R}">a</a>'),
    ('<p style="background:u\\72l(//host/x)">p</p>', "<p>p</p>"),
    ('<style>@import "x.css";</style>', "<style></style>"),
    ('<style>b{background:url("https:host/x")}</style><b>x</b>', "<style></style><b>x</b>"),
    ('<meta http-equiv="refresh" content="0;url=https://host/">', ""),
    ('<base href="//host/"><img src="x.png">', '<img src="x.png">'),
    ('<img src="x" onerror="fetch(1)"><script>fetch("//host")</script>', '<img src="x">'),
    ('<iframe srcdoc="&lt;img src=//host&gt;" src="page.html"></iframe>',
     '<iframe src="page.html"></iframe>'),
    # a browser ends the comment at "<!-->": the img is rebuilt, not hidden in a comment
    ('<!--> <img src="https:host/x"> -->', f' <img src="{R}"> --&gt;'),
    ('<img src="x.png" alt="a', ""),  # cut off inside a tag: a browser drops it too
    # local: the same markup, written canonically
    ('<a href="x?a=1&para=2">t &copy;</a>', '<a href="x?a=1&amp;para=2">t ©</a>'),
    ('<table border="1" class="dataframe">\n<tr style="text-align: right;"><th>a</th></tr>'
     "</table>",
     '<table border="1" class="dataframe">\n<tr style="text-align: right;"><th>a</th></tr>'
     "</table>"),
]

SVG = [
    ('<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
     'viewBox="0 0 9 9"><image xlink:href="//host/x"/><use href="#g"/>'
     '<rect fill="url(#g)" filter="url(https://host/f#x)"/></svg>',
     '<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
     f'viewBox="0 0 9 9"><image xlink:href="{R}" /><use href="#g" /><rect fill="url(#g)" />'
     "</svg>"),
    ('<svg><set attributeName="href" to="https:host/x"/>'
     '<feImage href="data:image/png;base64,AA"/></svg>',
     f'<svg><set attributeName="href" to="{R}" /><feImage href="data:image/png;base64,AA" />'
     "</svg>"),
    ("<svg><style><![CDATA[ *{stroke:red} ]]></style><style><img src=//host/x></style></svg>",
     "<svg><style> *{stroke:red} </style><style></style></svg>"),
    ('<?xml version="1.0"?>\n<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" '
     '"http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd">\n<!-- made by x --><svg><linearGradient '
     'id="g"/></svg>',
     '\n\n<svg><linearGradient id="g" /></svg>'),
]


@pytest.mark.parametrize(("text", "expected"), MARKDOWN)
def test_markdown(text: str, expected: str) -> None:
    assert shown("text/markdown", text) == expected


@pytest.mark.parametrize(("text", "expected"), HTML)
def test_html(text: str, expected: str) -> None:
    assert shown("text/html", text) == expected


@pytest.mark.parametrize(("text", "expected"), SVG)
def test_svg(text: str, expected: str) -> None:
    assert shown("image/svg+xml", text) == expected


@pytest.mark.parametrize(("value", "local"), [
    ("", True), ("#x", True), ("plot.png", True), ("/files/a.png", True), ("?q=1", True),
    ("./http://host", True), ("%68ttps://host/x", False), ("data:image/png;base64,AA", True),
    ("data:text/html,<b>", False), ("http:host/x", False), ("https:host/x", False),
    ("//host", False), ("/\\host", False), ("\\\\host", False), (" \x01//host", False),
    ("ht\ttps://host", False), ("javascript:alert(1)", False), ("mailto:a@b", False),
])
def test_is_local(value: str, local: bool) -> None:
    """The rule (docs/output.md), on image references (data:image stays there only)."""
    assert is_local(value, image=True) is local


def test_a_non_string_markdown_value_is_withheld() -> None:
    """A list where markdown should be (nbformat's multiline form) cannot be checked: a
    renderer that joins it would fetch what it names."""
    policy = agent_all_mime()
    f = OutputFilter(policy, build_redactor(policy, env={}), audit=None, nonce="abc123")
    content = json.dumps({"data": {"text/markdown": ["![x](https:", "//host/x)"]},
                          "metadata": {}}).encode()
    out, _ = apply_rules((f,), "iopub", "display_data", {}, {"msg_id": "p"}, content, b"{}")
    data = json.loads(out)["data"]
    assert data == {"text/plain": "[cellblock: withheld text/markdown (not a string: its URLs "
                                  "cannot be checked)]"}


def test_rebuilt_html_with_no_url_is_still_sent_rebuilt() -> None:
    """A comment can hide markup from one parser and not another: what leaves is the rebuilt
    form even when nothing was removed (the original bytes are not forwarded)."""
    assert shown("text/html", "<b>x</b><!-- c -->") == "<b>x</b>"


@pytest.mark.parametrize("piece", ["<", "<a", "<!--", '<a b="', "<a b=", "[![", "*_", "&#",
                                   "/*", "\\", "<style>"])
def test_hostile_shapes_finish(piece: str) -> None:
    """Inputs that made html.parser quadratic (256 KiB of ``<a``: 38 s) finish; the
    benchmark in docs/output.md gives the times. No timing asserted: each must return."""
    text = piece * (64 * 1024 // len(piece))
    assert isinstance(neutralize_html(text)[0], str)
    assert isinstance(neutralize_markdown(text)[0], str)
