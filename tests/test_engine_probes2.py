"""Adversarial probes of the engine's money and fairness (second round).

Each test asserts the behaviour the operator and the users are owed. Four defects they found are
fixed: a NaN or infinite price loaded from the catalog; a NaN cost wiping the day's spend when its
submit failed; a reroll whose reference photos were gone raising a raw FileNotFoundError; and
IMAGE_RETENTION_DAYS never deleting the reference photos users sent.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bot.adapter import StatusKind
from bot.catalog import Catalog, CatalogError
from bot.errors import BudgetExceeded, QuotaExceeded, Transient, UserError
from bot.jobs import GeneratedImage, Ticket, UserRef
from bot.providers.base import GenerationRequest, JobHooks
from bot.quota import Limits
from tests.conftest import TEST_MODELS, Harness, request
from tests.fakes import ScriptedProvider, png_bytes
from tests.test_accounting import balanced as books_balance
from tests.test_accounting import job_rows, until

ALICE = UserRef("test", "alice")
PRICE = 0.5  # "paid" in the test catalog, per image at the default size
DAY_SECONDS = 86_400.0


# ---- helpers ------------------------------------------------------------------------------


def write_catalog(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "extra-models.toml"
    path.write_text(TEST_MODELS + extra)
    return path


class FewerProvider(ScriptedProvider):
    """Returns `count[prompt]` images whatever was asked (fewer, or more)."""

    def __init__(self, count: dict[str, int]) -> None:
        super().__init__()
        self.count = count

    async def generate(self, request: GenerationRequest, hooks: JobHooks) -> list[GeneratedImage]:
        images = await super().generate(request, hooks)
        want = self.count.get(request.prompt)
        if want is None:
            return images
        return [GeneratedImage(png_bytes(color=(i, 1, 2)), "image/png", 8, 8) for i in range(want)]


# ---- the quota day ------------------------------------------------------------------------


async def test_jobs_queued_before_utc_midnight_release_yesterday_when_they_end_after(
    harness: Harness,
) -> None:
    """A failure and a cancel after midnight give back yesterday's hold, not today's."""
    harness.clock.now = 1_767_225_600.0 + DAY_SECONDS - 30  # 2026-01-01 23:59:30 UTC
    p = harness.provider
    p.gates["first"] = asyncio.Event()
    p.errors["fails"] = [Transient("down")]
    engine = await harness.engine(
        concurrency=1, max_pending_per_user=5, retry_attempts=1, limits=Limits(user_images=3)
    )
    first = await engine.submit(request(prompt="first", model="paid"))
    fails = await engine.submit(request(prompt="fails", model="paid"))
    cancelled = await engine.submit(request(prompt="cancelled", model="paid"))
    with pytest.raises(QuotaExceeded):
        await engine.submit(request(prompt="fourth", model="paid"))
    await until(lambda: p.running == 1)
    harness.clock.now += 60  # 2026-01-02 00:00:30 UTC
    assert engine.quotas.today() == "2026-01-02"
    await engine.cancel(ALICE, cancelled.job_id)  # queued yesterday, cancelled today
    # Today is a fresh day: the whole quota is there, whatever yesterday still holds.
    today = await engine.submit(request(prompt="today", model="paid", n=3))
    p.gates["first"].set()
    await engine.run_until_idle()
    rows = {r["id"]: r for r in await job_rows(harness)}
    assert [rows[t.job_id]["day"] for t in (first, fails, cancelled, today)] == [
        "2026-01-01",
        "2026-01-01",
        "2026-01-01",
        "2026-01-02",
    ]
    assert [rows[t.job_id]["status"] for t in (first, fails, cancelled, today)] == [
        "succeeded",
        "failed",
        "cancelled",
        "succeeded",
    ]
    assert engine.quotas.used("test:alice", "2026-01-01") == (1, pytest.approx(PRICE))
    assert engine.quotas.used("test:alice", "2026-01-02") == (3, pytest.approx(3 * PRICE))
    assert engine.quotas.charged_total("2026-01-01") == pytest.approx(PRICE)
    assert engine.quotas.charged_total("2026-01-02") == pytest.approx(3 * PRICE)
    usage = await engine.usage(ALICE)
    assert (usage.day, usage.images, usage.usd) == ("2026-01-02", 3, pytest.approx(1.5))
    await books_balance(engine, harness)


async def test_yesterdays_full_budget_does_not_refuse_today_and_today_is_capped_anew(
    harness: Harness,
) -> None:
    harness.clock.now = 1_767_225_600.0 + DAY_SECONDS - 10  # 23:59:50 UTC
    harness.provider.gate = asyncio.Event()
    engine = await harness.engine(max_pending_per_user=10, limits=Limits(budget_usd=1.0))
    await engine.submit(request("a", "y1", model="paid"))
    await engine.submit(request("b", "y2", model="paid"))
    with pytest.raises(BudgetExceeded):
        await engine.submit(request("c", "y3", model="paid"))
    harness.clock.now += 20  # past midnight, yesterday's two still running
    await engine.submit(request("c", "t1", model="paid", n=2))  # today's whole budget
    with pytest.raises(BudgetExceeded):
        await engine.submit(request("d", "t2", model="paid"))
    harness.provider.gate.set()
    await engine.run_until_idle()
    assert engine.quotas.charged_total("2026-01-01") == pytest.approx(1.0)
    assert engine.quotas.charged_total("2026-01-02") == pytest.approx(1.0)
    await books_balance(engine, harness)


# ---- bounds and the last slot -------------------------------------------------------------


async def test_n2_with_one_image_left_is_refused_whole_and_holds_nothing(
    harness: Harness,
) -> None:
    engine = await harness.engine(
        start=False, max_pending_per_user=10, limits=Limits(user_images=3)
    )
    await engine.submit(request(prompt="two", model="paid", n=2))
    with pytest.raises(QuotaExceeded) as refused:
        await engine.submit(request(prompt="two more", model="paid", n=2))
    assert refused.value.params == {"asked": 2, "left": 1, "limit": 3}  # what is left is said
    assert engine.quotas.used("test:alice", engine.quotas.today()) == (2, pytest.approx(1.0))
    assert len(engine._jobs) == 1
    await engine.submit(request(prompt="the last one", model="paid", n=1))
    with pytest.raises(QuotaExceeded):
        await engine.submit(request(prompt="none left", model="paid", n=1))
    await books_balance(engine, harness)


async def test_a_short_result_gives_the_unmade_images_back_to_the_quota(
    tmp_path: Path, harness: Harness
) -> None:
    """n=4 makes 2: charged for 2, and the user may ask for 2 more today."""
    harness.provider = FewerProvider({"four": 2})
    engine = await harness.engine(max_pending_per_user=5, limits=Limits(user_images=4))
    short = await engine.submit(request(prompt="four", model="paid", n=4))
    await engine.run_until_idle()
    (r,) = [r for r in await job_rows(harness) if r["id"] == short.job_id]
    assert (r["status"], r["n_images"], r["cost_usd"]) == ("succeeded", 2, pytest.approx(1.0))
    assert len(harness.adapter.deliveries[0][1]) == 2
    await engine.submit(request(prompt="two more", model="paid", n=2))
    await engine.run_until_idle()
    with pytest.raises(QuotaExceeded):
        await engine.submit(request(prompt="over", model="paid"))
    await books_balance(engine, harness)


async def test_a_provider_returning_more_images_than_asked_is_charged_for_those_asked(
    harness: Harness,
) -> None:
    harness.provider = FewerProvider({"one": 3})
    engine = await harness.engine()
    ticket = await engine.submit(request(prompt="one", model="paid", n=1))
    await engine.run_until_idle()
    (r,) = await job_rows(harness)
    assert (r["status"], r["n_images"], r["cost_usd"]) == ("succeeded", 1, pytest.approx(PRICE))
    assert [len(images) for j, images in harness.adapter.deliveries if j == ticket.job_id] == [1]
    await books_balance(engine, harness)


async def test_the_budget_is_reached_exactly_by_concurrent_submits_of_mixed_sizes(
    harness: Harness,
) -> None:
    engine = await harness.engine(
        start=False, max_pending_per_user=50, queue_max=100, limits=Limits(budget_usd=1.5)
    )
    await engine.submit(request("first", "first", model="paid"))  # 0.5 of 1.5
    asks = [2, 1, 2, 1, 1, 4, 1]  # 1.0 fits, then 0.5 fits, then nothing does
    results = await asyncio.gather(
        *(engine.submit(request(f"u{i}", f"p{i}", model="paid", n=n)) for i, n in enumerate(asks)),
        return_exceptions=True,
    )
    passed = [r for r in results if isinstance(r, Ticket)]
    assert all(isinstance(r, (Ticket, BudgetExceeded)) for r in results), results
    assert sum(t.reserved_usd for t in passed) == pytest.approx(1.0)
    day = engine.quotas.today()
    assert engine.quotas.spent_total(day) == pytest.approx(1.5)
    await books_balance(engine, harness)


async def test_float_prices_reach_a_budget_exactly(tmp_path: Path, harness: Harness) -> None:
    """Ten 0.1 jobs fit a 1.0 budget (0.1 * 10 in floats is 0.9999999999999999)."""
    harness.catalog = Catalog.load(
        write_catalog(
            tmp_path, '\n[models.dime]\nprovider = "demo"\nprice_usd = 0.1\nmax_images = 4\n'
        )
    )
    engine = await harness.engine(
        max_pending_per_user=20, queue_max=50, limits=Limits(budget_usd=1.0)
    )
    results = await asyncio.gather(
        *(engine.submit(request(f"u{i}", f"p{i}", model="dime")) for i in range(12)),
        return_exceptions=True,
    )
    assert sum(isinstance(r, Ticket) for r in results) == 10
    assert sum(isinstance(r, BudgetExceeded) for r in results) == 2
    await engine.run_until_idle()
    day = engine.quotas.today()
    assert engine.quotas.charged_total(day) == pytest.approx(1.0)
    with pytest.raises(BudgetExceeded):
        await engine.submit(request("late", "late", model="dime"))
    await books_balance(engine, harness)


# ---- fairness -----------------------------------------------------------------------------


async def test_five_single_jobs_do_not_wait_behind_a_fifty_job_batch(harness: Harness) -> None:
    harness.provider.gate = asyncio.Event()
    engine = await harness.engine(concurrency=1, max_pending_per_user=50, queue_max=100)
    flood = [(await engine.submit(request("flood", f"f{i}"))).job_id for i in range(50)]
    singles = [(await engine.submit(request(f"s{i}", f"s{i}"))).job_id for i in range(5)]
    positions = [engine.position(j) for j in singles]
    assert max(positions) <= 10, positions  # what they are told matches what happens
    harness.provider.gate.set()
    await engine.run_until_idle()
    order = harness.provider.started
    assert len(order) == 55
    assert max(order.index(j) for j in singles) <= 10, [order.index(j) for j in singles]
    assert [j for j in order if j in flood] == flood  # the batch itself stays in order
    assert len(harness.adapter.deliveries) == 55


# ---- cancel racing success ----------------------------------------------------------------


@pytest.mark.parametrize("turns", [0, 1, 2, 3, 5])
async def test_cancel_racing_the_result_tells_the_user_exactly_one_outcome(
    harness: Harness, turns: int
) -> None:
    """The provider answers, then `turns` loop turns later the user's /cancel comes."""
    harness.provider.gates["race"] = asyncio.Event()
    engine = await harness.engine()
    ticket = await engine.submit(request(prompt="race", model="paid", n=2))
    await until(lambda: harness.provider.running == 1)
    harness.provider.gates["race"].set()
    for _ in range(turns):
        await asyncio.sleep(0)
    try:
        await engine.cancel(ALICE, ticket.job_id)
        cancelled = True
    except UserError:
        cancelled = False
    await engine.run_until_idle()
    (r,) = await job_rows(harness)
    kinds = harness.adapter.kinds(ticket.job_id)
    delivered = harness.adapter.delivered(ticket.job_id)
    if cancelled:
        assert (r["status"], r["cost_usd"], delivered) == ("cancelled", 0.0, 0)
        assert kinds.count(StatusKind.CANCELLED) == 1
    else:
        assert (r["status"], r["cost_usd"], delivered) == ("succeeded", pytest.approx(1.0), 1)
        assert StatusKind.CANCELLED not in kinds
    assert StatusKind.FAILED not in kinds
    assert engine.quotas.charged_total(engine.quotas.today()) == pytest.approx(r["cost_usd"])
    await books_balance(engine, harness)


# ---- money across a shutdown --------------------------------------------------------------


async def test_shutdown_mid_run_then_reopen_ends_every_job_once_and_books_agree(
    harness: Harness,
) -> None:
    p = harness.provider
    p.task_ids = True  # each job's paid task is submitted first, then waits
    p.gate = asyncio.Event()
    first = await harness.engine(concurrency=2, max_pending_per_user=5, shutdown_grace=0.05)
    tickets = [await first.submit(request(f"u{i % 3}", f"p{i}", model="paid")) for i in range(6)]
    await until(lambda: p.running == 2)
    await first.close()  # two paid tasks running, four queued: parked
    assert p.submits() == 2
    p.gate.set()
    second = await harness.engine(concurrency=2, max_pending_per_user=5)
    await second.run_until_idle()
    rows = {r["id"]: r for r in await job_rows(harness)}
    assert [rows[t.job_id]["status"] for t in tickets] == ["succeeded"] * 6
    assert p.submits() == 6  # no task was paid for twice
    for t in tickets:
        assert harness.adapter.delivered(t.job_id) == 1
        assert StatusKind.FAILED not in harness.adapter.kinds(t.job_id)
        assert StatusKind.CANCELLED not in harness.adapter.kinds(t.job_id)
    day = second.quotas.today()
    spent = sum(r["cost_usd"] for r in rows.values())
    assert spent == pytest.approx(6 * PRICE)
    assert second.quotas.charged_total(day) == pytest.approx(
        sum(r["cost_usd"] for r in rows.values() if r["status"] == "succeeded")
    )
    totals = await second.store.day_totals(day)
    assert sum(t.charged_usd for t in totals) == pytest.approx(spent)
    assert sum(t.usd for t in totals) == pytest.approx(spent)  # nothing still held
    await books_balance(second, harness)


# ---- rerolls ------------------------------------------------------------------------------


async def test_a_reroll_after_the_result_images_expired_is_a_new_charged_job(
    harness: Harness,
) -> None:
    engine = await harness.engine(max_pending_per_user=5)
    original = await engine.submit(request(model="paid", n=2))
    await engine.run_until_idle()
    harness.clock.now += 40 * DAY_SECONDS
    assert await engine.store.expire_images(harness.clock() - 30 * DAY_SECONDS) == 2
    again = await engine.reroll(ALICE, original.job_id)
    await engine.run_until_idle()
    rows = {r["id"]: r for r in await job_rows(harness)}
    r = rows[again.job_id]
    assert (r["status"], r["n_images"], r["cost_usd"]) == ("succeeded", 2, pytest.approx(1.0))
    assert r["parent_id"] == original.job_id
    assert harness.adapter.delivered(again.job_id) == 1
    await books_balance(engine, harness)


async def test_a_reroll_whose_reference_images_are_gone_is_a_clear_user_error(
    harness: Harness,
) -> None:
    engine = await harness.engine(max_pending_per_user=5)
    original = await engine.submit(request(model="paid", refs=(png_bytes(),)))
    await engine.run_until_idle()
    for ref in (harness.data_dir / "refs").iterdir():
        ref.unlink()
    with pytest.raises(UserError) as refused:
        await engine.reroll(ALICE, original.job_id)
    assert refused.value.key == "error.refs_gone"
    assert engine._jobs == {}
    await books_balance(engine, harness)


async def test_image_retention_also_removes_old_reference_photos(harness: Harness) -> None:
    engine = await harness.engine()
    await engine.submit(request(model="paid", refs=(png_bytes(),)))
    await engine.run_until_idle()
    assert len(list((harness.data_dir / "refs").iterdir())) == 1
    harness.clock.now += 40 * DAY_SECONDS
    recent = await engine.submit(request(model="paid", refs=(png_bytes(),)))
    await engine.run_until_idle()  # ended today: within the retention
    await engine.store.expire_images(harness.clock() - 30 * DAY_SECONDS)
    assert [p.name for p in (harness.data_dir / "refs").iterdir()] == [f"{recent.job_id}-0"]


async def test_a_new_job_the_database_refused_leaves_no_reference_photos(
    harness: Harness,
) -> None:
    """A full disk refuses the row after the photos were written: no row will ever name them,
    so they go with the refusal (else they stayed in data/refs forever)."""
    import sqlite3

    from bot.errors import StorageUnavailable

    engine = await harness.engine()

    async def full(job: Any) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    engine.store.insert_job = full  # type: ignore[method-assign]
    with pytest.raises(StorageUnavailable):
        await engine.submit(request(model="paid", refs=(png_bytes(), png_bytes())))
    assert list((harness.data_dir / "refs").iterdir()) == []
    assert engine.quotas.used("test:alice", engine.quotas.today()) == (0, 0.0)


async def test_linked_identities_share_one_pending_cap_and_one_turn(harness: Harness) -> None:
    """MAX_PENDING_PER_USER and the queue's turns are the account's: a user linked on two
    platforms had twice the cap and two turns in the rotation. Jobs queued before the link
    move their count with them, so after they end nobody is left over the cap."""
    from bot.errors import TooManyPending

    assert isinstance(harness.provider, ScriptedProvider)
    harness.provider.gate = asyncio.Event()  # every job stays queued or running
    engine = await harness.engine(max_pending_per_user=2)
    tg, dc = UserRef("test", "tg"), UserRef("test", "dc")
    first = await engine.submit(request("dc", "before the link"))
    await engine.link(dc, await engine.new_link_code(tg))
    await engine.submit(request("tg", "one"))
    with pytest.raises(TooManyPending):  # dc's job counts: the account has two pending
        await engine.submit(request("tg", "two"))
    with pytest.raises(TooManyPending):
        await engine.submit(request("dc", "three"))
    assert engine._active_by_user == {"test:tg": 2}
    await engine.cancel(dc, first.job_id)
    await engine.submit(request("dc", "after a cancel"))  # room again for the account
    assert engine._active_by_user == {"test:tg": 2}
    harness.provider.gate.set()
    await engine.run_until_idle()
    assert engine._active_by_user == {}


async def test_a_linked_account_takes_one_turn_in_the_queue(harness: Harness) -> None:
    """Bob's one job waits behind one of the account's, not behind one per linked platform."""
    assert isinstance(harness.provider, ScriptedProvider)
    gate_ = harness.provider.gate = asyncio.Event()
    engine = await harness.engine(max_pending_per_user=5, concurrency=1)
    tg, dc = UserRef("test", "tg"), UserRef("test", "dc")
    await engine.link(dc, await engine.new_link_code(tg))
    for user, prompt in [("tg", "A"), ("tg", "B"), ("dc", "C"), ("bob", "D")]:
        await engine.submit(request(user, prompt))
    gate_.set()
    await engine.run_until_idle()
    assert [c.prompt for c in harness.provider.calls] == ["A", "B", "D", "C"]


# ---- hostile prices in the catalog --------------------------------------------------------


@pytest.mark.parametrize(
    "table",
    [
        pytest.param("price_usd = nan", id="nan"),
        pytest.param("price_usd = inf", id="inf"),
        pytest.param(
            'price_usd = 0.5\nsizes = ["1K"]\n[models.bad.prices_by_size]\n"1K" = nan',
            id="size-nan",
        ),
        pytest.param(
            'price_usd = 0.5\nsizes = ["1K"]\n[models.bad.prices_by_size]\n"1K" = inf',
            id="size-inf",
        ),
        pytest.param("price_usd = -0.01", id="negative"),
        pytest.param(
            'price_usd = 0.5\nsizes = ["1K"]\n[models.bad.prices_by_size]\n"1K" = -1.0',
            id="size-negative",
        ),
    ],
)
def test_a_non_finite_or_negative_price_stops_the_catalog(tmp_path: Path, table: str) -> None:
    path = write_catalog(tmp_path, f'\n[models.bad]\nprovider = "demo"\n{table}\n')
    with pytest.raises(CatalogError):
        Catalog.load(path)


def nan_catalog(harness: Harness) -> None:
    paid = harness.catalog.get("paid")
    assert paid is not None
    nanny = replace(paid, name="nanny", price_usd=math.nan, prices_by_size={})
    harness.catalog = Catalog([*harness.catalog, nanny])


async def test_a_nan_priced_submit_never_wipes_the_days_spend(harness: Harness) -> None:
    """Whatever a NaN price does to its own request, what was spent stays spent."""
    nan_catalog(harness)
    engine = await harness.engine(
        max_pending_per_user=10,
        queue_max=50,
        limits=Limits(budget_usd=1.0, user_usd=1.0),
    )
    await engine.submit(request("alice", "a1", model="paid"))
    await engine.submit(request("alice", "a2", model="paid"))
    await engine.run_until_idle()
    day = engine.quotas.today()
    assert engine.quotas.spent_total(day) == pytest.approx(1.0)
    with pytest.raises(UserError):  # a NaN cost can be neither held nor stored
        await engine.submit(request("alice", "nan", model="nanny"))
    assert engine.quotas.spent_total(day) == pytest.approx(1.0)
    assert engine.quotas.used("test:alice", day)[1] == pytest.approx(1.0)
    with pytest.raises(BudgetExceeded):
        await engine.submit(request("bob", "b1", model="paid"))
    await books_balance(engine, harness)
