"""A loopback fake of the OpenAI Images API (and the OpenAI-compatible relays that copy it).

It speaks the real protocol closely enough that the official `openai` SDK works against it
(`tests/test_provider_openai.py` proves that), so tests of drawbridge's own client mean something:

- `POST /v1/images/generations` (JSON) and `POST /v1/images/edits` (multipart: `image`, repeated
  `image[]`, `mask`), `Authorization: Bearer` checked, fields validated the way the API does
  (unknown model or parameter, `n` limits, sizes per model, `response_format` on GPT-image models,
  transparent JPEG), errors in the real shape `{"error": {"message", "type", "param", "code"}}`.
- Real PNG bytes (Pillow) of the size asked for, as `b64_json` or as a `url` the fake serves at
  `/files/{name}`; a `usage` block for GPT-image models; `x-request-id` and the six
  `x-ratelimit-*` headers on every answer; SSE streaming for `stream: true`.
- Faults per test: `fake.fail_next("rate_limit", retry_after="2")`, or a per-request header
  `X-Fake-Scenario: kind[:variant]`. Kinds: `rate_limit`, `insufficient_quota`, `server_error`
  (`status=503`, `should_retry="false"`), `forbidden`, `moderation` (variant `relay`: a relay's
  500 with the code only in the message), `content_policy`, `hang`,
  `slow` (`delay=`), `malformed` (variants `truncated`, `html`, `empty`, `no_data`, `not_image`,
  `bad_base64`), `error_200` (an HTTP 200 carrying an error body, as some relays do).
- Expired result URLs: `fake.files_status = 404` (or 403), or `fake.file_ttl = seconds`.
- Relay behaviour (§7.4): `url_output=True` answers URLs even for GPT-image models,
  `request_id_suffix=True` appends `(request id: …)` to error messages; `reject_response_format`
  (on by default, as api.openai.com does) answers 400 `unknown_parameter` to `response_format`
  sent with a GPT-image model — switch it off to play a lenient relay; `extra_models` adds a
  relay's own model names (validated like gpt-image-2: any size within its limits).

Every request is recorded (`fake.requests`), with JSON bodies, multipart text fields and file
parts (name, filename, content type, bytes), so tests can assert what a client sent.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from aiohttp import BodyPartReader, web
from PIL import Image

from tests.fakes import LISTEN_BACKLOG, quick_form_headers

DEFAULT_KEY = "sk-fake-0123456789abcdefTESTKEY"

GPT_IMAGE_MODELS = {
    "gpt-image-1",
    "gpt-image-1-mini",
    "gpt-image-1.5",
    "gpt-image-2",
    "gpt-image-2-2026-04-21",
    "chatgpt-image-latest",
}
DALL_E_MODELS = {"dall-e-2", "dall-e-3"}
MODELS = GPT_IMAGE_MODELS | DALL_E_MODELS

COMMON_PARAMS = {
    "model",
    "prompt",
    "n",
    "size",
    "quality",
    "background",
    "output_format",
    "output_compression",
    "response_format",
    "stream",
    "partial_images",
    "user",
    "safety_identifier",
}
GENERATION_PARAMS = COMMON_PARAMS | {"moderation", "style"}
EDIT_PARAMS = COMMON_PARAMS | {"image", "image[]", "mask", "input_fidelity"}

PROMPT_LIMITS = {"dall-e-2": 1000, "dall-e-3": 4000}
GPT_IMAGE_SIZES = {"auto", "1024x1024", "1536x1024", "1024x1536"}
DALL_E_SIZES = {
    "dall-e-2": {"256x256", "512x512", "1024x1024"},
    "dall-e-3": {"1024x1024", "1792x1024", "1024x1792"},
}
QUALITIES = {
    "gpt-image": {"auto", "low", "medium", "high"},
    "dall-e-3": {"standard", "hd"},
    "dall-e-2": {"standard"},
}
FAULT_KINDS = {
    "rate_limit",
    "insufficient_quota",
    "server_error",
    "forbidden",
    "moderation",
    "content_policy",
    "hang",
    "slow",
    "malformed",
    "error_200",
}
_PIXELS = re.compile(r"^(\d+)x(\d+)$")


@dataclass
class Part:
    """A file part of a multipart request."""

    name: str
    filename: str | None
    content_type: str | None
    data: bytes


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    json: Any = None
    fields: dict[str, str] = field(default_factory=dict)
    files: list[Part] = field(default_factory=list)

    @property
    def part_names(self) -> list[str]:
        return [p.name for p in self.files]


@dataclass
class Fault:
    kind: str
    variant: str = ""
    status: int | None = None
    retry_after: str | None = None
    retry_after_ms: str | None = None
    should_retry: str | None = None
    exhaust_requests: bool = False  # x-ratelimit-remaining-requests: 0 on the answer
    delay: float = 0.0


class ApiError(Exception):
    """An error answer in the API's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}


def invalid_value(param: str, value: object, supported: list[str]) -> ApiError:
    listed = ", ".join(f"'{s}'" for s in supported[:-1]) + f", and '{supported[-1]}'"
    return ApiError(
        400,
        f"Invalid value: '{value}'. Supported values are: {listed}.",
        param=param,
        code="invalid_value",
    )


def unknown_parameter(name: str) -> ApiError:
    return ApiError(400, f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter")


@lru_cache(maxsize=64)
def png(width: int, height: int, color: tuple[int, int, int] = (40, 120, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def mask_key(key: str) -> str:
    return key[:3] + "*" * max(0, len(key) - 7) + key[-4:] if len(key) > 8 else "***"


class FakeOpenAI:
    """Start with `async with FakeOpenAI() as fake:`; point clients at `fake.base_url`."""

    def __init__(
        self,
        api_key: str = DEFAULT_KEY,
        *,
        reject_response_format: bool = True,
        url_output: bool = False,
        request_id_suffix: bool = False,
        extra_models: Iterable[str] = (),
    ) -> None:
        self.api_key = api_key
        self.extra_models = set(extra_models)
        self.reject_response_format = reject_response_format
        self.url_output = url_output
        self.request_id_suffix = request_id_suffix
        self.requests: list[RecordedRequest] = []
        self.faults: list[Fault] = []
        self.files: dict[str, tuple[bytes, float]] = {}
        self.files_status: int | None = None
        self.file_ttl: float | None = None
        self.rate_limit_requests = 500
        self._remaining = self.rate_limit_requests
        self._counter = 0
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.root = ""

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return self.root + "/v1"

    async def __aenter__(self) -> FakeOpenAI:
        quick_form_headers()
        app = web.Application(client_max_size=200 * 1024 * 1024)
        app.router.add_post("/v1/images/generations", self._wrap(self._generations))
        app.router.add_post("/v1/images/edits", self._wrap(self._edits))
        app.router.add_get("/files/{name}", self._file)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=LISTEN_BACKLOG)
        await site.start()
        port = self._runner.addresses[0][1]
        self.root = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- test controls ---------------------------------------------------------------------

    def fail_next(self, kind: str, times: int = 1, **options: Any) -> None:
        """Answer the next `times` image requests with a fault instead of (or before) success."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}")
        self.faults.extend(Fault(kind, **options) for _ in range(times))

    def calls(self, path_end: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.endswith(path_end)]

    @property
    def image_calls(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.startswith("/v1/images/")]

    # -- plumbing --------------------------------------------------------------------------

    def _request_id(self) -> str:
        self._counter += 1
        return f"req_{self._counter:024x}"

    def _headers(self, request_id: str, fault: Fault | None = None) -> dict[str, str]:
        self._remaining = max(0, self._remaining - 1)
        exhausted = fault is not None and fault.exhaust_requests
        return {
            "x-request-id": request_id,
            "openai-processing-ms": "12",
            "openai-version": "2020-10-01",
            "x-ratelimit-limit-requests": str(self.rate_limit_requests),
            "x-ratelimit-limit-tokens": "100000",
            "x-ratelimit-remaining-requests": "0" if exhausted else str(self._remaining),
            "x-ratelimit-remaining-tokens": "99000",
            "x-ratelimit-reset-requests": "3s" if exhausted else "120ms",
            "x-ratelimit-reset-tokens": "6m0s",
        }

    def _error_response(
        self, err: ApiError, request_id: str, fault: Fault | None = None
    ) -> web.Response:
        message = err.message
        if self.request_id_suffix:
            message += f" (request id: {request_id})"
        body = {
            "error": {"message": message, "type": err.type, "param": err.param, "code": err.code}
        }
        headers = self._headers(request_id, fault)
        headers.update(err.headers)
        return web.json_response(body, status=err.status, headers=headers)

    def _wrap(
        self, handler: Callable[[web.Request, RecordedRequest, str, Fault | None], Awaitable[Any]]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def run(request: web.Request) -> web.StreamResponse:
            record = RecordedRequest(request.method, request.path, dict(request.headers))
            self.requests.append(record)
            request_id = self._request_id()
            fault = self._scenario(request)
            try:
                self._check_auth(request)
                result = await handler(request, record, request_id, fault)
            except ApiError as err:
                return self._error_response(err, request_id, fault)
            if isinstance(result, web.StreamResponse):
                return result
            return web.json_response(result, headers=self._headers(request_id, fault))

        return run

    def _scenario(self, request: web.Request) -> Fault | None:
        header = request.headers.get("X-Fake-Scenario")
        if header:
            kind, _, variant = header.partition(":")
            return Fault(kind.strip(), variant.strip())
        return self.faults.pop(0) if self.faults else None

    def _check_auth(self, request: web.Request) -> None:
        auth = request.headers.get("Authorization", "")
        scheme, _, key = auth.partition(" ")
        if not auth or scheme.lower() != "bearer" or not key.strip():
            raise ApiError(
                401,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), "
                "or as the password field (with blank username) if you're accessing the API "
                "from your browser and are prompted for a username and password. You can obtain "
                "an API key from https://platform.openai.com/account/api-keys.",
            )
        if key.strip() != self.api_key:
            raise ApiError(
                401,
                f"Incorrect API key provided: {mask_key(key.strip())}. You can find your API key "
                "at https://platform.openai.com/account/api-keys.",
                code="invalid_api_key",
            )

    # -- routes ----------------------------------------------------------------------------

    async def _generations(
        self, request: web.Request, record: RecordedRequest, request_id: str, fault: Fault | None
    ) -> Any:
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(
                400,
                "We could not parse the JSON body of your request. (HINT: This likely means you "
                "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, "
                "but what was sent was not valid JSON.)",
            ) from None
        record.json = body
        if not isinstance(body, dict):
            raise ApiError(400, "Invalid type for request body: expected an object.")
        for name in body:
            if name not in GENERATION_PARAMS:
                raise unknown_parameter(name)
        model = body.get("model", "dall-e-2")
        params = self._validate(body, model, edit=False, n_images=0)
        return await self._answer(request, request_id, fault, params)

    async def _edits(
        self, request: web.Request, record: RecordedRequest, request_id: str, fault: Fault | None
    ) -> Any:
        if not request.content_type.startswith("multipart/"):
            raise ApiError(
                400,
                "Invalid Content-Type header (application/json), expected multipart/form-data.",
            )
        reader = await request.multipart()
        while True:
            part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise ApiError(400, "Nested multipart bodies are not supported.")
            name = part.name or ""
            if part.filename is not None:
                data = await part.read(decode=False)
                ctype = part.headers.get("Content-Type")
                record.files.append(Part(name, part.filename, ctype, bytes(data)))
            else:
                record.fields[name] = await part.text()
        for name in [*record.fields, *record.part_names]:
            if name not in EDIT_PARAMS:
                raise unknown_parameter(name)
        images = [p for p in record.files if p.name in ("image", "image[]")]
        if not images:
            raise ApiError(
                400,
                "Missing required parameter: 'image'.",
                param="image",
                code="missing_required_parameter",
            )
        for image in images:
            if _sniff(image.data) is None:
                raise ApiError(
                    400,
                    f"Invalid file '{image.name}': unsupported mimetype "
                    f"('{image.content_type}'). Supported file formats are 'image/jpeg', "
                    "'image/png', and 'image/webp'.",
                    param=image.name,
                    code="unsupported_file_mimetype",
                )
        body: dict[str, Any] = dict(record.fields)
        for key in ("n", "output_compression", "partial_images"):
            if key in body:
                try:
                    body[key] = int(body[key])
                except ValueError:
                    raise ApiError(
                        400,
                        f"Invalid type for '{key}': expected an integer, but got a string instead.",
                        param=key,
                        code="invalid_type",
                    ) from None
        if "stream" in body:
            body["stream"] = body["stream"].lower() == "true"
        model = body.get("model", "gpt-image-1.5")
        if model == "dall-e-3":
            raise invalid_value("model", model, sorted(GPT_IMAGE_MODELS | {"dall-e-2"}))
        limit = 16 if model in GPT_IMAGE_MODELS else 1
        if len(images) > limit:
            raise ApiError(
                400,
                f"Invalid 'image': array too long. Expected an array with maximum length {limit}, "
                f"but got an array with length {len(images)} instead.",
                param="image",
                code="array_above_max_length",
            )
        params = self._validate(body, model, edit=True, n_images=len(images))
        return await self._answer(request, request_id, fault, params)

    async def _file(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(RecordedRequest(request.method, request.path, dict(request.headers)))
        name = request.match_info["name"]
        stored = self.files.get(name)
        if self.files_status is not None:
            status = self.files_status
        elif stored is None:
            status = 404
        elif self.file_ttl is not None and time.monotonic() - stored[1] > self.file_ttl:
            status = 403  # an expired SAS URL answers 403, as Azure blob storage does
        else:
            return web.Response(body=stored[0], content_type="image/png")
        code = "BlobNotFound" if status == 404 else "AuthenticationFailed"
        xml = f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code></Error>'
        return web.Response(status=status, text=xml, content_type="application/xml")

    # -- validation and answers ------------------------------------------------------------

    def _validate(
        self, body: dict[str, Any], model: object, *, edit: bool, n_images: int
    ) -> dict[str, Any]:
        known = MODELS | self.extra_models
        if not isinstance(model, str) or model not in known:
            raise invalid_value("model", model, sorted(known))
        family = "gpt-image" if model in GPT_IMAGE_MODELS | self.extra_models else model
        prompt = body.get("prompt")
        if prompt is None:
            raise ApiError(
                400,
                "Missing required parameter: 'prompt'.",
                param="prompt",
                code="missing_required_parameter",
            )
        if not isinstance(prompt, str):
            raise ApiError(
                400,
                "Invalid type for 'prompt': expected a string.",
                param="prompt",
                code="invalid_type",
            )
        limit = PROMPT_LIMITS.get(model, 32000)
        if len(prompt) > limit:
            raise ApiError(
                400,
                f"Invalid 'prompt': string too long. Expected a string with maximum length "
                f"{limit}, but got a string with length {len(prompt)} instead.",
                param="prompt",
                code="string_above_max_length",
            )
        n = body.get("n", 1)
        if isinstance(n, bool) or not isinstance(n, int):
            raise ApiError(
                400,
                f"Invalid type for 'n': expected an integer, but got {type(n).__name__} instead.",
                param="n",
                code="invalid_type",
            )
        if n < 1:
            raise ApiError(
                400,
                f"Invalid 'n': integer below minimum value. Expected a value >= 1, but got {n} "
                "instead.",
                param="n",
                code="integer_below_min_value",
            )
        if n > 10:
            raise ApiError(
                400,
                f"Invalid 'n': integer above maximum value. Expected a value <= 10, but got {n} "
                "instead.",
                param="n",
                code="integer_above_max_value",
            )
        if model == "dall-e-3" and n != 1:
            raise ApiError(400, "You must provide n=1 for this model.", param="n")
        size = body.get("size", "1024x1024" if family != "gpt-image" else "auto")
        free = model.startswith("gpt-image-2") or model in self.extra_models
        width, height = self._check_size(model, family, size, free)
        response_format = body.get("response_format")
        if response_format is not None:
            if family == "gpt-image":
                if self.reject_response_format:
                    raise unknown_parameter("response_format")
                response_format = None  # a lenient relay drops it
            elif response_format not in ("url", "b64_json"):
                raise invalid_value("response_format", response_format, ["url", "b64_json"])
        quality = body.get("quality")
        if quality is not None and quality not in QUALITIES[family]:
            raise invalid_value("quality", quality, sorted(QUALITIES[family]))
        for name in ("output_format", "output_compression", "background", "moderation"):
            if name in body and family != "gpt-image":
                raise unknown_parameter(name)
        output_format = body.get("output_format", "png")
        if output_format not in ("png", "jpeg", "webp"):
            raise invalid_value("output_format", output_format, ["png", "jpeg", "webp"])
        if body.get("background") == "transparent" and output_format == "jpeg":
            raise ApiError(
                400,
                "Transparent background is not supported for output format 'jpeg'. Use 'png' "
                "or 'webp'.",
                param="background",
                code="invalid_value",
            )
        if "style" in body and model != "dall-e-3":
            raise unknown_parameter("style")
        return {
            "model": model,
            "family": family,
            "prompt": prompt,
            "n": n,
            "width": width,
            "height": height,
            "size": f"{width}x{height}",
            "response_format": response_format or ("url" if family != "gpt-image" else "b64_json"),
            "quality": quality or ("medium" if family == "gpt-image" else "standard"),
            "stream": bool(body.get("stream")),
            "partial_images": int(body.get("partial_images") or 0),
            "edit": edit,
            "n_images": n_images,
        }

    @staticmethod
    def _check_size(model: str, family: str, size: object, free: bool) -> tuple[int, int]:
        if not isinstance(size, str):
            raise ApiError(400, "Invalid type for 'size': expected a string.", param="size")
        if family != "gpt-image":
            allowed = DALL_E_SIZES[model]
            if size not in allowed:
                raise invalid_value("size", size, sorted(allowed))
        elif size == "auto":
            return 1024, 1024
        elif free:
            match = _PIXELS.match(size)
            if match is None:
                raise invalid_value("size", size, ["auto", "WIDTHxHEIGHT"])
            w, h = int(match[1]), int(match[2])
            problem = None
            if w % 16 or h % 16:
                problem = "both sides must be multiples of 16"
            elif max(w, h) > 3 * min(w, h):
                problem = "the aspect ratio must be between 1:3 and 3:1"
            elif max(w, h) > 3840 or w * h > 3840 * 2160:
                problem = "the image may be at most 3840x2160 pixels"
            if problem:
                raise ApiError(
                    400, f"Invalid size '{size}': {problem}.", param="size", code="invalid_value"
                )
            return w, h
        elif size not in GPT_IMAGE_SIZES:
            raise invalid_value("size", size, sorted(GPT_IMAGE_SIZES))
        match = _PIXELS.match(size)
        assert match is not None
        return int(match[1]), int(match[2])

    async def _answer(
        self, request: web.Request, request_id: str, fault: Fault | None, p: dict[str, Any]
    ) -> Any:
        if fault is not None:
            early = await self._fault(request_id, fault, p)
            if early is not None:
                return early
        image = png(p["width"], p["height"])
        use_url = p["response_format"] == "url" or self.url_output
        items: list[dict[str, Any]] = []
        for _ in range(p["n"]):
            if use_url:
                name = f"img-{self._counter}-{len(self.files)}.png"
                self.files[name] = (image, time.monotonic())
                item: dict[str, Any] = {"url": f"{self.root}/files/{name}"}
            else:
                item = {"b64_json": base64.b64encode(image).decode()}
            if p["model"] == "dall-e-3":
                item["revised_prompt"] = f"A detailed picture: {p['prompt']}"
            items.append(item)
        body: dict[str, Any] = {"created": int(time.time()), "data": items}
        if p["family"] == "gpt-image":
            body.update(
                background="opaque",
                output_format="png",
                quality=p["quality"],
                size=p["size"],
                usage=self._usage(p),
            )
        if p["stream"] and p["family"] == "gpt-image":
            return await self._stream(request, request_id, p, body)
        if fault is not None and fault.kind == "malformed":
            return self._malformed(fault.variant, body, request_id)
        return body

    @staticmethod
    def _usage(p: dict[str, Any]) -> dict[str, Any]:
        text_tokens = max(1, len(p["prompt"]) // 4)
        image_in = 323 * p["n_images"]
        out = p["n"] * max(16, p["width"] * p["height"] // 1000)
        return {
            "input_tokens": text_tokens + image_in,
            "input_tokens_details": {"text_tokens": text_tokens, "image_tokens": image_in},
            "output_tokens": out,
            "output_tokens_details": {"image_tokens": out, "text_tokens": 0},
            "total_tokens": text_tokens + image_in + out,
        }

    async def _fault(self, request_id: str, fault: Fault, p: dict[str, Any]) -> Any:
        kind = fault.kind
        if kind == "rate_limit":
            headers = {}
            if fault.retry_after is not None:
                headers["retry-after"] = fault.retry_after
            if fault.retry_after_ms is not None:
                headers["retry-after-ms"] = fault.retry_after_ms
            raise ApiError(
                429,
                "Rate limit exceeded for images per minute in organization org-fake. "
                "Limit: 5/1min. Current: 6/1min. Please visit "
                "https://platform.openai.com/docs/guides/rate-limits to learn more.",
                type_="requests",
                code="rate_limit_exceeded",
                headers=headers,
            )
        if kind == "insufficient_quota":
            raise ApiError(
                429,
                "You exceeded your current quota, please check your plan and billing details. "
                "For more information on this error, read the docs: "
                "https://platform.openai.com/docs/guides/error-codes/api-errors.",
                type_="insufficient_quota",
                code="insufficient_quota",
            )
        if kind == "server_error":
            status = fault.status or 500
            message = (
                "The engine is currently overloaded, please try again later."
                if status == 503
                else "The server had an error while processing your request. Sorry about that!"
            )
            headers = {} if fault.should_retry is None else {"x-should-retry": fault.should_retry}
            if fault.retry_after is not None:
                headers["retry-after"] = fault.retry_after
            raise ApiError(status, message, type_="server_error", headers=headers)
        if kind == "forbidden":
            raise ApiError(
                403,
                f"Your organization must be verified to use the model `{p['model']}`. Please go "
                "to: https://platform.openai.com/settings/organization/general and click on "
                "Verify Organization.",
            )
        if kind == "moderation" and fault.variant == "relay":
            # A relay that wraps the upstream refusal in its own error, code only in the text.
            raise ApiError(
                fault.status or 500,
                "upstream error: status 400, moderation_blocked: Your request was rejected by "
                "the safety system.",
                type_="new_api_error",
            )
        if kind == "moderation":
            raise ApiError(
                400,
                "Your request was rejected by the safety system. If you believe this is an "
                f"error, contact us at help.openai.com and include the request ID {request_id}.",
                type_="image_generation_user_error",
                code="moderation_blocked",
            )
        if kind == "content_policy":
            raise ApiError(
                400,
                "Your request was rejected as a result of our safety system. Your prompt may "
                "contain text that is not allowed by our safety system.",
                code="content_policy_violation",
            )
        if kind == "hang":
            await self._release.wait()
            raise ApiError(503, "The fake is shutting down.", type_="server_error")
        if kind == "slow":
            await asyncio.sleep(fault.delay or 5.0)
            return None
        if kind == "error_200":
            body = {
                "error": {
                    "message": "upstream error: do request failed",
                    "type": "upstream_error",
                    "param": None,
                    "code": 502,
                }
            }
            return web.json_response(body, headers=self._headers(request_id))
        return None  # malformed: shaped after the success body

    def _malformed(self, variant: str, body: dict[str, Any], request_id: str) -> web.Response:
        headers = self._headers(request_id)
        if variant == "html":
            return web.Response(
                text="<html><body><h1>502 Bad Gateway</h1></body></html>",
                content_type="text/html",
                headers=headers,
            )
        if variant == "empty":
            return web.Response(body=b"", content_type="application/json", headers=headers)
        if variant == "no_data":
            body = {k: v for k, v in body.items() if k != "data"}
        elif variant == "not_image":
            body["data"] = [{"b64_json": base64.b64encode(b"this is not a picture").decode()}]
        elif variant == "bad_base64":
            body["data"] = [{"b64_json": "%%%not-base64%%%"}]
        text = json.dumps(body)
        if variant in ("", "truncated"):
            text = text[: len(text) // 2]
        return web.Response(text=text, content_type="application/json", headers=headers)

    async def _stream(
        self, request: web.Request, request_id: str, p: dict[str, Any], body: dict[str, Any]
    ) -> web.StreamResponse:
        prefix = "image_edit" if p["edit"] else "image_generation"
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", **self._headers(request_id)}
        )
        await resp.prepare(request)
        common = {
            "background": "opaque",
            "output_format": "png",
            "quality": p["quality"],
            "size": p["size"],
            "created_at": body["created"],
        }
        b64 = body["data"][0].get("b64_json") or base64.b64encode(png(8, 8)).decode()
        for index in range(p["partial_images"]):
            event = {
                "type": f"{prefix}.partial_image",
                "b64_json": base64.b64encode(png(8, 8, (index * 40, 0, 0))).decode(),
                "partial_image_index": index,
                **common,
            }
            await resp.write(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())
        done = {"type": f"{prefix}.completed", "b64_json": b64, "usage": body["usage"], **common}
        await resp.write(f"event: {done['type']}\ndata: {json.dumps(done)}\n\n".encode())
        await resp.write_eof()
        return resp


def _sniff(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None
