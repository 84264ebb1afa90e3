"""Caps on text and the markers that say what was cut.

A marker is plain text a person or a model can read: what was cut and how much,
in bytes and lines. Markers carry a per-kernel nonce so a kernel cannot print a
fake marker that looks like ours (THREATS O18): the nonce never enters the jail.
"""

from __future__ import annotations

__all__ = ["cap_text", "marker"]


def marker(nonce: str, what: str, cut_bytes: int, cut_lines: int, more: str = "") -> str:
    """``more``: what follows, inside the brackets (where the cut text is kept)."""
    lines = f", {cut_lines:,} line{'s' if cut_lines != 1 else ''}" if cut_lines else ""
    return f"\n[cellblock {nonce}: {cut_bytes:,} bytes{lines} of {what} truncated{more}]\n"


def cap_text(text: str, limit: int, nonce: str, what: str) -> tuple[str, int]:
    """Keep the head and the tail of ``text`` within ``limit`` bytes (UTF-8).

    Returns the capped text and the number of bytes cut (0 when it fit). Cheap for
    text under the limit: the byte length is only computed when the character
    count could exceed it.
    """
    if len(text) * 4 <= limit:
        return text, 0
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= limit:
        return text, 0
    head_n = limit * 3 // 4
    tail_n = limit - head_n
    head = raw[:head_n].decode("utf-8", "ignore")
    tail = raw[len(raw) - tail_n:].decode("utf-8", "ignore") if tail_n else ""
    cut = raw[head_n:len(raw) - tail_n]
    mark = marker(nonce, what, len(cut), cut.count(b"\n"))
    return head + mark + tail, len(cut)
