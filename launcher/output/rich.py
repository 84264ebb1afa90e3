"""Rich outputs (MIME bundles): which types pass, image caps, remote-URL neutralisation.

A bundle is the ``data`` dict of display_data, update_display_data, execute_result,
inspect_reply, an execute_reply page payload or a user_expressions value. Every
text-like value passes the text cleaner (redaction, caps); images are size-capped
(never decoded, decompressed or rasterised: R20), and on a profile with an image budget
checked against it by their headers (:mod:`.imagefit`); types outside the profile's
allowlist are dropped, and a bundle left empty says so in ``text/plain``.

With no network, an agent reading the output is the only way out of the jail, and
an image URL in markdown or HTML is fetched by whatever renders it, with data in
its query string (THREATS N16). LLM-facing profiles replace every remote URL in
markdown, HTML and SVG, found by parsing them (:mod:`.markup`, by the rule in
:mod:`.urls`), on text already capped by the profile's ``max_text``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..policy import OutputPolicy
from .imagefit import has_image_budget, image_over_budget
from .markup import neutralize_html, neutralize_markdown
from .report import CellReport, label
from .urls import REMOVED_URL, neutralize_urls

__all__ = ["REMOVED_URL", "filter_bundle", "neutralize", "neutralize_urls"]

_URL_MIME = {"text/markdown", "text/html", "image/svg+xml"}


def neutralize(mime: str, text: str, data_images: bool = True) -> tuple[str, int]:
    """`text` of MIME type `mime` (markdown, HTML or SVG) without remote references (nor
    ``data:`` images, unless `data_images`), and how many were removed."""
    if mime == "text/markdown":
        return neutralize_markdown(text, data_images)
    return neutralize_html(text, data_images)


def filter_bundle(
    data: Any,
    policy: OutputPolicy,
    clean: Callable[[str, str], str],
    walk: Callable[[Any, str], Any],
    report: CellReport,
) -> tuple[Any, bool]:
    """The bundle as it may leave the gate, and whether a MIME type or image was withheld or a
    URL removed. ``clean(text, what)`` redacts and caps one string; ``walk(obj, what)`` does
    that for every string in a JSON value (both tell their caller themselves when they change
    something). ``report`` records what was withheld and removed, for the audit log.

    A MIME type is a string the kernel chose: what leaves (as a key, in a note, in a cut
    marker) is its cleaned form, never the original (a token in ``image/<token>``)."""
    if not isinstance(data, dict):
        return walk(data, "output"), False
    changed = False
    allowed = policy.allowed_mime
    budget = has_image_budget(policy)
    out: dict[str, Any] = {}
    withheld: list[str] = []
    for mime, value in data.items():
        mime_clean = clean(mime, "MIME type") if isinstance(mime, str) else str(mime)
        shown = label(mime_clean)
        if allowed is not None and mime not in allowed:
            withheld.append(f"{shown} (not allowed by the profile)")
            report.mime_withheld(mime_clean)
            continue
        if mime.startswith("image/") and mime != "image/svg+xml":
            size = len(value) if isinstance(value, str) else -1
            if size < 0 or size > policy.max_image:
                withheld.append(f"{shown} of {max(size, 0):,} bytes "
                                f"(limit {policy.max_image:,})")
                report.image_withheld(mime_clean)
                continue
            over = image_over_budget(mime, value, policy) if budget else None
            if over is not None:  # headers only: never decoded (R20)
                withheld.append(f"{shown} {over}")
                report.image_withheld(mime_clean)
                continue
            out[mime_clean] = value  # opaque; not decoded (R20), OCR is out of scope
            continue
        if budget and mime == "image/svg+xml":
            withheld.append(f"{shown} {image_over_budget(mime, value, policy)}")
            report.image_withheld(mime_clean)
            continue
        if policy.neutralize_urls and mime in _URL_MIME and not isinstance(value, str):
            withheld.append(f"{shown} (not a string: its URLs cannot be checked)")
            report.mime_withheld(mime_clean)
            continue
        if isinstance(value, str):
            text = clean(value, shown)
            if policy.neutralize_urls and mime in _URL_MIME:
                before = text
                text, n = neutralize(mime, text, data_images=not budget)
                changed = changed or text != before  # HTML is rebuilt: new bytes, maybe no URL
                if n:
                    report.urls(n)
                    report.note(f"{n} remote URL(s) removed from {mime}")
            out[mime_clean] = text
        else:
            out[mime_clean] = walk(value, shown)
    if withheld:
        for note in withheld:
            report.note(note)
        note = "[cellblock: withheld " + "; ".join(withheld) + "]"
        plain = out.get("text/plain")
        out["text/plain"] = f"{plain}\n{note}" if isinstance(plain, str) and plain else note
        changed = True
    return out, changed
