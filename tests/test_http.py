"""The HTTP server: health, Prometheus metrics, and GrsAI's signed webhook route."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.app import Core, open_core
from bot.http import HttpServer
from bot.settings import load_settings


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[Core, HttpServer]]:
    settings = load_settings(
        {
            "DRAWBRIDGE_DATA_DIR": str(tmp_path),
            "PUBLIC_URL": "https://bot.example.com",
            "GRSAI_API_KEY": "sk-test",
            "GRSAI_BASE_URL": "http://127.0.0.1:9",
        },
        env_file=None,
    )
    async with open_core(settings) as core:
        http = HttpServer(core, "127.0.0.1", 0)
        await http.open()
        await core.engine.start()
        try:
            yield core, http
        finally:
            await http.close()


async def test_healthz_and_metrics(server: tuple[Core, HttpServer]) -> None:
    _, http = server
    base = f"http://127.0.0.1:{http.bound_port}"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/healthz") as resp:
            body = await resp.json()
            assert resp.status == 200 and body["ok"] and body["checks"]["database"]
        async with session.get(f"{base}/metrics") as resp:
            text = await resp.text()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"drawbridge_queue_depth", "drawbridge_in_flight", "drawbridge_breaker_open"} <= names


async def test_grsai_webhook_needs_the_jobs_secret(server: tuple[Core, HttpServer]) -> None:
    core, http = server
    assert core.webhooks is not None
    url = core.webhooks.url_for("job123")
    assert url.startswith("https://bot.example.com/hooks/grsai/job123/")
    path = url.removeprefix("https://bot.example.com")
    base = f"http://127.0.0.1:{http.bound_port}"
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}{path}", json={"id": "t1", "status": "running"}) as resp:
            assert resp.status == 200
        async with session.post(f"{base}/hooks/grsai/job123/forged", json={"id": "t1"}) as resp:
            assert resp.status == 404
        async with session.post(f"{base}{path}", data=b"not json") as resp:
            assert resp.status == 400


async def test_metrics_counters_move_with_the_jobs(server: tuple[Core, HttpServer]) -> None:
    from bot.jobs import Options, Request, Target, UserRef
    from tests.fakes import RecordingAdapter

    core, http = server
    core.engine.register(RecordingAdapter())

    def request(prompt: str) -> Request:
        return Request(
            UserRef("test", "a"), Target("test", chat_id="c"), prompt, Options(n=2), model="demo"
        )

    for prompt in ("a fox", "a cat", "a cat [demo:refuse]"):
        await core.engine.submit(request(prompt))
    await core.engine.run_until_idle()
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{http.bound_port}/metrics") as resp,
    ):
        text = await resp.text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    ok = (("model", "demo"), ("provider", "demo"), ("status", "succeeded"))
    refused = (("model", "demo"), ("provider", "demo"), ("status", "refused"))
    assert samples[("drawbridge_jobs_total", ok)] == 2
    assert samples[("drawbridge_jobs_total", refused)] == 1
    assert samples[("drawbridge_images_total", (("model", "demo"), ("provider", "demo")))] == 4
    assert (
        samples[("drawbridge_provider_errors_total", (("kind", "refused"), ("provider", "demo")))]
        == 1
    )
    assert samples[("drawbridge_deliveries_total", (("outcome", "ok"), ("platform", "test")))] == 2
    assert samples[("drawbridge_job_seconds_count", ())] == 2
    assert samples[("drawbridge_queue_depth", ())] == 0
