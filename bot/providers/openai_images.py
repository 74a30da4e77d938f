"""OpenAI Images (`/images/generations`, `/images/edits`) and OpenAI-compatible aggregators.

One client serves api.openai.com and any aggregator that speaks the same protocol (APIYI,
PoloAPI, new-api/one-api relays): only `base_url` and the key differ. It talks plain aiohttp.

Choices worth knowing:
- `response_format` is sent only to DALL·E models (as `b64_json`, so there is no 60-minute URL to
  race). GPT-image models always answer base64 and api.openai.com as well as strict relays reject
  the field with 400 `unknown_parameter`. Any item that still comes back as a `url` (relays that
  default to URL output) is downloaded at once; a `data:` URI in `url` is decoded.
- dall-e-3 takes `n=1` only: a request for n images makes n calls one after another. If a later
  call fails after some images were made, the images already paid for are returned (fewer than n)
  rather than failing the job and paying again on the engine's retry.
- The `usage` block (GPT-image token counts) is kept per job in `usage_by_job`, bounded, so the
  engine can record it; several jobs run on one provider at once, so there is no "last usage".
- The API is synchronous: there is no task id to resume, so `request.task_id` is ignored. A read
  timeout is reported as `Transient`, but note that a relay usually bills a request the client
  gave up on.
- The key is sent per request (never set on the session, so result downloads never carry it) and
  never appears in an exception or a log line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Mapping
from functools import partial
from typing import Any

import aiohttp

from bot.errors import (
    AuthFailed,
    BadRequest,
    Expired,
    Malformed,
    ModelUnavailable,
    ProviderError,
    RateLimited,
    Refused,
    Transient,
)
from bot.images import MAX_IMAGE_BYTES, extension_for, parse_ratio, ratio_size, sniff_mime
from bot.jobs import GeneratedImage
from bot.offload import off_loop
from bot.providers.base import GenerationRequest, JobHooks
from bot.providers.http import (
    decoded,
    download,
    new_session,
    parse_retry_after,
    read_capped,
    says_model_gone,
)

log = logging.getLogger("drawbridge.providers.openai")

DEFAULT_BASE_URL = "https://api.openai.com/v1"

# Moderation refusals: GPT-image (`moderation_blocked`) and DALL·E (`content_policy_violation`).
REFUSAL_CODES = ("moderation_blocked", "content_policy_violation")
# Out of credits: the operator must pay; retrying never helps.
QUOTA_CODES = ("insufficient_quota", "billing_hard_limit_reached", "insufficient_user_quota")

MAX_N = 10  # the API's limit on `n` for one call
MAX_EDIT_IMAGES = 16  # GPT-image edits take up to 16 `image[]` parts
MAX_EDIT_IMAGE_BYTES = 50_000_000  # per file, as the API documents

# gpt-image-2: any WxH with both sides multiples of 16, ratio within 1:3–3:1, at most 3840x2160
# worth of pixels and 3840 on the long side. These are the sizes drawbridge asks for per tier.
GPT_IMAGE_2_MAX_PIXELS = 3840 * 2160
GPT_IMAGE_2_MAX_EDGE = 3840
GPT_IMAGE_2_SIZES: dict[str, dict[str, str]] = {
    "1K": {
        "1:1": "1024x1024",
        "3:2": "1536x1024",
        "2:3": "1024x1536",
        "16:9": "1536x864",
        "9:16": "864x1536",
    },
    "2K": {
        "1:1": "2048x2048",
        "3:2": "2304x1536",
        "2:3": "1536x2304",
        "16:9": "2048x1152",
        "9:16": "1152x2048",
    },
    "4K": {
        "1:1": "2880x2880",
        "3:2": "3504x2336",
        "2:3": "2336x3504",
        "16:9": "3840x2160",
        "9:16": "2160x3840",
    },
}
# Long side for ratios outside the table (a models file may allow more ratios).
GPT_IMAGE_2_LONG_SIDE = {"1K": 1536, "2K": 2048, "4K": 3840}
GPT_IMAGE_SIZES = {"1:1": "1024x1024", "3:2": "1536x1024", "2:3": "1024x1536"}
DALL_E_3_SIZES = {"1:1": "1024x1024", "16:9": "1792x1024", "9:16": "1024x1792"}
DALL_E_2_SIZES = {"256": "256x256", "512": "512x512", "1K": "1024x1024"}

_PIXELS = re.compile(r"^(\d{2,5})x(\d{2,5})$")
_KEYLIKE = re.compile(r"\bsk-[A-Za-z0-9_\-*.]{4,}")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def model_family(remote_model: str) -> str:
    """`dall-e-3`, `dall-e-2`, `gpt-image-2`, `gpt-image` or `other` (an aggregator's own model)."""
    name = remote_model.rsplit("/", 1)[-1].lower()  # "openai/gpt-image-1" on some relays
    if name.startswith("dall-e-3"):
        return "dall-e-3"
    if name.startswith("dall-e-2"):
        return "dall-e-2"
    if name.startswith("gpt-image-2"):
        return "gpt-image-2"
    if name.startswith(("gpt-image", "chatgpt-image")):
        return "gpt-image"
    return "other"


def _tier(size: str | None) -> str:
    if size is None:
        return "1K"
    tier = size.strip().upper()
    return {"1024": "1K", "2048": "2K", "4096": "4K"}.get(tier, tier)


def _free_size(ratio: str, tier: str) -> str:
    """A gpt-image-2 size for any ratio: multiples of 16, within its pixel and edge limits."""
    try:
        w, h = parse_ratio(ratio)
    except ValueError:
        raise BadRequest(f"aspect ratio {ratio!r} is not W:H") from None
    if max(w, h) > 3 * min(w, h):
        raise BadRequest(f"aspect ratio {ratio} is outside 1:3–3:1")
    long_side = GPT_IMAGE_2_LONG_SIDE.get(tier)
    if long_side is None:
        raise BadRequest(f"size {tier} is not one of 1K, 2K, 4K")
    width, height = ratio_size(ratio, long_side, 16)
    while width * height > GPT_IMAGE_2_MAX_PIXELS or max(width, height) > GPT_IMAGE_2_MAX_EDGE:
        long_side -= 16
        width, height = ratio_size(ratio, long_side, 16)
    return f"{width}x{height}"


def size_for(remote_model: str, aspect_ratio: str | None, size: str | None) -> str | None:
    """The API's `size` for a model, a ratio and a size tier (`1K`/`2K`/`4K`, or literal `WxH`).

    `None` means "send no size" (an aggregator's own model with nothing asked for).
    Raises `BadRequest` for a combination the model cannot make.
    """
    family = model_family(remote_model)
    if size is not None and (size.strip().lower() == "auto" or _PIXELS.match(size.strip())):
        return size.strip().lower()  # an explicit WxH or `auto` from a models file goes as is
    ratio = aspect_ratio or "1:1"
    tier = _tier(size)
    if family == "dall-e-3":
        if tier != "1K" or ratio not in DALL_E_3_SIZES:
            raise BadRequest(f"dall-e-3 makes 1:1, 16:9 and 9:16 at 1K only, not {ratio} {tier}")
        return DALL_E_3_SIZES[ratio]
    if family == "dall-e-2":
        if ratio != "1:1" or tier not in DALL_E_2_SIZES:
            raise BadRequest(f"dall-e-2 makes 256, 512 or 1K squares only, not {ratio} {tier}")
        return DALL_E_2_SIZES[tier]
    if family == "gpt-image":
        if tier != "1K" or ratio not in GPT_IMAGE_SIZES:
            raise BadRequest(
                f"{remote_model} makes 1:1, 3:2 and 2:3 at 1K only, not {ratio} {tier}"
            )
        return GPT_IMAGE_SIZES[ratio]
    if family == "other" and aspect_ratio is None and size is None:
        return None
    table = GPT_IMAGE_2_SIZES.get(tier, {})
    return table.get(ratio) or _free_size(ratio, tier)


def parse_reset(value: str | None) -> float | None:
    """OpenAI's `x-ratelimit-reset-*` durations (`1s`, `6m0s`, `120ms`) in seconds."""
    if not value:
        return None
    parts = _DURATION.findall(value.strip())
    if not parts or "".join(n + u for n, u in parts) != value.strip():
        return None
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in parts)


class OpenAIImagesProvider:
    """The OpenAI Images API, or an OpenAI-compatible aggregator at another `base_url`."""

    name = "openai"
    usage_keep = 1000  # jobs whose `usage` block is remembered

    def __init__(
        self,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        *,
        session: aiohttp.ClientSession | None = None,
        max_image_bytes: int = MAX_IMAGE_BYTES,
        partial_images: int = 0,
    ) -> None:
        """`partial_images` > 0 streams gpt-image generations (SSE) and turns each partial
        image into progress; off by default, since not every aggregator streams."""
        if not api_key:
            raise ValueError("an API key is required")
        self._api_key = api_key
        self.base_url = base_url.rstrip("/")
        self._session = session
        self._owns_session = session is None
        self.max_image_bytes = max_image_bytes
        self.usage_by_job: dict[str, dict[str, Any]] = {}
        self.partial_images = max(0, min(3, partial_images))

    def __repr__(self) -> str:
        return f"OpenAIImagesProvider(base_url={self.base_url!r})"

    # -- the Provider protocol -------------------------------------------------------------

    async def generate(self, request: GenerationRequest, hooks: JobHooks) -> list[GeneratedImage]:
        family = model_family(request.remote_model)
        if request.n < 1:
            raise BadRequest("n must be at least 1")
        if request.n > MAX_N:
            raise BadRequest(f"n must be at most {MAX_N}")
        size = size_for(request.remote_model, request.aspect_ratio, request.size)
        refs = request.reference_images
        if refs:
            if family == "dall-e-3":
                raise BadRequest("dall-e-3 does not take reference images")
            if family == "dall-e-2" and len(refs) > 1:
                raise BadRequest("dall-e-2 edits take one image")
            if len(refs) > MAX_EDIT_IMAGES:
                raise BadRequest(f"at most {MAX_EDIT_IMAGES} reference images")
            if any(len(ref) > MAX_EDIT_IMAGE_BYTES for ref in refs):
                raise BadRequest("a reference image is over 50 MB")
        streams = family in ("gpt-image", "gpt-image-2") and not refs and request.n == 1
        if self.partial_images and streams:
            return await self._call_streaming(request, family, size, hooks)
        if family != "dall-e-3" or request.n == 1:
            return await self._call(request, family, size, request.n, hooks)
        images: list[GeneratedImage] = []
        for index in range(request.n):
            last = index == request.n - 1  # generating until the last call has answered
            try:
                images += await self._call(request, family, size, 1, hooks if last else None)
            except ProviderError as exc:
                if not images:
                    raise
                log.warning(
                    "job=%s: dall-e-3 call %d of %d failed (%s); keeping the %d image(s) made",
                    request.job_id,
                    index + 1,
                    request.n,
                    exc.kind.value,
                    len(images),
                )
                break
        return images

    async def aclose(self) -> None:
        if self._owns_session and self._session is not None:
            session, self._session = self._session, None
            await session.close()

    # -- one HTTP call ---------------------------------------------------------------------

    def _session_for_use(self) -> aiohttp.ClientSession:
        if self._session is None or (self._owns_session and self._session.closed):
            self._session = new_session()
            self._owns_session = True
        return self._session

    def _fields(
        self, request: GenerationRequest, family: str, size: str | None, n: int
    ) -> dict[str, str | int]:
        fields: dict[str, str | int] = {
            "model": request.remote_model,
            "prompt": request.prompt,
            "n": n,
            # A stable pseudonym per job for OpenAI's abuse monitoring; never a platform user id.
            "user": hashlib.sha256(request.job_id.encode()).hexdigest()[:32],
        }
        if size is not None:
            fields["size"] = size
        if family.startswith("dall-e"):
            fields["response_format"] = "b64_json"  # GPT-image models reject the field
        return fields

    def _body(
        self, request: GenerationRequest, family: str, size: str | None, n: int
    ) -> tuple[str, dict[str, Any]]:
        fields = self._fields(request, family, size, n)
        if not request.reference_images:
            return "/images/generations", {"json": fields}
        form = aiohttp.FormData()
        part = "image" if family == "dall-e-2" else "image[]"
        for index, ref in enumerate(request.reference_images):
            mime = sniff_mime(ref) or "image/png"
            form.add_field(
                part, ref, filename=f"image-{index + 1}{extension_for(mime)}", content_type=mime
            )
        for key, value in fields.items():
            form.add_field(key, str(value))
        return "/images/edits", {"data": form}

    async def _call(
        self,
        request: GenerationRequest,
        family: str,
        size: str | None,
        n: int,
        hooks: JobHooks | None,
    ) -> list[GeneratedImage]:
        """One call for `n` images; `hooks` hears `generated` if the last call has URLs."""
        path, body = self._body(request, family, size, n)
        session = self._session_for_use()
        timeout = aiohttp.ClientTimeout(
            total=request.timeout_s, sock_connect=min(30.0, request.timeout_s)
        )
        headers = {"Authorization": f"Bearer {self._api_key}", "Accept": "application/json"}
        began = time.monotonic()
        try:
            async with session.post(
                self.base_url + path, headers=headers, timeout=timeout, **body
            ) as resp:
                raw = await self._read(resp, n)
                status, resp_headers = resp.status, resp.headers
        except TimeoutError:
            raise Transient(
                f"no answer from the image API within {request.timeout_s:g} s"
            ) from None
        except aiohttp.ClientError as exc:
            raise Transient(f"the image API could not be reached ({type(exc).__name__})") from None
        log.debug(
            "job=%s %s -> %d in %.1f s (request id %s)",
            request.job_id,
            path,
            status,
            time.monotonic() - began,
            resp_headers.get("x-request-id", "-"),
        )
        if status >= 400:
            raise self._error(status, raw, resp_headers)
        payload = await off_loop(len(raw), partial(self._json, raw))
        if payload is None:
            raise Malformed(f"the image API sent an unreadable body (HTTP {status})")
        if isinstance(payload, dict) and payload.get("error") and not payload.get("data"):
            # Some relays report a failure that happened mid-generation with HTTP 200.
            code = payload["error"].get("code") if isinstance(payload["error"], dict) else None
            as_status = code if isinstance(code, int) and 400 <= code <= 599 else 502
            raise self._error(as_status, raw, resp_headers)
        return await self._images(request, payload, session, hooks, began + request.timeout_s)

    async def _call_streaming(
        self, request: GenerationRequest, family: str, size: str | None, hooks: JobHooks
    ) -> list[GeneratedImage]:
        """A gpt-image generation over SSE: each partial image is progress, then the image."""
        path, body = self._body(request, family, size, 1)
        fields = {**body["json"], "stream": True, "partial_images": self.partial_images}
        session = self._session_for_use()
        timeout = aiohttp.ClientTimeout(
            total=request.timeout_s, sock_connect=min(30.0, request.timeout_s)
        )
        headers = {"Authorization": f"Bearer {self._api_key}", "Accept": "text/event-stream"}
        steps = self.partial_images + 1
        deadline = time.monotonic() + request.timeout_s
        cap = (self.max_image_bytes * 4 // 3 + 4) * (steps + 1) + 1_000_000
        try:
            async with session.post(
                self.base_url + path, headers=headers, timeout=timeout, json=fields
            ) as resp:
                if resp.status >= 400 or "event-stream" not in resp.content_type:
                    raw = await self._read(resp, 1)
                    if resp.status >= 400:
                        raise self._error(resp.status, raw, resp.headers)
                    payload = self._json(raw)  # a relay that ignored `stream`
                    if payload is None:
                        raise Malformed("the image API sent an unreadable body")
                    return await self._images(request, payload, session, hooks, deadline)
                buffer, seen = b"", 0
                async for chunk in resp.content.iter_chunked(65536):
                    seen += len(chunk)
                    if seen > cap:
                        raise Transient("the image API sent a stream over the size cap")
                    # Events end in a blank line, of LF or CRLF line ends as the format allows.
                    buffer = (buffer + chunk).replace(b"\r\n", b"\n")
                    while b"\n\n" in buffer:
                        block, buffer = buffer.split(b"\n\n", 1)
                        event = self._sse_event(block)
                        if event is None:
                            continue
                        kind = str(event.get("type", ""))
                        if kind.endswith(".partial_image"):
                            index = event.get("partial_image_index", 0)
                            if isinstance(index, int) and not isinstance(index, bool):
                                await hooks.progress(max(0, min(100, 100 * (index + 1) // steps)))
                        elif kind.endswith(".completed"):
                            usage = event.get("usage")
                            if isinstance(usage, dict):
                                self._record_usage(request.job_id, usage)
                            b64 = event.get("b64_json")
                            if not isinstance(b64, str) or not b64:
                                raise Transient("the image stream ended without an image")
                            return [await decoded(b64, self.max_image_bytes)]
                        elif kind == "error" or "error" in event:
                            raw = json.dumps({"error": event.get("error", event)}).encode()
                            raise self._error(502, raw, resp.headers)
        except TimeoutError:
            raise Transient(
                f"no answer from the image API within {request.timeout_s:g} s"
            ) from None
        except aiohttp.ClientError as exc:
            raise Transient(f"the image stream broke ({type(exc).__name__})") from None
        raise Transient("the image stream ended without an image")

    @staticmethod
    def _sse_event(block: bytes) -> dict[str, Any] | None:
        data = b"".join(
            line[5:].strip() for line in block.splitlines() if line.startswith(b"data:")
        )
        if not data or data == b"[DONE]":
            return None
        try:
            event = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return None
        return event if isinstance(event, dict) else None

    async def _read(self, resp: aiohttp.ClientResponse, n: int) -> bytes:
        """The body, capped: n base64 images at most, plus room for JSON around them."""
        cap = (self.max_image_bytes * 4 // 3 + 4) * max(1, n) + 1_000_000
        return await read_capped(resp, cap, "the image API's body")

    @staticmethod
    def _json(raw: bytes) -> Any:
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return None

    async def _images(
        self,
        request: GenerationRequest,
        payload: Any,
        session: aiohttp.ClientSession,
        hooks: JobHooks | None,
        deadline: float,
    ) -> list[GeneratedImage]:
        """The answer's images, decoded or downloaded, by `deadline` (`time.monotonic`).

        Before the first download, `hooks.generated()`: the API has made the images, and the
        job's generating slot goes to the next job while they are fetched.
        """
        items = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(items, list) or not items:
            raise Transient("the image API answered without images")
        usage = payload.get("usage")
        if isinstance(usage, dict):
            self._record_usage(request.job_id, usage)
        images: list[GeneratedImage] = []
        broken: Transient | Expired | None = None
        for item in items:
            if not isinstance(item, dict):
                raise Transient("the image API sent a malformed image item")
            b64, url = item.get("b64_json"), item.get("url")
            inline = b64 if isinstance(b64, str) and b64 else None
            if inline is None and isinstance(url, str) and url.startswith("data:"):
                inline = url
            if inline is not None:
                # One unusable image of a batch does not throw away the others, which were
                # paid for too: a retry would buy the whole batch again. The user gets and
                # pays for the images that came (the job records how many).
                try:
                    images.append(await decoded(inline, self.max_image_bytes))
                except Transient as exc:
                    broken = exc
            elif isinstance(url, str) and url.startswith(("https://", "http://")):
                if hooks is not None:
                    hooks.generated()
                    hooks = None
                try:  # (as above: one broken or expired URL keeps the images that came)
                    images.append(
                        await download(
                            session,
                            url,
                            max_bytes=self.max_image_bytes,
                            timeout_s=max(0.05, min(120.0, deadline - time.monotonic())),
                        )
                    )
                except (Transient, Expired) as exc:
                    broken = exc
            else:
                raise Transient("the image API sent an item with neither b64_json nor url")
        if broken is not None:
            if not images:
                raise broken
            log.warning(
                "job=%s: %d of %d images could not be used (%s); delivering the rest",
                request.job_id,
                len(items) - len(images),
                len(items),
                broken,
            )
        return images

    def _record_usage(self, job_id: str, usage: dict[str, Any]) -> None:
        previous = self.usage_by_job.pop(job_id, None)
        self.usage_by_job[job_id] = _add_usage(previous, usage) if previous else usage
        while len(self.usage_by_job) > self.usage_keep:
            del self.usage_by_job[next(iter(self.usage_by_job))]

    # -- errors ----------------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        text = text.replace(self._api_key, "***")
        return _KEYLIKE.sub("***", text)[:300]

    def _error(self, status: int, raw: bytes, headers: Mapping[str, str]) -> ProviderError:
        payload = self._json(raw)
        error = payload.get("error") if isinstance(payload, dict) else None
        message = code = etype = param = ""
        if isinstance(error, dict):
            message = str(error.get("message") or "")
            code = self._redact(str(error.get("code") or ""))[:100]
            etype = str(error.get("type") or "")
            param = str(error.get("param") or "")
        elif isinstance(error, str):
            message = error
        elif isinstance(payload, dict) and isinstance(payload.get("message"), str):
            message = payload["message"]
        message = self._redact(message)
        marks = f"{code} {etype} {message}".lower()
        label = f"HTTP {status}" + (f" {code}" if code else "")

        refused = any(mark in marks for mark in REFUSAL_CODES)
        if refused or (status == 400 and "safety system" in marks):
            return Refused(f"the image API refused the prompt ({label}): {message}".rstrip(": "))
        if status in (401, 403):
            log.warning(
                "the image API at %s rejected the API key (%s): check OPENAI_API_KEY%s",
                self.base_url,
                label,
                f" ({message})" if status == 403 and message else "",
            )
            # The server's 401 message echoes a masked key: it is not repeated here.
            return AuthFailed(f"the image API rejected the API key ({label})")
        if status == 402 or any(mark in marks for mark in QUOTA_CODES):
            # Out of credits. AuthFailed, not RateLimited: it is never retried (waiting does not
            # top up an account), it is not the user's fault (so not BadRequest), and the engine
            # treats it as the operator's problem, like a rejected key.
            log.warning(
                "the image API at %s says the account is out of quota (%s)", self.base_url, label
            )
            return AuthFailed(f"the image API account is out of quota or credits ({label})")
        retry_after = parse_retry_after(headers)
        if status == 429:
            if retry_after is None and headers.get("x-ratelimit-remaining-requests") == "0":
                retry_after = parse_reset(headers.get("x-ratelimit-reset-requests"))
            return RateLimited(f"the image API is rate limiting ({label})", retry_after=retry_after)
        if status in (408, 409, 425) or status >= 500:
            exc: ProviderError = Transient(
                f"the image API failed ({label}){': ' + message if message else ''}",
                retry_after=retry_after,
            )
            if headers.get("x-should-retry", "").lower() == "false":
                exc.retryable = False  # the server says another try will not help
            return exc
        if param == "model" or says_model_gone(marks):
            log.warning("the image API does not serve the model (%s): check MODELS_FILE", label)
            return ModelUnavailable(f"the image API does not serve the model ({label}): {message}")
        return BadRequest(f"the image API rejected the request ({label}): {message}".rstrip(": "))


def _add_usage(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two `usage` blocks summed field by field (one job, several calls)."""
    out = dict(a)
    for key, value in b.items():
        mine = out.get(key)
        if isinstance(value, dict) and isinstance(mine, dict):
            out[key] = _add_usage(mine, value)
        elif isinstance(value, int | float) and isinstance(mine, int | float):
            out[key] = mine + value
        else:
            out[key] = value
    return out
