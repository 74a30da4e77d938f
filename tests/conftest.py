"""Shared fixtures: an engine on a temp data dir with a recording adapter and a scripted provider."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from bot.catalog import Catalog
from bot.engine import Engine, EngineConfig
from bot.jobs import Options, Request, Target, UserRef
from bot.quota import Quotas
from bot.store import Store
from tests.fakes import RecordingAdapter, ScriptedProvider

os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")


def pytest_configure(config: pytest.Config) -> None:
    # The product ignores PTB's hint to use the dedicated methods for its lean calls
    # (adapters/telegram_send.py); the suite's "error" filter would undo that.
    from adapters.telegram_send import LEAN_WARNING

    config.addinivalue_line(
        "filterwarnings", f"ignore:{LEAN_WARNING}:telegram.warnings.PTBUserWarning"
    )


TEST_MODELS = """
[models.paid]
provider = "demo"
price_usd = 0.5
aspect_ratios = ["1:1", "16:9"]
default_aspect_ratio = "1:1"
sizes = ["1K", "4K"]
default_size = "1K"
max_images = 4
reference_images = true
max_reference_images = 2
timeout_s = 30

[models.paid.prices_by_size]
"4K" = 1.0
"""


class Clock:
    """A settable clock for quota days and timeouts."""

    def __init__(self, now: float = 1_767_225_600.0) -> None:  # 2026-01-01T00:00:00Z
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    """Builds engines on one data dir, as one process after another would."""

    data_dir: Path
    catalog: Catalog
    clock: Clock
    adapter: RecordingAdapter
    provider: ScriptedProvider
    opened: list[tuple[Engine, Store]]

    async def engine(self, start: bool = True, tz: str = "UTC", **config: object) -> Engine:
        store = await Store.open(self.data_dir)
        config.setdefault("shutdown_grace", 0.5)
        config.setdefault("deliver_backoff", 0.01)
        config.setdefault("retry_initial", 0.01)
        cfg = EngineConfig(**config)  # type: ignore[arg-type]
        quotas = Quotas(cfg.limits, ZoneInfo(tz), self.clock)
        engine = Engine(
            store, self.catalog, {"demo": self.provider}, cfg, clock=self.clock, quotas=quotas
        )
        engine.register(self.adapter)
        self.opened.append((engine, store))
        if start:
            await engine.start()
        return engine

    async def abandon(self, engine: Engine) -> None:
        """Stop an engine the way a crash would: no grace, nothing written on the way out."""
        for task in [engine._scheduler, engine._sweeper, *engine._running.values()]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*engine._running.values(), return_exceptions=True)
        for e, store in list(self.opened):
            if e is engine:
                await store.close()
                self.opened.remove((e, store))


async def new_database(data_dir: Path) -> None:
    """A data dir as this release makes it, with an empty database."""
    store = await Store.open(data_dir)
    await store.close()


def request(
    user: str = "alice",
    prompt: str = "a fox in the snow",
    *,
    n: int = 1,
    model: str | None = None,
    ratio: str | None = None,
    size: str | None = None,
    seed: int | None = None,
    refs: tuple[bytes, ...] = (),
    lang: str = "en",
) -> Request:
    return Request(
        user=UserRef("test", user),
        target=Target("test", chat_id=f"chat-{user}"),
        prompt=prompt,
        options=Options(aspect_ratio=ratio, n=n, size=size, seed=seed),
        model=model,
        reference_images=refs,
        lang=lang,
    )


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    models = tmp_path / "models.toml"
    models.write_text(TEST_MODELS)
    h = Harness(
        data_dir=tmp_path / "data",
        catalog=Catalog.load(models),
        clock=Clock(),
        adapter=RecordingAdapter(platform="test"),
        provider=ScriptedProvider(),
        opened=[],
    )
    yield h
    for engine, store in reversed(h.opened):
        if h.provider.gate is not None:
            h.provider.gate.set()
        await engine.close()
        await store.close()


RequestFactory = Callable[..., Request]
