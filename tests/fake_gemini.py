"""A loopback fake of the Gemini API's `models/{model}:generateContent`, for offline tests.

Faithful to /work/shared/reference/providers.md §3 and §7.3, close enough that the official
`google-genai` SDK talks to it unchanged:

- auth by `x-goog-api-key` (or `?key=`); a missing key is 403 `PERMISSION_DENIED`, a wrong one
  400 `INVALID_ARGUMENT` with `ErrorInfo.reason: API_KEY_INVALID`, as the real API answers;
- an unknown model is 404 `NOT_FOUND`; unknown fields in `generationConfig`/`imageConfig`, a bad
  `responseModalities`, `aspectRatio` or `imageSize` are 400 `INVALID_ARGUMENT`; both camelCase
  and snake_case field names are accepted on input (proto-JSON), answers are camelCase;
- success is a text part plus a real PNG (Pillow) at the requested aspect ratio as `inlineData`,
  `finishReason: STOP`, `usageMetadata`, `modelVersion`, `responseId`.

Faults are chosen per call: `fake.faults` (a queue, one per call), else `fake.fault` (every
call), else the `X-Fake-Scenario` request header. See `SCENARIOS`. Every request is recorded in
`fake.requests` so tests can assert what the client sent.

    async with FakeGemini() as fake:
        fake.faults.append("rate_limit")
        ... fake.base_url ...  # "http://127.0.0.1:PORT/v1beta"
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import json
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiohttp import web
from PIL import Image

from tests.fakes import LISTEN_BACKLOG

DEFAULT_KEY = "fake-gemini-key"

BASE_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")


@dataclass(frozen=True)
class ModelSpec:
    """What one model accepts. `sizes` empty: `imageSize` is accepted but ignored (2.5-flash)."""

    ratios: tuple[str, ...] = BASE_RATIOS
    sizes: tuple[str, ...] = ()


DEFAULT_MODELS: dict[str, ModelSpec] = {
    "gemini-2.5-flash-image": ModelSpec(sizes=()),
    "gemini-3-pro-image-preview": ModelSpec(sizes=("1K", "2K", "4K")),
    "gemini-3.1-flash-image-preview": ModelSpec(
        ratios=(*BASE_RATIOS, "1:4", "4:1", "1:8", "8:1"), sizes=("512", "1K", "2K", "4K")
    ),
}

SIZE_PIXELS = {"512": 512, "1K": 1024, "2K": 2048, "4K": 4096}

SCENARIOS = {
    "ok": "success (the default)",
    "snake_case": "success, with the answer's field names in snake_case (some proxies do this)",
    "thought_image": "an interim `thought: true` image before the final one",
    "rate_limit": "429 RESOURCE_EXHAUSTED, per-minute QuotaFailure + RetryInfo.retryDelay",
    "rate_limit_daily": "429 RESOURCE_EXHAUSTED with a per-day quota id",
    "rate_limit_bare": "429 RESOURCE_EXHAUSTED without RetryInfo, with a Retry-After header",
    "internal": "500 INTERNAL",
    "overloaded": "503 UNAVAILABLE, 'The model is overloaded. Please try again later.'",
    "deadline": "504 DEADLINE_EXCEEDED",
    "hang": "accept the request and never answer (until the fake closes)",
    "slow": "answer after `slow_delay` seconds",
    "blocked": "200, no candidates, promptFeedback.blockReason = `block_reason`",
    "image_safety": "200, finishReason IMAGE_SAFETY with empty content",
    "no_image": "200, finishReason NO_IMAGE with empty content",
    "text_only": "200, a text part and no image, finishReason STOP",
    "missing_content": "200, a candidate without `content` (malformed)",
    "truncated": "200, truncated JSON",
    "empty": "200, an empty body",
    "html": "502 with an HTML error page",
}

_ERROR_TYPE = "type.googleapis.com/google.rpc."


@dataclass
class RecordedRequest:
    method: str
    path: str
    model: str
    method_name: str
    query: dict[str, str]
    headers: dict[str, str]
    raw: bytes
    body: Any = None

    @property
    def generation_config(self) -> dict[str, Any]:
        config = _pick(self.body, "generationConfig", "generation_config")
        return config if isinstance(config, dict) else {}

    @property
    def image_config(self) -> dict[str, Any]:
        config = _pick(self.generation_config, "imageConfig", "image_config")
        return config if isinstance(config, dict) else {}

    @property
    def parts(self) -> list[dict[str, Any]]:
        contents = _pick(self.body, "contents") or []
        return [p for c in contents for p in (_pick(c, "parts") or [])]


@dataclass
class FakeGemini:
    """The fake server; an async context manager that binds 127.0.0.1 on a free port."""

    api_key: str = DEFAULT_KEY
    models: dict[str, ModelSpec] = field(default_factory=lambda: dict(DEFAULT_MODELS))
    scale: int = 8  # images are 1/scale of the real pixel size, to keep tests fast
    faults: list[str] = field(default_factory=list)
    fault: str | None = None
    retry_delay: str = "2s"
    retry_after_header: str = "3"
    block_reason: str = "PROHIBITED_CONTENT"
    slow_delay: float = 0.5
    requests: list[RecordedRequest] = field(default_factory=list)
    responses: list[dict[str, Any]] = field(default_factory=list)  # successful answers sent
    in_flight: int = 0
    max_in_flight: int = 0
    port: int = 0
    _runner: web.AppRunner | None = field(default=None, init=False, repr=False)
    _release: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)

    @property
    def root_url(self) -> str:
        """The API root without a version, as the SDK's `HttpOptions.base_url` takes it."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1beta"

    def calls(self, model: str | None = None) -> list[RecordedRequest]:
        """Recorded `generateContent` calls, optionally for one model."""
        return [
            r
            for r in self.requests
            if r.method_name == "generateContent" and (model is None or r.model == model)
        ]

    async def start(self) -> FakeGemini:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1beta/models/{model:[^/:]+}:{method}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=LISTEN_BACKLOG)
        await site.start()
        address = self._runner.addresses[0]
        self.port = int(address[1])
        return self

    async def close(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeGemini:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- the endpoint ----------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        record = RecordedRequest(
            method=request.method,
            path=request.path,
            model=request.match_info["model"],
            method_name=request.match_info["method"],
            query=dict(request.query),
            headers=dict(request.headers),
            raw=raw,
        )
        try:
            record.body = json.loads(raw) if raw else None
        except ValueError:
            record.body = None
        self.requests.append(record)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer(request, record)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        key = request.headers.get("x-goog-api-key") or request.query.get("key")
        if not key:
            return google_error(
                403,
                "PERMISSION_DENIED",
                "Method doesn't allow unregistered callers (callers without established "
                "identity). Please use API Key or other form of API consumer identity to call "
                "this API.",
            )
        if key != self.api_key:
            return google_error(
                400,
                "INVALID_ARGUMENT",
                "API key not valid. Please pass a valid API key.",
                [
                    {
                        "@type": _ERROR_TYPE + "ErrorInfo",
                        "reason": "API_KEY_INVALID",
                        "domain": "googleapis.com",
                        "metadata": {"service": "generativelanguage.googleapis.com"},
                    },
                    {
                        "@type": _ERROR_TYPE + "LocalizedMessage",
                        "locale": "en-US",
                        "message": "API key not valid. Please pass a valid API key.",
                    },
                ],
            )
        spec = self.models.get(record.model)
        if spec is None or record.method_name != "generateContent":
            return google_error(
                404,
                "NOT_FOUND",
                f"models/{record.model} is not found for API version v1beta, or is not "
                f"supported for {record.method_name}. Call ListModels to see the list of "
                "available models and their supported methods.",
            )
        if record.body is None or not isinstance(record.body, dict):
            return invalid("Invalid JSON payload received. Unexpected token.")
        problem = validate(record.body, spec)
        if problem is not None:
            return invalid(problem)

        scenario = self._scenario(request)
        if scenario == "hang":
            await self._release.wait()
            return google_error(503, "UNAVAILABLE", "The service is shutting down.")
        if scenario == "slow":
            await asyncio.sleep(self.slow_delay)
        fault = self._fault_response(scenario, record.model)
        if fault is not None:
            return fault
        payload = self._success(record, spec, scenario)
        self.responses.append(payload)
        if scenario == "snake_case":
            return web.json_response(_snake_keys(payload))
        return web.json_response(payload)

    def _scenario(self, request: web.Request) -> str:
        if self.faults:
            return self.faults.pop(0)
        if self.fault is not None:
            return self.fault
        return request.headers.get("X-Fake-Scenario", "ok")

    def _fault_response(self, scenario: str, model: str) -> web.Response | None:
        if scenario in ("rate_limit", "rate_limit_daily"):
            daily = scenario == "rate_limit_daily"
            quota_id = (
                "GenerateRequestsPerDayPerProjectPerModel-FreeTier"
                if daily
                else "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"
            )
            return google_error(
                429,
                "RESOURCE_EXHAUSTED",
                "You exceeded your current quota, please check your plan and billing details. "
                "For more information on this error, head to: "
                "https://ai.google.dev/gemini-api/docs/rate-limits.",
                [
                    {
                        "@type": _ERROR_TYPE + "QuotaFailure",
                        "violations": [
                            {
                                "quotaMetric": "generativelanguage.googleapis.com/"
                                "generate_content_free_tier_requests",
                                "quotaId": quota_id,
                                "quotaDimensions": {"location": "global", "model": model},
                                "quotaValue": "100" if daily else "10",
                            }
                        ],
                    },
                    {
                        "@type": _ERROR_TYPE + "Help",
                        "links": [
                            {
                                "description": "Learn more about Gemini API quotas",
                                "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
                            }
                        ],
                    },
                    {"@type": _ERROR_TYPE + "RetryInfo", "retryDelay": self.retry_delay},
                ],
            )
        if scenario == "rate_limit_bare":
            return google_error(
                429,
                "RESOURCE_EXHAUSTED",
                "Resource has been exhausted (e.g. check quota).",
                headers={"Retry-After": self.retry_after_header},
            )
        if scenario == "internal":
            return google_error(
                500,
                "INTERNAL",
                "An internal error has occurred. Please retry or report in "
                "https://developers.generativeai.google/guide/troubleshooting",
            )
        if scenario == "overloaded":
            return google_error(
                503, "UNAVAILABLE", "The model is overloaded. Please try again later."
            )
        if scenario == "deadline":
            return google_error(
                504, "DEADLINE_EXCEEDED", "Deadline expired before operation could complete."
            )
        if scenario == "blocked":
            return web.json_response(
                {
                    "promptFeedback": {"blockReason": self.block_reason},
                    "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9},
                    "modelVersion": model,
                    "responseId": "fake-blocked",
                }
            )
        if scenario in ("image_safety", "no_image"):
            return web.json_response(
                {
                    "candidates": [
                        {
                            "content": {},
                            "finishReason": "IMAGE_SAFETY"
                            if scenario == "image_safety"
                            else "NO_IMAGE",
                            "index": 0,
                        }
                    ],
                    "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9},
                    "modelVersion": model,
                    "responseId": f"fake-{scenario}",
                }
            )
        if scenario == "missing_content":
            return web.json_response(
                {
                    "candidates": [{"finishReason": "STOP", "index": 0}],
                    "modelVersion": model,
                    "responseId": "fake-missing",
                }
            )
        if scenario == "truncated":
            return web.Response(
                body=b'{"candidates": [{"content": {"parts": [{"inlineData": {"mimeType": "ima',
                content_type="application/json",
                charset="utf-8",
            )
        if scenario == "empty":
            return web.Response(body=b"", content_type="application/json", charset="utf-8")
        if scenario == "html":
            return web.Response(
                status=502,
                text="<html><head><title>502 Bad Gateway</title></head>"
                "<body><h1>Bad Gateway</h1></body></html>",
                content_type="text/html",
            )
        if scenario in ("ok", "slow", "thought_image", "text_only", "snake_case"):
            return None
        raise ValueError(f"unknown fake scenario {scenario!r}")

    def _success(self, record: RecordedRequest, spec: ModelSpec, scenario: str) -> dict[str, Any]:
        config = record.generation_config
        image_config = record.image_config
        modalities = _pick(config, "responseModalities", "response_modalities") or [
            "TEXT",
            "IMAGE",
        ]
        ratio = _pick(image_config, "aspectRatio", "aspect_ratio") or "1:1"
        size = _pick(image_config, "imageSize", "image_size") if spec.sizes else None
        prompt = " ".join(
            str(_pick(p, "text")) for p in record.parts if isinstance(_pick(p, "text"), str)
        )
        seed = _pick(config, "seed")
        parts: list[dict[str, Any]] = []
        if scenario == "thought_image":
            parts.append({"text": "Sketching a first idea.", "thought": True})
            parts.append(
                {
                    "inlineData": {
                        "mimeType": "image/png",
                        "data": self._png(ratio, size, f"thought:{prompt}:{seed}"),
                    },
                    "thought": True,
                }
            )
        parts.append({"text": f"Here is your image of {prompt[:60]}"})
        if "IMAGE" in modalities and scenario != "text_only":
            parts.append(
                {
                    "inlineData": {
                        "mimeType": "image/png",
                        "data": self._png(ratio, size, f"{prompt}:{seed}"),
                    },
                    "thoughtSignature": base64.b64encode(b"fake-signature").decode(),
                }
            )
        n = len(self.calls())
        return {
            "candidates": [
                {"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}
            ],
            "usageMetadata": {
                "promptTokenCount": 12,
                "candidatesTokenCount": 1290,
                "totalTokenCount": 1302,
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 12}],
                "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": 1290}],
            },
            "modelVersion": record.model,
            "responseId": f"fake-response-{n}",
        }

    def _png(self, ratio: str, size: str | None, label: str) -> str:
        w, h = (int(x) for x in ratio.split(":"))
        long_side = max(8, SIZE_PIXELS.get(size or "1K", 1024) // self.scale)
        k = max(1, long_side // max(w, h))
        digest = hashlib.sha256(label.encode()).digest()
        buf = io.BytesIO()
        Image.new("RGB", (w * k, h * k), (digest[0], digest[1], digest[2])).save(buf, "PNG")
        return base64.b64encode(buf.getvalue()).decode("ascii")


# -- validation --------------------------------------------------------------------------------

GENERATION_CONFIG_FIELDS = {
    "stopSequences",
    "responseMimeType",
    "responseSchema",
    "responseJsonSchema",
    "responseModalities",
    "candidateCount",
    "maxOutputTokens",
    "temperature",
    "topP",
    "topK",
    "seed",
    "presencePenalty",
    "frequencyPenalty",
    "responseLogprobs",
    "logprobs",
    "enableEnhancedCivicAnswers",
    "speechConfig",
    "thinkingConfig",
    "imageConfig",
    "mediaResolution",
    "audioTranscriptionConfig",
}
IMAGE_CONFIG_FIELDS = {"aspectRatio", "imageSize"}
MODALITIES = {"TEXT", "IMAGE", "AUDIO"}
TOP_LEVEL_FIELDS = {
    "contents",
    "generationConfig",
    "safetySettings",
    "systemInstruction",
    "tools",
    "toolConfig",
    "cachedContent",
    "labels",
    "serviceTier",
    "store",
    "model",
}
PART_DATA_FIELDS = {
    "text",
    "inlineData",
    "fileData",
    "functionCall",
    "functionResponse",
    "executableCode",
    "codeExecutionResult",
}


def validate(body: dict[str, Any], spec: ModelSpec) -> str | None:
    """The message of the 400 the real API would give for this body, or None if it is fine."""
    unknown = _unknown(body, TOP_LEVEL_FIELDS)
    if unknown:
        return f'Invalid JSON payload received. Unknown name "{unknown}": Cannot find field.'
    contents = _pick(body, "contents")
    if not isinstance(contents, list) or not contents:
        return "* GenerateContentRequest.contents: contents is not specified"
    for i, content in enumerate(contents):
        parts = _pick(content, "parts")
        if not isinstance(parts, list) or not parts:
            return (
                f"* GenerateContentRequest.contents[{i}].parts: contents.parts must not be empty."
            )
        for j, part in enumerate(parts):
            where = f"contents[{i}].parts[{j}]"
            if not isinstance(part, dict):
                return f"Invalid value at '{where}': expected an object."
            present = [k for k in part if _camel(k) in PART_DATA_FIELDS]
            if len(present) != 1:
                return f"* GenerateContentRequest.{where}.data: required oneof field 'data' must have one initialized field"
            inline = _pick(part, "inlineData", "inline_data")
            if inline is not None:
                mime = _pick(inline, "mimeType", "mime_type")
                data = _pick(inline, "data")
                if not isinstance(mime, str) or not mime:
                    return f"* GenerateContentRequest.{where}.inline_data.mime_type: mime_type is not specified"
                if not isinstance(data, str):
                    return (
                        f"* GenerateContentRequest.{where}.inline_data.data: data is not specified"
                    )
                try:  # the API takes both alphabets (google-genai sends the URL-safe one)
                    standard = data.replace("-", "+").replace("_", "/")
                    base64.b64decode(standard + "=" * (-len(standard) % 4), validate=True)
                except (binascii.Error, ValueError):
                    return f"Invalid value at '{where}.inline_data.data' (TYPE_BYTES), Base64 decoding failed"
    config = _pick(body, "generationConfig", "generation_config")
    if config is None:
        return None
    if not isinstance(config, dict):
        return "Invalid value at 'generation_config': expected an object."
    unknown = _unknown(config, GENERATION_CONFIG_FIELDS)
    if unknown:
        return (
            f'Invalid JSON payload received. Unknown name "{unknown}" at '
            "'generation_config': Cannot find field."
        )
    modalities = _pick(config, "responseModalities", "response_modalities")
    if modalities is not None:
        if not isinstance(modalities, list):
            return "Invalid value at 'generation_config.response_modalities': expected a list."
        for i, modality in enumerate(modalities):
            if modality not in MODALITIES:
                return (
                    f"Invalid value at 'generation_config.response_modalities[{i}]' "
                    "(type.googleapis.com/google.ai.generativelanguage.v1beta."
                    f'GenerationConfig.Modality), "{modality}"'
                )
    seed = _pick(config, "seed")
    if seed is not None and (
        not isinstance(seed, int) or isinstance(seed, bool) or not -(2**31) <= seed < 2**31
    ):
        return f"Invalid value at 'generation_config.seed' (TYPE_INT32), {json.dumps(seed)}"
    image_config = _pick(config, "imageConfig", "image_config")
    if image_config is None:
        return None
    if not isinstance(image_config, dict):
        return "Invalid value at 'generation_config.image_config': expected an object."
    unknown = _unknown(image_config, IMAGE_CONFIG_FIELDS)
    if unknown:
        return (
            f'Invalid JSON payload received. Unknown name "{unknown}" at '
            "'generation_config.image_config': Cannot find field."
        )
    ratio = _pick(image_config, "aspectRatio", "aspect_ratio")
    if ratio is not None and ratio not in spec.ratios:
        return (
            "* GenerateContentRequest.generation_config.image_config.aspect_ratio: "
            f"Unsupported aspect ratio: {ratio}. Supported values are: {', '.join(spec.ratios)}."
        )
    size = _pick(image_config, "imageSize", "image_size")
    allowed_sizes = spec.sizes or ("1K", "2K", "4K")
    if size is not None and size not in allowed_sizes:
        return (
            "* GenerateContentRequest.generation_config.image_config.image_size: "
            f"Unsupported image size: {size}. Supported values are: {', '.join(allowed_sizes)}."
        )
    return None


def google_error(
    code: int,
    status: str,
    message: str,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """Google's error shape: `{"error": {"code", "message", "status", "details"?}}`."""
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = details
    return web.Response(
        status=code,
        text=json.dumps({"error": error}, indent=2),
        content_type="application/json",
        charset="UTF-8",
        headers=headers,
    )


def invalid(message: str) -> web.Response:
    return google_error(400, "INVALID_ARGUMENT", message)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(word[:1].upper() + word[1:] for word in rest)


def _unknown(obj: dict[str, Any], known: set[str]) -> str | None:
    for key in obj:
        if _camel(key) not in known:
            return key
    return None


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name)


def _snake_keys(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {_snake(k): _snake_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_snake_keys(v) for v in obj]
    return obj


def _pick(obj: Any, *keys: str) -> Any:
    """A field by its camelCase name or its snake_case one (proto-JSON accepts both)."""
    if not isinstance(obj, dict):
        return None
    for key in keys:
        if key in obj:
            return obj[key]
        snake = _snake(key)
        if snake in obj:
            return obj[snake]
    return None
