"""Routing: breakers, failover along a family's chain, and a GrsAI task resumed after a crash."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiosqlite
import pytest

from bot.catalog import Catalog
from bot.engine import Engine, EngineConfig
from bot.errors import BadRequest, Refused, Transient
from bot.jobs import Options, Request, Target, UserRef
from bot.providers.base import GenerationRequest, NullHooks
from bot.providers.gemini import GeminiProvider
from bot.providers.grsai import GrsaiProvider
from bot.routing import Breaker, BreakerState, Router
from bot.store import Store
from tests.fake_gemini import FakeGemini
from tests.fake_grsai import FakeGrsai, Fault
from tests.fakes import RecordingAdapter, ScriptedProvider


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_consecutive_failures_and_probes_half_open() -> None:
    clock = Clock()
    changes: list[BreakerState] = []
    b = Breaker(
        "grsai", threshold=3, cooldown=10, clock=clock, on_change=lambda _, s: changes.append(s)
    )
    for _ in range(2):
        b.failure(Transient("503"))
    b.failure(Refused("no"))  # a refusal says nothing about the provider's health
    b.failure(BadRequest("bad size"))
    assert b.state is BreakerState.CLOSED and b.allow()
    b.failure(Transient("503"))
    assert b.state is BreakerState.OPEN and not b.allow()
    clock.now = 10
    assert b.state is BreakerState.HALF_OPEN
    assert b.allow() and not b.allow()  # one probe at a time
    b.failure(Transient("still down"))
    assert b.state is BreakerState.OPEN
    clock.now = 20
    assert b.allow()
    b.success()
    assert b.state is BreakerState.CLOSED and b.allow()
    assert (
        changes == [BreakerState.OPEN, BreakerState.OPEN, BreakerState.CLOSED]
        or changes[-1] is BreakerState.CLOSED
    )


def test_chains_map_a_family_to_each_providers_model() -> None:
    catalog = Catalog.load()
    providers = {"grsai": object(), "gemini": object()}
    router = Router(catalog, providers, fallbacks={"nano-banana-pro": ["grsai", "gemini"]})  # type: ignore[arg-type]
    spec = catalog.get("nano-banana-pro")
    assert spec is not None
    routes = router.routes(spec)
    assert [(r.spec.name, r.spec.provider) for r in routes] == [
        ("nano-banana-pro", "grsai"),
        ("gemini-3-pro-image", "gemini"),
    ]
    gem = catalog.get("gemini-3-pro-image")
    # The chain serves the family both ways: its own provider first, then the others.
    assert gem is not None
    assert [r.spec.name for r in router.routes(gem)] == ["gemini-3-pro-image", "nano-banana-pro"]
    dalle = catalog.get("dall-e-3")
    assert dalle is not None and not router.available(dalle)  # openai is not configured


async def test_a_provider_cap_counts_calls_generating_not_downloading() -> None:
    """PROVIDER_CONCURRENCY=demo=1: the second call waits while the first generates, and
    starts once the first has its images made, while it is still fetching them."""
    provider = ScriptedProvider()
    provider.gates["a"] = asyncio.Event()
    provider.fetch_gates["a"] = asyncio.Event()
    catalog = Catalog.load()
    router = Router(catalog, {"demo": provider}, concurrency={"demo": 1})
    spec = catalog.get("demo")
    assert spec is not None
    (route,) = router.routes(spec)

    def call(prompt: str) -> asyncio.Task[object]:
        req = GenerationRequest(prompt, "demo", "demo", "", prompt, 1, None, None, None)
        return asyncio.create_task(router.call(route, req, NullHooks()))

    a, b = call("a"), call("b")
    for _ in range(20):
        await asyncio.sleep(0)
    assert provider.started == ["a"]  # b waits for the cap while a generates
    provider.gates["a"].set()
    async with asyncio.timeout(5):
        await b
    assert provider.started == ["a", "b"] and not a.done()  # a is still fetching its images
    provider.fetch_gates["a"].set()
    async with asyncio.timeout(5):
        await a
    c = call("c")  # the cap was given back once, not twice: c alone, then one more
    async with asyncio.timeout(5):
        await c
    assert router._slots["demo"]._value == 1


def request(model: str) -> Request:
    return Request(
        user=UserRef("test", "alice"),
        target=Target("test", chat_id="c1"),
        prompt="a lighthouse",
        options=Options(aspect_ratio="16:9"),
        model=model,
    )


async def status(data_dir: Path, job_id: str) -> tuple[object, ...]:
    async with aiosqlite.connect(data_dir / "drawbridge.db") as db:
        (r,) = await db.execute_fetchall(
            "SELECT status, provider, model, cost_usd FROM jobs WHERE id = ?", (job_id,)
        )
        return tuple(r)


async def test_failover_to_the_next_provider_when_the_first_is_down(tmp_path: Path) -> None:
    async with FakeGrsai() as grsai_fake, FakeGemini() as gemini_fake:
        grsai_fake.submit_faults.extend([Fault.http(503)] * 50)
        grsai = GrsaiProvider(grsai_fake.api_key, grsai_fake.base_url, poll_interval=0.01)
        gemini = GeminiProvider(gemini_fake.api_key, gemini_fake.base_url)
        providers = {"grsai": grsai, "gemini": gemini}
        catalog = Catalog.load()
        router = Router(
            catalog,
            providers,
            fallbacks={"nano-banana-pro": ["grsai", "gemini"]},
            breaker_threshold=2,
        )
        store = await Store.open(tmp_path)
        engine = Engine(
            store,
            catalog,
            providers,
            EngineConfig(retry_attempts=2, retry_initial=0.01),
            router=router,
        )
        engine.register(RecordingAdapter())
        await engine.start()
        try:
            first = await engine.submit(request("nano-banana-pro"))
            await engine.run_until_idle()
            # GrsAI failed twice (retries) and its breaker opened: the job went to Gemini.
            assert router.breakers["grsai"].state is BreakerState.OPEN
            submits_while_open = len(grsai_fake.requests)
            second = await engine.submit(request("nano-banana-pro"))
            await engine.run_until_idle()
            assert len(grsai_fake.requests) == submits_while_open  # an open breaker is not called
            for ticket in (first, second):
                s, provider, model, cost = await status(tmp_path, ticket.job_id)
                assert (s, provider, model) == ("succeeded", "gemini", "nano-banana-pro")
                gem = catalog.get("gemini-3-pro-image")
                assert gem is not None and cost == pytest.approx(gem.price_usd)
        finally:
            await engine.close()
            await store.close()
            await grsai.aclose()
            await gemini.aclose()


async def test_a_provider_busy_for_an_hour_sends_the_job_to_the_next_one_now(
    tmp_path: Path,
) -> None:
    """A 429 whose Retry-After outlasts the job's stage is not waited out on that provider."""
    async with FakeGrsai() as grsai_fake, FakeGemini() as gemini_fake:
        grsai_fake.submit_faults.append(Fault.http(429, retry_after="3600"))
        grsai = GrsaiProvider(grsai_fake.api_key, grsai_fake.base_url, poll_interval=0.01)
        gemini = GeminiProvider(gemini_fake.api_key, gemini_fake.base_url)
        providers = {"grsai": grsai, "gemini": gemini}
        catalog = Catalog.load()
        router = Router(catalog, providers, fallbacks={"nano-banana-pro": ["grsai", "gemini"]})
        store = await Store.open(tmp_path)
        config = EngineConfig(retry_attempts=4, retry_initial=0.01, generate_timeout=600)
        engine = Engine(store, catalog, providers, config, router=router)
        engine.register(RecordingAdapter())
        await engine.start()
        try:
            ticket = await engine.submit(request("nano-banana-pro"))
            async with asyncio.timeout(20):  # it would have slept 120 s before a retry
                await engine.run_until_idle()
            s, provider, _, _ = await status(tmp_path, ticket.job_id)
            assert (s, provider) == ("succeeded", "gemini")
            assert len([r for r in grsai_fake.requests if "draw" in r.path]) == 1
        finally:
            await engine.close()
            await store.close()
            await grsai.aclose()
            await gemini.aclose()


async def test_a_grsai_task_submitted_before_a_crash_is_polled_not_paid_again(
    tmp_path: Path,
) -> None:
    async with FakeGrsai(line_delay=0.3, steps=[0, 10, 20, 30, 40, 50, 60, 70]) as fake:
        catalog = Catalog.load()
        provider = GrsaiProvider(fake.api_key, fake.base_url, poll_interval=0.02)
        store = await Store.open(tmp_path)
        engine = Engine(
            store, catalog, {"grsai": provider}, EngineConfig(), default_model="nano-banana"
        )
        engine.register(RecordingAdapter())
        await engine.start()
        ticket = await engine.submit(request("nano-banana"))
        async with aiosqlite.connect(tmp_path / "drawbridge.db") as db:
            for _ in range(500):
                (r,) = await db.execute_fetchall("SELECT task_id FROM jobs")
                if r[0]:
                    break
                await asyncio.sleep(0.01)
        assert r[0] and fake.submits == 1
        # The process dies: tasks cancelled, nothing written on the way out.
        for task in [engine._scheduler, engine._sweeper, *engine._running.values()]:
            assert task is not None
            task.cancel()
        await asyncio.gather(*engine._running.values(), return_exceptions=True)
        await store.close()
        await provider.aclose()

        provider = GrsaiProvider(fake.api_key, fake.base_url, poll_interval=0.02)
        store = await Store.open(tmp_path)
        adapter = RecordingAdapter()
        engine = Engine(
            store, catalog, {"grsai": provider}, EngineConfig(), default_model="nano-banana"
        )
        engine.register(adapter)
        await engine.start()
        try:
            await engine.run_until_idle()
            s, provider_name, _, _ = await status(tmp_path, ticket.job_id)
            assert (s, provider_name) == ("succeeded", "grsai")
            assert fake.submits == 1 and fake.result_calls >= 1
            assert adapter.delivered(ticket.job_id) == 1
        finally:
            await engine.close()
            await store.close()
            await provider.aclose()
