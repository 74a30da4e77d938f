"""Adversarial probes of the paths where money moves: GrsAI webhooks end to end through the real
HTTP server, provider concurrency and rate limits under a burst, OpenAI-compatible relays with odd
answers, and jobs cancelled or timed out while their provider call is in flight.

Everything runs the real composition (`open_core` from settings, the real provider clients, the
real `HttpServer`) against the loopback fakes; a fake is subclassed here where the real API has a
behaviour the fake lacks. The rule checked throughout: a job is charged once, only on success, no
provider task is paid for twice, and whatever a job held is given back exactly once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import aiosqlite
import pytest
from aiohttp import web

from bot.app import Core, open_core
from bot.http import HttpServer
from bot.jobs import Options, Request, Target, UserRef
from bot.providers.grsai import GrsaiProvider
from bot.settings import load_settings
from tests.fake_grsai import JSON_BODY, FakeGrsai, FakeTask, Fault
from tests.fake_openai import FakeOpenAI
from tests.fake_openai import Fault as OpenAIFault
from tests.fakes import RecordingAdapter

DRAW = "/v1/draw/nano-banana"
COMPLETIONS = "/v1/draw/completions"


# -- the rig -----------------------------------------------------------------------------------


@dataclass
class Rig:
    core: Core
    adapter: RecordingAdapter
    http: HttpServer | None
    data_dir: Path

    @property
    def base(self) -> str:
        assert self.http is not None
        return f"http://127.0.0.1:{self.http.bound_port}"

    def price(self, model: str) -> float:
        spec = self.core.catalog.get(model)
        assert spec is not None
        return spec.price_usd

    @property
    def grsai(self) -> GrsaiProvider:
        provider = self.core.providers["grsai"]
        assert isinstance(provider, GrsaiProvider)
        return provider

    async def submit(self, model: str, user: str = "alice", n: int = 1) -> str:
        request = Request(
            user=UserRef("test", user),
            target=Target("test", chat_id=f"chat-{user}"),
            prompt="a lighthouse at dusk",
            options=Options(aspect_ratio="1:1", n=n),
            model=model,
        )
        return (await self.core.engine.submit(request)).job_id

    async def row(self, job_id: str) -> dict[str, Any]:
        await self.core.store.flush()
        async with aiosqlite.connect(self.data_dir / "drawbridge.db") as db:
            db.row_factory = aiosqlite.Row
            (r,) = await db.execute_fetchall(
                "SELECT status, cost_usd, error_kind, provider, n_images, task_id "
                "FROM jobs WHERE id = ?",
                (job_id,),
            )
            return dict(r)

    async def used(self, user: str = "alice") -> tuple[int, float]:
        usage = await self.core.engine.usage(UserRef("test", user))
        return usage.images, usage.usd

    def spent_today(self) -> float:
        quotas = self.core.engine.quotas
        return quotas.spent_total(quotas.today())

    def final_text(self, job_id: str) -> str:
        finals = [u.text for j, u in self.adapter.statuses if j == job_id and u.kind.final]
        assert finals, f"job {job_id} never told its end"
        return finals[-1]

    async def idle(self, bound: float = 15.0) -> None:
        async with asyncio.timeout(bound):
            await self.core.engine.run_until_idle()


@asynccontextmanager
async def bot(
    data_dir: Path, env: dict[str, str], *, http: bool = False, **overrides: Any
) -> AsyncIterator[Rig]:
    """The real core from settings; with `http`, the real HTTP server and a PUBLIC_URL on it."""
    values = {"DRAWBRIDGE_DATA_DIR": str(data_dir), **env}
    if http:
        values.setdefault("PUBLIC_URL", "http://127.0.0.1:1")  # pointed at the server below
    settings = load_settings(values, env_file=None)
    config: dict[str, Any] = {
        "retry_attempts": 3,
        "retry_initial": 0.01,
        "generate_timeout": 5.0,
        "shutdown_grace": 0.5,
        "deliver_backoff": 0.01,
        **overrides,
    }
    async with open_core(settings, **config) as core:
        server: HttpServer | None = None
        if http:
            server = HttpServer(core, "127.0.0.1", 0)
            await server.open()
            assert core.webhooks is not None
            core.webhooks.public_url = f"http://127.0.0.1:{server.bound_port}"
        adapter = RecordingAdapter()
        core.engine.register(adapter)
        await core.engine.start()
        try:
            yield Rig(core, adapter, server, data_dir)
        finally:
            if server is not None:
                await server.close()


def grsai_env(fake: FakeGrsai, **extra: str) -> dict[str, str]:
    return {"GRSAI_API_KEY": fake.api_key, "GRSAI_BASE_URL": fake.base_url, **extra}


def openai_env(fake: FakeOpenAI, **extra: str) -> dict[str, str]:
    return {"OPENAI_API_KEY": fake.api_key, "OPENAI_BASE_URL": fake.base_url, **extra}


async def until(cond: Callable[[], bool], bound: float = 10.0) -> None:
    """Wait for `cond` (a bound against hangs, not a timing assertion)."""
    async with asyncio.timeout(bound):
        while not cond():  # noqa: ASYNC110 (a condition on several objects, no event)
            await asyncio.sleep(0.005)


async def settle(turns: float = 0.3) -> None:
    """Let anything that would (wrongly) happen next happen."""
    await asyncio.sleep(turns)


def draw_requests(fake: FakeGrsai) -> int:
    return sum(1 for r in fake.requests if r.path in (DRAW, COMPLETIONS))


async def post(url: str, **kwargs: Any) -> int:
    async with aiohttp.ClientSession() as session, session.post(url, **kwargs) as resp:
        await resp.read()
        return resp.status


# -- fakes with the behaviours these probes need ---------------------------------------------


class NoisyGrsai(FakeGrsai):
    """Webhook mode as an unreliable sender plays it: every body twice, then after the final
    state a stale `running` body and the final state again (GrsAI's retry policy for callbacks
    is undocumented, providers.md §1.5)."""

    async def _post_webhooks(self, task: FakeTask, url: str, shut: bool) -> None:
        assert self._client is not None

        async def send(body: dict[str, Any]) -> None:
            async with self._client.post(url, json=body) as resp:  # type: ignore[union-attr]
                self.webhook_statuses.append(resp.status)

        while True:
            view = task.view(self.base_url)
            await send(view)
            await send(view)
            if task.done:
                break
            task.advance()
        await send({"id": task.id, "results": [], "progress": 30, "status": "running"})
        await send(task.view(self.base_url))


class EagerGrsai(FakeGrsai):
    """Calls the webhook with the final state before it answers the submit itself."""

    async def _draw(self, request: web.Request) -> web.StreamResponse:
        body = request[JSON_BODY]
        hook = body.get("webHook") if isinstance(body, dict) else None
        if not (isinstance(hook, str) and hook.startswith("http") and self._authorized(request)):
            return await super()._draw(request)
        task = self._new_task(body)
        task.finish()
        assert self._client is not None
        async with self._client.post(hook, json=task.view(self.base_url)) as resp:
            self.webhook_statuses.append(resp.status)
        return web.json_response({"code": 0, "msg": "success", "data": {"id": task.id}})


class CountingGrsai(FakeGrsai):
    """Counts tasks generating at once (submitted, not yet finished) as each new one comes."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.max_live = 0

    def _new_task(self, body: dict[str, Any]) -> FakeTask:
        live = sum(1 for t in self.tasks.values() if not t.done)
        self.max_live = max(self.max_live, live + 1)
        return super()._new_task(body)


class RelayOpenAI(FakeOpenAI):
    """An OpenAI-compatible relay: `rewrite` reshapes the next success bodies; `gate` holds
    answers (and `file_gate` result downloads) until a test releases them."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rewrite: list[Callable[[dict[str, Any]], Any]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.file_gate = asyncio.Event()
        self.file_gate.set()
        self.answered = 0
        self.file_misses: set[str] = set()

    async def _answer(self, request: web.Request, request_id: str, fault: Any, p: Any) -> Any:
        await self.gate.wait()
        body = await super()._answer(request, request_id, fault, p)
        self.answered += 1
        if isinstance(body, dict) and self.rewrite:
            return self.rewrite.pop(0)(body)
        return body

    async def _file(self, request: web.Request) -> web.StreamResponse:
        await self.file_gate.wait()
        if request.match_info["name"] in self.file_misses:
            self.requests.append(RecordedFile(request.path))
            return web.Response(status=404, text="gone")
        return await super()._file(request)

    @property
    def file_gets(self) -> int:
        return sum(1 for r in self.requests if r.path.startswith("/files/"))


class RecordedFile:
    def __init__(self, path: str) -> None:
        self.path = path
        self.method = "GET"
        self.headers: dict[str, str] = {}


# -- GrsAI webhook mode, end to end ------------------------------------------------------------


async def test_webhook_duplicates_and_a_stale_running_after_success_charge_once(
    tmp_path: Path,
) -> None:
    """Every callback twice, then `running` after `succeeded`, then `succeeded` again: one
    submit, one download, one charge, one post."""
    async with NoisyGrsai() as fake, bot(tmp_path, grsai_env(fake), http=True) as rig:
        rig.grsai.poll_interval = 30  # only the callbacks can end the job in time
        job = await rig.submit("nano-banana")
        await rig.idle()
        sent = 2 * (len(fake.steps) + 1) + 2
        await until(lambda: len(fake.webhook_statuses) == sent)
        await settle()
        row = await rig.row(job)
        assert (row["status"], row["cost_usd"]) == (
            "succeeded",
            pytest.approx(rig.price("nano-banana")),
        )
        assert fake.webhook_statuses == [200] * sent
        assert fake.submits == 1 and fake.file_gets == 1
        assert rig.adapter.delivered(job) == 1
        assert await rig.used() == (1, pytest.approx(rig.price("nano-banana")))


async def test_webhook_before_the_submit_answer_is_not_lost(tmp_path: Path) -> None:
    """GrsAI calls back with the final state before it has answered the submit: the job ends on
    that callback (polling is 30 s away, past the job's time)."""
    async with EagerGrsai() as fake, bot(tmp_path, grsai_env(fake), http=True) as rig:
        rig.grsai.poll_interval = 30
        job = await rig.submit("nano-banana")
        await rig.idle()
        row = await rig.row(job)
        assert (row["status"], row["error_kind"]) == ("succeeded", None)
        assert fake.webhook_statuses == [200]
        assert fake.submits == 1 and rig.adapter.delivered(job) == 1


async def test_webhook_that_never_comes_is_covered_by_polling_within_the_jobs_time(
    tmp_path: Path,
) -> None:
    """No callback at all, with the shipped poll interval: polling finishes the job in time,
    with one submit and one charge."""
    async with (
        FakeGrsai(send_webhooks=False, steps=[]) as fake,
        bot(tmp_path, grsai_env(fake), http=True) as rig,
    ):
        job = await rig.submit("nano-banana")
        await rig.idle()
        row = await rig.row(job)
        assert row["status"] == "succeeded"
        assert fake.submits == 1 and fake.result_calls >= 1
        assert fake.requests[0].body["webHook"].startswith(rig.base + "/hooks/grsai/" + job)


async def test_webhook_junk_is_answered_and_changes_nothing(tmp_path: Path) -> None:
    """While a job waits: a wrong secret, a body that is not JSON, a JSON array, and a forged
    `succeeded` (with a foreign URL) on another job's valid URL. None of it ends, charges or
    posts the job; the real final callback then ends it once."""
    async with (
        FakeGrsai(send_webhooks=False) as fake,
        bot(tmp_path, grsai_env(fake), http=True) as rig,
    ):
        rig.grsai.poll_interval = 30
        job = await rig.submit("nano-banana")
        await until(lambda: fake.submits == 1)
        task_id = next(iter(fake.tasks))
        signer = rig.core.webhooks
        assert signer is not None
        hook = signer.url_for(job)
        forged = {
            "id": task_id,
            "status": "succeeded",
            "results": [{"url": "http://127.0.0.1:9/evil.png"}],
        }
        assert await post(f"{rig.base}/hooks/grsai/{job}/{'0' * 32}", json=forged) == 404
        assert await post(hook, data=b"{not json") == 400
        assert await post(hook, json=[forged]) == 200
        assert await post(signer.url_for("nosuchjob0"), json=forged) == 200
        await settle()
        assert rig.core.engine.active_job(job) is not None  # still waiting
        assert rig.adapter.delivered(job) == 0 and fake.file_gets == 0
        task = fake.tasks[task_id]
        task.finish()
        assert await post(hook, json=task.view(fake.base_url)) == 200
        await rig.idle()
        row = await rig.row(job)
        assert row["status"] == "succeeded" and fake.file_gets == 1
        assert fake.submits == 1 and rig.adapter.delivered(job) == 1


@pytest.mark.parametrize("end", ["cancelled", "timed out"])
async def test_webhook_after_the_job_ended_charges_and_posts_nothing(
    tmp_path: Path, end: str
) -> None:
    """The job was cancelled (or timed out) while its GrsAI task ran; the final `succeeded`
    callback arrives afterwards: no charge, no post, no download, and the job's hold was given
    back exactly once (an earlier success stays counted)."""
    timeout = 1.0 if end == "timed out" else 5.0
    async with (
        FakeGrsai() as fake,
        bot(tmp_path, grsai_env(fake), http=True, generate_timeout=timeout) as rig,
    ):
        rig.grsai.poll_interval = 30
        first = await rig.submit("nano-banana")
        await rig.idle()
        assert (await rig.row(first))["status"] == "succeeded"
        price = rig.price("nano-banana")
        fake.send_webhooks = False
        job = await rig.submit("nano-banana")
        await until(lambda: fake.submits == 2)
        await until(lambda: (rig.core.engine.active_job(job) or _NoTask).task_id is not None)
        if end == "cancelled":
            await rig.core.engine.cancel(UserRef("test", "alice"), job)
        await rig.idle()
        gets = fake.file_gets
        task = fake.tasks["task-0002"]
        task.finish()
        signer = rig.core.webhooks
        assert signer is not None
        assert await post(signer.url_for(job), json=task.view(fake.base_url)) == 200
        await settle()
        await rig.idle()
        row = await rig.row(job)
        expected = ("cancelled", "cancelled") if end == "cancelled" else ("failed", "timeout")
        assert (row["status"], row["error_kind"]) == expected
        assert row["cost_usd"] == 0
        assert rig.adapter.delivered(job) == 0 and fake.file_gets == gets
        assert "not charged" in rig.final_text(job) or end == "cancelled"
        assert await rig.used() == (1, pytest.approx(price))
        assert rig.spent_today() == pytest.approx(price)
        assert fake.submits == 2


class _NoTask:
    task_id = None


# -- PROVIDER_CONCURRENCY and PROVIDER_RPM under a burst ---------------------------------------


async def test_provider_concurrency_bounds_a_burst_with_retries(tmp_path: Path) -> None:
    """PROVIDER_CONCURRENCY=grsai=2, eight jobs at once, some submits failing with 503 first:
    GrsAI never has more than two tasks generating, and each job is paid for once."""
    async with CountingGrsai(line_delay=0.02) as fake:
        fake.submit_faults.extend([Fault.http(503), Fault("none"), Fault.http(503)] * 2)
        env = grsai_env(fake, PROVIDER_CONCURRENCY="grsai=2")
        async with bot(tmp_path, env, retry_attempts=6) as rig:
            jobs = [await rig.submit("nano-banana", user=f"u{i}") for i in range(8)]
            await rig.idle()
            rows = [await rig.row(job) for job in jobs]
            assert [r["status"] for r in rows] == ["succeeded"] * 8
            assert fake.max_live <= 2
            assert fake.submits == 8  # a 503 created no task; no task was paid twice
            assert draw_requests(fake) == 8 + 4


async def test_provider_concurrency_bounds_jobs_that_failed_over(tmp_path: Path) -> None:
    """gpt-image-2 falls back from OpenAI to GrsAI. OpenAI is down; with
    PROVIDER_CONCURRENCY=grsai=1 the jobs arriving at GrsAI by failover still queue for its one
    slot, and each is charged once, at the price of the model that served it."""
    async with CountingGrsai(line_delay=0.02) as grsai, FakeOpenAI() as openai:
        openai.fail_next("server_error", times=50, status=503, should_retry="false")
        env = {**grsai_env(grsai), **openai_env(openai), "PROVIDER_CONCURRENCY": "grsai=1"}
        async with bot(tmp_path, env) as rig:
            jobs = [await rig.submit("gpt-image-2", user=f"u{i}") for i in range(4)]
            await rig.idle()
            rows = [await rig.row(job) for job in jobs]
            assert {(r["status"], r["provider"]) for r in rows} == {("succeeded", "grsai")}
            price = rig.price("grsai-gpt-image-2")
            assert [r["cost_usd"] for r in rows] == [pytest.approx(price)] * 4
            assert grsai.max_live <= 1
            assert grsai.submits == 4


async def test_provider_rpm_bounds_a_burst(tmp_path: Path) -> None:
    """PROVIDER_RPM=grsai=2 and four jobs at once: GrsAI sees two submits this minute; the
    other two wait (cancelled here, uncharged, their holds released)."""
    async with FakeGrsai() as fake, bot(tmp_path, grsai_env(fake, PROVIDER_RPM="grsai=2")) as rig:
        jobs = [await rig.submit("nano-banana", user=f"u{i}") for i in range(4)]
        await until(lambda: len(rig.adapter.deliveries) == 2)
        await settle(0.5)
        assert draw_requests(fake) == 2
        waiting = [j for j in jobs if rig.core.engine.active_job(j) is not None]
        assert len(waiting) == 2
        for job in waiting:
            user = rig.core.engine.active_job(job).user  # type: ignore[union-attr]
            await rig.core.engine.cancel(user, job)
        await rig.idle()
        for job in waiting:
            row = await rig.row(job)
            assert (row["status"], row["cost_usd"]) == ("cancelled", 0)
        assert rig.spent_today() == pytest.approx(2 * rig.price("nano-banana"))
        assert draw_requests(fake) == 2


async def test_provider_rpm_counts_retries(tmp_path: Path) -> None:
    """PROVIDER_RPM=grsai=2, one job whose submits keep failing with 503: its retries spend the
    same per-minute budget, so GrsAI sees two requests, and the job times out uncharged."""
    async with FakeGrsai() as fake:
        fake.submit_faults.extend([Fault.http(503)] * 5)
        env = grsai_env(fake, PROVIDER_RPM="grsai=2")
        async with bot(tmp_path, env, retry_attempts=5, generate_timeout=1.5) as rig:
            job = await rig.submit("nano-banana")
            await rig.idle()
            row = await rig.row(job)
            assert (row["status"], row["error_kind"], row["cost_usd"]) == ("failed", "timeout", 0)
            assert draw_requests(fake) == 2
            assert await rig.used() == (0, 0)


# -- OpenAI-compatible aggregators ---------------------------------------------------------


def both_shapes(body: dict[str, Any]) -> dict[str, Any]:
    for index, item in enumerate(body["data"]):
        item["url"] = f"{FAKE_ROOT[0]}/files/never-{index}.png"
    return body


FAKE_ROOT = [""]


async def test_relay_answering_url_and_b64_uses_the_bytes(tmp_path: Path) -> None:
    """Each item carries both `b64_json` and a `url`: the bytes are used, nothing is fetched,
    the job is charged once."""
    async with RelayOpenAI() as fake, bot(tmp_path, openai_env(fake)) as rig:
        FAKE_ROOT[0] = fake.root
        fake.rewrite.append(both_shapes)
        job = await rig.submit("gpt-image-1", n=2)
        await rig.idle()
        row = await rig.row(job)
        assert (row["status"], row["n_images"]) == ("succeeded", 2)
        assert row["cost_usd"] == pytest.approx(2 * rig.price("gpt-image-1"))
        assert fake.file_gets == 0 and len(fake.image_calls) == 1


async def test_relay_returning_fewer_images_than_n_charges_what_came(tmp_path: Path) -> None:
    """n=3 asked, the relay returns one: one image posted, one charged, and the user's day
    counts one image, not three."""
    async with RelayOpenAI(url_output=True) as fake, bot(tmp_path, openai_env(fake)) as rig:
        fake.rewrite.append(lambda body: {**body, "data": body["data"][:1]})
        job = await rig.submit("gpt-image-1", n=3)
        await rig.idle()
        row = await rig.row(job)
        price = rig.price("gpt-image-1")
        assert (row["status"], row["n_images"]) == ("succeeded", 1)
        assert row["cost_usd"] == pytest.approx(price)
        ((_, images),) = rig.adapter.deliveries
        assert len(images) == 1
        assert await rig.used() == (1, pytest.approx(price))
        assert rig.spent_today() == pytest.approx(price)
        assert len(fake.image_calls) == 1


@pytest.mark.parametrize("which", ["all", "second"])
async def test_relay_url_expired_on_download_is_not_paid_again(tmp_path: Path, which: str) -> None:
    """Result URLs answer 403 (all) or the second of two 404: the paid generation is not asked
    for again. All gone: the job ends uncharged as expired and the hold is released; one of
    two gone: the user gets, and pays for, the one that came (as for base64 results)."""
    async with RelayOpenAI(url_output=True) as fake, bot(tmp_path, openai_env(fake)) as rig:
        if which == "all":
            fake.files_status = 403
        else:

            def drop_second(body: dict[str, Any]) -> dict[str, Any]:
                fake.file_misses.add(body["data"][1]["url"].rsplit("/", 1)[-1])
                return body

            fake.rewrite.append(drop_second)
        job = await rig.submit("gpt-image-1", n=2)
        await rig.idle()
        row = await rig.row(job)
        assert len(fake.image_calls) == 1
        if which == "second":
            price = rig.price("gpt-image-1")
            assert (row["status"], row["n_images"]) == ("succeeded", 1)
            assert row["cost_usd"] == pytest.approx(price)
            assert await rig.used() == (1, pytest.approx(price))
            assert rig.adapter.delivered(job) == 1
            return
        assert (row["status"], row["error_kind"], row["cost_usd"]) == ("failed", "expired", 0)
        assert "not charged" in rig.final_text(job)
        assert await rig.used() == (0, 0)
        assert rig.adapter.delivered(job) == 0


def moderation_in_200(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "error": {
            "message": "Your request was rejected by the safety system.",
            "type": "image_generation_user_error",
            "param": None,
            "code": "moderation_blocked",
        }
    }


@pytest.mark.parametrize("case", ["upstream 502", "moderation"])
async def test_relay_200_with_an_error_body(tmp_path: Path, case: str) -> None:
    """HTTP 200 carrying `{"error": …}`: an upstream failure is retried and the job is charged
    once; a moderation refusal is not retried and not charged."""
    async with RelayOpenAI() as fake, bot(tmp_path, openai_env(fake)) as rig:
        if case == "moderation":
            fake.rewrite.append(moderation_in_200)
        else:
            fake.fail_next("error_200")
        job = await rig.submit("gpt-image-1")
        await rig.idle()
        row = await rig.row(job)
        if case == "moderation":
            assert (row["status"], row["cost_usd"]) == ("refused", 0)
            assert len(fake.image_calls) == 1
            assert await rig.used() == (0, 0)
        else:
            assert (row["status"], row["cost_usd"]) == (
                "succeeded",
                pytest.approx(rig.price("gpt-image-1")),
            )
            assert len(fake.image_calls) == 2
            assert rig.adapter.delivered(job) == 1


@pytest.mark.parametrize("ms", ["20", "3600000"])
async def test_relay_retry_after_ms(tmp_path: Path, ms: str) -> None:
    """429 with only `retry-after-ms`: 20 ms is waited and retried (charged once); an hour in
    ms ends the job now as rate limited, uncharged, telling the user for how long."""
    async with RelayOpenAI() as fake, bot(tmp_path, openai_env(fake)) as rig:
        fake.faults.append(OpenAIFault("rate_limit", retry_after_ms=ms))
        job = await rig.submit("gpt-image-1")
        await rig.idle()
        row = await rig.row(job)
        if ms == "20":
            assert row["status"] == "succeeded" and len(fake.image_calls) == 2
        else:
            assert (row["status"], row["error_kind"], row["cost_usd"]) == (
                "failed",
                "rate_limited",
                0,
            )
            assert len(fake.image_calls) == 1
            assert "60 minutes" in rig.final_text(job)


# -- cancelled or timed out while the provider call is in flight -------------------------------


@pytest.mark.parametrize("stage", ["answer", "download"])
@pytest.mark.parametrize("end", ["cancelled", "timed out"])
async def test_answer_after_the_job_ended_charges_nothing(
    tmp_path: Path, stage: str, end: str
) -> None:
    """The job is cancelled (or times out) while the relay is still answering, or while its
    result URL is being fetched; the answer then arrives. Nothing is charged or posted, and the
    job's hold is released exactly once: the user's earlier success still counts."""
    timeout = 1.0 if end == "timed out" else 5.0
    async with (
        RelayOpenAI(url_output=True) as fake,
        bot(tmp_path, openai_env(fake), generate_timeout=timeout) as rig,
    ):
        price = rig.price("gpt-image-1")
        first = await rig.submit("gpt-image-1")
        await rig.idle()
        assert (await rig.row(first))["status"] == "succeeded"
        gate = fake.gate if stage == "answer" else fake.file_gate
        gate.clear()
        job = await rig.submit("gpt-image-1", n=2)
        if stage == "answer":
            await until(lambda: len(fake.image_calls) == 2)
        else:
            await until(lambda: fake.answered == 2)
        await settle(0.05)
        if end == "cancelled":
            cancelled = await rig.core.engine.cancel(UserRef("test", "alice"), job)
            assert cancelled.status.value == "cancelled"
        await rig.idle()
        gate.set()
        await settle()
        await rig.idle()
        row = await rig.row(job)
        expected = ("cancelled", "cancelled") if end == "cancelled" else ("failed", "timeout")
        assert (row["status"], row["error_kind"], row["cost_usd"]) == (*expected, 0)
        assert rig.adapter.delivered(job) == 0
        assert await rig.used() == (1, pytest.approx(price))
        assert rig.spent_today() == pytest.approx(price)
        assert len(fake.image_calls) == 2  # no retry paid for the ended job


async def test_grsai_stream_cancelled_in_flight_is_not_resumed_after_a_restart(
    tmp_path: Path,
) -> None:
    """A job cancelled while its GrsAI stream runs; the task then succeeds at GrsAI, and the
    bot restarts. The cancelled job is not resumed, polled, downloaded, charged or posted."""
    async with (
        FakeGrsai(line_delay=0.2, steps=[0, 10, 20, 30, 40, 50, 60]) as fake,
        bot(tmp_path, grsai_env(fake)) as rig,
    ):
        job = await rig.submit("nano-banana")
        await until(lambda: (rig.core.engine.active_job(job) or _NoTask).task_id is not None)
        await rig.core.engine.cancel(UserRef("test", "alice"), job)
        await rig.idle()
        assert (await rig.row(job))["status"] == "cancelled"
        fake.tasks["task-0001"].finish()
        async with bot(tmp_path, grsai_env(fake)) as rig:
            await settle()
            await rig.idle()
            row = await rig.row(job)
            assert (row["status"], row["cost_usd"]) == ("cancelled", 0)
            assert fake.result_calls == 0 and fake.file_gets == 0 and fake.submits == 1
            assert rig.adapter.delivered(job) == 0
            assert await rig.used() == (0, 0)
