"""The GrsAI client against the loopback fake: modes, resume, every fault, webhooks."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from bot.errors import AuthFailed, BadRequest, Expired, RateLimited, Refused, Transient
from bot.jobs import GeneratedImage
from bot.providers.base import GenerationRequest
from bot.providers.grsai import COMPLETIONS, NANO_BANANA, GrsaiProvider, gpt_image_size
from tests.fake_grsai import FakeGrsai, Fault, _png
from tests.fakes import png_bytes

Event = tuple[str, Any]


@dataclass
class RecordingHooks:
    """Remembers what the provider told the engine, in order; `on_task` runs inside the hook."""

    events: list[Event] = field(default_factory=list)
    on_task: Callable[[str | None], Awaitable[None]] | None = None
    on_generated: Callable[[], None] | None = None

    async def progress(self, percent: int) -> None:
        self.events.append(("progress", percent))

    async def task_submitted(self, task_id: str | None) -> None:
        self.events.append(("task", task_id))
        if self.on_task is not None:
            await self.on_task(task_id)

    def generated(self) -> None:
        self.events.append(("generated", None))
        if self.on_generated is not None:
            self.on_generated()

    @property
    def tasks(self) -> list[str | None]:
        return [value for kind, value in self.events if kind == "task"]

    @property
    def progress_values(self) -> list[int]:
        return [value for kind, value in self.events if kind == "progress"]


def make_request(**changes: Any) -> GenerationRequest:
    base = GenerationRequest(
        job_id="job-1",
        model="nano-banana",
        remote_model="nano-banana",
        endpoint=NANO_BANANA,
        prompt="a fox in the snow",
        n=1,
        aspect_ratio="1:1",
        size=None,
        seed=None,
        timeout_s=10.0,
    )
    return replace(base, **changes)


@pytest.fixture
async def fake() -> AsyncIterator[FakeGrsai]:
    async with FakeGrsai() as server:
        yield server


ProviderFactory = Callable[..., GrsaiProvider]


@pytest.fixture
async def make_provider(fake: FakeGrsai) -> AsyncIterator[ProviderFactory]:
    made: list[GrsaiProvider] = []

    def factory(**kwargs: Any) -> GrsaiProvider:
        kwargs.setdefault("api_key", fake.api_key)
        kwargs.setdefault("base_url", fake.base_url)
        kwargs.setdefault("poll_interval", 0.01)
        provider = GrsaiProvider(**kwargs)
        made.append(provider)
        return provider

    yield factory
    for provider in made:
        await provider.aclose()


def assert_fake_png(images: list[GeneratedImage], seed: int = 1) -> None:
    assert len(images) == 1
    assert images[0].data == _png(seed)
    assert images[0].mime == "image/png"
    assert (images[0].width, images[0].height) == (8, 8)


# -- success paths ---------------------------------------------------------------------------


async def test_stream_mode_returns_png_and_persists_the_id_first(
    fake: FakeGrsai, make_provider: ProviderFactory
) -> None:
    seen_at_task: list[int] = []
    seen_at_generated: list[int] = []

    async def on_task(task_id: str | None) -> None:
        seen_at_task.append(fake.file_gets)

    hooks = RecordingHooks(
        on_task=on_task, on_generated=lambda: seen_at_generated.append(fake.file_gets)
    )
    images = await make_provider().generate(make_request(), hooks)

    assert_fake_png(images)
    assert hooks.events[0] == ("task", "task-0001")
    assert seen_at_task == [0]  # persisted before the result was fetched
    assert seen_at_generated == [0]  # the slot may go before the download, once
    assert hooks.progress_values == [0, 30, 70]
    assert hooks.tasks == ["task-0001"]
    assert (fake.submits, fake.result_calls, fake.file_gets) == (1, 0, 1)
    submit = fake.requests[0]
    assert submit.path == NANO_BANANA
    assert submit.headers["Authorization"] == f"Bearer {fake.api_key}"
    assert submit.body == {
        "model": "nano-banana",
        "prompt": "a fox in the snow",
        "urls": [],
        "aspectRatio": "1:1",
        "shutProgress": False,
    }


@pytest.mark.parametrize("style", ["sse_done", "bare"])
async def test_stream_variants(fake: FakeGrsai, make_provider: ProviderFactory, style: Any) -> None:
    fake.stream_style = style
    hooks = RecordingHooks()
    images = await make_provider().generate(make_request(), hooks)
    assert_fake_png(images)
    assert hooks.tasks == ["task-0001"]


async def test_poll_mode(fake: FakeGrsai, make_provider: ProviderFactory) -> None:
    hooks = RecordingHooks()
    images = await make_provider(mode="poll").generate(make_request(), hooks)

    assert_fake_png(images)
    assert fake.requests[0].body["webHook"] == "-1"
    assert hooks.events[0] == ("task", "task-0001")
    assert hooks.progress_values == [0, 30, 70]
    assert fake.submits == 1
    assert fake.result_calls == len(fake.steps) + 1
    assert fake.requests[1].body == {"id": "task-0001"}


async def test_pro_model_sends_size_and_reference_images(
    fake: FakeGrsai, make_provider: ProviderFactory
) -> None:
    ref = png_bytes(4, 4)
    request = make_request(
        model="nano-banana-pro",
        remote_model="nano-banana-pro",
        size="2K",
        aspect_ratio=None,
        reference_images=(ref,),
    )
    await make_provider().generate(request, RecordingHooks())
    body = fake.requests[0].body
    assert body["imageSize"] == "2K"
    assert body["aspectRatio"] == "auto"
    assert len(body["urls"]) == 1
    assert body["urls"][0].startswith("data:image/png;base64,")


@pytest.mark.parametrize(
    ("ratio", "expected"),
    [("3:2", "1536x1024"), ("2:3", "1024x1536"), ("1:1", "1024x1024"), (None, "auto")],
)
async def test_gpt_image_2_uses_completions_and_pixel_sizes(
    fake: FakeGrsai, make_provider: ProviderFactory, ratio: str | None, expected: str
) -> None:
    request = make_request(
        model="grsai-gpt-image-2",
        remote_model="gpt-image-2",
        endpoint=COMPLETIONS,
        aspect_ratio=ratio,
    )
    images = await make_provider().generate(request, RecordingHooks())
    assert_fake_png(images)
    assert fake.requests[0].path == COMPLETIONS
    assert fake.requests[0].body["aspectRatio"] == expected
    assert fake.requests[0].body["model"] == "gpt-image-2"


def test_gpt_image_sizes_are_valid_multiples_of_16() -> None:
    assert gpt_image_size("16:9") == "1536x864"
    assert gpt_image_size("9:16") == "864x1536"
    assert gpt_image_size("16:9", "4K") == "3840x2160"
    for ratio in ["1:1", "3:2", "2:3", "16:9", "9:16", "4:3", "3:4", "21:9"]:
        w, h = (int(x) for x in gpt_image_size(ratio).split("x"))
        assert w % 16 == 0 and h % 16 == 0


async def test_empty_endpoint_defaults_to_nano_banana(
    fake: FakeGrsai, make_provider: ProviderFactory
) -> None:
    await make_provider().generate(make_request(endpoint=""), RecordingHooks())
    assert fake.requests[0].path == NANO_BANANA


# -- resume: never pay twice -----------------------------------------------------------------


async def test_resume_polls_without_submitting(
    fake: FakeGrsai, make_provider: ProviderFactory
) -> None:
    task = fake.create_task()
    hooks = RecordingHooks()
    images = await make_provider().generate(make_request(task_id=task.id), hooks)

    assert_fake_png(images)
    assert fake.submits == 1  # only the earlier one
    assert not fake.submitted_bodies()
    assert hooks.tasks == []  # already persisted; nothing to change
    assert hooks.progress_values == [0, 30, 70]


@pytest.mark.parametrize("kind", ["break_after_id", "bad_line"])
async def test_broken_stream_after_id_falls_back_to_polling(
    fake: FakeGrsai, make_provider: ProviderFactory, kind: Any
) -> None:
    fake.submit_faults.append(Fault(kind))
    hooks = RecordingHooks()
    images = await make_provider().generate(make_request(), hooks)

    assert_fake_png(images)
    assert fake.submits == 1
    assert hooks.tasks == ["task-0001"]
    assert fake.result_calls >= 1


async def test_task_gone_on_resume_forgets_the_id(
    fake: FakeGrsai, make_provider: ProviderFactory
) -> None:
    hooks = RecordingHooks()
    with pytest.raises(Transient):
        await make_provider().generate(make_request(task_id="task-9999"), hooks)
    assert hooks.tasks == [None]
    assert fake.submits == 0


async def test_task_expiring_mid_poll_forgets_the_id(
    fake: FakeGrsai, make_provider: ProviderFactory
) -> None:
    async def on_task(task_id: str | None) -> None:
        if task_id is not None:
            fake.expire_task(task_id)

    hooks = RecordingHooks(on_task=on_task)
    with pytest.raises(Transient):
        await make_provider(mode="poll").generate(make_request(), hooks)
    assert hooks.tasks == ["task-0001", None]


# -- failures mapped onto the taxonomy --------------------------------------------------------


@pytest.mark.parametrize("mode", ["stream", "poll"])
@pytest.mark.parametrize("reason", ["input_moderation", "output_moderation"])
async def test_moderation_is_refused(
    fake: FakeGrsai, make_provider: ProviderFactory, mode: Any, reason: Any
) -> None:
    fake.outcome = reason
    with pytest.raises(Refused, match=reason):
        await make_provider(mode=mode).generate(make_request(), RecordingHooks())


@pytest.mark.parametrize("mode", ["stream", "poll"])
async def test_failure_reason_error_is_transient_and_forgets_the_task(
    fake: FakeGrsai, make_provider: ProviderFactory, mode: Any
) -> None:
    fake.outcome = "error"
    hooks = RecordingHooks()
    with pytest.raises(Transient):
        await make_provider(mode=mode).generate(make_request(), hooks)
    assert hooks.tasks == ["task-0001", None]


@pytest.mark.parametrize("mode", ["stream", "poll"])
@pytest.mark.parametrize(("header", "expected"), [("2", 2.0), (None, None)])
async def test_429_is_rate_limited_with_retry_after(
    fake: FakeGrsai,
    make_provider: ProviderFactory,
    mode: Any,
    header: str | None,
    expected: float | None,
) -> None:
    fake.submit_faults.append(Fault.http(429, retry_after=header))
    with pytest.raises(RateLimited) as caught:
        await make_provider(mode=mode).generate(make_request(), RecordingHooks())
    assert caught.value.retry_after == expected
    assert fake.submits == 0


@pytest.mark.parametrize("mode", ["stream", "poll"])
@pytest.mark.parametrize("status", [500, 502, 503])
async def test_5xx_once_is_transient_then_ok(
    fake: FakeGrsai, make_provider: ProviderFactory, mode: Any, status: int
) -> None:
    fake.submit_faults.append(Fault.http(status))
    provider = make_provider(mode=mode)
    with pytest.raises(Transient):
        await provider.generate(make_request(), RecordingHooks())
    assert_fake_png(await provider.generate(make_request(), RecordingHooks()))
    assert fake.submits == 1


@pytest.mark.parametrize("mode", ["stream", "poll"])
@pytest.mark.parametrize(
    "fault",
    [Fault("truncated"), Fault("html", status=200), Fault("html", status=502), Fault("empty")],
)
async def test_malformed_answers_are_transient(
    fake: FakeGrsai, make_provider: ProviderFactory, mode: Any, fault: Fault
) -> None:
    fake.submit_faults.append(fault)
    with pytest.raises(Transient):
        await make_provider(mode=mode).generate(make_request(), RecordingHooks())


@pytest.mark.parametrize("mode", ["stream", "poll"])
@pytest.mark.parametrize("status", [200, 401])
async def test_wrong_key_is_auth_failed_and_never_leaks(
    fake: FakeGrsai,
    make_provider: ProviderFactory,
    caplog: pytest.LogCaptureFixture,
    mode: Any,
    status: int,
) -> None:
    fake.error_status = status
    secret = "sk-ffffffffffffffffffffffffffffffff"
    caplog.set_level(logging.DEBUG, logger="drawbridge.providers.grsai")
    with pytest.raises(AuthFailed) as caught:
        await make_provider(api_key=secret, mode=mode).generate(make_request(), RecordingHooks())
    assert "apikey error" in str(caught.value)
    assert secret not in str(caught.value)
    assert secret not in caplog.text
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and warnings[0].name == "drawbridge.providers.grsai"
    assert fake.submits == 0


@pytest.mark.parametrize(
    "changes",
    [
        {"remote_model": "no-such-model"},
        {"aspect_ratio": "7:3"},
        {"size": "4K"},  # plain nano-banana takes no imageSize
    ],
)
async def test_validation_errors_are_bad_request(
    fake: FakeGrsai, make_provider: ProviderFactory, changes: dict[str, Any]
) -> None:
    with pytest.raises(BadRequest):
        await make_provider().generate(make_request(**changes), RecordingHooks())
    assert fake.submits == 0


async def test_expired_result_url(fake: FakeGrsai, make_provider: ProviderFactory) -> None:
    fake.expire_files()
    with pytest.raises(Expired):
        await make_provider().generate(make_request(), RecordingHooks())
    assert fake.file_gets == 1


async def test_hang_is_bounded_by_the_callers_timeout(
    fake: FakeGrsai, make_provider: ProviderFactory
) -> None:
    fake.submit_faults.append(Fault("hang"))
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await make_provider().generate(make_request(), RecordingHooks())


@pytest.mark.parametrize("mode", ["stream", "poll"])
async def test_hang_is_bounded_by_the_request_timeout(
    fake: FakeGrsai, make_provider: ProviderFactory, mode: Any
) -> None:
    fake.submit_faults.append(Fault("hang"))
    async with asyncio.timeout(5):
        with pytest.raises(Transient):
            await make_provider(mode=mode).generate(make_request(timeout_s=0.2), RecordingHooks())


async def test_connection_refused_is_transient(make_provider: ProviderFactory) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    provider = make_provider(base_url=f"http://127.0.0.1:{port}")
    with pytest.raises(Transient):
        await provider.generate(make_request(), RecordingHooks())


async def test_a_poll_hiccup_is_tolerated(fake: FakeGrsai, make_provider: ProviderFactory) -> None:
    fake.result_faults.append(Fault.http(502))
    images = await make_provider(mode="poll").generate(make_request(), RecordingHooks())
    assert_fake_png(images)
    assert fake.submits == 1


async def test_a_poll_outage_is_transient_and_keeps_the_task(
    fake: FakeGrsai, make_provider: ProviderFactory
) -> None:
    fake.result_faults.extend([Fault.http(503)] * 10)
    hooks = RecordingHooks()
    with pytest.raises(Transient):
        await make_provider(mode="poll").generate(make_request(), hooks)
    assert hooks.tasks == ["task-0001"]  # not forgotten: the retry resumes it


async def test_rate_limited_poll_honours_retry_after(
    fake: FakeGrsai, make_provider: ProviderFactory
) -> None:
    fake.result_faults.append(Fault.http(429, retry_after="0.05"))
    images = await make_provider(mode="poll").generate(make_request(), RecordingHooks())
    assert_fake_png(images)


# -- webhook mode ----------------------------------------------------------------------------


@dataclass
class Receiver:
    """A tiny loopback route standing in for the bot's webhook endpoint."""

    url: str
    bodies: list[tuple[str, Any]]


@pytest.fixture
async def receiver_for() -> AsyncIterator[Callable[[GrsaiProvider], Awaitable[Receiver]]]:
    runners: list[web.AppRunner] = []

    async def start(provider: GrsaiProvider) -> Receiver:
        bodies: list[tuple[str, Any]] = []

        async def hook(request: web.Request) -> web.Response:
            payload = await request.json()
            bodies.append((request.match_info["job"], payload))
            await provider.webhook_received(payload)
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_post("/hook/{job}", hook)
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        server = site._server
        assert isinstance(server, asyncio.Server)
        port = server.sockets[0].getsockname()[1]
        return Receiver(f"http://127.0.0.1:{port}", bodies)

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_webhook_mode_wakes_on_the_callback(
    fake: FakeGrsai,
    make_provider: ProviderFactory,
    receiver_for: Callable[[GrsaiProvider], Awaitable[Receiver]],
) -> None:
    urls: dict[str, str] = {}
    # A long poll interval: only the webhook can end this within the test's bound.
    provider = make_provider(
        poll_interval=30, webhook_url=lambda job: urls["base"] + f"/hook/{job}"
    )
    receiver = await receiver_for(provider)
    urls["base"] = receiver.url
    hooks = RecordingHooks()
    async with asyncio.timeout(5):
        images = await provider.generate(make_request(), hooks)

    assert_fake_png(images)
    assert fake.requests[0].body["webHook"] == f"{receiver.url}/hook/job-1"
    assert hooks.tasks == ["task-0001"]
    assert hooks.progress_values == [0, 30, 70]  # forwarded from the callbacks
    assert fake.webhook_statuses == [200] * (len(fake.steps) + 1)
    assert {job for job, _ in receiver.bodies} == {"job-1"}
    assert receiver.bodies[-1][1]["status"] == "succeeded"
    assert fake.result_calls == 1  # the one confirming read


async def test_webhook_that_never_comes_is_covered_by_polling(
    fake: FakeGrsai, make_provider: ProviderFactory
) -> None:
    fake.send_webhooks = False
    provider = make_provider(webhook_url=lambda job: f"http://127.0.0.1:9/hook/{job}")
    images = await provider.generate(make_request(), RecordingHooks())
    assert_fake_png(images)
    assert fake.submits == 1


async def test_webhook_before_the_submit_returns_is_kept(
    fake: FakeGrsai, make_provider: ProviderFactory
) -> None:
    fake.send_webhooks = False
    provider = make_provider(poll_interval=30, webhook_url=lambda job: f"http://x.invalid/{job}")

    async def on_task(task_id: str | None) -> None:
        # The callback lands while the provider is still handling the submit's answer.
        assert task_id is not None
        task = fake.tasks[task_id]
        task.finish()
        await provider.webhook_received(task.view(fake.base_url))

    async with asyncio.timeout(5):
        images = await provider.generate(make_request(), RecordingHooks(on_task=on_task))
    assert_fake_png(images)


async def test_a_forged_webhook_is_checked_against_the_result_endpoint(
    fake: FakeGrsai, make_provider: ProviderFactory
) -> None:
    fake.send_webhooks = False
    provider = make_provider(poll_interval=30, webhook_url=lambda job: f"http://x.invalid/{job}")

    async def on_task(task_id: str | None) -> None:
        assert task_id is not None
        fake.tasks[task_id].finish()
        forged = {
            "id": task_id,
            "status": "succeeded",
            "results": [{"url": "http://127.0.0.1:9/evil.png"}],
        }
        await provider.webhook_received(forged)

    async with asyncio.timeout(5):
        images = await provider.generate(make_request(), RecordingHooks(on_task=on_task))
    assert_fake_png(images)  # the fake's own file, not the forged URL


async def test_webhook_bodies_without_an_id_are_ignored(make_provider: ProviderFactory) -> None:
    provider = make_provider()
    await provider.webhook_received({"code": -1, "msg": "nonsense"})
    await provider.webhook_received({"status": "succeeded"})


# -- the provider object ---------------------------------------------------------------------


async def test_a_given_session_is_not_closed(
    fake: FakeGrsai, make_provider: ProviderFactory
) -> None:
    async with aiohttp.ClientSession() as session:
        provider = make_provider(session=session)
        assert_fake_png(await provider.generate(make_request(), RecordingHooks()))
        await provider.aclose()
        assert not session.closed


def test_unknown_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="mode"):
        GrsaiProvider("k", mode="carrier-pigeon")  # type: ignore[arg-type]


# -- the fake's own checks -------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 401])
async def test_fake_rejects_a_wrong_key(fake: FakeGrsai, status: int) -> None:
    fake.error_status = status
    async with aiohttp.ClientSession() as session:
        for path, body in [
            (NANO_BANANA, {"model": "nano-banana", "prompt": "x"}),
            ("/v1/draw/result", {"id": "t"}),
        ]:
            async with session.post(
                fake.base_url + path, json=body, headers={"Authorization": "Bearer sk-wrong"}
            ) as resp:
                assert resp.status == status
                assert await resp.json() == {"code": -1, "msg": "apikey error"}
            async with session.post(fake.base_url + path, json=body) as resp:
                assert (await resp.json())["msg"] == "apikey error"
    assert fake.submits == 0


async def test_fake_result_sequence_and_unknown_ids(fake: FakeGrsai) -> None:
    task = fake.create_task()
    headers = {"Authorization": f"Bearer {fake.api_key}"}
    seen = []
    async with aiohttp.ClientSession(headers=headers) as session:
        for task_id in [task.id] * 4 + ["nope"]:
            async with session.post(
                fake.base_url + "/v1/draw/result", json={"id": task_id}
            ) as resp:
                seen.append(await resp.json())
    assert [a["data"]["status"] for a in seen[:4]] == ["running"] * 3 + ["succeeded"]
    assert [a["data"]["progress"] for a in seen[:4]] == [0, 30, 70, 100]
    assert seen[4] == {"code": -22, "msg": "task not found"}


async def test_fake_unified_api(fake: FakeGrsai) -> None:
    headers = {"Authorization": f"Bearer {fake.api_key}"}
    body = {"model": "nano-banana", "prompt": "x", "images": [], "replyType": "async"}
    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.post(fake.base_url + "/v1/api/generate", json=body) as resp:
            started = await resp.json()
        assert started["status"] == "running" and "code" not in started
        fake.outcome = "input_moderation"
        async with session.post(
            fake.base_url + "/v1/api/generate", json={**body, "replyType": "json"}
        ) as resp:
            refused = await resp.json()
        assert refused["status"] == "violation"
        async with session.get(
            fake.base_url + "/v1/api/result", params={"id": started["id"]}
        ) as resp:
            assert (await resp.json())["id"] == started["id"]
        async with session.get(fake.base_url + "/v1/api/result", params={"id": "?"}) as resp:
            assert (await resp.json())["code"] == -22


async def test_fake_logs_requests_and_serves_pngs(fake: FakeGrsai) -> None:
    task = fake.create_task()
    async with aiohttp.ClientSession() as session:
        assert task.view(fake.base_url)["results"] == []  # still running
        task.finish()
        file_url = task.view(fake.base_url)["results"][0]["url"]
        async with session.get(file_url) as resp:
            assert resp.status == 200 and await resp.read() == _png(1)
        async with session.get(fake.base_url + "/files/unknown.png") as resp:
            assert resp.status == 404
    assert [r.path for r in fake.requests] == [
        f"/files/{task.files[0]}",
        "/files/unknown.png",
    ]
