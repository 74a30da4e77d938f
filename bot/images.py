"""Image bytes: sniff the type, verify a provider's result, pick pixel sizes for a ratio."""

from __future__ import annotations

import io
import warnings

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


def verify_image(data: bytes, max_bytes: int = MAX_IMAGE_BYTES) -> GeneratedImage:
    """Check that `data` is a whole PNG, JPEG or WebP; a broken result is a retryable failure."""
    if not data:
        raise Transient("the provider returned an empty image")
    if len(data) > max_bytes:
        raise Transient(f"the provider returned {len(data)} bytes, over the {max_bytes} cap")
    mime = sniff_mime(data)
    if mime is None:
        raise Transient("the provider returned something that is not a PNG, JPEG or WebP")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > MAX_PIXELS:
                    raise Transient(f"the image is {width}x{height}, too large")
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
        raise Transient(
            f"the provider returned a broken image ({exc.__class__.__name__})"
        ) from None
    return GeneratedImage(data=data, mime=_FORMATS.get(fmt, mime), width=width, height=height)


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
