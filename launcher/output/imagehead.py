"""Image dimensions from headers only: PNG, JPEG, GIF and WebP, never decoded (THREATS R20).

The gate checks an image against a profile's image budget (:mod:`.imagefit`) by its pixel
dimensions, which it reads here from the few bytes of the header that declare them: the PNG
``IHDR`` chunk, the JPEG start-of-frame segment (found by walking the segment lengths, with
every offset bounds-checked), the GIF logical screen, the WebP ``VP8``/``VP8L``/``VP8X``
chunk. No pixel data is decompressed or interpreted, so a decompression bomb costs the host
what its header costs. The payload is untrusted: every read is bounds-checked, and anything
that is not a well-formed header of the declared type raises :class:`BadImageHeader`, whose
message says what was wrong (a fixed text, never bytes of the image).

A header may lie about the dimensions (a PNG declaring 10x10 whose pixel data is larger):
what a client does with such an image is its decoder's problem, as for any image; the byte
budget is checked on the real bytes, whatever the header says.
"""

from __future__ import annotations

import re
import struct

__all__ = ["HEADER_MIME", "BadImageHeader", "image_size"]

#: the MIME types whose header this module reads
HEADER_MIME = ("image/png", "image/jpeg", "image/gif", "image/webp")
#: the largest side any of these formats can declare that we accept (PNG allows 2**31 - 1)
MAX_SIDE = 1 << 24

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# SOF0-SOF15 except DHT (C4), JPG (C8) and DAC (CC), which share the range
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# markers with no length field: TEM, RST0-RST7 (SOI and EOI are handled on their own)
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
#: markers read before a start-of-frame at most; a real file has a few dozen (APPn, DQT,
#: DHT, DRI, COM), and each is a Python loop turn on the gate's thread
JPEG_MAX_STEPS = 4096
#: GIF blocks and sub-blocks walked at most (a 300 KiB GIF of 255-byte sub-blocks has ~1,200)
GIF_MAX_STEPS = 65536
_NOT_FF = re.compile(rb"[^\xff]")


class BadImageHeader(ValueError):
    """The bytes are not a well-formed header of the declared image type."""


def image_size(mime: str, data: bytes) -> tuple[int, int]:
    """``(width, height)`` in pixels declared by the header of `data`, an image of MIME type
    `mime` (one of :data:`HEADER_MIME`). Raises :class:`BadImageHeader` when the bytes are not
    such a header, are cut short, or declare a zero or absurd side."""
    reader = _READERS.get(mime)
    if reader is None:
        raise BadImageHeader(f"no header reader for {mime}")
    width, height = reader(data)
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise BadImageHeader(f"its header declares {width}x{height} pixels")
    return width, height


def _png(data: bytes) -> tuple[int, int]:
    if not data.startswith(_PNG_SIGNATURE):
        raise BadImageHeader("it does not start with the PNG signature")
    if len(data) < 24:
        raise BadImageHeader("its PNG header is cut short")
    length, kind, width, height = struct.unpack(">I4sII", data[8:24])
    if kind != b"IHDR" or length != 13:
        raise BadImageHeader("its first PNG chunk is not IHDR")
    return width, height


def _gif(data: bytes) -> tuple[int, int]:
    """The logical screen, grown to every frame's extent: a frame may lie outside the screen,
    and decoders draw it at its own size (a 10x10 screen with a 4000x4000 frame decodes at
    4000x4000; found from the jail). The blocks are walked, never the LZW data decoded: at
    most :data:`GIF_MAX_STEPS` blocks and sub-blocks (each moves forward one byte or more)."""
    if data[:6] not in (b"GIF87a", b"GIF89a"):
        raise BadImageHeader("it does not start with a GIF signature")
    if len(data) < 10:
        raise BadImageHeader("its GIF header is cut short")
    width, height = struct.unpack("<HH", data[6:10])
    if len(data) < 13:
        return width, height
    at = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    steps = 0
    while at < len(data) and data[at] != 0x3B:  # the trailer
        if data[at] == 0x2C:  # an image descriptor: left, top, width, height, flags
            if at + 10 > len(data):  # cut short: no frame of it can be drawn
                break
            left, top, w, h = struct.unpack("<HHHH", data[at + 1:at + 9])
            width, height = max(width, left + w), max(height, top + h)
            flags = data[at + 9]
            at += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0) + 1  # + LZW size
        elif data[at] == 0x21:  # an extension: its label, then sub-blocks
            at += 2
        else:
            raise BadImageHeader(f"its GIF has an unknown block type 0x{data[at]:02x}")
        while at < len(data):  # sub-blocks, up to the empty one
            steps += 1
            if steps > GIF_MAX_STEPS:
                raise BadImageHeader(f"its GIF has over {GIF_MAX_STEPS} blocks")
            size = data[at]
            at += 1 + size
            if size == 0:
                break
    return width, height


def _jpeg(data: bytes) -> tuple[int, int]:
    """Walk the segments from SOI to the first start-of-frame, at most
    :data:`JPEG_MAX_STEPS` markers (each moves forward at least two bytes; fill bytes are
    skipped by one regular-expression search)."""
    if not data.startswith(b"\xff\xd8"):
        raise BadImageHeader("it does not start with a JPEG SOI marker")
    pos, end = 2, len(data)
    for _ in range(JPEG_MAX_STEPS):
        if pos >= end or data[pos] != 0xFF:
            raise BadImageHeader("its JPEG segments end before a start-of-frame")
        marker_at = _NOT_FF.search(data, pos)  # past any fill bytes, in C
        if marker_at is None:
            raise BadImageHeader("its JPEG segments end before a start-of-frame")
        pos = marker_at.start()
        marker = data[pos]
        pos += 1
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (0x00, 0xD8, 0xD9, 0xDA):  # stuffed byte, SOI again, EOI, scan data
            raise BadImageHeader("its JPEG segments reach image data before a start-of-frame")
        if pos + 2 > end:
            raise BadImageHeader("its JPEG segments end before a start-of-frame")
        (length,) = struct.unpack(">H", data[pos:pos + 2])
        if length < 2:
            raise BadImageHeader("a JPEG segment has a length under 2")
        if marker in _JPEG_SOF:
            if length < 8 or pos + 7 > end:
                raise BadImageHeader("its JPEG start-of-frame is cut short")
            height, width = struct.unpack(">HH", data[pos + 3:pos + 7])
            return width, height
        pos += length
    raise BadImageHeader(f"its JPEG has over {JPEG_MAX_STEPS} markers before a start-of-frame")


def _webp(data: bytes) -> tuple[int, int]:
    if len(data) < 16 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise BadImageHeader("it does not start with a RIFF WEBP header")
    kind = data[12:16]
    if kind == b"VP8 ":
        if len(data) < 30:
            raise BadImageHeader("its WebP VP8 header is cut short")
        if data[23:26] != b"\x9d\x01\x2a":
            raise BadImageHeader("its WebP VP8 frame has no start code")
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if kind == b"VP8L":
        if len(data) < 25:
            raise BadImageHeader("its WebP VP8L header is cut short")
        if data[20] != 0x2F:
            raise BadImageHeader("its WebP VP8L stream has no signature")
        (bits,) = struct.unpack("<I", data[21:25])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8X":
        if len(data) < 30:
            raise BadImageHeader("its WebP VP8X header is cut short")
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    raise BadImageHeader("its WebP chunk is none of VP8, VP8L, VP8X")


_READERS = {"image/png": _png, "image/jpeg": _jpeg, "image/gif": _gif, "image/webp": _webp}
