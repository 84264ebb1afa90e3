"""Images sized for a model: the header readers (exact-value tables, truncated and garbage
headers, hypothesis), the budget check, and the gate rule applying it to every bundle path.

No jail here; test_images_jail.py runs the same on real jailed kernels. Test images are
made on the host with Pillow (trusted test code); the code under test never decodes one.
"""

from __future__ import annotations

import base64
import io
import json
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cellblock.errors import PolicyError
from cellblock.gate.rules import apply_rules
from cellblock.output.filter import OutputFilter, build_redactor
from cellblock.output.imagefit import fit_size, has_image_budget, image_over_budget
from cellblock.output.imagehead import HEADER_MIME, BadImageHeader, image_size
from cellblock.policy import OutputPolicy, load_policy

from gate_harness import examples

pytestmark = pytest.mark.nonroot

FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/gif": "GIF", "image/webp": "WEBP"}


def agent() -> OutputPolicy:
    return load_policy(env={}).profile("agent").output


def encoded(width: int, height: int, fmt: str, **save: Any) -> bytes:
    buf = io.BytesIO()
    mode = "RGBA" if save.pop("alpha", False) else "RGB"
    Image.new(mode, (width, height), (200, 30, 30)).save(buf, format=fmt, **save)
    return buf.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


# -- header readers: exact values ---------------------------------------------------------

@pytest.mark.parametrize(("mime", "size", "save"), [
    ("image/png", (3000, 1800), {}),
    ("image/png", (1, 1), {}),
    ("image/jpeg", (1568, 941), {}),
    ("image/jpeg", (17, 5), {"progressive": True}),  # SOF2
    ("image/jpeg", (64, 48), {"exif": b"Exif\0\0" + b"\0" * 60_000}),  # a long APP1 first
    ("image/gif", (640, 480), {}),
    ("image/webp", (300, 200), {}),  # lossy: VP8
    ("image/webp", (301, 199), {"lossless": True}),  # VP8L
    ("image/webp", (16_383, 3), {"lossless": True}),  # VP8L at its 14-bit limit
    ("image/webp", (50, 40), {"alpha": True, "exif": b"Exif\0\0xx"}),  # VP8X
])
def test_sizes_read_from_real_files(mime: str, size: tuple[int, int],
                                    save: dict[str, Any]) -> None:
    assert image_size(mime, encoded(*size, FORMATS[mime], **save)) == size


def png_head(width: int, height: int, kind: bytes = b"IHDR", length: int = 13) -> bytes:
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I4sII", length, kind, width, height)
            + b"\x08\x02\0\0\0")


def sof(width: int, height: int, marker: int = 0xC0) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x11\0\0"


@pytest.mark.parametrize(("mime", "data", "size"), [
    ("image/png", png_head(10, 20), (10, 20)),
    ("image/png", png_head(1 << 24, 1), (1 << 24, 1)),
    ("image/gif", b"GIF87a\x10\x00\x20\x00", (16, 32)),
    # a frame outside its 10x10 screen is drawn at its own size (found from the jail)
    ("image/gif", b"GIF89a\x0a\x00\x0a\x00\x00\x00\x00" + b"\x2c" + struct.pack(
        "<HHHH", 0, 0, 4000, 4000) + b"\x00\x02\x01\x00\x00\x3b", (4000, 4000)),
    ("image/gif", b"GIF89a\x0a\x00\x0a\x00\x80\x00\x00" + b"\0" * 6  # a colour table
     + b"\x21\xf9\x04\0\0\0\0\x00"  # an extension
     + b"\x2c" + struct.pack("<HHHH", 5, 7, 10, 10) + b"\x00\x02\x00\x3b", (15, 17)),
    ("image/gif", b"GIF89a\x0a\x00\x0a\x00\x00\x00\x00\x2c\x00\x00", (10, 10)),  # cut short
    ("image/jpeg", b"\xff\xd8" + sof(7, 9), (7, 9)),
    ("image/jpeg", b"\xff\xd8\xff\xff\xff" + sof(7, 9)[1:], (7, 9)),  # fill bytes
    ("image/jpeg", b"\xff\xd8\xff\xd0" + sof(7, 9, 0xC2), (7, 9)),  # RST, then SOF2
    ("image/jpeg", b"\xff\xd8" + b"\xff\xd0" * 4095 + sof(7, 9), (7, 9)),  # at the limit
    ("image/jpeg", b"\xff\xd8" + b"\xff" * 100_000 + sof(7, 9), (7, 9)),  # long fill run
    ("image/jpeg", b"\xff\xd8\xff\xe0\x00\x04ab" + sof(5, 6, 0xCF), (5, 6)),
    ("image/webp", b"RIFF\0\0\0\0WEBPVP8X" + b"\0" * 8 + b"\x01\0\0\x02\0\0", (2, 3)),
])
def test_sizes_read_from_handmade_headers(mime: str, data: bytes,
                                          size: tuple[int, int]) -> None:
    assert image_size(mime, data) == size


# -- header readers: what is refused ------------------------------------------------------

@pytest.mark.parametrize(("mime", "data", "why"), [
    ("image/png", b"", "PNG signature"),
    ("image/png", b"GIF89a" + b"\0" * 30, "PNG signature"),
    ("image/png", png_head(10, 20)[:23], "cut short"),
    ("image/png", png_head(10, 20, kind=b"IDAT"), "not IHDR"),
    ("image/png", png_head(10, 20, length=14), "not IHDR"),
    ("image/png", png_head(0, 20), "declares 0x20"),
    ("image/png", png_head(2**31 - 1, 1), "declares 2147483647x1"),
    ("image/gif", b"GIF89a\x01\x00", "cut short"),
    ("image/gif", b"GIF90a" + b"\0" * 10, "GIF signature"),
    ("image/gif", b"GIF89a\x00\x00\x05\x00", "declares 0x5"),
    ("image/gif", b"GIF89a\x0a\x00\x0a\x00\x00\x00\x00\x99", "unknown block type 0x99"),
    ("image/gif", b"GIF89a\x0a\x00\x0a\x00\x00\x00\x00\x21\xfe" + b"\x01a" * 70_000,
     "over 65536 blocks"),
    ("image/jpeg", b"\xff\xd9", "SOI"),
    ("image/jpeg", b"\xff\xd8", "end before"),
    ("image/jpeg", b"\xff\xd8\xff", "end before"),
    ("image/jpeg", b"\xff\xd8\xff\xff\xff", "end before"),
    ("image/jpeg", b"\xff\xd8\x00\x00", "end before"),
    ("image/jpeg", b"\xff\xd8\xff\xe0\x00", "end before"),
    ("image/jpeg", b"\xff\xd8\xff\xe0\x00\x01", "under 2"),
    ("image/jpeg", b"\xff\xd8\xff\xe0\xff\xf0abc", "end before"),  # length past the end
    ("image/jpeg", b"\xff\xd8\xff\xda\x00\x02", "image data"),
    ("image/jpeg", b"\xff\xd8\xff\xd9", "image data"),
    ("image/jpeg", b"\xff\xd8" + sof(7, 9)[:8], "cut short"),
    ("image/jpeg", b"\xff\xd8\xff\xc0\x00\x05" + b"\0" * 10, "cut short"),
    ("image/jpeg", b"\xff\xd8" + sof(7, 0), "declares 7x0"),  # height from a DNL segment
    ("image/jpeg", b"\xff\xd8" + b"\xff\xd0" * 4096 + sof(7, 9), "over 4096 markers"),
    ("image/jpeg", b"\xff\xd8" + b"\xff\xfe\x00\x02" * 5000 + sof(7, 9), "over 4096 markers"),
    ("image/jpeg", b"\xff\xd8" + b"\xff" * 300_000, "end before"),
    ("image/webp", b"RIFF\0\0\0\0WEBQVP8 " + b"\0" * 20, "RIFF WEBP"),
    ("image/webp", b"RIFF\0\0\0\0WEBPVP8 " + b"\0" * 13, "cut short"),
    ("image/webp", b"RIFF\0\0\0\0WEBPVP8 " + b"\0" * 14, "start code"),
    ("image/webp", b"RIFF\0\0\0\0WEBPVP8L" + b"\0" * 9, "signature"),
    ("image/webp", b"RIFF\0\0\0\0WEBPVP8L" + b"\0" * 8, "cut short"),
    ("image/webp", b"RIFF\0\0\0\0WEBPVP8X" + b"\0" * 13, "cut short"),
    ("image/webp", b"RIFF\0\0\0\0WEBPALPH" + b"\0" * 20, "none of"),
    ("image/bmp", b"BM" + b"\0" * 40, "no header reader"),
])
def test_malformed_headers_are_refused(mime: str, data: bytes, why: str) -> None:
    with pytest.raises(BadImageHeader, match=why):
        image_size(mime, data)


def test_every_truncation_of_real_files_is_a_size_or_a_refusal() -> None:
    """Every prefix of a real file of each type: the right size once the header is in, a
    BadImageHeader before, never another exception."""
    for mime, fmt in FORMATS.items():
        data = encoded(33, 21, fmt)
        sizes = []
        for n in range(min(len(data), 700)):
            try:
                sizes.append(image_size(mime, data[:n]))
            except BadImageHeader:
                sizes.append(None)
        first = sizes.index((33, 21))
        assert all(s is None for s in sizes[:first]), mime
        assert all(s == (33, 21) for s in sizes[first:]), mime


@settings(max_examples=examples(3000), deadline=None)
@given(mime=st.sampled_from(HEADER_MIME), seed=st.sampled_from(list(FORMATS)),
       data=st.data())
def test_garbage_and_mutated_headers_never_crash(mime: str, seed: str, data: Any) -> None:
    """Random bytes, or a real header with bytes flipped, cut or inserted: a size within
    bounds or a BadImageHeader, nothing else."""
    raw = bytearray(encoded(9, 7, FORMATS[seed]))[:200]
    if data.draw(st.booleans()):
        raw = bytearray(data.draw(st.binary(max_size=200)))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(("flip", "cut", "insert")))
        pos = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut":
            del raw[pos:]
        else:
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    try:
        width, height = image_size(mime, bytes(raw))
    except BadImageHeader as exc:
        assert str(exc)
    else:
        assert 0 < width <= 1 << 24 and 0 < height <= 1 << 24


# -- the budget ---------------------------------------------------------------------------

@pytest.mark.parametrize(("size", "side", "pixels", "fits"), [
    ((3000, 1800), 1568, 1_150_000, (1384, 830)),
    ((3000, 1800), 1568, 0, (1568, 940)),
    ((1800, 3000), 1568, 0, (940, 1568)),
    ((1000, 600), 1568, 1_150_000, (1000, 600)),
    ((100_000, 1), 1568, 1_150_000, (1568, 1)),
    ((3000, 1800), 0, 0, (3000, 1800)),
])
def test_fit_size(size: tuple[int, int], side: int, pixels: int,
                  fits: tuple[int, int]) -> None:
    assert fit_size(*size, side, pixels) == fits
    w, h = fits
    assert (not side or max(w, h) <= side) and (not pixels or w * h <= pixels)


def test_the_agent_profile_has_the_documented_budget_and_the_analyst_none() -> None:
    policy = load_policy(env={})
    out = policy.profile("agent").output
    assert (out.image_max_side, out.image_max_pixels, out.image_max_bytes) == (
        1568, 1_150_000, 300 * 1024)
    assert has_image_budget(out)
    assert not has_image_budget(policy.profile("analyst").output)
    assert not has_image_budget(OutputPolicy())


@pytest.mark.parametrize(("mime", "value", "note"), [
    ("image/png", b64(encoded(1384, 830, "PNG")), None),
    ("image/png", b64(encoded(1568, 733, "PNG")), None),
    ("image/png", b64(encoded(1569, 10, "PNG")),
     "1569x10 px, {n} bytes (over this profile's image budget: 1,568 px long side, "
     "1,150,000 pixels, 307,200 bytes; fits at 1568x9; display it smaller: "
     "fig.set_size_inches(...) or a lower dpi for a figure; a smaller image for "
     "IPython.display.Image)"),
    ("image/jpeg", b64(encoded(1100, 1100, "JPEG")), "1100x1100 px, {n} bytes (over"),
    ("image/png", b64(encoded(500, 500, "PNG", pnginfo=None) + b"\0" * 310_000),
     "500x500 px, {n} bytes (over this profile's image budget: 1,568 px long side, "
     "1,150,000 pixels, 307,200 bytes; display it"),
    ("image/png", "\n".join(b64(encoded(20, 10, "PNG"))[i:i + 76] for i in range(0, 200, 76)),
     None),  # base64 with line breaks, as nbformat writes it
    ("image/png", "not base64!", "(not valid base64)"),
    ("image/png", "aGVsbG8=é", "(not valid base64)"),
    ("image/png", ["iVBOR"], "(not a base64 string)"),
    ("image/png", b64(encoded(20, 10, "JPEG")),
     "(unreadable header: it does not start with the PNG signature; not sent)"),
    ("image/bmp", b64(encoded(20, 10, "BMP")),
     "(no size check for this type; this profile's image budget: 1,568 px long side, "
     "1,150,000 pixels, 307,200 bytes takes image/png, image/jpeg, image/gif, image/webp)"),
])
def test_image_over_budget(mime: str, value: Any, note: str | None) -> None:
    got = image_over_budget(mime, value, agent())
    if note is None:
        assert got is None
        return
    n = f"{len(base64.b64decode(value)):,}" if "{n}" in note else ""
    assert got is not None and got.startswith(note.format(n=n)), got


# -- the gate rule: every path an image takes ---------------------------------------------

def gate(policy: OutputPolicy, msg_type: str, content: dict[str, Any],
         channel: str = "iopub") -> dict[str, Any]:
    f = OutputFilter(policy, build_redactor(policy, env={}), audit=None, nonce="abc123")
    out = apply_rules((f,), channel, msg_type, {"msg_type": msg_type}, {"msg_id": "p"},
                      json.dumps(content).encode(), b"{}")
    return json.loads(out[0]) if isinstance(out, tuple) else json.loads(out)


BIG = b64(encoded(3000, 1800, "PNG"))
SMALL = b64(encoded(300, 180, "PNG"))
BIG_BYTES = len(base64.b64decode(BIG))
BIG_NOTE = (f"[cellblock: withheld image/png 3000x1800 px, {BIG_BYTES:,} bytes (over this "
            "profile's image budget")


@pytest.mark.parametrize("msg_type", ["display_data", "update_display_data", "execute_result"])
def test_every_bundle_message_is_checked(msg_type: str) -> None:
    extra = {"execution_count": 1} if msg_type == "execute_result" else {}
    if msg_type == "update_display_data":
        extra = {"transient": {"display_id": "d"}}
    out = gate(agent(), msg_type, {"data": {"image/png": BIG, "text/plain": "<Figure>"},
                                   "metadata": {}, **extra})
    assert "image/png" not in out["data"]
    assert out["data"]["text/plain"].startswith("<Figure>\n" + BIG_NOTE)
    out = gate(agent(), msg_type, {"data": {"image/png": SMALL}, "metadata": {}, **extra})
    assert out["data"] == {"image/png": SMALL}


def test_execute_reply_payloads_and_user_expressions_are_checked() -> None:
    bundle = {"image/png": BIG, "text/plain": "x"}
    out = gate(agent(), "execute_reply", {
        "status": "ok", "execution_count": 1,
        "payload": [{"source": "page", "data": bundle, "start": 0}],
        "user_expressions": {"e": {"status": "ok", "data": bundle, "metadata": {}}}},
        channel="shell")
    for data in (out["payload"][0]["data"], out["user_expressions"]["e"]["data"]):
        assert "image/png" not in data and BIG_NOTE in data["text/plain"]


def test_svg_and_other_types_are_refused_on_a_budgeted_profile_only() -> None:
    svg = '<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
    bmp = b64(encoded(4, 4, "BMP"))
    policy = agent().model_copy(update={"allowed_mime": None})
    out = gate(policy, "display_data", {"data": {"image/svg+xml": svg, "image/bmp": bmp},
                                        "metadata": {}})
    assert set(out["data"]) == {"text/plain"}
    assert "withheld image/svg+xml (no size check for this type" in out["data"]["text/plain"]
    assert "image/bmp (no size check for this type" in out["data"]["text/plain"]
    analyst = load_policy(env={}).profile("analyst").output
    data = {"image/svg+xml": svg, "image/bmp": bmp, "image/png": BIG}
    assert gate(analyst, "display_data", {"data": data, "metadata": {}})["data"] == data


TINY = b64(encoded(2, 1, "PNG"))


@pytest.mark.parametrize(("mime", "value"), [
    ("text/html", f'<img src="data:image/png;base64,{TINY}">'),
    ("text/html", f'<img src="data&#58;image/png;base64,{TINY}">'),
    ("text/html", f'<div style="background: url(data:image/png;base64,{TINY})">x</div>'),
    ("text/html", f'<style>p {{ background: url("data:image/png;base64,{TINY}") }}</style>'),
    ("text/html", f'<img srcset="data:image/png;base64,{TINY} 2x">'),
    ("image/svg+xml", f'<svg><image href="data:image/png;base64,{TINY}"/></svg>'),
    ("text/markdown", f"![x](data:image/png;base64,{TINY})"),
    ("text/markdown", f"![x](data&#58;image/png;base64,{TINY})"),
    ("text/markdown", f'<img src="data:image/png;base64,{TINY}">'),
])
def test_data_images_in_markup_do_not_bypass_the_budget(mime: str, value: str) -> None:
    """An image inside markdown, HTML or SVG as a data: URL would skip the header check: on
    a profile with an image budget it is removed (markdown becomes a code block), however
    small; on one without, it stays (a data: image is local)."""
    policy = agent().model_copy(update={"allowed_mime": None, "max_text": 1 << 20})
    out = gate(policy, "display_data", {"data": {mime: value}, "metadata": {}})["data"]
    shown = out.get(mime, "")
    assert f"base64,{TINY}" not in shown or shown.startswith("[cellblock: "), out
    unbudgeted = policy.model_copy(update={"image_max_side": 0, "image_max_pixels": 0,
                                           "image_max_bytes": 0})
    if mime != "image/svg+xml":
        kept = gate(unbudgeted, "display_data", {"data": {mime: value}, "metadata": {}})
        assert TINY in kept["data"][mime]


def test_an_image_budget_needs_the_markup_parse(tmp_path: Any) -> None:
    path = tmp_path / "cellblock.toml"
    path.write_text("[profiles.agent.output]\nneutralize_urls = false\n")
    with pytest.raises(PolicyError, match=r"profiles\.agent\.output: Value error, an image "
                       r"budget \(image_max_side, image_max_pixels, image_max_bytes\) needs "
                       r"neutralize_urls = true"):
        load_policy(path, env={})
    path.write_text("[profiles.agent.output]\nneutralize_urls = false\nimage_max_side = 0\n"
                    "image_max_pixels = 0\nimage_max_bytes = 0\n")
    assert not has_image_budget(load_policy(path, env={}).profile("agent").output)


# -- the kernel's side: figures rendered to fit (a convenience; the gate is the control) -----

@pytest.mark.parametrize(("size", "nbytes", "budget", "scale"), [
    ((3000, 1800), 0, (1568, 0, 0), 1568 / 3000),
    ((3000, 1800), 0, (0, 1_350_000, 0), 0.5),
    ((1000, 500), 400, (0, 0, 100), 0.5),
    ((1000, 500), 50, (0, 0, 200), 2.0),  # room left: may grow
    ((1000, 500), 0, (0, 0, 0), float("inf")),
])
def test_fit_scale(size: tuple[int, int], nbytes: int, budget: tuple[int, int, int],
                   scale: float) -> None:
    from cellblock_kernel.figures import ImageBudget, fit_scale

    assert fit_scale(*size, nbytes, ImageBudget(*budget)) == pytest.approx(scale)


@pytest.mark.parametrize("fmt", ["png", "retina", "jpeg"])
@pytest.mark.parametrize("bbox", ["tight", None])
def test_a_figure_is_rendered_to_just_fit(fmt: str, bbox: str | None) -> None:
    """With matplotlib-inline's own printer (the figure's dpi=300, 3000x1800 canvas): the
    render fits the agent's budget and fills at least 90% of its pixels."""
    import functools

    import matplotlib
    from IPython.core.pylabtools import print_figure
    from matplotlib.figure import Figure

    from cellblock_kernel.figures import ImageBudget, _render

    matplotlib.use("agg")
    fig = Figure(figsize=(10, 6), dpi=300)
    fig.add_subplot().plot(range(100), [i * i % 37 for i in range(100)])
    printer = functools.partial(print_figure, fmt=fmt, base64=True, bbox_inches=bbox)
    out = agent()
    budget = ImageBudget(out.image_max_side, out.image_max_pixels, out.image_max_bytes)
    raw = base64.b64decode(_render(fig, printer, budget))
    mime = "image/jpeg" if fmt == "jpeg" else "image/png"
    width, height = image_size(mime, raw)
    assert image_over_budget(mime, b64(raw), out) is None, (width, height, len(raw))
    assert width * height >= 0.9 * out.image_max_pixels, (width, height)
