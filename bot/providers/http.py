"""HTTP plumbing every provider client shares: sessions, Retry-After, result downloads.

Provider clients call their APIs with aiohttp and map each failure to one `ProviderError` kind;
the engine's retry policy (`bot.providers.retry`) decides what to try again.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import time
from collections.abc import Mapping
from functools import partial

import aiohttp

from bot import __version__
from bot.errors import BadRequest, Expired, ProviderError, RateLimited, Transient
from bot.images import MAX_IMAGE_BYTES, sniff_mime, verify_image
from bot.jobs import GeneratedImage
from bot.offload import off_loop

USER_AGENT = f"drawbridge/{__version__}"

# How image APIs and relays say they do not serve the model (retired, renamed, not on this relay):
# the family's next provider may. OpenAI's codes and wording, OpenRouter's, GrsAI's (which change
# often, providers.md §1.8), and a Chinese relay's.
MODEL_GONE = (
    "model_not_found",
    "model not found",
    "model not register",
    "no such model",
    "does not exist or you do not have access",
    "no endpoints found",
    "is not a valid model",
    "unknown model",
    "模型不存在",
)


def says_model_gone(text: str) -> bool:
    """Whether an error's code or message (any case) says the model is not served."""
    low = text.lower()
    return any(mark in low for mark in MODEL_GONE)


def new_session(timeout_s: float = 600.0) -> aiohttp.ClientSession:
    """A session for one provider: one connection pool, no global timeout beyond `timeout_s`."""
    timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=30)
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
    return aiohttp.ClientSession(
        timeout=timeout, connector=connector, headers={"User-Agent": USER_AGENT}
    )


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from `Retry-After` (seconds or an HTTP date) or `retry-after-ms`."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("Retry-After") or headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def status_error(status: int, message: str, headers: Mapping[str, str]) -> ProviderError:
    """The generic mapping of an HTTP status; clients refine it from the body first."""
    retry_after = parse_retry_after(headers)
    if status == 429:
        return RateLimited(message, retry_after=retry_after)
    if status in (408, 409, 425) or status >= 500:
        return Transient(message, retry_after=retry_after)
    return BadRequest(message)


async def download(
    session: aiohttp.ClientSession,
    url: str,
    *,
    max_bytes: int = MAX_IMAGE_BYTES,
    timeout_s: float = 120.0,
) -> GeneratedImage:
    """Fetch a result URL at once and verify it; an expired or broken URL is a clear failure."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status in (403, 404, 410):
                raise Expired(f"the result URL answered {resp.status}: it has expired")
            if resp.status >= 400:
                raise status_error(
                    resp.status, f"result download: HTTP {resp.status}", resp.headers
                )
            data = await read_capped(resp, max_bytes, "the result")
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise Transient(f"result download failed ({exc.__class__.__name__})") from None
    return await verified(data, max_bytes)


async def verified(data: bytes, max_bytes: int = MAX_IMAGE_BYTES) -> GeneratedImage:
    """`verify_image`, off the loop when the image is big."""
    return await off_loop(len(data), partial(verify_image, data, max_bytes))


async def decoded(data: str, max_bytes: int = MAX_IMAGE_BYTES) -> GeneratedImage:
    """`decode_base64_image`, off the loop when the image is big."""
    return await off_loop(len(data), partial(decode_base64_image, data, max_bytes))


async def read_capped(resp: aiohttp.ClientResponse, cap: int, what: str) -> bytes:
    """A response body, refused (as a retryable failure) once it passes `cap` bytes."""
    if resp.content_length is not None and resp.content_length > cap:
        raise Transient(f"{what} is {resp.content_length} bytes, over the cap")
    data = bytearray()
    async for chunk in resp.content.iter_chunked(65536):
        data += chunk
        if len(data) > cap:
            raise Transient(f"{what} is over the size cap")
    return bytes(data)


def decode_base64_image(data: str, max_bytes: int = MAX_IMAGE_BYTES) -> GeneratedImage:
    """A base64 (or `data:` URI) image from a JSON body, verified."""
    data = data.strip()
    if data.startswith("data:"):
        _, _, data = data.partition(",")
    if len(data) > max_bytes * 4 // 3 + 4 + len(data) // 38:  # (line breaks every 76)
        raise Transient("the returned image is over the size cap")
    try:
        raw = b64_bytes(data)
    except (binascii.Error, ValueError):
        raise Transient("the provider returned broken base64") from None
    return verify_image(raw, max_bytes)


_URL_SAFE = str.maketrans("-_", "+/")


def b64_bytes(data: str) -> bytes:
    """Base64 as relays spell it: line breaks, the URL-safe alphabet, padding left off.

    Decoding without validation skips characters outside the alphabet, `-` and `_` among them:
    a URL-safe image came out as garbage (refused as broken, so the job was retried and the
    provider paid again for the same image).
    """
    if "-" in data or "_" in data:
        data = data.translate(_URL_SAFE)
    try:
        return base64.b64decode(data)
    except binascii.Error:
        compact = "".join(data.split()).rstrip("=")
        return base64.b64decode(compact + "=" * (-len(compact) % 4))


def data_uri(image: bytes) -> str:
    """A reference image as a `data:` URI, the way GrsAI and OpenRouter take them."""
    mime = sniff_mime(image) or "image/png"
    return f"data:{mime};base64,{base64.b64encode(image).decode()}"
