"""Image bytes: sniff the type, verify a provider's result, pick pixel sizes for a ratio."""

from __future__ import annotations

import io
import warnings
import zlib
from collections.abc import Iterator

from PIL import Image, UnidentifiedImageError

from bot.errors import Transient
from bot.jobs import GeneratedImage

MAX_IMAGE_BYTES = 50_000_000
MAX_PIXELS = 80_000_000

_EXTENSIONS = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}
_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


def sniff_mime(data: bytes) -> str | None:
    """The MIME type from the magic bytes, for PNG, JPEG and WebP only."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def extension_for(mime: str) -> str:
    return _EXTENSIONS.get(mime, ".bin")


class BrokenImage(ValueError):
    """Bytes that are not a whole PNG, JPEG or WebP within the size bounds (the reason given)."""


def inspect_image(data: bytes, max_bytes: int = MAX_IMAGE_BYTES) -> GeneratedImage:
    """Check that `data` is a whole PNG, JPEG or WebP no larger than `MAX_PIXELS`.

    Pillow reads the header (a bomb's warning is an error) and `verify()` checks a PNG's chunk
    CRCs, but neither looks at a JPEG's or WebP's body, nor at how much pixel data a PNG's
    chunks hold: a file cut short (by a CDN that closed early and cached it) passed and was
    posted, and charged, as half a picture. So each format's end is checked too (`_check_whole`).
    Raises `BrokenImage`.
    """
    if not data:
        raise BrokenImage("empty")
    if len(data) > max_bytes:
        raise BrokenImage(f"{len(data)} bytes, over the {max_bytes} cap")
    mime = sniff_mime(data)
    if mime is None:
        raise BrokenImage("not a PNG, JPEG or WebP")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > MAX_PIXELS:
                    raise BrokenImage(f"{width}x{height} pixels, too large")
                fmt = img.format or ""
                img.verify()
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as exc:
        if isinstance(exc, BrokenImage):
            raise
        raise BrokenImage(f"broken ({exc.__class__.__name__})") from None
    mime = _FORMATS.get(fmt, mime)
    _check_whole(mime, data, width, height)
    return GeneratedImage(data=data, mime=mime, width=width, height=height)


def verify_image(data: bytes, max_bytes: int = MAX_IMAGE_BYTES) -> GeneratedImage:
    """`inspect_image` for a provider's result: a broken one is a retryable failure."""
    try:
        return inspect_image(data, max_bytes)
    except BrokenImage as exc:
        raise Transient(f"the provider returned an image that is {exc}") from None


# Channels per PNG colour type (greyscale, RGB, palette, grey + alpha, RGBA).
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# Adam7's passes: first column, first row, column step, row step.
_ADAM7 = (
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
)
_INFLATE_STEP = 1 << 20  # bytes of pixel data inflated at a time: the check holds no more
_FEED_STEP = 1 << 16  # compressed bytes handed to the inflater at a time


def _check_whole(mime: str, data: bytes, width: int, height: int) -> None:
    """Raise `BrokenImage` unless the file reaches its format's end.

    JPEG: the end-of-image marker (the entropy-coded data cannot hold FF D9: an FF in it is
    always followed by 00). WebP: as many bytes as its RIFF header says. PNG: the pixel data
    its IHDR promises, counted as it inflates, a megabyte at a time, rather than decoded
    (Pillow's `load()` would hold a whole 4K RGBA image, 67 MB, per check).
    """
    if mime == "image/jpeg" and not data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
        raise BrokenImage("a JPEG cut short")
    if mime == "image/webp" and len(data) < 8 + int.from_bytes(data[4:8], "little"):
        raise BrokenImage("a WebP cut short")
    if mime == "image/png" and _png_pixel_bytes(data) < _png_expected_bytes(data, width, height):
        raise BrokenImage("a PNG with pixel data missing")


def _png_chunks(data: bytes) -> Iterator[tuple[bytes, memoryview]]:
    view = memoryview(data)
    pos = 8
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        yield kind, view[pos + 8 : pos + 8 + length]
        if kind == b"IEND":
            return
        pos += 12 + length


def _png_expected_bytes(data: bytes, width: int, height: int) -> int:
    """The inflated size of a PNG's image: each row's filter byte and packed pixels."""
    header = next((body for kind, body in _png_chunks(data) if kind == b"IHDR"), None)
    if header is None or len(header) < 13:
        raise BrokenImage("a PNG without its header")
    depth, colour, interlace = header[8], header[9], header[12]
    bits = _PNG_CHANNELS.get(colour, 4) * depth

    def rows(w: int, h: int) -> int:
        return h * (1 + (w * bits + 7) // 8) if w > 0 and h > 0 else 0

    if not interlace:
        return rows(width, height)
    return sum(
        rows((width - x + dx - 1) // dx, (height - y + dy - 1) // dy) for x, y, dx, dy in _ADAM7
    )


def _png_pixel_bytes(data: bytes) -> int:
    """How many bytes the PNG's IDAT stream inflates to (0 for a broken stream)."""
    inflater = zlib.decompressobj()
    total = 0
    try:
        for kind, body in _png_chunks(data):
            if kind != b"IDAT":
                continue
            # Fed in slices: what a step leaves unread comes back as a copy (`unconsumed_tail`),
            # and of a whole 8 MB chunk that was a copy of most of it at every step.
            for start in range(0, len(body), _FEED_STEP):
                pending: bytes | memoryview = body[start : start + _FEED_STEP]
                while pending:
                    total += len(inflater.decompress(pending, _INFLATE_STEP))
                    pending = inflater.unconsumed_tail
        while not inflater.eof and (out := inflater.decompress(b"", _INFLATE_STEP)):
            total += len(out)
    except zlib.error:
        return 0
    return total


def parse_ratio(ratio: str) -> tuple[int, int]:
    """`"16:9"` → (16, 9); ValueError when it is not two positive integers."""
    left, sep, right = ratio.partition(":")
    if not sep:
        raise ValueError(ratio)
    w, h = int(left), int(right)
    if w <= 0 or h <= 0:
        raise ValueError(ratio)
    return w, h


def ratio_size(ratio: str | None, long_side: int, multiple: int = 8) -> tuple[int, int]:
    """Pixel width and height for `ratio` with the longer side `long_side`, rounded to `multiple`."""
    w, h = parse_ratio(ratio or "1:1")

    def snap(x: float) -> int:
        return max(multiple, round(x / multiple) * multiple)

    if w >= h:
        return snap(long_side), snap(long_side * h / w)
    return snap(long_side * w / h), snap(long_side)
