"""The composition root: builds store, providers and engine from the settings, and tears them down."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

from bot.catalog import Catalog, CatalogError
from bot.engine import Engine, EngineConfig
from bot.operator import Blocklist, Operator
from bot.providers.base import Provider
from bot.providers.demo import DemoProvider
from bot.providers.gemini import GeminiProvider
from bot.providers.grsai import GrsaiProvider
from bot.providers.openai_images import OpenAIImagesProvider
from bot.quota import Limits, Quotas
from bot.routing import Router
from bot.settings import Settings
from bot.store import Store

log = logging.getLogger("drawbridge")


class Service(Protocol):
    """An adapter as the app runs it: connect, take input, stop taking input, close."""

    async def open(self) -> None: ...

    async def start(self) -> None: ...

    async def stop_intake(self) -> None: ...

    async def close(self) -> None: ...


@runtime_checkable
class CanFail(Protocol):
    """A service that can lose its platform for good (a token refused mid-run): `failed` is
    set, `failure` says why, and `drawbridge run` stops with it."""

    failed: asyncio.Event
    failure: str


@dataclass(frozen=True, slots=True)
class Core:
    """Everything platform-free, built and ready."""

    settings: Settings
    catalog: Catalog
    store: Store
    engine: Engine
    providers: Mapping[str, Provider]
    webhooks: WebhookSigner | None = None


class WebhookSigner:
    """Per-job secrets in provider webhook URLs, so only the provider can call a job's route.

    The key lives in memory: after a restart old callbacks fail the check, and the provider
    client's polling (the safety net the webhook never replaces) finishes those jobs.
    """

    def __init__(self, public_url: str, key: bytes | None = None) -> None:
        self.public_url = public_url.rstrip("/")
        self.key = key or secrets.token_bytes(32)

    def secret(self, job_id: str) -> str:
        return hmac.new(self.key, job_id.encode(), hashlib.sha256).hexdigest()[:32]

    def url_for(self, job_id: str) -> str:
        return f"{self.public_url}/hooks/grsai/{job_id}/{self.secret(job_id)}"

    def check(self, job_id: str, secret: str) -> bool:
        # As bytes: on text, `compare_digest` raises for anything not ASCII (a 500 to anyone).
        return hmac.compare_digest(
            self.secret(job_id).encode(), secret.encode(errors="surrogateescape")
        )


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
        image_retention_days=settings.image_retention_days,
        result_cache_ttl=settings.result_cache_ttl,
        provider_concurrency=settings.concurrency_by_provider,
    )
    return replace(config, **overrides) if overrides else config  # type: ignore[arg-type]


def build_providers(
    settings: Settings, grsai_webhook: Callable[[str], str] | None = None
) -> dict[str, Provider]:
    """The demo provider always; paid providers for every key that is configured."""
    providers: dict[str, Provider] = {"demo": DemoProvider(latency=settings.demo_latency)}
    if settings.grsai_api_key is not None:
        providers["grsai"] = GrsaiProvider(
            settings.grsai_api_key.get_secret_value(),
            settings.grsai_base_url,
            mode=settings.grsai_mode,
            webhook_url=grsai_webhook,
        )
    if settings.openai_api_key is not None:
        # OpenAI's own API streams gpt-image partial images (progress for the status message);
        # aggregators often don't, so they get the plain call.
        official = "api.openai.com" in settings.openai_base_url
        providers["openai"] = OpenAIImagesProvider(
            settings.openai_api_key.get_secret_value(),
            settings.openai_base_url,
            partial_images=2 if official else 0,
        )
    if settings.gemini_api_key is not None:
        providers["gemini"] = GeminiProvider(
            settings.gemini_api_key.get_secret_value(), settings.gemini_base_url
        )
    return providers


def build_router(settings: Settings, catalog: Catalog, providers: Mapping[str, Provider]) -> Router:
    return Router(
        catalog,
        providers,
        fallbacks=settings.fallbacks,
        concurrency=settings.concurrency_by_provider,
        rpm=settings.rpm_by_provider,
    )


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
        webhooks = WebhookSigner(settings.public_url) if settings.public_url else None
        providers = build_providers(settings, webhooks.url_for if webhooks else None)
        for provider in providers.values():
            stack.push_async_callback(provider.aclose)
        config = engine_config(settings, **overrides)
        quotas = Quotas(config.limits, settings.tz, time.time)
        router = build_router(settings, catalog, providers)
        spec = catalog.get(default_model)
        if spec is not None and not router.available(spec):  # every default request refused
            raise CatalogError(
                f"DEFAULT_MODEL: {spec.name} is served by {spec.provider}, and "
                f"{spec.provider.upper()}_API_KEY is not set (nor a fallback for it)"
            )
        engine = Engine(
            store,
            catalog,
            providers,
            config,
            default_model=default_model,
            quotas=quotas,
            router=router,
            operator=Operator(blocklist=Blocklist.load(settings.blocklist_file)),
        )
        stack.push_async_callback(engine.close)
        yield Core(settings, catalog, store, engine, providers, webhooks)


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
