"""The composition root: builds store, providers and engine from the settings, and tears them down."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from typing import Protocol

from bot.catalog import Catalog
from bot.engine import Engine, EngineConfig
from bot.providers.base import Provider
from bot.providers.demo import DemoProvider
from bot.quota import Limits, Quotas
from bot.settings import Settings
from bot.store import Store

log = logging.getLogger("drawbridge")


class Service(Protocol):
    """An adapter as the app runs it: connect, take input, stop taking input, close."""

    async def open(self) -> None: ...

    async def start(self) -> None: ...

    async def stop_intake(self) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Core:
    """Everything platform-free, built and ready."""

    settings: Settings
    catalog: Catalog
    store: Store
    engine: Engine
    providers: Mapping[str, Provider]


def engine_config(settings: Settings, **overrides: object) -> EngineConfig:
    config = EngineConfig(
        concurrency=settings.concurrency,
        queue_max=settings.queue_max,
        max_pending_per_user=settings.max_pending_per_user,
        limits=Limits(
            user_images=settings.quota_user_daily_images,
            user_usd=settings.quota_user_daily_usd,
            budget_usd=settings.budget_daily_usd,
        ),
        admin_ids=settings.admin_ids,
        allowed_ids=settings.allowed_ids,
        max_prompt_chars=settings.max_prompt_chars,
        generate_timeout=settings.generate_timeout,
        deliver_timeout=settings.deliver_timeout,
        queue_timeout=settings.queue_timeout,
        shutdown_grace=settings.shutdown_grace,
    )
    return replace(config, **overrides) if overrides else config  # type: ignore[arg-type]


def build_providers(settings: Settings) -> dict[str, Provider]:
    """The demo provider always; paid providers for every key that is configured."""
    providers: dict[str, Provider] = {"demo": DemoProvider(latency=settings.demo_latency)}
    return providers


@asynccontextmanager
async def open_core(settings: Settings, **overrides: object) -> AsyncIterator[Core]:
    """Open the core; on exit the engine drains or parks its jobs, then the database closes."""
    async with AsyncExitStack() as stack:
        catalog = Catalog.load(settings.models_file)
        default_model = catalog.default_model(
            settings.configured_providers(), settings.default_model
        )
        store = await Store.open(settings.data_dir)
        stack.push_async_callback(store.close)
        providers = build_providers(settings)
        for provider in providers.values():
            stack.push_async_callback(provider.aclose)
        config = engine_config(settings, **overrides)
        quotas = Quotas(config.limits, settings.tz, time.time)
        engine = Engine(
            store, catalog, providers, config, default_model=default_model, quotas=quotas
        )
        stack.push_async_callback(engine.close)
        yield Core(settings, catalog, store, engine, providers)


@asynccontextmanager
async def serve(core: Core, services: list[Service]) -> AsyncIterator[None]:
    """Run adapters around a started engine; shutdown runs in reverse order.

    Adapters stop taking work first, the engine then drains or parks its jobs (delivering
    through adapters that are still open), and only then do the adapters close.
    """
    async with AsyncExitStack() as stack:
        for service in services:
            await service.open()  # able to deliver (the engine resumes deliveries at start)
            stack.push_async_callback(service.close)
        await core.engine.start()
        stack.push_async_callback(core.engine.close)
        for service in services:
            await service.start()
            stack.push_async_callback(service.stop_intake)
        yield
