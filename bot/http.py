"""The HTTP server (`HTTP_HOST`, `HTTP_PORT`): health, metrics, and the webhook routes.

Adapters and providers add their own routes (Telegram's webhook, GrsAI's callbacks) before it
starts. It runs as a service beside the adapters and closes after them.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from bot.app import Core
from bot.providers.grsai import GrsaiProvider

log = logging.getLogger("drawbridge.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_WEBHOOK_BYTES = 1_000_000
HEALTH_WRITE_TIMEOUT = 2.0  # seconds the health check waits for an empty write, after a failure


class EngineCollector(Collector):
    """Gauges read from the live engine at scrape time (the rest is in `engine.metrics`)."""

    def __init__(self, core: Core) -> None:
        self.core = core

    def collect(self) -> Any:
        engine = self.core.engine
        breakers = GaugeMetricFamily(
            "drawbridge_breaker_open",
            "1 while a provider's circuit breaker is open.",
            labels=["provider"],
        )
        for name, breaker in engine.router.breakers.items():
            breakers.add_metric([name], 1.0 if breaker.state.value != "closed" else 0.0)
        yield breakers


class HttpServer:
    """aiohttp on HTTP_HOST:HTTP_PORT; port 0 in settings means no server at all."""

    def __init__(self, core: Core, host: str, port: int) -> None:
        self.core = core
        self.host = host
        self.port = port
        self.app = web.Application(client_max_size=MAX_WEBHOOK_BYTES)
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(core))
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/metrics", self._metrics)
        self.app.router.add_post("/hooks/grsai/{job}/{secret}", self._grsai_hook)
        self.started = time.time()
        self._runner: web.AppRunner | None = None
        self.health_checks: dict[str, Callable[[], bool]] = {}
        self.stopping = False  # draining after SIGTERM: unwell to a load balancer from now on

    def add_post(self, path: str, handler: Handler) -> None:
        """A route for an adapter (Telegram's webhook); call before `open`."""
        self.app.router.add_post(path, handler)

    @property
    def bound_port(self) -> int:
        if self._runner is None or not self._runner.addresses:
            return self.port
        return int(self._runner.addresses[0][1])

    # ---- Service ---------------------------------------------------------------------------

    async def open(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        log.info("http server on %s:%d", self.host, self.bound_port)

    async def start(self) -> None:
        return None

    async def stop_intake(self) -> None:
        self.stopping = True

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- routes ----------------------------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.Response:
        checks: dict[str, bool] = {}
        engine = self.core.engine
        try:
            await self.core.store.get_job("healthz")
            checks["database"] = True
        except Exception:
            log.warning("health check: database unreadable", exc_info=True)
            checks["database"] = False
        if checks["database"] and engine.storage_failing:
            # New jobs' rows were refused: readable is not enough. An empty write shows
            # whether it has cleared (a bot no request reaches would stay unwell otherwise).
            try:
                async with asyncio.timeout(HEALTH_WRITE_TIMEOUT):
                    await self.core.store.flush()
                engine.storage_failing = False
            except (TimeoutError, sqlite3.Error, OSError):
                checks["database"] = False
        for name, check in self.health_checks.items():
            try:
                checks[name] = bool(check())
            except Exception:
                checks[name] = False
        if self.stopping:
            checks["accepting"] = False  # finishing what it has, taking nothing new
        body = {
            "ok": all(checks.values()),
            "checks": checks,
            "queue_depth": engine.queue_depth,
            "in_flight": engine.in_flight,
            "uptime_s": round(time.time() - self.started, 1),
        }
        return web.json_response(body, status=200 if body["ok"] else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.core.engine.metrics.registry) + generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _grsai_hook(self, request: web.Request) -> web.Response:
        signer = self.core.webhooks
        job, secret = request.match_info["job"], request.match_info["secret"]
        if signer is None or not signer.check(job, secret):
            return web.json_response({"ok": False}, status=404)
        provider = self.core.providers.get("grsai")
        try:
            payload = await request.json()
        except (ValueError, RecursionError):  # (nested past the parser's depth)
            return web.json_response({"ok": False, "error": "not JSON"}, status=400)
        if isinstance(provider, GrsaiProvider) and isinstance(payload, dict):
            await provider.webhook_received(payload, job)
        return web.json_response({"ok": True})
