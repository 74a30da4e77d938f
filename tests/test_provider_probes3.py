"""Provider probes, round three: what the first rounds left unchecked.

The real clients (`bot/providers/*`) against loopback servers, and the real engine, router and
breakers on a temporary data dir. Each probe asserts what a user or the paying operator should
see; where the code does otherwise the probe is a strict xfail naming the defect.

Areas: Gemini's documented account errors (402 prepay credits, 400 FAILED_PRECONDITION), several
candidates, lying MIME types and RetryInfo; relays' URL batches, data URIs and wrapped base64;
the breaker opening, probing and closing across a family's providers, and a provider that hangs;
sizes and reference images carried across a failover.
"""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bot.catalog import Catalog
from bot.engine import Engine, EngineConfig
from bot.errors import AuthFailed
from bot.jobs import Options, Request, Target, UserRef
from bot.providers.base import Provider
from bot.providers.gemini import GeminiProvider
from bot.providers.grsai import NANO_BANANA, GrsaiProvider
from bot.providers.openai_images import OpenAIImagesProvider
from bot.routing import BreakerState, Router
from bot.store import Store
from tests.fake_gemini import FakeGemini
from tests.fake_grsai import FakeGrsai, Fault
from tests.fake_openai import FakeOpenAI
from tests.fakes import RecordingAdapter
from tests.test_provider_hostile import (
    GEMINI_PATH,
    Hooks,
    Hostile,
    assert_failed,
    assert_images,
    gem,
    gemini_run,
    inline,
    openai_request,
    server,
)
from tests.test_provider_protocol_probes import final_text, job_row

__all__ = ["server"]  # the Hostile loopback fixture, shared with the hostile probes

FLASH = "gemini-2.5-flash-image"
OPENAI_GEN = "/v1/images/generations"
ADMIN = "test:boss"


def png(width: int = 8, height: int = 8, color: tuple[int, int, int] = (20, 90, 160)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


def jpeg(width: int = 8, height: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 40)).save(buf, "JPEG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def google_error(code: int, status: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "status": status, **extra}}


def ask(
    model: str,
    *,
    user: str = "alice",
    prompt: str = "a lighthouse at dusk",
    n: int = 1,
    ratio: str | None = "1:1",
    size: str | None = None,
    seed: int | None = None,
    refs: tuple[bytes, ...] = (),
) -> Request:
    return Request(
        user=UserRef("test", user),
        target=Target("test", chat_id=f"chat-{user}"),
        prompt=prompt,
        options=Options(aspect_ratio=ratio, n=n, size=size, seed=seed),
        model=model,
        reference_images=refs,
    )


@asynccontextmanager
async def engine_on(
    providers: Mapping[str, Provider],
    model: str,
    data_dir: Path,
    *,
    fallbacks: Mapping[str, list[str]] | None = None,
    router_options: Mapping[str, Any] | None = None,
    **config: Any,
) -> AsyncIterator[tuple[Engine, RecordingAdapter, Router]]:
    """The real engine and router over `providers`; the providers are closed afterwards."""
    catalog = Catalog.load()
    store = await Store.open(data_dir)
    config.setdefault("retry_initial", 0.01)
    router = Router(catalog, providers, fallbacks=fallbacks, **dict(router_options or {}))
    engine = Engine(
        store, catalog, providers, EngineConfig(**config), default_model=model, router=router
    )
    adapter = RecordingAdapter()
    engine.register(adapter)
    await engine.start()
    try:
        yield engine, adapter, router
    finally:
        await engine.close()
        await store.close()
        for provider in providers.values():
            await provider.aclose()


async def until(condition: Any, what: str = "the condition") -> None:
    """Wait until `condition()` holds, polled for five seconds at most."""
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{what} did not hold within 5 s")


class Clock:
    """A settable monotonic clock for the router's breakers."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# == Gemini: the account errors Google documents ================================================

PREPAY_DEPLETED = google_error(
    402,
    "RESOURCE_EXHAUSTED",
    "Your prepayment credits are depleted. Please go to AI Studio at https://ai.studio/projects "
    "to manage your project and billing.",
)
NO_FREE_TIER_HERE = google_error(
    400,
    "FAILED_PRECONDITION",
    "Gemini API free tier is not available in your country. Please enable billing on your "
    "project in Google AI Studio.",
)


@pytest.mark.parametrize(
    "status, body",
    [(402, PREPAY_DEPLETED), (400, NO_FREE_TIER_HERE)],
    ids=["402 prepay credits depleted", "400 FAILED_PRECONDITION billing"],
)
async def test_gemini_account_errors_are_the_operators_not_the_users(
    server: Hostile, status: int, body: dict[str, Any]
) -> None:
    server.routes[GEMINI_PATH] = server.reply(body, status=status)
    value, _ = await gemini_run(server.url("/v1beta"))
    error = assert_failed(value, AuthFailed)
    assert error.retryable is False


async def test_gemini_out_of_prepaid_credits_fails_over_and_tells_the_admins(
    server: Hostile, tmp_path: Path
) -> None:
    server.routes[GEMINI_PATH] = server.reply(PREPAY_DEPLETED, status=402)
    async with FakeGrsai() as grsai:
        providers: dict[str, Provider] = {
            "gemini": GeminiProvider("AIza-operator", server.url("/v1beta")),
            "grsai": GrsaiProvider(grsai.api_key, grsai.base_url, poll_interval=0.01),
        }
        async with engine_on(
            providers,
            FLASH,
            tmp_path,
            fallbacks={"nano-banana": ["grsai", "gemini"]},
            admin_ids=frozenset({ADMIN}),
        ) as (engine, adapter, _):
            ticket = await engine.submit(ask(FLASH))
            await engine.run_until_idle()
            row = await job_row(tmp_path, ticket.job_id)
            text = final_text(adapter, ticket.job_id)
            assert (row["status"], row["provider"]) == ("succeeded", "grsai"), (
                f"Gemini out of prepaid credits ended the job {row['status']} "
                f"({row['error_kind']}) instead of failing over; the user was told {text!r}"
            )
            # The operator hears of it (in the background), as of a rejected key.
            await until(lambda: any(t.chat_id == "boss" for t, _ in adapter.notices))


# == Breakers: opening, probing and closing across a family's providers ========================


async def test_the_breaker_sends_jobs_to_the_fallback_until_a_probe_closes_it(
    tmp_path: Path,
) -> None:
    clock = Clock()
    async with FakeGrsai() as grsai, FakeGemini() as gemini:
        grsai.submit_faults.extend([Fault.http(503), Fault.http(503)])
        providers: dict[str, Provider] = {
            "grsai": GrsaiProvider(grsai.api_key, grsai.base_url, poll_interval=0.01),
            "gemini": GeminiProvider(gemini.api_key, gemini.base_url),
        }

        def draws() -> int:
            return sum(1 for r in grsai.requests if r.path == NANO_BANANA)

        async with engine_on(
            providers,
            "nano-banana-pro",
            tmp_path,
            fallbacks={"nano-banana-pro": ["grsai", "gemini"]},
            router_options={"breaker_threshold": 2, "breaker_cooldown": 30.0, "clock": clock},
            retry_attempts=2,
            admin_ids=frozenset({ADMIN}),
        ) as (engine, adapter, router):
            breaker = router.breakers["grsai"]
            served: list[tuple[str, str]] = []
            for step in range(4):
                if step == 2:
                    clock.now += 31  # the cool-down is over: the next job probes GrsAI
                ticket = await engine.submit(ask("nano-banana-pro", prompt=f"a tower, take {step}"))
                await engine.run_until_idle()
                row = await job_row(tmp_path, ticket.job_id)
                served.append((row["status"], row["provider"]))
                if step == 0:
                    assert breaker.state is BreakerState.OPEN and draws() == 2
                if step == 1:
                    assert draws() == 2, "a job was sent to GrsAI while its breaker was open"
            assert breaker.state is BreakerState.CLOSED
            await until(lambda: any("grsai" in text for _, text in adapter.notices))
    assert served == [
        ("succeeded", "gemini"),
        ("succeeded", "gemini"),
        ("succeeded", "grsai"),
        ("succeeded", "grsai"),
    ]
    assert draws() == 4 and len(gemini.calls()) == 2


async def test_a_job_started_while_the_breaker_probes_waits_for_the_probe(
    tmp_path: Path,
) -> None:
    # One provider, no fallback (the common small deployment). A 500 opens the breaker
    # (threshold 1 here, 5 by default); after the cool-down one job probes, and the probe is a
    # real generation that takes a while. A job that comes to the breaker meanwhile is told
    # "retry in 0.05 s" (the cool-down is over), tries four times within a quarter second and
    # fails, while the provider is answering fine.
    async with FakeGemini(slow_delay=1.5) as gemini:
        gemini.faults.extend(["internal", "slow"])
        providers: dict[str, Provider] = {"gemini": GeminiProvider(gemini.api_key, gemini.base_url)}
        async with engine_on(
            providers,
            FLASH,
            tmp_path,
            router_options={"breaker_threshold": 1, "breaker_cooldown": 0.3},
            retry_attempts=4,
        ) as (engine, adapter, router):
            first = await engine.submit(ask(FLASH, user="alice"))
            await until(lambda: router.breakers["gemini"].state is BreakerState.OPEN)
            second = await engine.submit(ask(FLASH, user="bob"))
            await engine.run_until_idle()
            rows = [await job_row(tmp_path, t.job_id) for t in (first, second)]
            texts = [final_text(adapter, t.job_id) for t in (first, second)]
    assert [r["status"] for r in rows] == ["succeeded", "succeeded"], (
        f"{[(r['status'], r['error']) for r in rows]}; told {texts}"
    )


async def test_a_provider_that_hangs_opens_its_breaker_and_later_jobs_fail_over(
    tmp_path: Path,
) -> None:
    # Gemini accepts every call and never answers. GENERATE_TIMEOUT (1 s here; an operator's
    # 120 or 300 s against a model's 600) is shorter than the model's own request timeout, so
    # each job ends at its stage timeout, whose cancellation reaches the router as
    # CancelledError, which the breaker does not count: after any number of hung jobs it stays
    # closed, and no job ever reaches the family's fallback, which is up.
    async with FakeGemini(fault="hang") as gemini, FakeGrsai() as grsai:
        providers: dict[str, Provider] = {
            "gemini": GeminiProvider(gemini.api_key, gemini.base_url),
            "grsai": GrsaiProvider(grsai.api_key, grsai.base_url, poll_interval=0.01),
        }
        async with engine_on(
            providers,
            FLASH,
            tmp_path,
            fallbacks={"nano-banana": ["gemini", "grsai"]},
            router_options={"breaker_threshold": 2},
            generate_timeout=1.0,
        ) as (engine, _, router):
            rows = []
            for step in range(3):
                ticket = await engine.submit(ask(FLASH, prompt=f"a bridge, take {step}"))
                await engine.run_until_idle()
                rows.append(await job_row(tmp_path, ticket.job_id))
            state = router.breakers["gemini"].state
    assert [r["error_kind"] for r in rows[:2]] == ["timeout", "timeout"]
    assert (rows[2]["status"], rows[2]["provider"]) == ("succeeded", "grsai"), (
        f"after two hung jobs Gemini's breaker is {state.value} and the third job ended "
        f"{rows[2]['status']} ({rows[2]['error_kind']}) on {rows[2]['provider']}"
    )


# == What a failover carries to the next provider ==============================================


async def test_a_4k_job_failed_over_to_grsai_still_asks_for_4k(tmp_path: Path) -> None:
    # PROVIDER_FALLBACKS' default sends gpt-image-2 to GrsAI when OpenAI is down. The job asked
    # (and holds the price of) a 4K image; the backup's catalog entry lists no sizes, so the
    # engine drops the size and GrsAI is asked for gpt-image-2's 1K default, which the user gets
    # as their "4K" image. Either GrsAI is asked for 4K or the job does not go there.
    async with FakeOpenAI() as openai, FakeGrsai() as grsai:
        openai.fail_next("server_error", times=4, status=503)
        providers: dict[str, Provider] = {
            "openai": OpenAIImagesProvider(openai.api_key, openai.base_url),
            "grsai": GrsaiProvider(grsai.api_key, grsai.base_url, poll_interval=0.01),
        }
        async with engine_on(
            providers,
            "gpt-image-2",
            tmp_path,
            fallbacks={"gpt-image-2": ["openai", "grsai"]},
            retry_attempts=1,
        ) as (engine, _, _):
            ticket = await engine.submit(ask("gpt-image-2", size="4K"))
            await engine.run_until_idle()
            row = await job_row(tmp_path, ticket.job_id)
    asked = [body.get("aspectRatio") for body in grsai.submitted_bodies()]
    assert [r.json["size"] for r in openai.calls(OPENAI_GEN)] == ["2880x2880"]
    assert all(a == "2880x2880" for a in asked), (
        f"the 4K job ({row['status']} on {row['provider']}, charged {row['cost_usd']}) asked "
        f"GrsAI for {asked}"
    )


# == Relays: URL batches, data URIs, base64 as relays spell it =================================

BROKEN_SECOND_URL = {
    "HTML page": (b"<html><body>Please log in</body></html>", 200, "text/html"),
    "cut-off PNG": (png(64, 64)[:60], 200, "image/png"),
    "HTTP 502": (b"bad gateway", 502, "text/plain"),
}


@pytest.mark.parametrize("case", BROKEN_SECOND_URL)
async def test_relay_url_batch_with_one_broken_url_is_not_bought_again(
    server: Hostile, tmp_path: Path, case: str
) -> None:
    # A relay answers n=2 with two URLs (new-api's default output, providers.md §4.4); the
    # first downloads, the second does not give an image. Both were billed. For base64 items the
    # client keeps the good one (README: "one unusable image of a batch does not throw away the
    # others"); for URL items the second download's Transient fails the whole call, the engine
    # retries it, and the relay bills the batch again, and again.
    body, status, content_type = BROKEN_SECOND_URL[case]
    server.routes["/files/a.png"] = server.reply(png(), content_type="image/png")
    server.routes["/files/b.png"] = server.reply(body, status=status, content_type=content_type)
    items = [{"url": server.url("/files/a.png")}, {"url": server.url("/files/b.png")}]
    server.routes[OPENAI_GEN] = server.reply({"created": 1, "data": items})
    provider = OpenAIImagesProvider("sk-relay-0000", server.url("/v1"))
    async with engine_on({"openai": provider}, "gpt-image-1", tmp_path, retry_attempts=4) as (
        engine,
        adapter,
        _,
    ):
        ticket = await engine.submit(ask("gpt-image-1", n=2))
        await engine.run_until_idle()
        row = await job_row(tmp_path, ticket.job_id)
    calls = server.count(OPENAI_GEN)
    assert calls == 1, (
        f"{calls} billed n=2 calls for one job that ended {row['status']} "
        f"({row['error_kind']}: {row['error']}), delivering {adapter.delivered(ticket.job_id)}"
    )
    assert (row["status"], row["n_images"]) == ("succeeded", 1)


def data_uri_wrapped(data: bytes) -> str:
    text = b64(data)
    return "data:image/png;base64," + "\n".join(text[i : i + 76] for i in range(0, len(text), 76))


RELAY_SPELLINGS = {
    "data URI in url, wrapped at 76": lambda image: {"url": data_uri_wrapped(image)},
    "data URI in b64_json": lambda image: {"b64_json": "data:image/png;base64," + b64(image)},
    "url-safe, unpadded, CRLF": lambda image: {
        "b64_json": base64.urlsafe_b64encode(image).decode().rstrip("=")[:40]
        + "\r\n"
        + base64.urlsafe_b64encode(image).decode().rstrip("=")[40:]
    },
}


@pytest.mark.parametrize("case", RELAY_SPELLINGS)
async def test_relay_base64_spellings_decode_to_the_same_image(server: Hostile, case: str) -> None:
    image = png(96, 64, (250, 250, 250))  # long enough that its base64 holds - and _
    server.routes[OPENAI_GEN] = server.reply({"created": 1, "data": [RELAY_SPELLINGS[case](image)]})
    provider = OpenAIImagesProvider("sk-relay-0000", server.url("/v1"))
    try:
        images = await provider.generate(openai_request(), Hooks())
    finally:
        await provider.aclose()
    assert [(i.data, i.mime, i.width, i.height) for i in images] == [(image, "image/png", 96, 64)]


# == Gemini answers the first rounds did not try ================================================


async def test_gemini_several_candidates_give_one_image_from_the_one_that_has_it(
    server: Hostile,
) -> None:
    blocked = {"content": {}, "finishReason": "IMAGE_SAFETY", "index": 0}
    drew = {
        "content": {"parts": [{"text": "here"}, inline(b64(png(16, 8)))]},
        "finishReason": "STOP",
        "index": 1,
    }
    also = {"content": {"parts": [inline(b64(png(8, 16)))]}, "finishReason": "STOP", "index": 2}
    server.routes[GEMINI_PATH] = server.sequence(
        server.reply({"candidates": [blocked, drew]}),
        server.reply({"candidates": [drew, also]}),
    )
    first, _ = await gemini_run(server.url("/v1beta"))
    second, _ = await gemini_run(server.url("/v1beta"))
    assert_images(first, n=1, size=(16, 8))
    assert_images(second, n=1)  # one image asked for, one returned (and charged)


async def test_gemini_inline_data_of_a_lying_mime_type_is_taken_for_what_it_is(
    server: Hostile,
) -> None:
    server.routes[GEMINI_PATH] = server.reply(gem([inline(b64(jpeg(24, 12)), mime="image/png")]))
    value, _ = await gemini_run(server.url("/v1beta"))
    assert isinstance(value, list), value
    assert [(i.mime, i.width, i.height) for i in value] == [("image/jpeg", 24, 12)]
    assert value[0].data.startswith(b"\xff\xd8\xff")


async def test_gemini_retry_info_past_the_stage_ends_the_job_at_once(tmp_path: Path) -> None:
    # RetryInfo "17s" with 5 s of the stage left: not waited out, not called again, not charged.
    async with FakeGemini(fault="rate_limit", retry_delay="17s") as gemini:
        providers: dict[str, Provider] = {"gemini": GeminiProvider(gemini.api_key, gemini.base_url)}
        async with engine_on(
            providers, FLASH, tmp_path, retry_attempts=4, generate_timeout=5.0
        ) as (engine, adapter, _):
            ticket = await engine.submit(ask(FLASH))
            await engine.run_until_idle()
            row = await job_row(tmp_path, ticket.job_id)
            text = final_text(adapter, ticket.job_id)
    assert (row["status"], row["error_kind"], row["cost_usd"]) == ("failed", "rate_limited", 0)
    assert len(gemini.calls()) == 1
    assert "busy" in text and "not charged" in text


async def test_an_hour_long_retry_after_tells_the_user_for_how_long(
    server: Hostile, tmp_path: Path
) -> None:
    error = {"error": {"message": "Rate limit exceeded", "code": "rate_limit_exceeded"}}
    server.routes[OPENAI_GEN] = server.reply(error, status=429, headers={"retry-after": "3600"})
    provider = OpenAIImagesProvider("sk-relay-0000", server.url("/v1"))
    async with engine_on({"openai": provider}, "gpt-image-1", tmp_path, retry_attempts=4) as (
        engine,
        adapter,
        _,
    ):
        ticket = await engine.submit(ask("gpt-image-1"))
        await engine.run_until_idle()
        row = await job_row(tmp_path, ticket.job_id)
        text = final_text(adapter, ticket.job_id)
    assert (row["status"], row["error_kind"], row["cost_usd"]) == ("failed", "rate_limited", 0)
    assert server.count(OPENAI_GEN) == 1
    assert "60 minutes" in text and "not charged" in text, text


# == Reference images and seeds, in each API's own form ========================================


async def test_reference_images_reach_the_fallback_in_its_own_form(tmp_path: Path) -> None:
    # GrsAI takes references as data URIs; when it is down the job moves to Gemini, which must
    # get the same bytes as inlineData with their real MIME type.
    refs = (jpeg(20, 10), png(10, 20))
    async with FakeGrsai() as grsai, FakeGemini() as gemini:
        grsai.submit_faults.extend([Fault.http(502)] * 2)
        providers: dict[str, Provider] = {
            "grsai": GrsaiProvider(grsai.api_key, grsai.base_url, poll_interval=0.01),
            "gemini": GeminiProvider(gemini.api_key, gemini.base_url),
        }
        async with engine_on(
            providers,
            "nano-banana",
            tmp_path,
            fallbacks={"nano-banana": ["grsai", "gemini"]},
            retry_attempts=2,
        ) as (engine, _, _):
            ticket = await engine.submit(ask("nano-banana", refs=refs))
            await engine.run_until_idle()
            row = await job_row(tmp_path, ticket.job_id)
    assert (row["status"], row["provider"]) == ("succeeded", "gemini")
    first = grsai.submitted_bodies()[0]
    assert [u.split(",")[0] for u in first["urls"]] == [
        "data:image/jpeg;base64",
        "data:image/png;base64",
    ]
    (call,) = gemini.calls()
    sent = [p["inlineData"] for p in call.parts if "inlineData" in p]
    assert [(s["mimeType"], base64.b64decode(s["data"])) for s in sent] == [
        ("image/jpeg", refs[0]),
        ("image/png", refs[1]),
    ]


async def test_a_seed_goes_only_to_the_api_that_takes_one(tmp_path: Path) -> None:
    # OpenAI's Images API rejects unknown fields (400 unknown_parameter), GrsAI documents none:
    # a --seed must not break those jobs, and Gemini gets it as generationConfig.seed.
    async with FakeOpenAI() as openai, FakeGrsai() as grsai, FakeGemini() as gemini:
        providers: dict[str, Provider] = {
            "openai": OpenAIImagesProvider(openai.api_key, openai.base_url),
            "grsai": GrsaiProvider(grsai.api_key, grsai.base_url, poll_interval=0.01),
            "gemini": GeminiProvider(gemini.api_key, gemini.base_url),
        }
        async with engine_on(providers, FLASH, tmp_path) as (engine, _, _):
            models = ("gpt-image-1", "nano-banana", "grsai-gpt-image-2", FLASH)
            tickets = [
                await engine.submit(ask(model, user=f"user{i}", seed=424242))
                for i, model in enumerate(models)
            ]
            await engine.run_until_idle()
            rows = [await job_row(tmp_path, t.job_id) for t in tickets]
    assert [r["status"] for r in rows] == ["succeeded"] * 4, rows
    assert "seed" not in openai.calls(OPENAI_GEN)[0].json
    assert all("seed" not in body for body in grsai.submitted_bodies())
    assert [c.generation_config.get("seed") for c in gemini.calls()] == [424242]
