"""The engine with each real provider client against its loopback fake: the whole job path.

Every job ends with a row and a message: success stores exactly the bytes the fake served and
charges the catalog price; throttling and outages are retried; a hang hits the stage timeout; a
refusal, a malformed body, an expired URL and a wrong key end the job uncharged, with the reason.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
import pytest

from bot.adapter import StatusKind
from bot.catalog import Catalog
from bot.engine import Engine, EngineConfig
from bot.jobs import Options, Request, Target, UserRef
from bot.providers.base import Provider
from bot.providers.gemini import GeminiProvider
from bot.providers.grsai import GrsaiProvider
from bot.providers.openai_images import OpenAIImagesProvider
from bot.store import Store
from tests.fake_gemini import FakeGemini
from tests.fake_grsai import FakeGrsai, Fault
from tests.fake_openai import FakeOpenAI
from tests.fakes import RecordingAdapter


@dataclass
class Setup:
    """One provider wired to its fake, and how to play each fault on it."""

    name: str
    model: str
    provider: Provider
    fake: Any
    served: Callable[[], set[str]]  # sha256 of every image body the fake handed out
    faults: dict[str, Callable[[], None]]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@asynccontextmanager
async def grsai() -> AsyncIterator[Setup]:
    async with FakeGrsai() as fake:
        provider = GrsaiProvider(fake.api_key, fake.base_url, poll_interval=0.01)
        faults: dict[str, Callable[[], None]] = {
            "429 retry-after": lambda: fake.submit_faults.append(Fault.http(429, retry_after="1")),
            "429 for an hour": lambda: fake.submit_faults.append(
                Fault.http(429, retry_after="3600")
            ),
            "429": lambda: fake.submit_faults.append(Fault.http(429)),
            "5xx": lambda: fake.submit_faults.append(Fault.http(503)),
            "hang": lambda: fake.submit_faults.extend([Fault("hang")] * 4),
            "refusal": lambda: setattr(fake, "outcome", "output_moderation"),
            "malformed": lambda: fake.submit_faults.extend([Fault("html", status=200)] * 4),
            "expired": lambda: setattr(fake, "file_ttl", 0.0),
            "wrong key": lambda: setattr(fake, "api_key", "sk-another"),
        }
        yield Setup(
            "grsai",
            "nano-banana",
            provider,
            fake,
            lambda: {sha(data) for data, _ in fake._files.values()},
            faults,
        )
        await provider.aclose()


@asynccontextmanager
async def openai() -> AsyncIterator[Setup]:
    async with FakeOpenAI(url_output=True) as fake:
        provider = OpenAIImagesProvider(fake.api_key, fake.base_url)
        faults: dict[str, Callable[[], None]] = {
            "429 retry-after": lambda: fake.fail_next("rate_limit", retry_after="1"),
            "429 for an hour": lambda: fake.fail_next("rate_limit", retry_after="3600"),
            "429": lambda: fake.fail_next("rate_limit"),
            "5xx": lambda: fake.fail_next("server_error", status=503),
            "hang": lambda: fake.fail_next("hang", times=4),
            "refusal": lambda: fake.fail_next("moderation"),
            "malformed": lambda: fake.fail_next("malformed", times=4),
            "expired": lambda: setattr(fake, "files_status", 404),
            "wrong key": lambda: setattr(fake, "api_key", "sk-another"),
        }
        yield Setup(
            "openai",
            "gpt-image-1",
            provider,
            fake,
            lambda: {sha(data) for data, _ in fake.files.values()},
            faults,
        )
        await provider.aclose()


@asynccontextmanager
async def gemini() -> AsyncIterator[Setup]:
    async with FakeGemini(retry_delay="1s") as fake:
        provider = GeminiProvider(fake.api_key, fake.base_url)

        def served() -> set[str]:
            out = set()
            for payload in fake.responses:
                for cand in payload.get("candidates", []):
                    for part in cand.get("content", {}).get("parts", []):
                        if "inlineData" in part:
                            out.add(sha(base64.b64decode(part["inlineData"]["data"])))
            return out

        faults: dict[str, Callable[[], None]] = {
            "429 retry-after": lambda: fake.faults.append("rate_limit"),
            "429 for an hour": lambda: (
                setattr(fake, "retry_delay", "3600s"),
                fake.faults.append("rate_limit"),
            ),
            "429": lambda: fake.faults.append("rate_limit_bare"),
            "5xx": lambda: fake.faults.append("overloaded"),
            "hang": lambda: setattr(fake, "fault", "hang"),
            "refusal": lambda: setattr(fake, "fault", "image_safety"),
            "malformed": lambda: setattr(fake, "fault", "truncated"),
            "wrong key": lambda: setattr(fake, "api_key", "AIza-another"),
        }
        fake.retry_after_header = "0"
        yield Setup("gemini", "gemini-2.5-flash-image", provider, fake, served, faults)
        await provider.aclose()


SETUPS = {"grsai": grsai, "openai": openai, "gemini": gemini}


@asynccontextmanager
async def engine_for(
    setup: Setup, data_dir: Path
) -> AsyncIterator[tuple[Engine, RecordingAdapter]]:
    store = await Store.open(data_dir)
    config = EngineConfig(retry_attempts=3, retry_initial=0.01, generate_timeout=1.5)
    engine = Engine(
        store, Catalog.load(), {setup.name: setup.provider}, config, default_model=setup.model
    )
    adapter = RecordingAdapter()
    engine.register(adapter)
    await engine.start()
    try:
        yield engine, adapter
    finally:
        await engine.close()
        await store.close()


def request(prompt: str = "a lighthouse at dusk") -> Request:
    return Request(
        user=UserRef("test", "alice"),
        target=Target("test", chat_id="c1"),
        prompt=prompt,
        options=Options(aspect_ratio="1:1"),
    )


async def row(data_dir: Path, job_id: str) -> tuple[Any, ...]:
    async with aiosqlite.connect(data_dir / "drawbridge.db") as db:
        (r,) = await db.execute_fetchall(
            "SELECT status, cost_usd, error_kind, provider FROM jobs WHERE id = ?", (job_id,)
        )
        return tuple(r)


@pytest.mark.parametrize("name", SETUPS)
async def test_success_stores_the_served_bytes_and_charges(name: str, tmp_path: Path) -> None:
    async with SETUPS[name]() as setup, engine_for(setup, tmp_path) as (engine, adapter):
        ticket = await engine.submit(request())
        await engine.run_until_idle()
        status, cost, kind, provider = await row(tmp_path, ticket.job_id)
        spec = engine.catalog.get(setup.model)
        assert spec is not None
        assert (status, kind, provider) == ("succeeded", None, name)
        assert cost == pytest.approx(spec.price_usd)
        ((_, images),) = adapter.deliveries
        assert {sha(img.path.read_bytes()) for img in images} <= setup.served()
        if name == "grsai":  # the stream's progress lines reach the job's status
            assert StatusKind.PROGRESS in adapter.kinds(ticket.job_id)


OUTCOMES = {
    "429 retry-after": ("succeeded", None),
    "429": ("succeeded", None),
    # Told to wait past the stage's time: ended at once, and the user told for how long.
    "429 for an hour": ("failed", "rate_limited"),
    "5xx": ("succeeded", None),
    "hang": ("failed", "timeout"),
    "refusal": ("refused", "refused"),
    "malformed": ("failed", "transient"),
    "expired": ("failed", "expired"),
    "wrong key": ("failed", "auth"),
}


@pytest.mark.parametrize("fault", OUTCOMES)
@pytest.mark.parametrize("name", SETUPS)
async def test_faults_end_the_job_right(name: str, fault: str, tmp_path: Path) -> None:
    async with SETUPS[name]() as setup, engine_for(setup, tmp_path) as (engine, adapter):
        if fault not in setup.faults:
            pytest.skip(f"{name} has no {fault} (results come inline)")
        setup.faults[fault]()
        ticket = await engine.submit(request())
        await engine.run_until_idle()
        status, cost, kind, _ = await row(tmp_path, ticket.job_id)
        assert (status, kind) == OUTCOMES[fault]
        if status != "succeeded":
            assert cost == 0
            final = [u for j, u in adapter.statuses if j == ticket.job_id and u.kind.final]
            assert final and "not charged" in final[-1].text
            if fault == "429 for an hour":
                assert "60 minutes" in final[-1].text
            usage = await engine.usage(UserRef("test", "alice"))
            assert usage.images == 0  # the reservation was released


async def test_openai_streams_partial_images_as_progress(tmp_path: Path) -> None:
    async with FakeOpenAI() as fake:
        provider = OpenAIImagesProvider(fake.api_key, fake.base_url, partial_images=2)
        setup = Setup("openai", "gpt-image-1", provider, fake, set, {})
        async with engine_for(setup, tmp_path) as (engine, adapter):
            ticket = await engine.submit(request())
            await engine.run_until_idle()
            assert (await row(tmp_path, ticket.job_id))[0] == "succeeded"
            percents = [u.percent for j, u in adapter.statuses if j == ticket.job_id and u.percent]
            assert percents == [33, 66]
            (call,) = fake.image_calls
            assert call.json["stream"] is True and call.json["partial_images"] == 2
        await provider.aclose()
