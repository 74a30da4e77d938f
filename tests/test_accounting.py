"""Money: only a job that succeeded is charged, exactly once; everything else is released.

Every test ends with `balanced()`: the engine's quota and budget tallies must equal what the
`jobs` table says (succeeded → charged, queued/running → held, anything else → nothing), and a
row that did not succeed must carry no cost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiosqlite
import pytest

from bot.adapter import StatusKind
from bot.catalog import Catalog
from bot.dbwriter import Op
from bot.engine import Engine, EngineConfig
from bot.errors import JobNotFound, QuotaExceeded, Refused, Transient, UserError
from bot.jobs import GeneratedImage, Job, StoredImage, UserRef
from bot.operator import Policy, scope_of
from bot.providers.base import GenerationRequest, JobHooks
from bot.quota import Limits, Quotas
from bot.routing import Router
from bot.store import Store
from tests.conftest import Harness, request
from tests.fakes import RecordingAdapter, ScriptedProvider

ALICE = UserRef("test", "alice")
BOB = UserRef("test", "bob")
PRICE = 0.5  # the test catalog's "paid" model, per image at the default size


# ---- the books --------------------------------------------------------------------------


async def job_rows(h: Harness) -> list[dict[str, Any]]:
    async with aiosqlite.connect(h.data_dir / "drawbridge.db") as db:
        db.row_factory = aiosqlite.Row
        rows = await db.execute_fetchall(
            "SELECT id, platform, user_id, status, n_images, reserved_usd, cost_usd, day, "
            "cached_from, delivered_at, provider, parent_id, error_kind FROM jobs"
        )
        return [dict(r) for r in rows]


async def row(h: Harness, job_id: str) -> dict[str, Any]:
    (found,) = [r for r in await job_rows(h) if r["id"] == job_id]
    return found


async def balanced(engine: Engine, h: Harness) -> None:
    """The invariant: the engine's tallies are exactly what the jobs table says."""
    await engine.store.flush()
    rows = await job_rows(h)
    expected: dict[tuple[str, str], tuple[int, float]] = {}
    for r in rows:
        key = (f"{r['platform']}:{r['user_id']}", r["day"])
        images, usd = expected.get(key, (0, 0.0))
        if r["status"] in ("queued", "running"):
            images, usd = images + r["n_images"], usd + r["reserved_usd"]
        elif r["status"] == "succeeded" and r["cached_from"] is None:
            images, usd = images + r["n_images"], usd + r["cost_usd"]
        else:
            assert r["cost_usd"] == 0, f"job {r['id']} is {r['status']} but cost {r['cost_usd']}"
        expected[key] = (images, usd)
    for (user, day), (images, usd) in expected.items():
        got = engine.quotas.used(user, day)
        assert got[0] == images and got[1] == pytest.approx(usd), (
            f"{user} on {day}: engine holds {got}, the jobs table says {(images, usd)}"
        )
    for day in {d for _, d in expected}:
        total = sum(usd for (_, d), (_, usd) in expected.items() if d == day)
        assert engine.quotas.spent_total(day) == pytest.approx(total), f"budget on {day}"
    today = engine.quotas.today()
    for user in {u for u, _ in expected}:
        usage = await engine.usage(UserRef.parse(user))
        images, usd = expected.get((user, today), (0, 0.0))
        assert (usage.images, usage.usd) == (images, pytest.approx(usd)), f"/usage of {user}"


async def until(check: Callable[[], bool], within: float = 3.0) -> None:
    """Wait (polling the loop, not sleeping long) until `check()` holds."""
    async with asyncio.timeout(within):
        while not check():  # noqa: ASYNC110 - the conditions are fakes' counters
            await asyncio.sleep(0.005)


# ---- fakes with one more knob -------------------------------------------------------------


class CountingProvider(ScriptedProvider):
    """A scripted provider that returns a set number of images for some prompts."""

    def __init__(self, returns: dict[str, int]) -> None:
        super().__init__()
        self.returns = returns

    async def generate(self, request: GenerationRequest, hooks: JobHooks) -> list[GeneratedImage]:
        images = await super().generate(request, hooks)
        count = self.returns.get(request.prompt)
        return images if count is None else (images * count)[:count]


class GatedAdapter(RecordingAdapter):
    """Holds every delivery until `gate` is set; `entered` says one is waiting."""

    def __init__(self) -> None:
        super().__init__(platform="test")
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    async def deliver(self, job: Job, images: Sequence[StoredImage]) -> str:
        self.entered.set()
        await self.gate.wait()
        return await super().deliver(job, images)


def hold_writes(engine: Engine, match: Callable[[Op], bool]) -> tuple[asyncio.Event, asyncio.Event]:
    """Make the store's `write` of a matching unit wait (a slow commit); (entered, release)."""
    original = engine.store.write
    entered, release = asyncio.Event(), asyncio.Event()

    async def write(*ops: Op) -> None:
        if any(match(op) for op in ops):
            entered.set()
            await release.wait()
        await original(*ops)

    engine.store.write = write  # type: ignore[method-assign]
    return entered, release


def hold_settle(
    engine: Engine, *, after_commit: bool
) -> tuple[asyncio.Event, asyncio.Event, list[str]]:
    """Hold `save_images` (the succeeded-and-charged commit) before or after it commits."""
    original = engine.store.save_images
    entered, release = asyncio.Event(), asyncio.Event()
    seen: list[str] = []

    async def save_images(job_id: str, images: Sequence[GeneratedImage], *ops: Op) -> Any:
        seen.append(job_id)
        if not after_commit:
            entered.set()
            await release.wait()
        stored = await original(job_id, images, *ops)
        if after_commit:
            entered.set()
            await release.wait()
        return stored

    engine.store.save_images = save_images  # type: ignore[method-assign]
    return entered, release, seen


def failed_update_of(job_id: str) -> Callable[[Op], bool]:
    """The unit `_finish` writes when it ends `job_id` without images."""
    return lambda op: (
        op[0].startswith("UPDATE jobs SET status = ?, cost_usd = 0") and (op[1][-1] == job_id)
    )


# ---- cancel -----------------------------------------------------------------------------


async def test_cancel_while_queued_releases_and_a_second_cancel_releases_nothing(
    harness: Harness,
) -> None:
    harness.provider.gates["first"] = asyncio.Event()
    engine = await harness.engine(concurrency=1, max_pending_per_user=5)
    first = await engine.submit(request(prompt="first", model="paid"))
    queued = await engine.submit(request(prompt="second", model="paid", n=2))
    await until(lambda: harness.provider.running == 1)
    assert (await engine.usage(ALICE)).images == 3
    results = await asyncio.gather(
        engine.cancel(ALICE, queued.job_id),
        engine.cancel(ALICE, queued.job_id),
        return_exceptions=True,
    )
    assert sum(isinstance(r, Job) for r in results) == 1
    assert sum(isinstance(r, UserError) for r in results) == 1
    await balanced(engine, harness)
    assert (await engine.usage(ALICE)).images == 1  # the running one is still held
    harness.provider.gates["first"].set()
    await engine.run_until_idle()
    assert (await row(harness, queued.job_id))["status"] == "cancelled"
    assert (await row(harness, first.job_id))["cost_usd"] == pytest.approx(PRICE)
    assert [c.job_id for c in harness.provider.calls] == [first.job_id]
    await balanced(engine, harness)


async def test_cancel_while_running_before_the_provider_returns(harness: Harness) -> None:
    harness.provider.gates["slow"] = asyncio.Event()
    engine = await harness.engine(max_pending_per_user=5)
    ticket = await engine.submit(request(prompt="slow", model="paid", n=2))
    await until(lambda: harness.provider.running == 1)
    await balanced(engine, harness)
    await engine.cancel(ALICE, ticket.job_id)
    harness.provider.gates["slow"].set()
    await engine.run_until_idle()
    r = await row(harness, ticket.job_id)
    assert (r["status"], r["cost_usd"]) == ("cancelled", 0.0)
    assert harness.adapter.deliveries == []
    assert (await engine.usage(ALICE)).images == 0
    await balanced(engine, harness)


async def test_cancel_while_the_result_downloads_is_a_cancel(harness: Harness) -> None:
    # The provider made the images (the slot is given back) but they are still being fetched.
    harness.provider.fetch_gates["fetching"] = asyncio.Event()
    engine = await harness.engine()
    ticket = await engine.submit(request(prompt="fetching", model="paid"))
    await until(lambda: bool(harness.provider.started) and harness.provider.running == 0)
    await engine.cancel(ALICE, ticket.job_id)
    harness.provider.fetch_gates["fetching"].set()
    await engine.run_until_idle()
    assert (await row(harness, ticket.job_id))["status"] == "cancelled"
    assert harness.adapter.deliveries == []
    await balanced(engine, harness)


async def test_a_cancel_just_after_the_start_cancels(harness: Harness) -> None:
    # The scheduler has taken the job from the queue and made its task, which has not run yet:
    # the user's cancel still cancels it (it used to say "finishing, can no longer be
    # cancelled") and the provider is never called.
    engine = await harness.engine()
    ticket = await engine.submit(request(prompt="quick", model="paid"))
    engine._fill_slots()  # what the scheduler's next turn does
    assert ticket.job_id not in engine._queue and ticket.job_id in engine._running
    await engine.cancel(ALICE, ticket.job_id)
    await engine.run_until_idle()
    assert (await row(harness, ticket.job_id))["status"] == "cancelled"
    assert harness.provider.calls == []
    await balanced(engine, harness)


async def test_two_cancels_of_a_running_job_refund_it_once(harness: Harness) -> None:
    # Two taps on "cancel" (or /cancel and the button) arrive together.
    engine = await harness.engine(max_pending_per_user=5)
    done = await engine.submit(request(prompt="kept", model="paid"))
    await engine.run_until_idle()
    harness.provider.gates["slow"] = asyncio.Event()
    ticket = await engine.submit(request(prompt="slow", model="paid"))
    await until(lambda: harness.provider.running == 1)
    results = await asyncio.gather(
        engine.cancel(ALICE, ticket.job_id),
        engine.cancel(ALICE, ticket.job_id),
        return_exceptions=True,
    )
    harness.provider.gates["slow"].set()
    await engine.run_until_idle()
    assert (await row(harness, done.job_id))["cost_usd"] == pytest.approx(PRICE)
    # The first cancel waits for the job's task; the second, arriving meanwhile, used to end
    # the job too and release its hold twice (Alice's charged image vanished from her quota and
    # the budget). Now the first claims the end and the second is told there is no such job.
    await balanced(engine, harness)
    assert harness.adapter.kinds(ticket.job_id).count(StatusKind.CANCELLED) == 1
    assert sum(isinstance(r, Job) for r in results) == 1


async def test_cancel_racing_the_providers_return_has_one_consistent_outcome(
    harness: Harness,
) -> None:
    harness.provider.gates["race"] = asyncio.Event()
    engine = await harness.engine()
    ticket = await engine.submit(request(prompt="race", model="paid"))
    await until(lambda: harness.provider.running == 1)
    harness.provider.gates["race"].set()  # the provider answers in this very turn of the loop
    outcome: Job | UserError
    try:
        outcome = await engine.cancel(ALICE, ticket.job_id)
    except UserError as exc:
        outcome = exc
    await engine.run_until_idle()
    r = await row(harness, ticket.job_id)
    if isinstance(outcome, Job):  # the cancel won: nothing charged, nothing posted
        assert (r["status"], r["cost_usd"]) == ("cancelled", 0.0)
        assert harness.adapter.deliveries == []
    else:  # the result won: charged once, posted once
        assert (r["status"], r["cost_usd"]) == ("succeeded", PRICE)
        assert harness.adapter.delivered(ticket.job_id) == 1
    await balanced(engine, harness)


async def test_cancel_while_the_result_is_being_stored_is_refused_and_charged_once(
    harness: Harness,
) -> None:
    engine = await harness.engine()
    entered, release, _ = hold_settle(engine, after_commit=False)
    ticket = await engine.submit(request(model="paid", n=2))
    await asyncio.wait_for(entered.wait(), 3)
    with pytest.raises(UserError) as exc:
        await engine.cancel(ALICE, ticket.job_id)
    assert exc.value.key == "error.job_finishing"
    await balanced(engine, harness)  # still held while it is stored
    release.set()
    await engine.run_until_idle()
    r = await row(harness, ticket.job_id)
    assert (r["status"], r["cost_usd"], r["n_images"]) == ("succeeded", 2 * PRICE, 2)
    assert harness.adapter.delivered(ticket.job_id) == 1
    assert (await engine.usage(ALICE)).usd == pytest.approx(2 * PRICE)
    await balanced(engine, harness)


async def test_cancel_during_delivery_keeps_the_charge(harness: Harness) -> None:
    harness.adapter = GatedAdapter()
    engine = await harness.engine()
    ticket = await engine.submit(request(model="paid"))
    await asyncio.wait_for(harness.adapter.entered.wait(), 3)
    with pytest.raises(JobNotFound):
        await engine.cancel(ALICE, ticket.job_id)
    with pytest.raises(JobNotFound):
        await engine.cancel(ALICE)  # "my latest job" is no longer active either
    await balanced(engine, harness)
    harness.adapter.gate.set()
    await engine.run_until_idle()
    r = await row(harness, ticket.job_id)
    assert (r["status"], r["cost_usd"]) == ("succeeded", PRICE)
    assert r["delivered_at"] is not None
    assert (await engine.usage(ALICE)).images == 1
    await balanced(engine, harness)


# ---- the queue-timeout sweep racing the rest --------------------------------------------


async def test_queue_timeout_racing_a_cancel_releases_once(harness: Harness) -> None:
    harness.provider.gates["r"] = asyncio.Event()
    engine = await harness.engine(
        concurrency=1,
        max_pending_per_user=5,
        queue_timeout=60,
        sweep_interval=0.005,
        image_retention_days=0,
    )
    running = await engine.submit(request(prompt="r", model="paid"))
    await until(lambda: harness.provider.running == 1)
    q1 = await engine.submit(request(prompt="q1", model="paid"))
    q2 = await engine.submit(request(prompt="q2", model="paid"))
    entered, release = hold_writes(engine, failed_update_of(q1.job_id))
    harness.clock.now += 120  # both queued jobs are past QUEUE_TIMEOUT: the sweep takes them
    await asyncio.wait_for(entered.wait(), 3)  # it is ending q1; q2 is next on its list
    await engine.cancel(ALICE, q2.job_id)  # the user cancels q2 meanwhile
    release.set()
    await until(lambda: StatusKind.TIMEOUT in harness.adapter.kinds(q1.job_id))
    await asyncio.sleep(0.05)  # let the sweep go on to q2
    # The sweep lists the expired jobs once; one cancelled while it ended an earlier one used
    # to be ended again (a second release, its row turned from cancelled to failed). It skips
    # a job that is no longer queued now.
    kinds = harness.adapter.kinds(q2.job_id)
    await balanced(engine, harness)
    assert kinds == [StatusKind.CANCELLED]
    harness.provider.gates["r"].set()
    await engine.run_until_idle()
    assert (await row(harness, running.job_id))["cost_usd"] == pytest.approx(PRICE)
    await balanced(engine, harness)


async def test_queue_timeout_racing_a_start_never_gives_images_away(harness: Harness) -> None:
    harness.provider.gates["r"] = asyncio.Event()
    engine = await harness.engine(
        concurrency=1,
        max_pending_per_user=5,
        queue_timeout=60,
        sweep_interval=0.005,
        image_retention_days=0,
    )
    await engine.submit(request(prompt="r", model="paid"))
    await until(lambda: harness.provider.running == 1)
    q1 = await engine.submit(request(prompt="q1", model="paid"))
    q2 = await engine.submit(request(prompt="q2", model="paid"))
    entered, release = hold_writes(engine, failed_update_of(q1.job_id))
    harness.clock.now += 120
    await asyncio.wait_for(entered.wait(), 3)
    harness.provider.gates["r"].set()  # a slot frees while the sweep is ending q1: q2 starts
    await until(lambda: harness.adapter.delivered(q2.job_id) == 1)
    release.set()
    await until(lambda: StatusKind.TIMEOUT in harness.adapter.kinds(q1.job_id))
    await asyncio.sleep(0.05)  # let the sweep go on to q2
    await engine.run_until_idle()
    r = await row(harness, q2.job_id)
    # q2 started, was charged and delivered while the sweep ended q1; the sweep used to "time
    # it out" next (failed, cost 0, charge released: images the books called free).
    assert (r["status"], r["cost_usd"]) == ("succeeded", PRICE)
    assert StatusKind.TIMEOUT not in harness.adapter.kinds(q2.job_id)
    await balanced(engine, harness)


# ---- provider outcomes ------------------------------------------------------------------


async def test_failure_after_a_retry_refusal_and_success_after_a_retry(harness: Harness) -> None:
    p = harness.provider
    p.errors["down"] = [Transient("503")] * 5
    p.errors["then-refused"] = [Transient("503"), Refused("unsafe")]
    p.errors["flaky"] = [Transient("503")]
    p.errors["refused"] = [Refused("unsafe")]
    engine = await harness.engine(retry_attempts=2, max_pending_per_user=5)
    tickets = {
        prompt: await engine.submit(request(prompt=prompt, model="paid", n=2))
        for prompt in ("down", "then-refused", "flaky", "refused")
    }
    await engine.run_until_idle()
    got = {k: await row(harness, t.job_id) for k, t in tickets.items()}
    assert {k: (r["status"], r["cost_usd"]) for k, r in got.items()} == {
        "down": ("failed", 0.0),
        "then-refused": ("refused", 0.0),
        "flaky": ("succeeded", 2 * PRICE),
        "refused": ("refused", 0.0),
    }
    calls = [c.prompt for c in p.calls]
    assert (calls.count("down"), calls.count("flaky"), calls.count("refused")) == (2, 2, 1)
    usage = await engine.usage(ALICE)
    assert (usage.images, usage.usd) == (2, pytest.approx(2 * PRICE))
    await balanced(engine, harness)


async def test_generation_timeouts_are_not_charged(harness: Harness) -> None:
    harness.provider.hang_prompts.add("hang")
    harness.provider.fetch_gates["hang-in-download"] = asyncio.Event()  # never set
    engine = await harness.engine(generate_timeout=0.05, max_pending_per_user=5)
    a = await engine.submit(request(prompt="hang", model="paid", n=3))
    b = await engine.submit(request(prompt="hang-in-download", model="paid"))
    await engine.run_until_idle()
    for ticket in (a, b):
        r = await row(harness, ticket.job_id)
        assert (r["status"], r["cost_usd"], r["error_kind"]) == ("failed", 0.0, "timeout")
        assert harness.adapter.kinds(ticket.job_id)[-1] is StatusKind.TIMEOUT
    assert (await engine.usage(ALICE)).images == 0
    await balanced(engine, harness)


FAILOVER_MODELS = """
[models.fam-main]
provider = "demo"
family = "fam"
remote_model = "fam-x"
price_usd = 0.5
max_images = 4

[models.fam-backup]
provider = "backup"
family = "fam"
remote_model = "fam-x"
price_usd = 0.8
max_images = 4
"""


async def failover_engine(h: Harness, tmp_path: Path, **config: Any) -> Engine:
    models = tmp_path / "failover.toml"
    models.write_text(FAILOVER_MODELS)
    catalog = Catalog.load(models)
    backup = ScriptedProvider()
    backup.name = "backup"  # type: ignore[misc]
    providers = {"demo": h.provider, "backup": backup}
    router = Router(catalog, providers, fallbacks={"fam": ["demo", "backup"]})
    store = await Store.open(h.data_dir)
    cfg = EngineConfig(shutdown_grace=0.5, retry_initial=0.01, deliver_backoff=0.01, **config)
    engine = Engine(
        store,
        catalog,
        providers,
        cfg,
        clock=h.clock,
        quotas=Quotas(cfg.limits, ZoneInfo("UTC"), h.clock),
        router=router,
    )
    engine.register(h.adapter)
    h.opened.append((engine, store))
    await engine.start()
    return engine


async def test_failover_is_charged_once_at_the_serving_models_price(
    harness: Harness, tmp_path: Path
) -> None:
    harness.provider.errors["fox"] = [Transient("503")] * 10
    engine = await failover_engine(harness, tmp_path, retry_attempts=2)
    ticket = await engine.submit(request(prompt="fox", model="fam-main", n=2))
    assert ticket.reserved_usd == pytest.approx(1.0)
    await engine.run_until_idle()
    r = await row(harness, ticket.job_id)
    assert (r["status"], r["provider"], r["n_images"]) == ("succeeded", "backup", 2)
    assert r["cost_usd"] == pytest.approx(1.6)  # two images at the backup's $0.80
    usage = await engine.usage(ALICE)
    assert (usage.images, usage.usd) == (2, pytest.approx(1.6))
    assert harness.adapter.delivered(ticket.job_id) == 1
    await balanced(engine, harness)


async def test_a_pricier_failover_holds_the_difference_first(
    harness: Harness, tmp_path: Path
) -> None:
    # Before it runs on the backup the job holds the backup's price, so nothing later can take
    # the money it will be charged; the row says so too, for a restart.
    harness.provider.errors["fox"] = [Transient("503")] * 10
    backup_gate = asyncio.Event()
    engine = await failover_engine(harness, tmp_path, retry_attempts=2)
    backup = engine.providers["backup"]
    assert isinstance(backup, ScriptedProvider)
    backup.gates["fox"] = backup_gate
    ticket = await engine.submit(request(prompt="fox", model="fam-main", n=2))
    await until(lambda: backup.running == 1)
    await engine.store.flush()
    assert (await row(harness, ticket.job_id))["reserved_usd"] == pytest.approx(1.6)
    assert engine.quotas.spent_total(engine.quotas.today()) == pytest.approx(1.6)
    await balanced(engine, harness)
    backup_gate.set()
    await engine.run_until_idle()
    assert (await row(harness, ticket.job_id))["cost_usd"] == pytest.approx(1.6)
    await balanced(engine, harness)


@pytest.mark.parametrize("limit", ["budget", "user_usd"])
async def test_a_failover_that_would_pass_a_spending_limit_is_not_taken(
    harness: Harness, tmp_path: Path, limit: str
) -> None:
    # $1.00 held for two images on the main route; the backup's $1.60 would pass the $1.20
    # cap: the job fails, uncharged, rather than overspend.
    harness.provider.errors["fox"] = [Transient("503")] * 10
    limits = Limits(budget_usd=1.2) if limit == "budget" else Limits(user_usd=1.2)
    engine = await failover_engine(harness, tmp_path, retry_attempts=2, limits=limits)
    ticket = await engine.submit(request(prompt="fox", model="fam-main", n=2))
    await engine.run_until_idle()
    r = await row(harness, ticket.job_id)
    assert (r["status"], r["cost_usd"], r["provider"]) == ("failed", 0.0, "demo")
    backup = engine.providers["backup"]
    assert isinstance(backup, ScriptedProvider) and backup.calls == []
    assert harness.adapter.kinds(ticket.job_id)[-1] is StatusKind.FAILED
    await balanced(engine, harness)


async def test_a_failover_that_fails_too_releases_all_it_held(
    harness: Harness, tmp_path: Path
) -> None:
    harness.provider.errors["fox"] = [Transient("503")] * 10
    engine = await failover_engine(harness, tmp_path, retry_attempts=2)
    backup = engine.providers["backup"]
    assert isinstance(backup, ScriptedProvider)
    backup.errors["fox"] = [Transient("503")] * 10
    ticket = await engine.submit(request(prompt="fox", model="fam-main", n=2))
    await engine.run_until_idle()
    r = await row(harness, ticket.job_id)
    assert (r["status"], r["cost_usd"], r["provider"]) == ("failed", 0.0, "backup")
    assert engine.quotas.spent_total(engine.quotas.today()) == 0
    await balanced(engine, harness)


@pytest.mark.parametrize(("asked", "returned"), [(3, 1), (1, 3)])
async def test_charged_for_the_images_made_not_asked(
    harness: Harness, asked: int, returned: int
) -> None:
    harness.provider = CountingProvider({"fox": returned})
    engine = await harness.engine(limits=Limits(user_images=3))
    ticket = await engine.submit(request(prompt="fox", model="paid", n=asked))
    await engine.run_until_idle()
    made = min(asked, returned)
    r = await row(harness, ticket.job_id)
    assert (r["status"], r["n_images"], r["cost_usd"]) == ("succeeded", made, made * PRICE)
    ((_, images),) = harness.adapter.deliveries
    assert len(images) == made
    usage = await engine.usage(ALICE)
    assert (usage.images, usage.usd) == (made, pytest.approx(made * PRICE))
    await balanced(engine, harness)
    if made < 3:  # what was not made is free again today
        await engine.submit(request(prompt="more", n=3 - made))


# ---- reroll and the result cache --------------------------------------------------------


async def test_reroll_is_a_new_job_charged_to_whoever_asked(harness: Harness) -> None:
    engine = await harness.engine(limits=Limits(user_images=2), max_pending_per_user=5)
    first = await engine.submit(request(model="paid"))
    await engine.run_until_idle()
    again = await engine.reroll(ALICE, first.job_id)
    theirs = await engine.reroll(BOB, first.job_id)
    await engine.run_until_idle()
    with pytest.raises(QuotaExceeded):
        await engine.reroll(ALICE, first.job_id)
    for t in (first, again, theirs):
        assert (await row(harness, t.job_id))["cost_usd"] == pytest.approx(PRICE)
    assert (await row(harness, again.job_id))["parent_id"] == first.job_id
    assert len(harness.provider.calls) == 3
    assert (await engine.usage(ALICE)).images == 2
    assert (await engine.usage(BOB)).usd == pytest.approx(PRICE)
    await balanced(engine, harness)


async def test_reroll_of_a_refused_job_is_charged_only_if_it_succeeds(harness: Harness) -> None:
    harness.provider.errors["fox"] = [Refused("no"), Refused("no")]
    engine = await harness.engine(max_pending_per_user=5)
    first = await engine.submit(request(prompt="fox", model="paid"))
    await engine.run_until_idle()
    refused_again = await engine.reroll(ALICE, first.job_id)
    await engine.run_until_idle()
    served = await engine.reroll(ALICE, refused_again.job_id)
    await engine.run_until_idle()
    costs = [(await row(harness, t.job_id))["cost_usd"] for t in (first, refused_again, served)]
    assert costs == [0.0, 0.0, PRICE]
    await balanced(engine, harness)


async def test_result_cache_hit_is_free_and_expires(harness: Harness) -> None:
    engine = await harness.engine(
        result_cache_ttl=600, limits=Limits(user_images=1), max_pending_per_user=5
    )
    first = await engine.submit(request(model="paid", seed=7))
    await engine.run_until_idle()
    hit = await engine.submit(request(model="paid", seed=7))  # at the quota, but free
    assert hit.cached_from == first.job_id and hit.reserved_usd == 0
    await engine.run_until_idle()
    r = await row(harness, hit.job_id)
    assert (r["status"], r["cost_usd"], r["cached_from"]) == ("succeeded", 0.0, first.job_id)
    assert harness.adapter.delivered(hit.job_id) == 1
    assert len(harness.provider.calls) == 1
    usage = await engine.usage(ALICE)
    assert (usage.images, usage.usd) == (1, pytest.approx(PRICE))
    await balanced(engine, harness)
    harness.clock.now += 601  # the cache has expired: a real (and over-quota) request
    with pytest.raises(QuotaExceeded):
        await engine.submit(request(model="paid", seed=7))
    await balanced(engine, harness)


async def test_result_cache_hit_counts_the_same_for_a_chat_after_a_restart(
    harness: Harness,
) -> None:
    # A chat with its own daily image limit (an admin's /policy daily_images=2).
    first_engine = await harness.engine(result_cache_ttl=600, max_pending_per_user=5)
    scope = scope_of(request().target)
    now = harness.clock()
    await first_engine.apply(
        first_engine.operator.set_policy(Policy(scope, daily_images=2), "test:boss", now)
    )
    await first_engine.submit(request(model="paid", seed=7))
    await first_engine.run_until_idle()
    hit = await first_engine.submit(request(model="paid", seed=7))
    assert hit.cached_from is not None
    await first_engine.run_until_idle()
    probe = await first_engine.submit(request(prompt="another", model="paid"))  # 2 of 2: fits
    await first_engine.cancel(ALICE, probe.job_id)
    await first_engine.close()
    second = await harness.engine(result_cache_ttl=600, max_pending_per_user=5)
    await balanced(second, harness)
    # A live cache hit takes nothing from the chat's limit; the per-chat counts a restart
    # rebuilds (`Store.scope_totals`) used to count it, and refused this request after one.
    await second.submit(request(prompt="another", model="paid"))


# ---- restarts ---------------------------------------------------------------------------


async def test_restart_with_a_job_running_holds_it_then_charges_it_once(
    harness: Harness,
) -> None:
    harness.provider.gate = asyncio.Event()
    first = await harness.engine(shutdown_grace=0.05, limits=Limits(user_images=3))
    ticket = await first.submit(request(model="paid", n=2))
    await until(lambda: harness.provider.running == 1)
    await first.close()  # parked: the row stays running
    assert (await row(harness, ticket.job_id))["status"] == "running"
    second = await harness.engine(limits=Limits(user_images=3))
    await balanced(second, harness)
    assert (await second.usage(ALICE)).images == 2  # held again from the table
    with pytest.raises(QuotaExceeded):
        await second.submit(request(n=2))
    harness.provider.gate.set()
    await second.run_until_idle()
    r = await row(harness, ticket.job_id)
    assert (r["status"], r["cost_usd"], r["n_images"]) == ("succeeded", 2 * PRICE, 2)
    assert harness.adapter.delivered(ticket.job_id) == 1
    usage = await second.usage(ALICE)
    assert (usage.images, usage.usd) == (2, pytest.approx(2 * PRICE))
    await balanced(second, harness)


async def test_restart_after_the_charge_committed_never_charges_or_generates_again(
    harness: Harness,
) -> None:
    first = await harness.engine(limits=Limits(user_images=1, budget_usd=PRICE))
    entered, _, _ = hold_settle(first, after_commit=True)
    ticket = await first.submit(request(model="paid"))
    await asyncio.wait_for(entered.wait(), 3)  # committed as succeeded; the process dies now
    await harness.abandon(first)
    calls = len(harness.provider.calls)
    for _ in range(2):  # and restarts twice
        engine = await harness.engine(limits=Limits(user_images=1, budget_usd=PRICE))
        await engine.run_until_idle()
        await balanced(engine, harness)
        usage = await engine.usage(ALICE)
        assert (usage.images, usage.usd) == (1, pytest.approx(PRICE))
        assert engine.quotas.spent_total(engine.quotas.today()) == pytest.approx(PRICE)
        await harness.abandon(engine)
    assert len(harness.provider.calls) == calls
    assert harness.adapter.delivered(ticket.job_id) == 1
    r = await row(harness, ticket.job_id)
    assert (r["status"], r["cost_usd"]) == ("succeeded", PRICE)


async def test_restart_books_match_the_table_for_every_kind_of_row(harness: Harness) -> None:
    harness.provider.errors["refused"] = [Refused("no")]
    harness.provider.gates["held"] = asyncio.Event()
    first = await harness.engine(concurrency=1, max_pending_per_user=9)
    await first.submit(request(prompt="ok", model="paid", n=2))
    await first.submit(request("bob", prompt="refused", model="paid"))
    await first.run_until_idle()
    await first.submit(request(prompt="held", model="paid", size="4K"))  # running
    queued = await first.submit(request(prompt="queued", model="paid"))
    cancelled = await first.submit(request("bob", prompt="cancelled", model="paid", n=3))
    await first.cancel(BOB, cancelled.job_id)
    await until(lambda: harness.provider.running == 1)
    await balanced(first, harness)
    await harness.abandon(first)
    second = await harness.engine(start=False, concurrency=1, max_pending_per_user=9)
    await second.start()
    await balanced(second, harness)
    usage = await second.usage(ALICE)
    assert (usage.images, usage.usd) == (4, pytest.approx(1.0 + 1.0 + 0.5))
    assert (await second.usage(BOB)).images == 0
    harness.provider.gates["held"].set()
    await second.run_until_idle()
    assert (await row(harness, queued.job_id))["cost_usd"] == pytest.approx(PRICE)
    await balanced(second, harness)


# ---- the quota day ----------------------------------------------------------------------


async def test_a_job_settles_against_the_day_it_was_reserved_on(harness: Harness) -> None:
    # 2026-01-01 23:30 in Shanghai (15:30 UTC); the jobs finish after midnight there.
    harness.clock.now = 1_767_281_400.0
    p = harness.provider
    p.gates["ok"], p.gates["no"] = asyncio.Event(), asyncio.Event()
    p.errors["no"] = [Refused("no")]
    engine = await harness.engine(
        tz="Asia/Shanghai", limits=Limits(user_images=2, user_usd=1.0), max_pending_per_user=5
    )
    ok = await engine.submit(request(prompt="ok", model="paid"))
    no = await engine.submit(request(prompt="no", model="paid"))
    with pytest.raises(QuotaExceeded):
        await engine.submit(request(prompt="third", model="paid"))
    await until(lambda: p.running == 2)
    harness.clock.now += 31 * 60  # 2026-01-02 00:01 in Shanghai
    new_day = await engine.submit(request(prompt="new day", model="paid", n=2))
    await balanced(engine, harness)
    p.gates["ok"].set()
    p.gates["no"].set()
    await engine.run_until_idle()
    rows = {t.job_id: await row(harness, t.job_id) for t in (ok, no, new_day)}
    assert [r["day"] for r in rows.values()] == ["2026-01-01", "2026-01-01", "2026-01-02"]
    assert [r["status"] for r in rows.values()] == ["succeeded", "refused", "succeeded"]
    assert engine.quotas.used("test:alice", "2026-01-01") == (1, pytest.approx(PRICE))
    usage = await engine.usage(ALICE)
    assert (usage.day, usage.images, usage.usd) == ("2026-01-02", 2, pytest.approx(1.0))
    await balanced(engine, harness)
