"""The image budget of a profile marked for LLMs: pixels and bytes, checked from headers.

A model API takes images up to a size and scales larger ones down (or refuses them), and
every image costs context: so on a profile with an image budget (``image_max_side``,
``image_max_pixels``, ``image_max_bytes`` in ``[profiles.X.output]``; docs/policy.md) every
image that leaves the gate fits it. ``cellblock_kernel`` renders matplotlib figures to fit
(the convenience); the gate checks every image whatever made it (the control), and replaces
one that does not fit, or whose header it cannot read, by a note saying why and how to make
it fit.

The check decodes the base64 text (which is not image decoding: the byte budget is on the
real bytes) and reads the dimensions from the header alone (:mod:`.imagehead`). Types without
a header reader here (BMP, TIFF, ...) and SVG are refused on such a profile: the size of an
SVG is only known by rendering it, and model APIs take PNG, JPEG, GIF and WebP.
"""

from __future__ import annotations

import base64
import binascii
import math

from ..policy import OutputPolicy
from .imagehead import HEADER_MIME, BadImageHeader, image_size

__all__ = ["fit_size", "has_image_budget", "image_over_budget"]

HINT = ("display it smaller: fig.set_size_inches(...) or a lower dpi for a figure; "
        "a smaller image for IPython.display.Image")


def has_image_budget(policy: OutputPolicy) -> bool:
    """True when the profile sets any image budget (then every image is checked)."""
    return bool(policy.image_max_side or policy.image_max_pixels or policy.image_max_bytes)


def fit_size(width: int, height: int, max_side: int, max_pixels: int) -> tuple[int, int]:
    """The largest ``(width, height)`` of the same aspect that fits both pixel budgets (0:
    none); the size itself when it fits already. Never below 1x1."""
    scale = 1.0
    if max_side:
        scale = min(scale, max_side / max(width, height))
    if max_pixels:
        scale = min(scale, math.sqrt(max_pixels / (width * height)))
    if scale >= 1.0:
        return width, height
    # 1e-9: 1568 / 3000 * 3000 is 1567.9999999999998 in floating point
    w, h = max(1, math.floor(width * scale + 1e-9)), max(1, math.floor(height * scale + 1e-9))
    def over(w: int, h: int) -> bool:
        return bool((max_pixels and w * h > max_pixels) or (max_side and max(w, h) > max_side))

    while over(w, h) and w + h > 2:
        w, h = max(1, w - (w >= h)), max(1, h - (h > w))
    return w, h


def _budget(policy: OutputPolicy) -> str:
    parts = []
    if policy.image_max_side:
        parts.append(f"{policy.image_max_side:,} px long side")
    if policy.image_max_pixels:
        parts.append(f"{policy.image_max_pixels:,} pixels")
    if policy.image_max_bytes:
        parts.append(f"{policy.image_max_bytes:,} bytes")
    return "this profile's image budget: " + ", ".join(parts)


def image_over_budget(mime: str, value: object, policy: OutputPolicy) -> str | None:
    """None when the image `value` (the base64 text of a MIME bundle) of type `mime` fits the
    profile's budget; else what the note about it says (after the MIME type), naming its size,
    the budget and how to fit it. Never raises on any input."""
    if mime not in HEADER_MIME:
        return (f"(no size check for this type; {_budget(policy)} takes "
                f"{', '.join(HEADER_MIME)})")
    if not isinstance(value, str):
        return "(not a base64 string)"
    try:
        raw = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        return "(not valid base64)"
    try:
        width, height = image_size(mime, raw)
    except BadImageHeader as exc:
        return f"(unreadable header: {exc}; not sent)"
    fits_w, fits_h = fit_size(width, height, policy.image_max_side, policy.image_max_pixels)
    too_many_bytes = bool(policy.image_max_bytes) and len(raw) > policy.image_max_bytes
    if (fits_w, fits_h) == (width, height) and not too_many_bytes:
        return None
    shape = "" if (fits_w, fits_h) == (width, height) else f" fits at {fits_w}x{fits_h};"
    return (f"{width}x{height} px, {len(raw):,} bytes (over {_budget(policy)};{shape} "
            f"{HINT})")
