"""The Gemini image client against a loopback fake of `generateContent`.

First the official `google-genai` SDK talks to the fake, which proves the fake speaks the real
protocol (URLs, headers, JSON casing, Google's error shape); then drawbridge's own aiohttp
client is checked against the same fake, fault by fault.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import aiohttp
import httpx
import pytest
from google import genai
from google.genai import types
from PIL import Image

from bot.errors import (
    AuthFailed,
    BadRequest,
    Malformed,
    ProviderError,
    RateLimited,
    Refused,
    Transient,
)
from bot.providers.base import GenerationRequest
from bot.providers.gemini import GeminiProvider, parse_duration, until_daily_reset
from tests.fake_gemini import DEFAULT_KEY, FakeGemini
from tests.fakes import png_bytes

FLASH = "gemini-2.5-flash-image"
PRO = "gemini-3-pro-image-preview"
NB2 = "gemini-3.1-flash-image-preview"

# The SDK subclasses aiohttp.ClientSession, which aiohttp 3.14 discourages with a warning; that
# is the SDK's business, and the suite turns warnings into errors.
sdk_aiohttp_warning = pytest.mark.filterwarnings(
    "ignore:Inheritance class AiohttpClientSession from ClientSession:DeprecationWarning"
)


class Hooks:
    """No-op hooks that remember what they were told."""

    def __init__(self) -> None:
        self.progress_seen: list[int] = []
        self.tasks: list[str | None] = []

    async def progress(self, percent: int) -> None:
        self.progress_seen.append(percent)

    async def task_submitted(self, task_id: str | None) -> None:
        self.tasks.append(task_id)

    def generated(self) -> None:
        return None


@pytest.fixture
async def fake() -> AsyncIterator[FakeGemini]:
    async with FakeGemini() as server:
        yield server


@pytest.fixture
async def provider(fake: FakeGemini) -> AsyncIterator[GeminiProvider]:
    client = GeminiProvider(DEFAULT_KEY, fake.base_url)
    yield client
    await client.aclose()


def req(
    prompt: str = "a fox in the snow",
    *,
    model: str = FLASH,
    n: int = 1,
    ratio: str | None = "16:9",
    size: str | None = None,
    seed: int | None = None,
    refs: tuple[bytes, ...] = (),
    timeout_s: float = 10.0,
) -> GenerationRequest:
    return GenerationRequest(
        job_id="job-1",
        model=model,
        remote_model=model,
        endpoint="",
        prompt=prompt,
        n=n,
        aspect_ratio=ratio,
        size=size,
        seed=seed,
        reference_images=refs,
        timeout_s=timeout_s,
    )


def image_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG"
        return img.size


def ratio_of(size: tuple[int, int]) -> float:
    return size[0] / size[1]


def jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, "JPEG")
    return buf.getvalue()


# -- the official SDK against the fake -------------------------------------------------------


@asynccontextmanager
async def sdk(fake: FakeGemini, transport: str, api_key: str = DEFAULT_KEY) -> AsyncIterator[Any]:
    """An SDK async client on the fake, over aiohttp (its default) or an httpx client."""
    options: dict[str, Any] = {"base_url": fake.root_url, "api_version": "v1beta"}
    async with httpx.AsyncClient() as hx:
        if transport == "httpx":
            options["httpx_async_client"] = hx
        client = genai.Client(api_key=api_key, http_options=types.HttpOptions(**options))
        try:
            yield client.aio
        finally:
            await client.aio.aclose()
            client.close()


def image_config(ratio: str = "16:9") -> types.GenerateContentConfig:
    return types.GenerateContentConfig(
        response_modalities=["TEXT", "IMAGE"], image_config=types.ImageConfig(aspect_ratio=ratio)
    )


@sdk_aiohttp_warning
@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_sdk_gets_a_png_of_the_requested_ratio(fake: FakeGemini, transport: str) -> None:
    async with sdk(fake, transport) as client:
        response = await client.models.generate_content(
            model=FLASH, contents="a fox in the snow", config=image_config("16:9")
        )
    parts = response.candidates[0].content.parts
    assert response.candidates[0].finish_reason == types.FinishReason.STOP
    assert any(p.text for p in parts)
    images = [p.inline_data for p in parts if p.inline_data is not None]
    assert len(images) == 1
    assert images[0].mime_type == "image/png"
    assert ratio_of(image_size(images[0].data)) == pytest.approx(16 / 9)
    assert response.usage_metadata.total_token_count == 1302

    (call,) = fake.calls()
    assert call.path == f"/v1beta/models/{FLASH}:generateContent"
    assert call.headers["x-goog-api-key"] == DEFAULT_KEY
    assert call.image_config == {"aspectRatio": "16:9"}
    assert call.generation_config["responseModalities"] == ["TEXT", "IMAGE"]


@sdk_aiohttp_warning
async def test_sdk_sees_image_size_and_thought_images(fake: FakeGemini) -> None:
    fake.faults.append("thought_image")
    async with sdk(fake, "aiohttp") as client:
        response = await client.models.generate_content(
            model=PRO,
            contents="a lighthouse",
            config=types.GenerateContentConfig(
                response_modalities=["TEXT", "IMAGE"],
                image_config=types.ImageConfig(aspect_ratio="9:16", image_size="2K"),
            ),
        )
    parts = response.candidates[0].content.parts
    thoughts = [p for p in parts if p.thought and p.inline_data is not None]
    finals = [p for p in parts if not p.thought and p.inline_data is not None]
    assert len(thoughts) == 1 and len(finals) == 1
    assert finals[0].thought_signature == b"fake-signature"
    width, height = image_size(finals[0].inline_data.data)
    assert (width, height) == (144, 256)  # 2K at 1/8 scale, 9:16
    assert fake.calls()[0].image_config == {"aspectRatio": "9:16", "imageSize": "2K"}


@sdk_aiohttp_warning
@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_sdk_raises_client_error_on_429(fake: FakeGemini, transport: str) -> None:
    fake.faults.append("rate_limit")
    async with sdk(fake, transport) as client:
        with pytest.raises(genai.errors.ClientError) as caught:
            await client.models.generate_content(
                model=FLASH, contents="a fox", config=image_config()
            )
    error = caught.value
    assert error.code == 429
    assert error.status == "RESOURCE_EXHAUSTED"
    details = error.details["error"]["details"]
    retry = [d for d in details if d["@type"].endswith("google.rpc.RetryInfo")]
    assert retry == [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "2s"}]


@sdk_aiohttp_warning
@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_sdk_raises_client_error_on_a_wrong_key(fake: FakeGemini, transport: str) -> None:
    async with sdk(fake, transport, api_key="not-the-key") as client:
        with pytest.raises(genai.errors.ClientError) as caught:
            await client.models.generate_content(model=FLASH, contents="a fox")
    assert caught.value.code == 400
    assert caught.value.status == "INVALID_ARGUMENT"
    assert caught.value.message == "API key not valid. Please pass a valid API key."
    assert caught.value.details["error"]["details"][0]["reason"] == "API_KEY_INVALID"


@sdk_aiohttp_warning
async def test_sdk_errors_for_unknown_model_bad_ratio_and_overload(fake: FakeGemini) -> None:
    async with sdk(fake, "aiohttp") as client:
        with pytest.raises(genai.errors.ClientError) as caught:
            await client.models.generate_content(model="gemini-9-ultra", contents="a fox")
        assert (caught.value.code, caught.value.status) == (404, "NOT_FOUND")

        with pytest.raises(genai.errors.ClientError) as caught:
            await client.models.generate_content(
                model=FLASH, contents="a fox", config=image_config("7:3")
            )
        assert (caught.value.code, caught.value.status) == (400, "INVALID_ARGUMENT")

        fake.faults.append("overloaded")
        with pytest.raises(genai.errors.ServerError) as server:
            await client.models.generate_content(model=FLASH, contents="a fox")
        assert (server.value.code, server.value.status) == (503, "UNAVAILABLE")


@sdk_aiohttp_warning
async def test_sdk_parses_the_fakes_refusals(fake: FakeGemini) -> None:
    async with sdk(fake, "aiohttp") as client:
        fake.faults.append("blocked")
        blocked = await client.models.generate_content(model=FLASH, contents="something bad")
        fake.faults.append("image_safety")
        unsafe = await client.models.generate_content(model=FLASH, contents="something bad")
    assert blocked.prompt_feedback.block_reason == types.BlockedReason.PROHIBITED_CONTENT
    assert not blocked.candidates
    assert unsafe.candidates[0].finish_reason == types.FinishReason.IMAGE_SAFETY


# -- the fake's own input handling -----------------------------------------------------------


async def test_fake_accepts_snake_case_and_key_query(fake: FakeGemini) -> None:
    body = {
        "contents": [
            {
                "parts": [
                    {"text": "a fox"},
                    {"inline_data": {"mime_type": "image/png", "data": "aGVsbG8="}},
                ]
            }
        ],
        "generation_config": {
            "response_modalities": ["IMAGE"],
            "image_config": {"aspect_ratio": "4:3"},
        },
    }
    url = f"{fake.base_url}/models/{FLASH}:generateContent"
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=body, params={"key": DEFAULT_KEY}) as resp:
            assert resp.status == 200
            payload = await resp.json()
        async with session.post(url, json=body) as resp:
            assert resp.status == 403
            assert (await resp.json())["error"]["status"] == "PERMISSION_DENIED"
        body["generation_config"]["colour"] = "blue"  # type: ignore[index]
        async with session.post(url, json=body, headers={"x-goog-api-key": DEFAULT_KEY}) as resp:
            assert resp.status == 400
            assert "Unknown name" in (await resp.json())["error"]["message"]
    part = payload["candidates"][0]["content"]["parts"][-1]
    data = base64.b64decode(part["inlineData"]["data"])
    assert ratio_of(image_size(data)) == pytest.approx(4 / 3)


# -- drawbridge's client against the fake ----------------------------------------------------


async def test_generates_one_image_with_the_right_request(
    fake: FakeGemini, provider: GeminiProvider
) -> None:
    hooks = Hooks()
    images = await provider.generate(req(model=PRO, ratio="16:9", size="2k"), hooks)
    assert len(images) == 1
    image = images[0]
    assert image.mime == "image/png"
    assert (image.width, image.height) == (256, 144)  # 2K at 1/8 scale
    (call,) = fake.calls(PRO)
    assert call.headers["x-goog-api-key"] == DEFAULT_KEY
    assert "key" not in call.query
    assert call.image_config == {"aspectRatio": "16:9", "imageSize": "2K"}
    assert call.generation_config["responseModalities"] == ["TEXT", "IMAGE"]
    assert "seed" not in call.generation_config
    assert call.parts == [{"text": "a fox in the snow"}]
    assert hooks.tasks == []  # synchronous API: nothing to resume


async def test_omits_image_size_and_image_config_when_unset(
    fake: FakeGemini, provider: GeminiProvider
) -> None:
    await provider.generate(req(ratio="3:2"), Hooks())
    await provider.generate(req(ratio=None, seed=7), Hooks())
    first, second = fake.calls()
    assert first.image_config == {"aspectRatio": "3:2"}
    assert "imageConfig" not in second.generation_config
    assert second.generation_config["seed"] == 7


async def test_reference_images_go_inline_with_their_mime_types(
    fake: FakeGemini, provider: GeminiProvider
) -> None:
    png, jpeg = png_bytes(), jpeg_bytes()
    await provider.generate(req(refs=(png, jpeg)), Hooks())
    text, first, second = fake.calls()[0].parts
    assert text == {"text": "a fox in the snow"}
    assert first["inlineData"]["mimeType"] == "image/png"
    assert base64.b64decode(first["inlineData"]["data"]) == png
    assert second["inlineData"]["mimeType"] == "image/jpeg"
    assert base64.b64decode(second["inlineData"]["data"]) == jpeg


async def test_a_reference_that_is_not_an_image_is_a_bad_request(
    fake: FakeGemini, provider: GeminiProvider
) -> None:
    with pytest.raises(BadRequest):
        await provider.generate(req(refs=(b"GIF89a not supported",)), Hooks())
    assert fake.calls() == []


async def test_n2_makes_two_concurrent_calls_with_consecutive_seeds(
    fake: FakeGemini, provider: GeminiProvider
) -> None:
    fake.fault = "slow"
    fake.slow_delay = 0.2
    hooks = Hooks()
    images = await provider.generate(req(n=2, seed=42), hooks)
    assert len(images) == 2
    calls = fake.calls()
    assert len(calls) == 2
    assert sorted(c.generation_config["seed"] for c in calls) == [42, 43]
    assert fake.max_in_flight == 2
    assert hooks.progress_seen == [50]


async def test_n2_returns_what_succeeded(fake: FakeGemini, provider: GeminiProvider) -> None:
    fake.faults.append("overloaded")
    images = await provider.generate(req(n=2), Hooks())
    assert len(images) == 1
    assert len(fake.calls()) == 2


async def test_n2_all_failing_raises_the_first_error(
    fake: FakeGemini, provider: GeminiProvider
) -> None:
    fake.faults.extend(["image_safety", "overloaded"])
    with pytest.raises(ProviderError) as caught:
        await provider.generate(req(n=2), Hooks())
    assert isinstance(caught.value, Refused | Transient)
    assert len(fake.calls()) == 2


async def test_takes_the_final_image_not_a_thought(
    fake: FakeGemini, provider: GeminiProvider
) -> None:
    fake.faults.append("thought_image")
    (image,) = await provider.generate(req(model=PRO), Hooks())
    parts = fake.responses[0]["candidates"][0]["content"]["parts"]
    final = next(p for p in reversed(parts) if "inlineData" in p)
    thought = next(p for p in parts if "inlineData" in p and p.get("thought"))
    assert image.data == base64.b64decode(final["inlineData"]["data"])
    assert image.data != base64.b64decode(thought["inlineData"]["data"])


async def test_accepts_snake_case_answers(fake: FakeGemini, provider: GeminiProvider) -> None:
    fake.faults.append("snake_case")
    (image,) = await provider.generate(req(ratio="1:1"), Hooks())
    assert image.width == image.height


@pytest.mark.parametrize(
    ("scenario", "error", "retry_after"),
    [
        ("rate_limit", RateLimited, 2.0),
        ("rate_limit_bare", RateLimited, 3.0),
        ("internal", Transient, None),
        ("overloaded", Transient, None),
        ("deadline", Transient, None),
        ("html", Transient, None),
        ("truncated", Malformed, None),
        ("empty", Malformed, None),
        ("missing_content", Transient, None),
        ("blocked", Refused, None),
        ("image_safety", Refused, None),
        ("no_image", Refused, None),
        ("text_only", Refused, None),
    ],
)
async def test_faults_map_to_the_error_taxonomy(
    fake: FakeGemini,
    provider: GeminiProvider,
    scenario: str,
    error: type[ProviderError],
    retry_after: float | None,
) -> None:
    fake.faults.append(scenario)
    with pytest.raises(ProviderError) as caught:
        await provider.generate(req(), Hooks())
    assert type(caught.value) is error
    assert caught.value.retry_after == retry_after
    assert DEFAULT_KEY not in str(caught.value)


async def test_a_used_up_daily_quota_waits_for_midnight_pacific_without_calling_again(
    fake: FakeGemini, provider: GeminiProvider
) -> None:
    fake.faults.append("rate_limit_daily")
    with pytest.raises(RateLimited) as caught:
        await provider.generate(req(), Hooks())
    wait = caught.value.retry_after
    assert wait is not None and abs(wait - until_daily_reset()) < 5  # not RetryInfo's 2 s
    calls = len(fake.calls())
    with pytest.raises(RateLimited) as again:
        await provider.generate(req(), Hooks())
    assert len(fake.calls()) == calls  # the model is not asked again before the reset
    assert again.value.retry_after is not None and again.value.retry_after <= wait


def test_the_daily_reset_is_midnight_pacific_time() -> None:
    # 2026-07-01 06:30 UTC is 23:30 PDT (UTC−7); 2026-01-01 07:30 UTC is 23:30 PST (UTC−8).
    summer = datetime(2026, 7, 1, 6, 30, tzinfo=UTC).timestamp()
    winter = datetime(2026, 1, 1, 7, 30, tzinfo=UTC).timestamp()
    assert until_daily_reset(summer) == pytest.approx(1800)
    assert until_daily_reset(winter) == pytest.approx(1800)


async def test_retry_delay_with_fractions(fake: FakeGemini, provider: GeminiProvider) -> None:
    fake.retry_delay = "1.5s"
    fake.faults.append("rate_limit")
    with pytest.raises(RateLimited) as caught:
        await provider.generate(req(), Hooks())
    assert caught.value.retry_after == 1.5


async def test_refusal_messages_say_why(fake: FakeGemini, provider: GeminiProvider) -> None:
    fake.block_reason = "BLOCKLIST"
    fake.faults.extend(["blocked", "image_safety", "text_only"])
    messages = []
    for _ in range(3):
        with pytest.raises(Refused) as caught:
            await provider.generate(req(), Hooks())
        messages.append(str(caught.value))
    assert "BLOCKLIST" in messages[0]
    assert "IMAGE_SAFETY" in messages[1]
    assert "Here is your image" in messages[2]


async def test_a_wrong_key_is_auth_failed_and_warns_without_the_key(
    fake: FakeGemini, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "AIzaSy-very-secret-key"
    client = GeminiProvider(secret, fake.base_url)
    try:
        with (
            caplog.at_level(logging.WARNING, logger="drawbridge.providers.gemini"),
            pytest.raises(AuthFailed) as caught,
        ):
            await client.generate(req(), Hooks())
    finally:
        await client.aclose()
    assert "API key not valid" in str(caught.value)
    assert secret not in str(caught.value)
    warnings = [r for r in caplog.records if r.name == "drawbridge.providers.gemini"]
    assert warnings and all(r.levelno == logging.WARNING for r in warnings)
    assert all(secret not in r.getMessage() for r in caplog.records)
    assert fake.calls()[0].headers["x-goog-api-key"] == secret


async def test_a_missing_key_is_auth_failed(fake: FakeGemini) -> None:
    client = GeminiProvider("", fake.base_url)
    try:
        with pytest.raises(AuthFailed):
            await client.generate(req(), Hooks())
    finally:
        await client.aclose()


async def test_unknown_model_and_bad_ratio_are_bad_requests(provider: GeminiProvider) -> None:
    with pytest.raises(BadRequest) as caught:
        await provider.generate(req(model="gemini-9-ultra"), Hooks())
    assert "gemini-9-ultra" in str(caught.value)
    with pytest.raises(BadRequest) as caught:
        await provider.generate(req(ratio="7:3"), Hooks())
    assert "INVALID_ARGUMENT" in str(caught.value)
    with pytest.raises(BadRequest):
        await provider.generate(req(model=PRO, size="8k"), Hooks())


async def test_nano_banana_2_takes_its_extra_ratios(
    fake: FakeGemini, provider: GeminiProvider
) -> None:
    (image,) = await provider.generate(req(model=NB2, ratio="1:8", size="1K"), Hooks())
    assert ratio_of((image.width, image.height)) == pytest.approx(1 / 8)


async def test_a_hang_is_bounded_by_the_request_timeout(
    fake: FakeGemini, provider: GeminiProvider
) -> None:
    fake.faults.append("hang")
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(Transient):
        await provider.generate(req(timeout_s=0.3), Hooks())
    assert loop.time() - started < 3
    assert len(fake.calls()) == 1


async def test_a_refused_connection_is_transient() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = GeminiProvider(DEFAULT_KEY, f"http://127.0.0.1:{port}/v1beta")
    try:
        with pytest.raises(Transient):
            await client.generate(req(), Hooks())
    finally:
        await client.aclose()


async def test_a_given_session_is_used_and_left_open(fake: FakeGemini) -> None:
    async with aiohttp.ClientSession() as session:
        client = GeminiProvider(DEFAULT_KEY, fake.base_url + "/", session=session)
        await client.generate(req(), Hooks())
        await client.aclose()
        assert not session.closed
        await client.generate(req(), Hooks())
    assert len(fake.calls()) == 2


async def test_an_owned_session_is_closed_and_reopened(fake: FakeGemini) -> None:
    client = GeminiProvider(DEFAULT_KEY, fake.base_url)
    await client.generate(req(), Hooks())
    await client.aclose()
    await client.generate(req(), Hooks())  # a closed provider opens a fresh session
    await client.aclose()
    assert len(fake.calls()) == 2
    assert DEFAULT_KEY not in repr(client)


def test_parse_duration() -> None:
    assert parse_duration("13s") == 13.0
    assert parse_duration("1.5s") == 1.5
    assert parse_duration("0.250s") == 0.25
    assert parse_duration({"seconds": 2, "nanos": 500_000_000}) == 2.5
    assert parse_duration("13") is None
    assert parse_duration("soon") is None
    assert parse_duration(None) is None
