"""Adversarial probes of provider protocol fidelity.

Two kinds of probe, each adding to what `test_provider_{openai,gemini,grsai,hostile}.py` and
`test_providers_engine.py` already check:

- fake fidelity: the official `openai` and `google-genai` SDKs against `tests/fake_openai.py` and
  `tests/fake_gemini.py` for the request shapes drawbridge's clients send and the fakes' error
  modes, and what our clients put on the wire compared with what the SDK puts there;
- real-world quirks (gzip, a BOM, CRLF event streams, keep-alive-only streams, a task id unknown
  just after its submit, daily quotas, retired models, half-broken batches, unparseable 200s),
  each ending in the outcome providers.md and DESIGN.md call for, and never a charge (at our end
  or a second one at the provider's) for a job that failed.

A probe that exposes a defect fails with a message saying what a paying operator would see.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import aiosqlite
import httpx
import openai
import pytest
from aiohttp import web
from google import genai
from google.genai import types
from PIL import Image

from bot.catalog import Catalog
from bot.engine import Engine, EngineConfig
from bot.errors import AuthFailed, BadRequest, ProviderError, RateLimited, Transient
from bot.jobs import GeneratedImage, Options, Request, Target, UserRef
from bot.providers.base import GenerationRequest, NullHooks, Provider
from bot.providers.gemini import GeminiProvider
from bot.providers.grsai import NANO_BANANA, RESULT, GrsaiProvider
from bot.providers.openai_images import OpenAIImagesProvider
from bot.routing import Router
from bot.store import Store
from tests.fake_gemini import DEFAULT_KEY as GEMINI_FAKE_KEY
from tests.fake_gemini import FakeGemini
from tests.fake_grsai import FakeGrsai, Fault
from tests.fake_openai import FakeOpenAI
from tests.fakes import RecordingAdapter

FLASH = "gemini-2.5-flash-image"
GEMINI_PATH = f"/v1beta/models/{FLASH}:generateContent"
OPENAI_GEN = "/v1/images/generations"
INT32_MAX = 2**31 - 1
ADMIN = "test:boss"

# The SDK subclasses aiohttp.ClientSession, which aiohttp 3.14 warns about; the SDK's business.
sdk_warning = pytest.mark.filterwarnings(
    "ignore:Inheritance class AiohttpClientSession from ClientSession:DeprecationWarning"
)


def png(width: int = 8, height: int = 8, color: tuple[int, int, int] = (30, 160, 90)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


PNG = png()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- a scriptable loopback server ------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Loopback:
    """An aiohttp server whose routes a test scripts; it counts the hits per path."""

    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        self.hits: list[str] = []
        self.root = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> Loopback:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, shutdown_timeout=0.2, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.root = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def count(self, path: str) -> int:
        return self.hits.count(path)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(request.path)
        if request.can_read_body:
            await request.read()
        handler = self.routes.get(request.path)
        if handler is None:
            return web.Response(status=404, text="no such route")
        return await handler(request)


def reply(
    body: Any,
    status: int = 200,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
    compress: bool = False,
) -> Handler:
    """A whole answer; dicts and lists go as JSON. `compress`: gzip, `Content-Encoding` set."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()

    async def handler(request: web.Request) -> web.StreamResponse:
        extra = dict(headers or {})
        data = raw
        if compress:
            data = gzip.compress(raw)
            extra["Content-Encoding"] = "gzip"
        return web.Response(body=data, status=status, content_type=content_type, headers=extra)

    return handler


def raw_stream(chunks: list[bytes], content_type: str = "text/event-stream") -> Handler:
    """A streamed body written chunk by chunk, then EOF."""

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": content_type})
        await resp.prepare(request)
        for chunk in chunks:
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    return handler


# -- requests, hooks, running ------------------------------------------------------------------


class Hooks:
    def __init__(self) -> None:
        self.tasks: list[str | None] = []
        self.percents: list[int] = []

    async def progress(self, percent: int) -> None:
        self.percents.append(percent)

    async def task_submitted(self, task_id: str | None) -> None:
        self.tasks.append(task_id)

    def generated(self) -> None:
        return None


def gen_request(
    model: str,
    *,
    n: int = 1,
    ratio: str | None = "1:1",
    size: str | None = None,
    seed: int | None = None,
    refs: tuple[bytes, ...] = (),
    endpoint: str = "",
    timeout_s: float = 5.0,
) -> GenerationRequest:
    return GenerationRequest(
        job_id="job-probe",
        model=model,
        remote_model=model,
        endpoint=endpoint,
        prompt="a fox in the snow",
        n=n,
        aspect_ratio=ratio,
        size=size,
        seed=seed,
        reference_images=refs,
        timeout_s=timeout_s,
    )


async def attempt(call: Awaitable[list[GeneratedImage]]) -> list[GeneratedImage] | Exception:
    try:
        return await call
    except Exception as exc:
        return exc


def task(status: str = "running", progress: int = 0, urls: tuple[str, ...] = ()) -> dict:
    return {
        "id": "t1",
        "results": [{"url": u, "content": "a picture"} for u in urls],
        "progress": progress,
        "status": status,
        "failure_reason": "",
        "error": "",
    }


def sse(obj: dict[str, Any], end: bytes = b"\n\n") -> bytes:
    return b"data: " + json.dumps(obj).encode() + end


@asynccontextmanager
async def engine_for(
    providers: dict[str, Provider],
    model: str,
    data_dir: Path,
    fallbacks: dict[str, list[str]] | None = None,
    **config: Any,
) -> AsyncIterator[tuple[Engine, RecordingAdapter]]:
    catalog = Catalog.load()
    store = await Store.open(data_dir)
    config.setdefault("retry_initial", 0.01)
    config.setdefault("generate_timeout", 8.0)
    router = Router(catalog, providers, fallbacks=fallbacks) if fallbacks else None
    engine = Engine(
        store, catalog, providers, EngineConfig(**config), default_model=model, router=router
    )
    adapter = RecordingAdapter()
    engine.register(adapter)
    await engine.start()
    try:
        yield engine, adapter
    finally:
        await engine.close()
        await store.close()
        for provider in providers.values():
            await provider.aclose()


def ask(model: str, n: int = 1, seed: int | None = None) -> Request:
    return Request(
        user=UserRef("test", "alice"),
        target=Target("test", chat_id="c1"),
        prompt="a lighthouse at dusk",
        options=Options(aspect_ratio="1:1", n=n, seed=seed),
        model=model,
    )


async def job_row(data_dir: Path, job_id: str) -> dict[str, Any]:
    async with aiosqlite.connect(data_dir / "drawbridge.db") as db:
        db.row_factory = aiosqlite.Row
        rows = await db.execute_fetchall(
            "SELECT status, cost_usd, error_kind, error, provider, n_images FROM jobs WHERE id = ?",
            (job_id,),
        )
    (row,) = rows
    return dict(row)


def final_text(adapter: RecordingAdapter, job_id: str) -> str:
    finals = [u.text for j, u in adapter.statuses if j == job_id and u.kind.final]
    return finals[-1] if finals else ""


def price(model: str, n: int = 1) -> float:
    spec = Catalog.load().get(model)
    assert spec is not None
    return spec.cost(n, None)


# == 1. Fake fidelity: the official SDKs against the fakes ======================================


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as server:
        yield server


async def test_openai_sdk_and_our_client_send_the_same_generation_request(
    fake_openai: FakeOpenAI,
) -> None:
    async with openai.AsyncOpenAI(
        api_key=fake_openai.api_key, base_url=fake_openai.base_url, max_retries=0
    ) as sdk:
        await sdk.images.generate(
            model="gpt-image-1", prompt="a fox in the snow", n=2, size="1024x1024"
        )
        await sdk.images.generate(
            model="dall-e-3",
            prompt="a fox in the snow",
            n=1,
            size="1792x1024",
            response_format="b64_json",
        )
    ours = OpenAIImagesProvider(fake_openai.api_key, fake_openai.base_url)
    try:
        await ours.generate(gen_request("gpt-image-1", n=2), NullHooks())
        await ours.generate(gen_request("dall-e-3", ratio="16:9"), NullHooks())
    finally:
        await ours.aclose()
    sdk_gpt, sdk_dalle, our_gpt, our_dalle = fake_openai.calls("/images/generations")
    for sdk_call, our_call in ((sdk_gpt, our_gpt), (sdk_dalle, our_dalle)):
        assert our_call.path == sdk_call.path == "/v1/images/generations"
        assert our_call.headers["Authorization"] == sdk_call.headers["Authorization"]
        assert our_call.headers["Content-Type"].startswith("application/json")
        ours_json = {k: v for k, v in our_call.json.items() if k != "user"}
        assert ours_json == sdk_call.json, f"ours {our_call.json} vs the SDK's {sdk_call.json}"
    assert "response_format" not in our_gpt.json  # GPT-image: 400 unknown_parameter otherwise
    assert our_dalle.json["response_format"] == "b64_json"  # no 60-minute URL to race


async def test_openai_sdk_and_our_client_send_the_same_edit_multipart(
    fake_openai: FakeOpenAI,
) -> None:
    refs = (png(16, 16), png(16, 16, (1, 2, 3)))
    async with openai.AsyncOpenAI(
        api_key=fake_openai.api_key, base_url=fake_openai.base_url, max_retries=0
    ) as sdk:
        await sdk.images.edit(
            model="gpt-image-1",
            image=[("a.png", refs[0], "image/png"), ("b.png", refs[1], "image/png")],
            prompt="a fox in the snow",
            size="1024x1024",
            n=1,
        )
        await sdk.images.edit(
            model="dall-e-2",
            image=("a.png", refs[0], "image/png"),
            prompt="a fox in the snow",
            size="1024x1024",
            n=1,
            response_format="b64_json",
        )
    ours = OpenAIImagesProvider(fake_openai.api_key, fake_openai.base_url)
    try:
        await ours.generate(gen_request("gpt-image-1", refs=refs), NullHooks())
        await ours.generate(gen_request("dall-e-2", size="1K", refs=refs[:1]), NullHooks())
    finally:
        await ours.aclose()
    sdk_gpt, sdk_dalle, our_gpt, our_dalle = fake_openai.calls("/images/edits")
    for sdk_call, our_call in ((sdk_gpt, our_gpt), (sdk_dalle, our_dalle)):
        assert our_call.headers["Content-Type"].startswith("multipart/form-data")
        assert our_call.part_names == sdk_call.part_names, (
            our_call.part_names,
            sdk_call.part_names,
        )
        assert [p.data for p in our_call.files] == [p.data for p in sdk_call.files]
        assert [p.content_type for p in our_call.files] == [p.content_type for p in sdk_call.files]
        ours_fields = {k: v for k, v in our_call.fields.items() if k != "user"}
        assert ours_fields == sdk_call.fields, f"ours {our_call.fields} vs SDK {sdk_call.fields}"


async def test_openai_sdk_reads_the_fakes_retry_hints_and_typed_errors(
    fake_openai: FakeOpenAI,
) -> None:
    async with openai.AsyncOpenAI(
        api_key=fake_openai.api_key, base_url=fake_openai.base_url, max_retries=2
    ) as sdk:
        before = len(fake_openai.image_calls)
        fake_openai.fail_next("rate_limit", retry_after_ms="10")
        await sdk.images.generate(model="gpt-image-1", prompt="a fox")  # the SDK retried
        assert len(fake_openai.image_calls) - before == 2

        before = len(fake_openai.image_calls)
        fake_openai.fail_next("server_error", status=503, should_retry="false")
        with pytest.raises(openai.InternalServerError):
            await sdk.images.generate(model="gpt-image-1", prompt="a fox")
        assert len(fake_openai.image_calls) - before == 1  # x-should-retry: false honoured

        cases: list[tuple[str, str, type[openai.APIStatusError], int, str | None]] = [
            ("insufficient_quota", "gpt-image-1", openai.RateLimitError, 429, "insufficient_quota"),
            ("forbidden", "gpt-image-1", openai.PermissionDeniedError, 403, None),
            ("content_policy", "dall-e-3", openai.BadRequestError, 400, "content_policy_violation"),
        ]
    async with openai.AsyncOpenAI(
        api_key=fake_openai.api_key, base_url=fake_openai.base_url, max_retries=0
    ) as sdk:
        for kind, model, error, status, code in cases:
            fake_openai.fail_next(kind)
            with pytest.raises(error) as caught:
                await sdk.images.generate(model=model, prompt="a fox")
            assert caught.value.status_code == status and caught.value.code == code, kind
            assert caught.value.response.headers["x-request-id"].startswith("req_")


@asynccontextmanager
async def gemini_sdk(fake: FakeGemini) -> AsyncIterator[Any]:
    async with httpx.AsyncClient() as hx:
        options = types.HttpOptions(
            base_url=fake.root_url, api_version="v1beta", httpx_async_client=hx
        )
        client = genai.Client(api_key=GEMINI_FAKE_KEY, http_options=options)
        try:
            yield client.aio
        finally:
            await client.aio.aclose()
            client.close()


def _casefree(obj: Any) -> Any:
    """JSON with snake_case keys turned camelCase and `data` decoded: proto-JSON takes both
    casings, and bytes as standard or URL-safe base64."""
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            head, *rest = key.split("_")
            name = head + "".join(w[:1].upper() + w[1:] for w in rest)
            if name == "data" and isinstance(value, str):
                out[name] = base64.urlsafe_b64decode(value.replace("+", "-").replace("/", "_"))
            else:
                out[name] = _casefree(value)
        return out
    if isinstance(obj, list):
        return [_casefree(v) for v in obj]
    return obj


def png_with_b64_symbols() -> bytes:
    """A PNG whose standard base64 holds `+` or `/`, so its URL-safe form differs."""
    for red in range(256):
        data = png(8, 8, (red, 9, 9))
        text = b64(data)
        if "+" in text or "/" in text:
            return data
    raise AssertionError("no such PNG")


def png_without_b64_symbols() -> bytes:
    """A PNG whose standard and URL-safe base64 are the same text."""
    for red in range(256):
        data = png(8, 8, (red, 9, 9))
        text = b64(data)
        if "+" not in text and "/" not in text:
            return data
    raise AssertionError("no such PNG")


@sdk_warning
async def test_fake_gemini_accepts_the_sdks_url_safe_base64_reference_image() -> None:
    # google-genai serializes `bytes` as URL-safe base64 (`-`, `_`); proto-JSON accepts standard
    # and URL-safe base64 alike, so the real API takes it. The fake's validate() decodes with
    # `base64.b64decode(validate=True)` and answers 400 "Base64 decoding failed".
    ref = png_with_b64_symbols()
    async with FakeGemini() as fake, gemini_sdk(fake) as sdk:
        try:
            answer = await sdk.models.generate_content(
                model=FLASH,
                contents=[
                    types.Part.from_text(text="this, as a watercolour"),
                    types.Part.from_bytes(data=ref, mime_type="image/png"),
                ],
                config=types.GenerateContentConfig(response_modalities=["TEXT", "IMAGE"]),
            )
        except genai.errors.ClientError as exc:
            pytest.fail(f"the fake rejected the official SDK's reference image: {exc.message}")
    assert any(p.inline_data for p in answer.candidates[0].content.parts)


@sdk_warning
async def test_gemini_sdk_and_our_client_send_the_same_generate_content() -> None:
    ref = png_without_b64_symbols()
    async with FakeGemini() as fake:
        async with gemini_sdk(fake) as sdk:
            await sdk.models.generate_content(
                model="gemini-3-pro-image-preview",
                contents=[
                    types.Content(
                        role="user",
                        parts=[
                            types.Part.from_text(text="a fox in the snow"),
                            types.Part.from_bytes(data=ref, mime_type="image/png"),
                        ],
                    )
                ],
                config=types.GenerateContentConfig(
                    response_modalities=["TEXT", "IMAGE"],
                    image_config=types.ImageConfig(aspect_ratio="16:9", image_size="2K"),
                    seed=42,
                ),
            )
        ours = GeminiProvider(GEMINI_FAKE_KEY, fake.base_url)
        try:
            await ours.generate(
                gen_request(
                    "gemini-3-pro-image-preview", ratio="16:9", size="2K", seed=42, refs=(ref,)
                ),
                NullHooks(),
            )
        finally:
            await ours.aclose()
        sdk_call, our_call = fake.calls()
    assert our_call.path == sdk_call.path
    assert our_call.headers["x-goog-api-key"] == sdk_call.headers["x-goog-api-key"]
    assert "key" not in our_call.query
    assert our_call.headers["Content-Type"].startswith("application/json")
    assert _casefree(our_call.body) == _casefree(sdk_call.body), (our_call.body, sdk_call.body)


@sdk_warning
async def test_gemini_sdk_parses_the_fakes_no_image_answers_and_errors() -> None:
    async with FakeGemini() as fake, gemini_sdk(fake) as sdk:
        fake.faults.append("no_image")
        answer = await sdk.models.generate_content(model=FLASH, contents="a fox")
        assert answer.candidates[0].finish_reason == types.FinishReason.NO_IMAGE
        fake.faults.append("text_only")
        answer = await sdk.models.generate_content(model=FLASH, contents="a fox")
        parts = answer.candidates[0].content.parts
        assert [p.inline_data for p in parts] == [None] and parts[0].text
        fake.faults.append("rate_limit_daily")
        with pytest.raises(genai.errors.ClientError) as caught:
            await sdk.models.generate_content(model=FLASH, contents="a fox")
        quota = [d for d in caught.value.details["error"]["details"] if "violations" in d]
        assert "PerDay" in quota[0]["violations"][0]["quotaId"]
        for scenario, code in (("internal", 500), ("deadline", 504), ("html", 502)):
            fake.faults.append(scenario)
            with pytest.raises(genai.errors.ServerError) as server:
                await sdk.models.generate_content(model=FLASH, contents="a fox")
            assert server.value.code == code, scenario


async def test_fake_gemini_rejects_a_seed_outside_int32_as_the_api_does() -> None:
    # GenerationConfig.seed is an int32 in the API's proto: 2**31 is a 400 INVALID_ARGUMENT
    # ("Invalid value at 'generation_config.seed' (TYPE_INT32)"). The fake's own message for a
    # non-integer seed names TYPE_INT32, but it takes any integer: a client bug here is invisible.
    body = {
        "contents": [{"parts": [{"text": "a fox"}]}],
        "generationConfig": {"responseModalities": ["TEXT", "IMAGE"], "seed": 2**31},
    }
    async with FakeGemini() as fake, aiohttp.ClientSession() as session:
        url = f"{fake.base_url}/models/{FLASH}:generateContent"
        headers = {"x-goog-api-key": GEMINI_FAKE_KEY}
        async with session.post(url, json=body, headers=headers) as resp:
            status = resp.status
    assert status == 400, f"the fake answered {status} to seed 2**31; the real API answers 400"


# == 2. What our clients put on the wire ==========================================================


async def test_gemini_client_never_sends_a_seed_the_api_rejects() -> None:
    # `--seed` takes 0..2**32-1 (bot/validate.py MAX_SEED); Gemini's seed is an int32.
    async with FakeGemini() as fake:
        provider = GeminiProvider(GEMINI_FAKE_KEY, fake.base_url)
        try:
            await attempt(provider.generate(gen_request(FLASH, seed=2**32 - 1), NullHooks()))
        finally:
            await provider.aclose()
        (call,) = fake.calls()
    sent = call.generation_config.get("seed")
    assert sent is None or -(2**31) <= sent <= INT32_MAX, (
        f"sent seed {sent}: the real Gemini API answers 400 INVALID_ARGUMENT (TYPE_INT32), so "
        "a user's valid `--seed` fails the job as 'the image service did not accept these settings'"
    )


async def test_gemini_client_reads_an_image_in_url_safe_base64() -> None:
    # Proto-JSON bytes may be URL-safe base64; the official SDK reads either alphabet, and a
    # relay that re-serializes answers through google-genai's models emits URL-safe.
    ref = png_with_b64_symbols()
    part = {"inlineData": {"mimeType": "image/png", "data": base64.urlsafe_b64encode(ref).decode()}}
    answer = {"candidates": [{"content": {"parts": [part]}, "finishReason": "STOP"}]}
    parsed = types.GenerateContentResponse.model_validate(answer)
    assert parsed.candidates[0].content.parts[0].inline_data.data == ref  # the SDK reads it
    async with Loopback() as server:
        server.routes[GEMINI_PATH] = reply(answer)
        provider = GeminiProvider("AIza-x", server.root + "/v1beta")
        try:
            value = await attempt(provider.generate(gen_request(FLASH), NullHooks()))
        finally:
            await provider.aclose()
    assert isinstance(value, list) and value[0].data == ref, (
        f"{value!r}: a valid image in URL-safe base64 was taken for a broken answer; the job is "
        "retried and each retry is another billed generation"
    )


# == 3. Transport quirks: gzip, BOM, CRLF, odd stream endings =====================================


async def test_gzip_encoded_answers_are_read_by_every_client() -> None:
    async with Loopback() as server:
        server.routes[OPENAI_GEN] = reply(
            {"created": 1, "data": [{"b64_json": b64(PNG)}]}, compress=True
        )
        server.routes[GEMINI_PATH] = reply(
            {
                "candidates": [
                    {
                        "content": {
                            "parts": [{"inlineData": {"mimeType": "image/png", "data": b64(PNG)}}]
                        },
                        "finishReason": "STOP",
                    }
                ]
            },
            compress=True,
        )
        server.routes["/files/a.png"] = reply(PNG, content_type="image/png", compress=True)
        done = task("succeeded", 100, (server.root + "/files/a.png",))
        server.routes[NANO_BANANA] = reply(
            sse(done), content_type="text/event-stream", compress=True
        )
        clients: list[tuple[Provider, GenerationRequest]] = [
            (OpenAIImagesProvider("sk-x", server.root + "/v1"), gen_request("gpt-image-1")),
            (GeminiProvider("AIza-x", server.root + "/v1beta"), gen_request(FLASH)),
            (GrsaiProvider("sk-g", server.root), gen_request("nano-banana", endpoint=NANO_BANANA)),
        ]
        for provider, request in clients:
            try:
                value = await attempt(provider.generate(request, Hooks()))
            finally:
                await provider.aclose()
            assert isinstance(value, list) and len(value) == 1, f"{provider.name}: {value!r}"
            assert value[0].data == PNG


async def test_json_answers_with_a_utf8_bom_are_read_by_every_client() -> None:
    bom = b"\xef\xbb\xbf"
    async with Loopback() as server:
        openai_body = {"created": 1, "data": [{"b64_json": b64(PNG)}]}
        part = {"inlineData": {"mimeType": "image/png", "data": b64(PNG)}}
        gemini_body = {"candidates": [{"content": {"parts": [part]}, "finishReason": "STOP"}]}
        done = task("succeeded", 100, (server.root + "/files/a.png",))
        server.routes[OPENAI_GEN] = reply(bom + json.dumps(openai_body).encode())
        server.routes[GEMINI_PATH] = reply(bom + json.dumps(gemini_body).encode())
        server.routes[NANO_BANANA] = reply(
            bom + json.dumps({"code": 0, "data": {"id": "t1"}}).encode()
        )
        server.routes[RESULT] = reply(bom + json.dumps({"code": 0, "data": done}).encode())
        server.routes["/files/a.png"] = reply(PNG, content_type="image/png")
        clients: list[tuple[Provider, GenerationRequest]] = [
            (OpenAIImagesProvider("sk-x", server.root + "/v1"), gen_request("gpt-image-1")),
            (GeminiProvider("AIza-x", server.root + "/v1beta"), gen_request(FLASH)),
            (
                GrsaiProvider("sk-g", server.root, mode="poll", poll_interval=0.01),
                gen_request("nano-banana"),
            ),
        ]
        for provider, request in clients:
            try:
                value = await attempt(provider.generate(request, Hooks()))
            finally:
                await provider.aclose()
            assert isinstance(value, list) and value[0].data == PNG, f"{provider.name}: {value!r}"


async def test_grsai_stream_with_a_utf8_bom_keeps_its_first_line() -> None:
    # The SSE spec has a leading U+FEFF stripped. GrsAI's first line carries the task id; with
    # shutProgress (or a fast task) it is the only line, and losing it loses the paid task.
    async with Loopback() as server:
        done = task("succeeded", 100, (server.root + "/files/a.png",))
        server.routes[NANO_BANANA] = raw_stream([b"\xef\xbb\xbf" + sse(done)])
        server.routes["/files/a.png"] = reply(PNG, content_type="image/png")
        hooks = Hooks()
        provider = GrsaiProvider("sk-g", server.root, poll_interval=0.01)
        try:
            value = await attempt(provider.generate(gen_request("nano-banana"), hooks))
        finally:
            await provider.aclose()
    assert isinstance(value, list), (
        f"{value!r}: a BOM before `data:` made the only line unreadable; the task id was never "
        "recorded, so the engine's retry submits (and GrsAI bills) a second task"
    )
    assert hooks.tasks == ["t1"]


@pytest.mark.parametrize(
    "chunks, polled",
    [
        (
            [
                sse(task(progress=10)),
                b"data: " + json.dumps(task("succeeded", 100, ("{file}",))).encode(),
            ],
            False,
        ),
        ([sse(task(progress=10)), sse(task(progress=60)), b"data: [DONE]\n\n"], True),
        (
            [
                sse(task(progress=10), b"\r\n\r\n"),
                sse(task("succeeded", 100, ("{file}",)), b"\r\n\r\n"),
            ],
            False,
        ),
    ],
    ids=["last line without newline", "[DONE] before a final task", "CRLF lines"],
)
async def test_grsai_stream_endings(chunks: list[bytes], polled: bool) -> None:
    async with Loopback() as server:
        file = server.root + "/files/a.png"
        server.routes[NANO_BANANA] = raw_stream(
            [c.replace(b"{file}", file.encode()) for c in chunks]
        )
        server.routes[RESULT] = reply(
            {"code": 0, "msg": "success", "data": task("succeeded", 100, (file,))}
        )
        server.routes["/files/a.png"] = reply(PNG, content_type="image/png")
        provider = GrsaiProvider("sk-g", server.root, poll_interval=0.01)
        try:
            value = await attempt(provider.generate(gen_request("nano-banana"), Hooks()))
        finally:
            await provider.aclose()
        assert isinstance(value, list) and len(value) == 1, repr(value)
        assert server.count(NANO_BANANA) == 1  # one paid task
        assert (server.count(RESULT) > 0) is polled


async def test_grsai_stream_of_only_keep_alive_comments_is_a_retryable_failure() -> None:
    async with Loopback() as server:
        server.routes[NANO_BANANA] = raw_stream([b": keep-alive\n\n"] * 3)
        hooks = Hooks()
        provider = GrsaiProvider("sk-g", server.root, poll_interval=0.01)
        try:
            value = await attempt(provider.generate(gen_request("nano-banana"), hooks))
        finally:
            await provider.aclose()
        assert isinstance(value, Transient) and value.retryable, repr(value)
        assert hooks.tasks == [] and server.count(RESULT) == 0  # no id: nothing to poll


async def test_openai_event_stream_with_crlf_line_endings() -> None:
    # SSE lets a server end lines with CRLF (sse-starlette does by default); the SDK's decoder
    # takes them. Our stream reader splits events on b"\n\n" only.
    done = {"type": "image_generation.completed", "b64_json": b64(PNG), "usage": {}}
    partial = {
        "type": "image_generation.partial_image",
        "b64_json": b64(PNG),
        "partial_image_index": 0,
    }
    blocks = [
        f"event: {e['type']}\r\ndata: {json.dumps(e)}\r\n\r\n".encode() for e in (partial, done)
    ]
    async with Loopback() as server:
        server.routes[OPENAI_GEN] = raw_stream(blocks)
        provider = OpenAIImagesProvider("sk-x", server.root + "/v1", partial_images=1)
        try:
            value = await attempt(provider.generate(gen_request("gpt-image-1"), Hooks()))
        finally:
            await provider.aclose()
    assert isinstance(value, list) and len(value) == 1, (
        f"{value!r}: a completed image sent with CRLF line endings was not seen; the job is "
        "retried and OpenAI bills the image again"
    )


async def test_grsai_business_errors_under_4xx() -> None:
    cases: list[tuple[int, dict[str, Any], type[ProviderError]]] = [
        (400, {"code": -1, "msg": "model not register"}, BadRequest),
        (403, {"code": -1, "msg": "apikey expired"}, AuthFailed),
        (402, {"code": -1, "msg": "余额不足"}, AuthFailed),
        (429, {"code": -1, "msg": "too frequent"}, RateLimited),
    ]
    async with Loopback() as server:
        for status, body, kind in cases:
            server.routes[NANO_BANANA] = reply(body, status=status)
            provider = GrsaiProvider("sk-g", server.root)
            try:
                value = await attempt(provider.generate(gen_request("nano-banana"), Hooks()))
            finally:
                await provider.aclose()
            assert isinstance(value, kind), f"HTTP {status} {body}: {value!r}"


# == 4. Through the engine: the outcome the operator and the user should see =====================


@pytest.mark.parametrize("name", ["openai", "gemini", "grsai"])
async def test_a_rejected_key_fails_fast_uncharged_and_alerts_the_admin_once(
    name: str, tmp_path: Path
) -> None:
    async with FakeOpenAI() as fo, FakeGemini() as fg, FakeGrsai() as fr:
        setups: dict[str, tuple[Provider, str, Callable[[], int]]] = {
            "openai": (
                OpenAIImagesProvider("sk-wrong-key-0000", fo.base_url),
                "gpt-image-1",
                lambda: len(fo.image_calls),
            ),
            "gemini": (GeminiProvider("AIza-wrong", fg.base_url), FLASH, lambda: len(fg.calls())),
            "grsai": (
                GrsaiProvider("sk-wrong", fr.base_url, poll_interval=0.01),
                "nano-banana",
                lambda: len(fr.submitted_bodies()),
            ),
        }
        provider, model, calls = setups[name]
        async with engine_for(
            {name: provider}, model, tmp_path, retry_attempts=4, admin_ids=frozenset({ADMIN})
        ) as (engine, adapter):
            tickets = [await engine.submit(ask(model)) for _ in range(2)]
            await engine.run_until_idle()
            for ticket in tickets:
                row = await job_row(tmp_path, ticket.job_id)
                assert (row["status"], row["error_kind"], row["cost_usd"]) == ("failed", "auth", 0)
                assert "not charged" in final_text(adapter, ticket.job_id)
            assert calls() == 2, f"{calls()} calls for 2 jobs: a rejected key must not be retried"
            alerts = [text for target, text in adapter.notices if target.chat_id == "boss"]
            assert len(alerts) == 1 and name in alerts[0], alerts


async def test_grsai_task_unknown_right_after_its_submit_is_not_paid_for_twice(
    tmp_path: Path,
) -> None:
    # `code: -22` on the first poll of a task GrsAI accepted a moment ago (its result store lags
    # the submit). providers.md §1.6/§6: -22 is terminal (`expired`), never a reason to submit
    # the same job again.
    async with FakeGrsai() as fake:
        fake.result_faults.append(Fault.http(200, body={"code": -22, "msg": "task not found"}))
        provider = GrsaiProvider(fake.api_key, fake.base_url, mode="poll", poll_interval=0.01)
        async with engine_for({"grsai": provider}, "nano-banana", tmp_path, retry_attempts=4) as (
            engine,
            _,
        ):
            ticket = await engine.submit(ask("nano-banana"))
            await engine.run_until_idle()
            row = await job_row(tmp_path, ticket.job_id)
    assert fake.submits == 1, (
        f"GrsAI billed {fake.submits} tasks for one job (ended {row['status']}, charged "
        f"{row['cost_usd']}): a -22 just after the submit forgot the task id and submitted anew"
    )


async def test_gemini_daily_quota_is_not_retried_within_the_day(tmp_path: Path) -> None:
    # providers.md §3.5: a per-day quota id means stop for the day; the RetryInfo delay that
    # comes with it (seconds) is not when the quota comes back.
    async with FakeGemini(fault="rate_limit_daily", retry_delay="0.05s") as fake:
        provider = GeminiProvider(fake.api_key, fake.base_url)
        async with engine_for({"gemini": provider}, FLASH, tmp_path, retry_attempts=4) as (
            engine,
            adapter,
        ):
            first = await engine.submit(ask(FLASH))
            await engine.run_until_idle()
            row = await job_row(tmp_path, first.job_id)
            text = final_text(adapter, first.job_id)
            after_first = len(fake.calls())
            await engine.submit(ask(FLASH))
            await engine.run_until_idle()
            after_second = len(fake.calls())
    assert (row["status"], row["error_kind"], row["cost_usd"]) == ("failed", "rate_limited", 0)
    assert "not charged" in text
    assert "hours" in text, text  # until midnight Pacific, not "busy for the next 900 minutes"
    assert after_first == 1, (
        f"{after_first} calls for one job on a used-up daily quota: retried after RetryInfo's "
        f"0.05 s as if it were a per-minute limit (user told {text!r})"
    )
    assert after_second == after_first, "the next job hammered the same used-up daily quota"


@pytest.mark.parametrize("primary", ["gemini", "grsai"])
async def test_a_retired_model_fails_over_to_the_familys_next_provider(
    primary: str, tmp_path: Path
) -> None:
    # providers.md §3.5: Gemini 404 NOT_FOUND (model retired/unknown) → fatal / fall back to
    # another model; §1.8: GrsAI's model set "changes often" (`model not register`). With
    # `PROVIDER_FALLBACKS=nano-banana=<primary>,<other>` the job should reach the other one.
    retired: dict[str, Any] = {"models": {}} if primary == "gemini" else {}
    async with FakeGemini(**retired) as fg, Loopback() as grs:
        if primary == "grsai":
            grs.routes[NANO_BANANA] = reply({"code": -1, "msg": "model not register"})
        else:
            file = grs.root + "/files/a.png"
            grs.routes[NANO_BANANA] = raw_stream([sse(task("succeeded", 100, (file,)))])
            grs.routes["/files/a.png"] = reply(PNG, content_type="image/png")
        providers: dict[str, Provider] = {
            "gemini": GeminiProvider(fg.api_key, fg.base_url),
            "grsai": GrsaiProvider("sk-g", grs.root, poll_interval=0.01),
        }
        other = "grsai" if primary == "gemini" else "gemini"
        model = FLASH if primary == "gemini" else "nano-banana"
        async with engine_for(
            providers, model, tmp_path, fallbacks={"nano-banana": [primary, other]}
        ) as (engine, adapter):
            ticket = await engine.submit(ask(model))
            await engine.run_until_idle()
            row = await job_row(tmp_path, ticket.job_id)
            text = final_text(adapter, ticket.job_id)
        tried = len(fg.calls()) if primary == "gemini" else grs.count(NANO_BANANA)
    assert tried >= 1
    assert (row["status"], row["provider"]) == ("succeeded", other), (
        f"{primary} no longer serving the model ended the job ({row['status']}, "
        f"{row['error_kind']}: {row['error']}; told {text!r}) instead of failing over to {other}"
    )


async def test_a_retired_model_with_no_fallback_fails_uncharged_and_tells_the_admins_once(
    tmp_path: Path,
) -> None:
    async with FakeGemini(models={}) as fake:  # the API no longer serves any model: 404
        provider = GeminiProvider(fake.api_key, fake.base_url)
        async with engine_for(
            {"gemini": provider}, FLASH, tmp_path, admin_ids=frozenset({"test:boss"})
        ) as (engine, adapter):
            jobs = [await engine.submit(ask(FLASH)) for _ in range(2)]
            await engine.run_until_idle()
            rows = [await job_row(tmp_path, ticket.job_id) for ticket in jobs]
    assert [(r["status"], r["cost_usd"]) for r in rows] == [("failed", 0)] * 2
    alerts = [text for target, text in adapter.notices if "MODELS_FILE" in text]
    assert len(alerts) == 1 and "gemini" in alerts[0], adapter.notices


BROKEN_ITEMS = {
    "bad base64": {"b64_json": "%%%not-base64%%%"},
    "not an image": {"b64_json": b64(b"<html>oops</html>")},
}


@pytest.mark.parametrize("kind", BROKEN_ITEMS)
async def test_openai_batch_with_one_broken_item_is_not_bought_again(
    kind: str, tmp_path: Path
) -> None:
    # Two images asked for, both billed by OpenAI; the second cannot be used. Retrying buys the
    # whole batch again (and again). DESIGN: charge for what was delivered; the client's own
    # rule for dall-e-3: keep the images already paid for rather than fail and pay again.
    # (An expired second *URL* is pinned as "fail uncharged, never re-bought" by
    # test_money_paths.py::test_relay_url_expired_on_download_is_not_paid_again.)
    async with Loopback() as server:
        good = {"b64_json": b64(PNG)}
        server.routes[OPENAI_GEN] = reply({"created": 1, "data": [good, BROKEN_ITEMS[kind]]})
        provider = OpenAIImagesProvider("sk-x", server.root + "/v1")
        async with engine_for({"openai": provider}, "gpt-image-1", tmp_path, retry_attempts=4) as (
            engine,
            adapter,
        ):
            ticket = await engine.submit(ask("gpt-image-1", n=2))
            await engine.run_until_idle()
            row = await job_row(tmp_path, ticket.job_id)
        calls = server.count(OPENAI_GEN)
    assert calls == 1, (
        f"{calls} billed n=2 calls ({2 * calls} images paid to OpenAI) for one job that ended "
        f"{row['status']} ({row['error_kind']}: {row['error']}), delivering "
        f"{adapter.delivered(ticket.job_id)}: one unusable item threw the good one away"
    )
    assert row["status"] == "succeeded" and row["n_images"] == 1
    assert row["cost_usd"] == pytest.approx(price("gpt-image-1", 1))
    assert adapter.delivered(ticket.job_id) == 1


@pytest.mark.parametrize("name", ["openai", "gemini"])
async def test_an_unparseable_200_is_retried_at_most_once(name: str, tmp_path: Path) -> None:
    # A 200 from a synchronous image API is a generation the provider has billed. providers.md
    # §6: `malformed` (unparseable body) → retry once. Trailing garbage after the JSON, as a
    # misbehaving proxy or a chunked-encoding bug leaves it.
    async with Loopback() as server:
        if name == "openai":
            body = (
                json.dumps({"created": 1, "data": [{"b64_json": b64(PNG)}]}).encode() + b"\n0\r\n"
            )
            server.routes[OPENAI_GEN] = reply(body)
            provider: Provider = OpenAIImagesProvider("sk-x", server.root + "/v1")
            model, path = "gpt-image-1", OPENAI_GEN
        else:
            part = {"inlineData": {"mimeType": "image/png", "data": b64(PNG)}}
            answer = {"candidates": [{"content": {"parts": [part]}, "finishReason": "STOP"}]}
            server.routes[GEMINI_PATH] = reply(json.dumps(answer).encode() + b"\n0\r\n")
            provider = GeminiProvider("AIza-x", server.root + "/v1beta")
            model, path = FLASH, GEMINI_PATH
        async with engine_for({name: provider}, model, tmp_path, retry_attempts=4) as (
            engine,
            adapter,
        ):
            ticket = await engine.submit(ask(model))
            await engine.run_until_idle()
            row = await job_row(tmp_path, ticket.job_id)
            text = final_text(adapter, ticket.job_id)
        calls = server.count(path)
    assert (row["status"], row["cost_usd"]) == ("failed", 0) and "not charged" in text
    assert calls <= 2, (
        f"{calls} billed generations for one job whose answers could not be parsed "
        "(retry_attempts=4, the default): providers.md says retry a malformed body once"
    )
