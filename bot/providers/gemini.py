"""Google Gemini native image output ("Nano Banana") over `models/{model}:generateContent`.

The API is synchronous: one call answers with the image inline as base64, so there is no task
to persist or resume (a restart mid-call simply calls again). One call makes one image; `n > 1`
makes `n` calls at once. Failures map onto the `bot.errors` taxonomy:

- HTTP 200 with `promptFeedback.blockReason`, a blocking `finishReason` (`IMAGE_SAFETY`,
  `PROHIBITED_CONTENT`, `NO_IMAGE` …) or a text-only answer → `Refused`;
- 400 `INVALID_ARGUMENT` → `BadRequest`, except a rejected key (`API_KEY_INVALID`) → `AuthFailed`;
  401/403 → `AuthFailed` (the operator is warned in the log); 404 (unknown model) →
  `ModelUnavailable` (a bad request that fails over to the family's next provider);
- 429 `RESOURCE_EXHAUSTED` → `RateLimited`, waiting `google.rpc.RetryInfo.retryDelay`; a
  per-day quota (`…PerDay…`) waits for its reset at midnight Pacific time, and the model is not
  called again before it;
- 5xx, timeouts, connection errors and unparseable bodies → `Transient`.

Reference: /work/shared/reference/providers.md §3.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import aiohttp

from bot.errors import (
    AuthFailed,
    BadRequest,
    Malformed,
    ModelUnavailable,
    ProviderError,
    RateLimited,
    Refused,
    Transient,
)
from bot.images import MAX_IMAGE_BYTES, sniff_mime
from bot.jobs import GeneratedImage
from bot.offload import off_loop
from bot.providers.base import GenerationRequest, JobHooks
from bot.providers.http import (
    decode_base64_image,
    new_session,
    parse_retry_after,
    read_capped,
    status_error,
)

log = logging.getLogger("drawbridge.providers.gemini")

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com/v1beta"

# Inline request bodies above ~20 MB are rejected; larger inputs need the Files API.
MAX_INLINE_REQUEST_BYTES = 20_000_000

# `finishReason` values that mean the model would not draw this (§3.4); never retried.
REFUSAL_FINISH_REASONS = frozenset(
    {
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_RECITATION",
        "IMAGE_OTHER",
        "NO_IMAGE",
        "SAFETY",
        "PROHIBITED_CONTENT",
        "RECITATION",
        "BLOCKLIST",
        "SPII",
        "OTHER",
    }
)

_RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
_QUOTA_FAILURE = "type.googleapis.com/google.rpc.QuotaFailure"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)s\s*$")
_MAX_MESSAGE = 300


class GeminiProvider:
    """A client for the Gemini API's native image output, on aiohttp."""

    name = "gemini"

    def __init__(
        self,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        *,
        session: aiohttp.ClientSession | None = None,
        max_image_bytes: int = MAX_IMAGE_BYTES,
    ) -> None:
        self._api_key = api_key
        self.base_url = base_url.rstrip("/")
        self._session = session
        self._owns_session = session is None
        self.max_image_bytes = max_image_bytes
        self._spent: dict[str, float] = {}  # model → when its daily quota is back (monotonic)

    def __repr__(self) -> str:
        return f"GeminiProvider(base_url={self.base_url!r})"

    async def generate(self, request: GenerationRequest, hooks: JobHooks) -> list[GeneratedImage]:
        contents = self._contents(request)
        n = max(1, request.n)
        if n == 1:
            return [await self._call(request, self._body(request, contents, 0))]

        done = 0

        async def one(index: int) -> GeneratedImage:
            nonlocal done
            image = await self._call(request, self._body(request, contents, index))
            done += 1
            if done < n:
                await hooks.progress(100 * done // n)
            return image

        results = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
        images: list[GeneratedImage] = []
        errors: list[ProviderError] = []
        for result in results:
            if isinstance(result, GeneratedImage):
                images.append(result)
            elif isinstance(result, ProviderError):
                errors.append(result)
            else:
                raise result  # a bug or a cancellation, not a provider failure
        if images:
            if errors:
                log.info(
                    "gemini: %d of %d images failed (%s); returning the rest",
                    len(errors),
                    n,
                    errors[0],
                )
            return images
        raise errors[0]

    async def aclose(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    # -- request ---------------------------------------------------------------------------

    def _contents(self, request: GenerationRequest) -> list[dict[str, Any]]:
        parts: list[dict[str, Any]] = [{"text": request.prompt}]
        total = len(request.prompt.encode())
        for image in request.reference_images:
            mime = sniff_mime(image)
            if mime is None:
                raise BadRequest("a reference image is not a PNG, JPEG or WebP")
            data = base64.b64encode(image).decode("ascii")
            total += len(data)
            parts.append({"inlineData": {"mimeType": mime, "data": data}})
        if total > MAX_INLINE_REQUEST_BYTES:
            raise BadRequest("the reference images are too large for one Gemini request")
        return [{"role": "user", "parts": parts}]

    def _body(
        self, request: GenerationRequest, contents: list[dict[str, Any]], index: int
    ) -> dict[str, Any]:
        config: dict[str, Any] = {"responseModalities": ["TEXT", "IMAGE"]}
        image_config: dict[str, str] = {}
        if request.aspect_ratio:
            image_config["aspectRatio"] = request.aspect_ratio
        if request.size:
            image_config["imageSize"] = request.size.upper()
        if image_config:
            config["imageConfig"] = image_config
        if request.seed is not None:  # an int32 to the API (400 TYPE_INT32 past it)
            config["seed"] = (request.seed + index) % 2**31
        return {"contents": contents, "generationConfig": config}

    def _session_for_call(self) -> aiohttp.ClientSession:
        if self._session is None or (self._owns_session and self._session.closed):
            self._session = new_session()
            self._owns_session = True
        return self._session

    async def _call(self, request: GenerationRequest, body: dict[str, Any]) -> GeneratedImage:
        model = request.remote_model.removeprefix("models/")
        url = f"{self.base_url}/models/{quote(model, safe='-._~')}:generateContent"
        headers = {"x-goog-api-key": self._api_key}
        timeout = aiohttp.ClientTimeout(
            total=request.timeout_s, sock_connect=min(30.0, request.timeout_s)
        )
        spent = self._spent.get(model)
        if spent is not None and (left := spent - time.monotonic()) > 0:
            raise RateLimited(f"gemini: the daily quota of {model} is used up", retry_after=left)
        session = self._session_for_call()
        try:
            async with session.post(url, json=body, headers=headers, timeout=timeout) as resp:
                status, resp_headers = resp.status, resp.headers
                raw = await self._read(resp)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise Transient(f"gemini: the request failed ({exc.__class__.__name__})") from None
        if status >= 400:
            raise self._http_error(status, raw, resp_headers, model)
        # The image comes inline, as base64 in the JSON: a big answer is read off the loop.
        return await off_loop(len(raw), partial(self._answer, raw))

    def _answer(self, raw: bytes) -> GeneratedImage:
        try:
            payload = json.loads(raw)
        except (UnicodeDecodeError, ValueError):
            raise Malformed("gemini: the answer is not JSON") from None
        if not isinstance(payload, dict):
            raise Malformed("gemini: the answer is not a JSON object")
        return self._image_from(payload)

    async def _read(self, resp: aiohttp.ClientResponse) -> bytes:
        # The body carries the image as base64, plus possibly interim "thought" images.
        return await read_capped(resp, self.max_image_bytes * 3 + 1_000_000, "gemini: the answer")

    # -- response --------------------------------------------------------------------------

    def _image_from(self, payload: Mapping[str, Any]) -> GeneratedImage:
        feedback = _get(payload, "promptFeedback", "prompt_feedback")
        if isinstance(feedback, Mapping):
            block = _get(feedback, "blockReason", "block_reason")
            if block and block != "BLOCKED_REASON_UNSPECIFIED":
                raise Refused(f"gemini blocked the prompt ({block})")
        candidates = _get(payload, "candidates")
        if not isinstance(candidates, list) or not candidates:
            raise Transient("gemini: the answer has no candidates")

        final: str | None = None
        texts: list[str] = []
        for candidate in candidates:
            if not isinstance(candidate, Mapping):
                continue
            content = _get(candidate, "content")
            parts = _get(content, "parts") if isinstance(content, Mapping) else None
            for part in parts if isinstance(parts, list) else ():
                if not isinstance(part, Mapping):
                    continue
                inline = _get(part, "inlineData", "inline_data")
                if isinstance(inline, Mapping):
                    data = _get(inline, "data")
                    # 3-pro may emit interim "thought" images before the final one.
                    if isinstance(data, str) and data and _get(part, "thought") is not True:
                        final = data
                elif isinstance(_get(part, "text"), str) and _get(part, "thought") is not True:
                    texts.append(_get(part, "text"))
        if final is not None:
            return decode_base64_image(final, self.max_image_bytes)

        first = candidates[0] if isinstance(candidates[0], Mapping) else {}
        finish = _get(first, "finishReason", "finish_reason")
        if isinstance(finish, str) and finish in REFUSAL_FINISH_REASONS:
            detail = _get(first, "finishMessage", "finish_message")
            suffix = f": {_clip(detail)}" if isinstance(detail, str) and detail else ""
            raise Refused(f"gemini would not make this image ({finish}){suffix}")
        text = " ".join(t.strip() for t in texts if t.strip())
        if text:
            raise Refused(f"gemini answered with text and no image: {_clip(text)}")
        raise Transient(f"gemini: the answer has no image and no text (finishReason {finish})")

    def _http_error(
        self, status: int, raw: bytes, headers: Mapping[str, str], model: str
    ) -> ProviderError:
        code, message, details = _google_error(raw)
        message = _clip(message.replace(self._api_key, "***") if self._api_key else message)
        described = f"gemini: HTTP {status}{f' {code}' if code else ''}: {message or 'no message'}"
        reasons = {str(_get(d, "reason")) for d in details if _get(d, "reason")}
        key_rejected = any(r.startswith("API_KEY_") for r in reasons) or (
            status == 400 and "api key" in message.lower()
        )
        if status in (401, 403) or key_rejected or code == "UNAUTHENTICATED":
            log.warning(
                "the Gemini API rejected the key (HTTP %s %s): check GEMINI_API_KEY",
                status,
                code or "",
            )
            return AuthFailed(described)
        if status == 402 or (status == 400 and code == "FAILED_PRECONDITION"):
            # Google's API-errors page: 402 RESOURCE_EXHAUSTED, prepaid credits used up; 400
            # FAILED_PRECONDITION, no free tier in this country and billing not enabled. The
            # operator's to pay for, not the user's settings: alerted, and failed over.
            log.warning(
                "the Gemini API refuses the account (HTTP %s %s): check its billing",
                status,
                code or "",
            )
            return AuthFailed(f"the Gemini account cannot pay for this ({described})")
        if status == 404:
            log.warning("the Gemini API does not serve the model %s (HTTP 404)", model)
            return ModelUnavailable(f"gemini does not know the model {model!r} ({described})")
        retry_after = _retry_delay(details)
        if status == 429:
            if retry_after is None:
                retry_after = parse_retry_after(headers)
            if _daily_quota(details):
                # RetryInfo's delay is the per-minute window's, not when the day's quota is back.
                retry_after = until_daily_reset()
                self._spent[model] = time.monotonic() + retry_after
                log.warning(
                    "the Gemini API says a daily quota is used up (model %s): not calling it "
                    "for %.1f h, until midnight Pacific time",
                    model,
                    retry_after / 3600,
                )
            return RateLimited(described, retry_after=retry_after)
        if status == 400:
            return BadRequest(described)
        error = status_error(status, described, headers)
        if retry_after is not None and error.retryable:
            error.retry_after = retry_after
        return error


def until_daily_reset(now: float | None = None) -> float:
    """Seconds until Gemini's daily quotas reset: midnight Pacific time (UTC−8 without tzdata)."""
    try:
        zone: Any = ZoneInfo("America/Los_Angeles")
    except ZoneInfoNotFoundError:
        zone = timezone(timedelta(hours=-8))
    local = datetime.fromtimestamp(time.time() if now is None else now, zone)
    midnight = (local + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1.0, midnight.timestamp() - local.timestamp())


def _get(obj: Any, *keys: str) -> Any:
    """The first of `keys` present in a JSON object (camelCase or snake_case), else None."""
    if not isinstance(obj, Mapping):
        return None
    for key in keys:
        if key in obj:
            return obj[key]
    return None


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 1] + "…"


def _google_error(raw: bytes) -> tuple[str, str, list[Mapping[str, Any]]]:
    """`(status, message, details)` from Google's `{"error": {...}}` shape, tolerating others."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return "", "", []
    if isinstance(body, list) and len(body) == 1:  # some front ends wrap the error in a list
        body = body[0]
    error = _get(body, "error")
    if not isinstance(error, Mapping):
        return "", "", []
    status = _get(error, "status")
    message = _get(error, "message")
    details = _get(error, "details")
    return (
        status if isinstance(status, str) else "",
        message if isinstance(message, str) else "",
        [d for d in details if isinstance(d, Mapping)] if isinstance(details, list) else [],
    )


def parse_duration(value: Any) -> float | None:
    """A protobuf `Duration` as JSON ("13s", "1.5s") or as `{"seconds", "nanos"}`, in seconds."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        return float(match.group(1)) if match else None
    if isinstance(value, Mapping):
        try:
            return float(value.get("seconds", 0) or 0) + float(value.get("nanos", 0) or 0) / 1e9
        except (TypeError, ValueError):
            return None
    return None


def _retry_delay(details: list[Mapping[str, Any]]) -> float | None:
    for detail in details:
        if _get(detail, "@type") == _RETRY_INFO:
            delay = parse_duration(_get(detail, "retryDelay", "retry_delay"))
            if delay is not None:
                return max(0.0, delay)
    return None


def _daily_quota(details: list[Mapping[str, Any]]) -> bool:
    for detail in details:
        if _get(detail, "@type") != _QUOTA_FAILURE:
            continue
        violations = _get(detail, "violations")
        for violation in violations if isinstance(violations, list) else ():
            quota_id = _get(violation, "quotaId", "quota_id")
            if isinstance(quota_id, str) and "PerDay" in quota_id:
                return True
    return False
