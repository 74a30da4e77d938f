"""The OpenAI Images client against a loopback fake, and the official SDK against the same fake.

The SDK tests come first: they show the fake speaks the real protocol, so what the client tests
prove about drawbridge's own client holds against api.openai.com and the relays that copy it.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from PIL import Image

from bot.errors import (
    AuthFailed,
    BadRequest,
    Expired,
    ModelUnavailable,
    RateLimited,
    Refused,
    Transient,
)
from bot.providers.base import GenerationRequest, NullHooks
from bot.providers.openai_images import (
    OpenAIImagesProvider,
    model_family,
    parse_reset,
    size_for,
)
from bot.routing import fails_over
from tests.fake_openai import FakeOpenAI, png
from tests.fakes import png_bytes

HOOKS = NullHooks()


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as server:
        yield server


@pytest.fixture
async def provider(fake: FakeOpenAI) -> AsyncIterator[OpenAIImagesProvider]:
    client = OpenAIImagesProvider(fake.api_key, fake.base_url)
    yield client
    await client.aclose()


@pytest.fixture
async def sdk(fake: FakeOpenAI) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        api_key=fake.api_key, base_url=fake.base_url, max_retries=0
    ) as client:
        yield client


def req(
    model: str = "gpt-image-1",
    *,
    n: int = 1,
    ratio: str | None = "1:1",
    size: str | None = None,
    refs: tuple[bytes, ...] = (),
    job_id: str = "job-1",
    timeout_s: float = 10.0,
    prompt: str = "a fox in the snow",
) -> GenerationRequest:
    return GenerationRequest(
        job_id=job_id,
        model=model,
        remote_model=model,
        endpoint="/images/generations",
        prompt=prompt,
        n=n,
        aspect_ratio=ratio,
        size=size,
        seed=None,
        reference_images=refs,
        timeout_s=timeout_s,
    )


def jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 10)).save(buf, "JPEG")
    return buf.getvalue()


def decoded_size(b64: str) -> tuple[int, int]:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as img:
        return img.size


# -- the official SDK against the fake ---------------------------------------------------------


async def test_sdk_generate_gpt_image_b64(sdk: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    result = await sdk.images.generate(
        model="gpt-image-1", prompt="a fox", n=2, size="1536x1024", quality="low"
    )
    assert result.data is not None and len(result.data) == 2
    assert result.data[0].b64_json is not None and result.data[0].url is None
    assert decoded_size(result.data[0].b64_json) == (1536, 1024)
    assert result.usage is not None and result.usage.total_tokens > 0
    assert result.size == "1536x1024" and result.quality == "low"
    sent = fake.calls("/images/generations")[0]
    assert sent.headers["Authorization"] == f"Bearer {fake.api_key}"
    assert sent.json == {
        "model": "gpt-image-1",
        "prompt": "a fox",
        "n": 2,
        "size": "1536x1024",
        "quality": "low",
    }


async def test_sdk_generate_dalle3_url(sdk: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    result = await sdk.images.generate(
        model="dall-e-3", prompt="a fox", size="1792x1024", response_format="url"
    )
    assert result.data is not None and result.usage is None
    item = result.data[0]
    assert item.url is not None and item.url.startswith(fake.root + "/files/")
    assert item.revised_prompt
    async with aiohttp.ClientSession() as session, session.get(item.url) as resp:
        assert resp.status == 200
        with Image.open(io.BytesIO(await resp.read())) as img:
            assert img.size == (1792, 1024)


async def test_sdk_edit_with_images(sdk: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    result = await sdk.images.edit(
        model="gpt-image-1",
        image=[("a.png", png_bytes(), "image/png"), ("b.jpg", jpeg_bytes(), "image/jpeg")],
        prompt="put them together",
        size="1024x1536",
    )
    assert result.data is not None and result.data[0].b64_json is not None
    assert decoded_size(result.data[0].b64_json) == (1024, 1536)
    assert result.usage is not None and result.usage.input_tokens_details.image_tokens > 0
    sent = fake.calls("/images/edits")[0]
    assert sent.part_names == ["image[]", "image[]"]
    assert [p.content_type for p in sent.files] == ["image/png", "image/jpeg"]
    assert sent.fields["prompt"] == "put them together"
    assert sent.fields["model"] == "gpt-image-1"


async def test_sdk_streaming(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.images.generate(
        model="gpt-image-1", prompt="a fox", stream=True, partial_images=2
    )
    kinds = [event.type async for event in stream]
    assert kinds == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]


async def test_sdk_wrong_key(fake: FakeOpenAI) -> None:
    async with openai.AsyncOpenAI(
        api_key="sk-wrong-key-123456", base_url=fake.base_url, max_retries=0
    ) as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.images.generate(model="gpt-image-1", prompt="a fox")
    assert caught.value.code == "invalid_api_key"
    assert caught.value.status_code == 401


async def test_sdk_rate_limit(sdk: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    fake.fail_next("rate_limit", retry_after="2")
    with pytest.raises(openai.RateLimitError) as caught:
        await sdk.images.generate(model="gpt-image-1", prompt="a fox")
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.response.headers["retry-after"] == "2"
    assert caught.value.response.headers["x-request-id"].startswith("req_")


async def test_sdk_moderation_refusal(sdk: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    fake.fail_next("moderation")
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.images.generate(model="gpt-image-1", prompt="something bad")
    assert caught.value.code == "moderation_blocked"
    assert caught.value.type == "image_generation_user_error"


async def test_sdk_sees_real_validation_errors(sdk: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.images.generate(model="gpt-image-1", prompt="a fox", response_format="b64_json")
    assert caught.value.code == "unknown_parameter" and caught.value.param == "response_format"
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.images.generate(model="gpt-image-9", prompt="a fox")
    assert caught.value.code == "invalid_value" and caught.value.param == "model"
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.images.generate(model="dall-e-3", prompt="a fox", n=2)
    assert caught.value.param == "n"
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.images.generate(model="gpt-image-1", prompt="a fox", size="1792x1024")
    assert caught.value.param == "size"
    fake.fail_next("server_error", status=503)
    with pytest.raises(openai.InternalServerError):
        await sdk.images.generate(model="gpt-image-1", prompt="a fox")


# -- size mapping --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "ratio", "size", "expected"),
    [
        ("gpt-image-1", "1:1", None, "1024x1024"),
        ("gpt-image-1", "3:2", None, "1536x1024"),
        ("gpt-image-1-mini", "2:3", None, "1024x1536"),
        ("gpt-image-2", "16:9", "1K", "1536x864"),
        ("gpt-image-2", "9:16", "2K", "1152x2048"),
        ("gpt-image-2", "16:9", "4K", "3840x2160"),
        ("gpt-image-2", "1:1", "4K", "2880x2880"),
        ("gpt-image-2", "3:2", "4K", "3504x2336"),
        ("gpt-image-2", "4:3", "4K", "3312x2480"),
        ("dall-e-3", "1:1", None, "1024x1024"),
        ("dall-e-3", "16:9", None, "1792x1024"),
        ("dall-e-3", "9:16", None, "1024x1792"),
        ("dall-e-2", "1:1", "512", "512x512"),
        ("flux-kontext-pro", None, None, None),
        ("nanobanana-pro", "16:9", "2K", "2048x1152"),
        ("gpt-image-1", "1:1", "1536x1024", "1536x1024"),
    ],
)
def test_size_for(model: str, ratio: str | None, size: str | None, expected: str | None) -> None:
    assert size_for(model, ratio, size) == expected


@pytest.mark.parametrize(
    ("model", "ratio", "size"),
    [
        ("gpt-image-1", "16:9", None),
        ("gpt-image-1", "1:1", "4K"),
        ("dall-e-3", "3:2", None),
        ("dall-e-2", "16:9", None),
        ("gpt-image-2", "4:1", "1K"),
    ],
)
def test_size_for_rejects(model: str, ratio: str, size: str | None) -> None:
    with pytest.raises(BadRequest):
        size_for(model, ratio, size)


def test_every_gpt_image_2_size_fits_its_limits() -> None:
    for tier in ("1K", "2K", "4K"):
        for ratio in ("1:1", "3:2", "2:3", "16:9", "9:16", "4:3", "3:4", "21:9", "5:4"):
            text = size_for("gpt-image-2", ratio, tier)
            assert text is not None
            w, h = (int(x) for x in text.split("x"))
            assert w % 16 == 0 and h % 16 == 0, text
            assert max(w, h) <= 3840 and w * h <= 3840 * 2160, text
            assert max(w, h) <= 3 * min(w, h), text


def test_helpers() -> None:
    assert model_family("openai/gpt-image-1") == "gpt-image"
    assert model_family("gpt-image-2-2026-04-21") == "gpt-image-2"
    assert model_family("dall-e-3") == "dall-e-3"
    assert model_family("seedream-4") == "other"
    assert parse_reset("6m0s") == 360.0
    assert parse_reset("120ms") == pytest.approx(0.12)
    assert parse_reset("soon") is None


# -- drawbridge's client against the fake --------------------------------------------------------


async def test_generations_gpt_image(provider: OpenAIImagesProvider, fake: FakeOpenAI) -> None:
    images = await provider.generate(req("gpt-image-1", n=2, ratio="3:2"), HOOKS)
    assert [(i.mime, i.width, i.height) for i in images] == [("image/png", 1536, 1024)] * 2
    [sent] = fake.calls("/images/generations")
    assert sent.headers["Authorization"] == f"Bearer {fake.api_key}"
    body = sent.json
    assert body["model"] == "gpt-image-1" and body["n"] == 2 and body["size"] == "1536x1024"
    assert body["prompt"] == "a fox in the snow"
    assert "response_format" not in body
    assert "job-1" not in body["user"] and len(body["user"]) == 32
    usage = provider.usage_by_job["job-1"]
    assert usage["total_tokens"] > 0 and usage["output_tokens_details"]["image_tokens"] > 0


async def test_gpt_image_2_4k_against_a_strict_relay(fake: FakeOpenAI) -> None:
    # reject_response_format is on: a client that sent it would get 400 unknown_parameter.
    assert fake.reject_response_format
    client = OpenAIImagesProvider(fake.api_key, fake.base_url)
    try:
        [image] = await client.generate(req("gpt-image-2", ratio="16:9", size="4K"), HOOKS)
    finally:
        await client.aclose()
    assert (image.width, image.height) == (3840, 2160)
    assert "response_format" not in fake.calls("/images/generations")[0].json


async def test_edits_send_reference_images(
    provider: OpenAIImagesProvider, fake: FakeOpenAI
) -> None:
    refs = (png_bytes(), jpeg_bytes())
    images = await provider.generate(req("gpt-image-1", ratio="2:3", refs=refs), HOOKS)
    assert [(i.width, i.height) for i in images] == [(1024, 1536)]
    assert fake.calls("/images/generations") == []
    [sent] = fake.calls("/images/edits")
    assert sent.headers["Content-Type"].startswith("multipart/form-data")
    assert sent.part_names == ["image[]", "image[]"]
    assert [(p.filename, p.content_type) for p in sent.files] == [
        ("image-1.png", "image/png"),
        ("image-2.jpg", "image/jpeg"),
    ]
    assert [p.data for p in sent.files] == list(refs)
    assert sent.fields["prompt"] == "a fox in the snow"
    assert sent.fields["model"] == "gpt-image-1"
    assert sent.fields["n"] == "1" and sent.fields["size"] == "1024x1536"
    assert "response_format" not in sent.fields
    assert provider.usage_by_job["job-1"]["input_tokens_details"]["image_tokens"] > 0


async def test_dalle3_asks_for_base64_and_makes_n_calls(
    provider: OpenAIImagesProvider, fake: FakeOpenAI
) -> None:
    images = await provider.generate(req("dall-e-3", n=2, ratio="16:9"), HOOKS)
    assert [(i.width, i.height) for i in images] == [(1792, 1024)] * 2
    calls = fake.calls("/images/generations")
    assert len(calls) == 2
    assert all(c.json["n"] == 1 and c.json["response_format"] == "b64_json" for c in calls)
    assert "job-1" not in provider.usage_by_job  # DALL·E reports no usage


async def test_dalle3_keeps_images_already_made(
    provider: OpenAIImagesProvider, fake: FakeOpenAI
) -> None:
    fake.fail_next("slow", delay=0.01)  # the first call succeeds
    fake.fail_next("server_error")
    images = await provider.generate(req("dall-e-3", n=3), HOOKS)
    assert len(images) == 1  # paid for once; the engine's retry would pay again
    assert len(fake.calls("/images/generations")) == 2


async def test_dalle3_takes_no_reference_images(
    provider: OpenAIImagesProvider, fake: FakeOpenAI
) -> None:
    with pytest.raises(BadRequest):
        await provider.generate(req("dall-e-3", refs=(png_bytes(),)), HOOKS)
    assert fake.image_calls == []


async def test_url_results_are_downloaded_without_the_key() -> None:
    # A relay that answers URLs even for GPT-image models (new-api style).
    async with FakeOpenAI(url_output=True) as fake:
        client = OpenAIImagesProvider(fake.api_key, fake.base_url)
        try:
            images = await client.generate(req("dall-e-3"), HOOKS)
            images += await client.generate(req("gpt-image-1", n=2, job_id="job-2"), HOOKS)
        finally:
            await client.aclose()
        assert [(i.width, i.height) for i in images] == [(1024, 1024)] * 3
        downloads = [r for r in fake.requests if r.path.startswith("/files/")]
        assert len(downloads) == 3
        assert all("Authorization" not in r.headers for r in downloads)
        assert "job-2" in client.usage_by_job


class _Seen:
    """Hooks that note, at `generated`, how many result downloads the fake had served."""

    def __init__(self, fake: FakeOpenAI) -> None:
        self.fake = fake
        self.at: list[int] = []

    async def progress(self, percent: int) -> None:
        return None

    async def task_submitted(self, task_id: str | None) -> None:
        return None

    def generated(self) -> None:
        self.at.append(len([r for r in self.fake.requests if r.path.startswith("/files/")]))


async def test_url_results_free_the_slot_before_they_are_downloaded() -> None:
    async with FakeOpenAI(url_output=True) as fake:
        client = OpenAIImagesProvider(fake.api_key, fake.base_url)
        try:
            seen = _Seen(fake)
            assert len(await client.generate(req("gpt-image-1", n=2), seen)) == 2
            assert seen.at == [0]  # once, before either download
            seen = _Seen(fake)
            await client.generate(req("dall-e-3", n=2, job_id="job-2"), seen)
            # Two calls, each with a URL: the slot is given up only once the last has answered.
            assert seen.at == [3]
        finally:
            await client.aclose()
        assert len(fake.calls("/images/generations")) == 3


async def test_expired_url_is_expired() -> None:
    async with FakeOpenAI(url_output=True) as fake:
        fake.files_status = 404
        client = OpenAIImagesProvider(fake.api_key, fake.base_url)
        try:
            with pytest.raises(Expired):
                await client.generate(req("dall-e-3"), HOOKS)
            fake.files_status = None
            fake.file_ttl = 0.0  # a SAS URL past its lifetime answers 403
            with pytest.raises(Expired):
                await client.generate(req("dall-e-3"), HOOKS)
        finally:
            await client.aclose()


async def test_data_uri_in_url_is_decoded() -> None:
    data = png(32, 16)

    class DataUriRelay(FakeOpenAI):
        async def _answer(self, request, request_id, fault, p):  # type: ignore[no-untyped-def]
            body = await super()._answer(request, request_id, fault, p)
            body["data"] = [{"url": "data:image/png;base64," + base64.b64encode(data).decode()}]
            return body

    async with DataUriRelay(extra_models=["some-relay-model"]) as relay:
        client = OpenAIImagesProvider(relay.api_key, relay.base_url)
        try:
            [image] = await client.generate(req("some-relay-model", ratio=None), HOOKS)
        finally:
            await client.aclose()
        assert (image.width, image.height) == (32, 16)
        assert "size" not in relay.calls("/images/generations")[0].json


# -- failures ------------------------------------------------------------------------------------


async def test_wrong_key_is_auth_failed_and_never_leaks(
    fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    key = "sk-this-is-the-wrong-key-9876"
    client = OpenAIImagesProvider(key, fake.base_url)
    try:
        with (
            caplog.at_level(logging.WARNING, logger="drawbridge.providers.openai"),
            pytest.raises(AuthFailed) as caught,
        ):
            await client.generate(req(), HOOKS)
    finally:
        await client.aclose()
    assert not caught.value.retryable
    assert "401" in str(caught.value)
    for text in (str(caught.value), caplog.text, repr(client)):
        assert key not in text and key[-4:] not in text
    assert any(r.name == "drawbridge.providers.openai" for r in caplog.records)


async def test_forbidden_is_auth_failed(provider: OpenAIImagesProvider, fake: FakeOpenAI) -> None:
    fake.fail_next("forbidden")
    with pytest.raises(AuthFailed):
        await provider.generate(req(), HOOKS)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"retry_after": "2"}, 2.0),
        ({"retry_after": "2", "retry_after_ms": "1500"}, 1.5),
        ({}, None),
        ({"exhaust_requests": True}, 3.0),  # no Retry-After: x-ratelimit-reset-requests
    ],
)
async def test_rate_limited_reads_retry_after(
    provider: OpenAIImagesProvider,
    fake: FakeOpenAI,
    options: dict[str, Any],
    expected: float | None,
) -> None:
    fake.fail_next("rate_limit", **options)
    with pytest.raises(RateLimited) as caught:
        await provider.generate(req(), HOOKS)
    assert caught.value.retryable
    assert caught.value.retry_after == expected


async def test_insufficient_quota_is_not_retried(
    provider: OpenAIImagesProvider, fake: FakeOpenAI
) -> None:
    fake.fail_next("insufficient_quota")
    with pytest.raises(AuthFailed) as caught:
        await provider.generate(req(), HOOKS)
    assert not caught.value.retryable
    assert "quota" in str(caught.value)


async def test_a_model_the_api_does_not_serve_fails_over(provider: OpenAIImagesProvider) -> None:
    with pytest.raises(ModelUnavailable) as caught:  # 400 invalid_value, param "model"
        await provider.generate(req("gpt-image-9"), HOOKS)
    assert not caught.value.retryable and fails_over(caught.value)


@pytest.mark.parametrize("status", [500, 503])
async def test_server_errors_are_transient_then_recover(
    provider: OpenAIImagesProvider, fake: FakeOpenAI, status: int
) -> None:
    fake.fail_next("server_error", status=status)
    with pytest.raises(Transient) as caught:
        await provider.generate(req(), HOOKS)
    assert caught.value.retryable and str(status) in str(caught.value)
    assert len(await provider.generate(req(), HOOKS)) == 1


async def test_should_retry_false_is_honoured(
    provider: OpenAIImagesProvider, fake: FakeOpenAI
) -> None:
    fake.fail_next("server_error", status=503, should_retry="false")
    with pytest.raises(Transient) as caught:
        await provider.generate(req(), HOOKS)
    assert not caught.value.retryable


@pytest.mark.parametrize(
    ("kind", "model"), [("moderation", "gpt-image-1"), ("content_policy", "dall-e-3")]
)
async def test_refusals(
    provider: OpenAIImagesProvider, fake: FakeOpenAI, kind: str, model: str
) -> None:
    fake.fail_next(kind)
    with pytest.raises(Refused) as caught:
        await provider.generate(req(model), HOOKS)
    assert not caught.value.retryable


async def test_refusal_wrapped_by_a_relay_is_refused() -> None:
    async with FakeOpenAI(request_id_suffix=True) as relay:
        relay.fail_next("moderation", variant="relay")
        client = OpenAIImagesProvider(relay.api_key, relay.base_url)
        try:
            with pytest.raises(Refused) as caught:
                await client.generate(req(), HOOKS)
        finally:
            await client.aclose()
    assert "request id" in str(caught.value)


@pytest.mark.parametrize(
    "variant", ["truncated", "html", "empty", "no_data", "not_image", "bad_base64"]
)
async def test_malformed_bodies_are_transient(
    provider: OpenAIImagesProvider, fake: FakeOpenAI, variant: str
) -> None:
    fake.fail_next("malformed", variant=variant)
    with pytest.raises(Transient):
        await provider.generate(req(), HOOKS)


async def test_error_in_a_200_body(provider: OpenAIImagesProvider, fake: FakeOpenAI) -> None:
    fake.fail_next("error_200")
    with pytest.raises(Transient) as caught:
        await provider.generate(req(), HOOKS)
    assert "upstream error" in str(caught.value)


async def test_bad_request(provider: OpenAIImagesProvider, fake: FakeOpenAI) -> None:
    with pytest.raises(BadRequest) as caught:
        await provider.generate(req("gpt-image-9"), HOOKS)
    assert "invalid_value" in str(caught.value)
    assert not caught.value.retryable


async def test_hang_is_bounded_by_the_request_timeout(
    provider: OpenAIImagesProvider, fake: FakeOpenAI
) -> None:
    fake.fail_next("hang")
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(Transient) as caught:
        await provider.generate(req(timeout_s=0.3), HOOKS)
    assert loop.time() - began < 5
    assert "0.3 s" in str(caught.value)


async def test_connection_refused_is_transient() -> None:
    async with FakeOpenAI() as fake:
        base_url = fake.base_url
    client = OpenAIImagesProvider("sk-anything-1234", base_url)
    try:
        with pytest.raises(Transient):
            await client.generate(req(timeout_s=2), HOOKS)
    finally:
        await client.aclose()


# -- bookkeeping ---------------------------------------------------------------------------------


async def test_usage_per_job_under_concurrency(
    provider: OpenAIImagesProvider, fake: FakeOpenAI
) -> None:
    await asyncio.gather(
        provider.generate(req(n=1, job_id="a"), HOOKS),
        provider.generate(req(n=3, job_id="b"), HOOKS),
    )
    a, b = provider.usage_by_job["a"], provider.usage_by_job["b"]
    assert b["output_tokens"] == 3 * a["output_tokens"]


async def test_usage_is_bounded(provider: OpenAIImagesProvider) -> None:
    provider.usage_keep = 3
    for index in range(5):
        await provider.generate(req(job_id=f"job-{index}"), HOOKS)
    assert list(provider.usage_by_job) == ["job-2", "job-3", "job-4"]


async def test_given_session_is_not_closed(fake: FakeOpenAI) -> None:
    async with aiohttp.ClientSession() as session:
        client = OpenAIImagesProvider(fake.api_key, fake.base_url + "/", session=session)
        assert len(await client.generate(req(), HOOKS)) == 1
        await client.aclose()
        assert not session.closed


async def test_own_session_is_closed(fake: FakeOpenAI) -> None:
    client = OpenAIImagesProvider(fake.api_key, fake.base_url)
    await client.generate(req(), HOOKS)
    session = client._session
    assert session is not None
    await client.aclose()
    assert session.closed
    await client.aclose()  # twice is fine


@pytest.mark.parametrize(
    "request_",
    [
        req(n=0),
        req(n=11),
        req(refs=(png_bytes(),) * 17),
        req("dall-e-2", refs=(png_bytes(), png_bytes())),
    ],
)
async def test_rejected_before_any_call(
    provider: OpenAIImagesProvider, fake: FakeOpenAI, request_: GenerationRequest
) -> None:
    with pytest.raises(BadRequest):
        await provider.generate(request_, HOOKS)
    assert fake.image_calls == []
