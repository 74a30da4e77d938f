"""The engine through a recording adapter and a scripted provider: fairness, bounds, money, restarts."""

from __future__ import annotations

import asyncio

import aiosqlite
import pytest

from bot.adapter import StatusKind
from bot.errors import (
    BudgetExceeded,
    InvalidRequest,
    JobEnded,
    JobNotFound,
    QueueFull,
    QuotaExceeded,
    RateLimited,
    Refused,
    ShuttingDown,
    TooManyPending,
    Transient,
)
from bot.jobs import UserRef
from bot.quota import Limits
from tests.conftest import Harness, request


async def rows(h: Harness, sql: str = "SELECT id, status, cost_usd, error_kind FROM jobs") -> list:
    async with aiosqlite.connect(h.data_dir / "drawbridge.db") as db:
        return list(await db.execute_fetchall(sql))


async def status_of(h: Harness, job_id: str) -> tuple:
    (row,) = await rows(
        h, f"SELECT status, cost_usd, error_kind, n_images FROM jobs WHERE id = '{job_id}'"
    )
    return tuple(row)


async def test_job_runs_to_delivery_and_is_charged(harness: Harness) -> None:
    engine = await harness.engine()
    ticket = await engine.submit(request(model="paid", n=2))
    assert ticket.position == 1 and ticket.reserved_usd == pytest.approx(1.0)
    await engine.run_until_idle()
    assert await status_of(harness, ticket.job_id) == ("succeeded", 1.0, None, 2)
    ((job_id, images),) = harness.adapter.deliveries
    assert job_id == ticket.job_id and len(images) == 2
    assert all(img.path.read_bytes().startswith(b"\x89PNG") for img in images)
    assert harness.adapter.kinds(ticket.job_id) == [StatusKind.STARTED]
    (ref,) = await rows(harness, "SELECT delivery_ref FROM jobs")
    assert ref[0] == f"msg-{ticket.job_id}"


async def test_fairness_a_late_user_is_served_before_a_batch(harness: Harness) -> None:
    harness.provider.gate = asyncio.Event()
    engine = await harness.engine(concurrency=1, max_pending_per_user=20)
    a = [(await engine.submit(request("a", f"a{i}"))).job_id for i in range(10)]
    b = (await engine.submit(request("b", "b0"))).job_id
    await asyncio.sleep(0)
    harness.provider.gate.set()
    await engine.run_until_idle()
    order = harness.provider.started
    assert order.index(b) < order.index(a[2])
    assert order[:3] == [a[0], a[1], b]


async def test_queue_positions_follow_round_robin(harness: Harness) -> None:
    engine = await harness.engine(start=False, max_pending_per_user=10)
    t1 = await engine.submit(request("a", "one"))
    t2 = await engine.submit(request("a", "two"))
    t3 = await engine.submit(request("b", "three"))
    assert (t1.position, t2.position, t3.position) == (1, 2, 2)
    assert engine.position(t2.job_id) == 3


async def test_concurrency_cap_is_never_exceeded(harness: Harness) -> None:
    engine = await harness.engine(concurrency=4, max_pending_per_user=50, queue_max=100)
    harness.provider.gate = asyncio.Event()
    for i in range(30):
        await engine.submit(request(f"u{i % 6}", f"p{i}"))
    await asyncio.sleep(0.05)
    assert harness.provider.running == 4
    harness.provider.gate.set()
    await engine.run_until_idle()
    assert harness.provider.max_running == 4
    assert len(harness.adapter.deliveries) == 30


async def test_a_made_result_frees_its_slot_and_a_retry_waits_for_one(harness: Harness) -> None:
    engine = await harness.engine(concurrency=1, max_pending_per_user=10)
    provider = harness.provider
    provider.fetch_errors["a"] = [Transient("result download failed")]
    provider.gates["b"] = asyncio.Event()
    a = await engine.submit(request("u1", "a"))
    b = await engine.submit(request("u2", "b"))
    await asyncio.sleep(0.1)
    # a was made, so b took the one slot while a fetched; a's fetch failed and its retry
    # waits for a slot rather than run beside b.
    assert provider.started == [a.job_id, b.job_id]
    assert provider.running == 1
    provider.gates["b"].set()
    await engine.run_until_idle()
    assert provider.started == [a.job_id, b.job_id, a.job_id]
    assert provider.max_running == 1
    assert (await status_of(harness, a.job_id))[0] == "succeeded"
    assert (await status_of(harness, b.job_id))[0] == "succeeded"


async def test_global_and_per_user_bounds_answer_at_once(harness: Harness) -> None:
    engine = await harness.engine(start=False, queue_max=5, max_pending_per_user=2)
    await engine.submit(request("a"))
    await engine.submit(request("a"))
    with pytest.raises(TooManyPending) as too_many:
        await engine.submit(request("a"))
    assert too_many.value.params == {"max": 2}
    for user in "bcd":
        if user != "d":
            await engine.submit(request(user))
        else:
            await engine.submit(request(user))
    with pytest.raises(QueueFull):
        await engine.submit(request("e"))
    assert len(await rows(harness)) == 5


async def test_burst_from_one_user_queues_only_the_allowed_number(harness: Harness) -> None:
    engine = await harness.engine(start=False, max_pending_per_user=3)
    results = await asyncio.gather(
        *(engine.submit(request("a", f"p{i}")) for i in range(20)), return_exceptions=True
    )
    assert sum(not isinstance(r, Exception) for r in results) == 3
    assert all(isinstance(r, TooManyPending) for r in results if isinstance(r, Exception))


async def test_quota_reserve_settle_refund(harness: Harness) -> None:
    harness.provider.errors["boom"] = [Refused("no")]
    engine = await harness.engine(limits=Limits(user_images=5), max_pending_per_user=5)
    user = UserRef("test", "alice")
    await engine.submit(request(n=2))
    refused = await engine.submit(request(prompt="boom", n=2))
    assert (await engine.usage(user)).images == 4  # both held while queued
    await engine.run_until_idle()
    assert (await engine.usage(user)).images == 2  # the refusal was released
    assert (await status_of(harness, refused.job_id))[:3] == ("refused", 0.0, "refused")
    assert harness.adapter.kinds(refused.job_id)[-1] is StatusKind.REFUSED
    await engine.submit(request(n=3))
    with pytest.raises(QuotaExceeded) as exc:
        await engine.submit(request(n=1))
    assert exc.value.params == {"used": 5, "limit": 5}


async def test_usd_quota_and_budget_count_prices_per_size(harness: Harness) -> None:
    engine = await harness.engine(
        limits=Limits(user_usd=2.0, budget_usd=3.0), max_pending_per_user=9
    )
    await engine.submit(request("a", model="paid", size="4K", n=2))  # $2.00
    with pytest.raises(QuotaExceeded):
        await engine.submit(request("a", model="paid", n=1))
    await engine.submit(request("b", model="paid", size="4K", n=1))  # total $3.00
    with pytest.raises(BudgetExceeded):
        await engine.submit(request("c", model="paid", n=1))
    await engine.submit(request("c", prompt="free", n=1))  # demo costs nothing
    await engine.run_until_idle()
    costs = sorted(r[2] for r in await rows(harness))
    assert costs == [0.0, 1.0, 2.0]


async def test_admins_skip_quotas(harness: Harness) -> None:
    engine = await harness.engine(
        limits=Limits(user_images=1), admin_ids=frozenset({"test:boss"}), max_pending_per_user=5
    )
    for _ in range(3):
        await engine.submit(request("boss"))
    with pytest.raises(QuotaExceeded):
        await engine.submit(request("alice", n=2))


async def test_the_budget_binds_admins_too(harness: Harness) -> None:
    # BUDGET_DAILY_USD is the operator's cap on the whole bill: an admin skips the user's
    # limits, not that one.
    engine = await harness.engine(
        limits=Limits(user_images=1, budget_usd=1.5),
        admin_ids=frozenset({"test:boss"}),
        max_pending_per_user=5,
    )
    await engine.submit(request("boss", model="paid", size="4K", n=1))  # $1.00 of the $1.50
    with pytest.raises(BudgetExceeded):
        await engine.submit(request("boss", model="paid", size="4K", n=1))
    await engine.submit(request("boss", n=2))  # over their image quota, but free: served


async def test_last_slot_race_exactly_one_passes(harness: Harness) -> None:
    engine = await harness.engine(
        start=False, limits=Limits(user_images=3), max_pending_per_user=50
    )
    await engine.submit(request(n=2))
    results = await asyncio.gather(
        *(engine.submit(request(prompt=f"p{i}")) for i in range(50)), return_exceptions=True
    )
    assert sum(not isinstance(r, Exception) for r in results) == 1
    assert sum(isinstance(r, QuotaExceeded) for r in results) == 49


async def test_budget_race_exactly_one_passes(harness: Harness) -> None:
    engine = await harness.engine(start=False, limits=Limits(budget_usd=0.5), queue_max=500)
    results = await asyncio.gather(
        *(engine.submit(request(f"u{i}", model="paid")) for i in range(40)), return_exceptions=True
    )
    assert sum(not isinstance(r, Exception) for r in results) == 1


async def test_cancelling_a_job_that_has_ended_says_so(harness: Harness) -> None:
    engine = await harness.engine()
    ticket = await engine.submit(request())
    await engine.run_until_idle()
    with pytest.raises(JobEnded):  # not "no job of yours was found"
        await engine.cancel(UserRef("test", "alice"), ticket.job_id)
    with pytest.raises(JobNotFound):  # someone else's: as if it did not exist
        await engine.cancel(UserRef("test", "bob"), ticket.job_id)


async def test_cancel_queued_job_is_refunded(harness: Harness) -> None:
    engine = await harness.engine(start=False, limits=Limits(user_images=2), max_pending_per_user=5)
    user = UserRef("test", "alice")
    ticket = await engine.submit(request(n=2))
    job = await engine.cancel(user, ticket.job_id)
    assert job.status == "cancelled"
    assert (await engine.usage(user)).images == 0
    assert await status_of(harness, ticket.job_id) == ("cancelled", 0.0, "cancelled", 2)
    assert harness.adapter.kinds(ticket.job_id) == [StatusKind.CANCELLED]
    with pytest.raises(JobNotFound):
        await engine.cancel(user, ticket.job_id)


async def test_cancel_running_job_discards_its_result(harness: Harness) -> None:
    harness.provider.gate = asyncio.Event()
    engine = await harness.engine(limits=Limits(user_images=2))
    user = UserRef("test", "alice")
    ticket = await engine.submit(request())
    await asyncio.sleep(0.05)
    assert harness.provider.running == 1
    await engine.cancel(user)  # no id: the user's latest job
    harness.provider.gate.set()
    await engine.run_until_idle()
    assert (await status_of(harness, ticket.job_id))[:2] == ("cancelled", 0.0)
    assert harness.adapter.deliveries == []
    assert (await engine.usage(user)).images == 0


async def test_someone_else_cannot_cancel_my_job(harness: Harness) -> None:
    engine = await harness.engine(start=False, admin_ids=frozenset({"test:boss"}))
    ticket = await engine.submit(request("alice"))
    with pytest.raises(JobNotFound):
        await engine.cancel(UserRef("test", "mallory"), ticket.job_id)
    await engine.cancel(UserRef("test", "boss"), ticket.job_id)


async def test_transient_errors_are_retried_then_succeed(harness: Harness) -> None:
    harness.provider.errors["flaky"] = [Transient("503"), Transient("503", retry_after=0.05)]
    engine = await harness.engine()
    ticket = await engine.submit(request(prompt="flaky"))
    await engine.run_until_idle()
    assert (await status_of(harness, ticket.job_id))[0] == "succeeded"
    assert len(harness.provider.calls) == 3


async def test_a_retry_after_past_the_stage_is_not_waited_for(harness: Harness) -> None:
    """Told to come back after the stage's time is up, the job ends now with the provider's
    reason (not a timeout at the end of a pointless wait), and the user hears for how long."""
    harness.provider.errors["busy"] = [RateLimited("429", retry_after=600)]
    harness.provider.errors["later"] = [Transient("503"), Transient("503", retry_after=600)]
    engine = await harness.engine(retry_attempts=4, generate_timeout=30)
    busy = await engine.submit(request("a", prompt="busy", model="paid"))
    later = await engine.submit(request("b", prompt="later", model="paid"))
    async with asyncio.timeout(10):
        await engine.run_until_idle()
    assert await status_of(harness, busy.job_id) == ("failed", 0.0, "rate_limited", 1)
    assert (await status_of(harness, later.job_id))[:3] == ("failed", 0.0, "transient")
    assert len(harness.provider.calls) == 3  # one try, then two: none after the long hint
    ((_, told),) = [
        (j, u) for j, u in harness.adapter.statuses if j == busy.job_id and u.kind.final
    ]
    assert "10 minutes" in told.text and "not charged" in told.text


async def test_persistent_failure_ends_with_a_message_and_no_charge(harness: Harness) -> None:
    harness.provider.errors["down"] = [Transient("503")] * 10
    engine = await harness.engine(retry_attempts=3)
    ticket = await engine.submit(request(prompt="down", model="paid"))
    await engine.run_until_idle()
    assert await status_of(harness, ticket.job_id) == ("failed", 0.0, "transient", 1)
    ((_, last),) = [(j, u) for j, u in harness.adapter.statuses if u.kind is StatusKind.FAILED]
    assert "not charged" in last.text.lower()
    assert len(harness.provider.calls) == 3


async def test_generation_stage_timeout(harness: Harness) -> None:
    harness.provider.hang_prompts.add("hang")
    engine = await harness.engine(generate_timeout=0.1)
    ticket = await engine.submit(request(prompt="hang"))
    await engine.run_until_idle()
    assert (await status_of(harness, ticket.job_id))[:3] == ("failed", 0.0, "timeout")
    assert harness.adapter.kinds(ticket.job_id)[-1] is StatusKind.TIMEOUT


async def test_queue_stage_timeout(harness: Harness) -> None:
    harness.provider.gate = asyncio.Event()
    engine = await harness.engine(concurrency=1, queue_timeout=60, sweep_interval=0.02)
    first = await engine.submit(request("a"))
    waiting = await engine.submit(request("b"))
    harness.clock.now += 120
    await asyncio.sleep(0.1)
    assert (await status_of(harness, waiting.job_id))[:3] == ("failed", 0.0, "timeout")
    harness.provider.gate.set()
    await engine.run_until_idle()
    assert (await status_of(harness, first.job_id))[0] == "succeeded"


async def test_delivery_is_retried_and_recorded(harness: Harness) -> None:
    harness.adapter.fail_deliveries = 2
    engine = await harness.engine()
    ticket = await engine.submit(request())
    await engine.run_until_idle()
    assert harness.adapter.delivered(ticket.job_id) == 1
    (row,) = await rows(harness, "SELECT delivered_at IS NOT NULL, delivery_attempts FROM jobs")
    assert tuple(row) == (1, 2)


@pytest.mark.parametrize("permanent", [True, False], ids=["refused", "retries-spent"])
async def test_a_result_that_cannot_be_posted_says_so_and_how_to_get_it(
    harness: Harness, permanent: bool
) -> None:
    # Every job ends with a message: the images are stored (and charged), the platform would
    # not take them, and the status message says where to have them again.
    harness.adapter.fail_deliveries = 10
    harness.adapter.permanent_failure = permanent
    engine = await harness.engine(deliver_timeout=0.3)  # the platform away for longer than that
    ticket = await engine.submit(request())
    await engine.run_until_idle()
    assert harness.adapter.delivered(ticket.job_id) == 0
    job_id, last = harness.adapter.statuses[-1]
    assert job_id == ticket.job_id and last.kind is StatusKind.FAILED
    assert f"/show {ticket.job_id}" in last.text
    assert (await status_of(harness, ticket.job_id))[0] == "succeeded"


async def test_delivery_stage_timeout_keeps_the_charge_and_retries(harness: Harness) -> None:
    harness.adapter.deliver_delay = 0.3
    engine = await harness.engine(deliver_timeout=0.05, deliver_attempts=2)
    ticket = await engine.submit(request(model="paid"))
    await engine.run_until_idle()
    assert (await status_of(harness, ticket.job_id))[:2] == ("succeeded", 0.5)
    (row,) = await rows(harness, "SELECT delivered_at, delivery_attempts FROM jobs")
    assert tuple(row) == (None, 2)


async def test_invalid_requests_are_refused_before_anything_is_written(harness: Harness) -> None:
    engine = await harness.engine(start=False, max_prompt_chars=100)
    cases = {
        "error.empty_prompt": request(prompt="   "),
        "error.prompt_too_long": request(prompt="x" * 101),
        "error.unknown_model": request(model="nope"),
        "error.ratio_not_supported": request(model="paid", ratio="99:1"),
        "error.size_not_supported": request(model="paid", size="8K"),
        "error.too_many_images": request(model="paid", n=5),
        "error.too_many_refs": request(model="paid", refs=(b"x", b"y", b"z")),
        "error.reference_unreadable": request(model="paid", refs=(b"<html>",)),
    }
    for key, req in cases.items():
        with pytest.raises(InvalidRequest) as exc:
            await engine.submit(req)
        assert exc.value.key == key
    assert await rows(harness) == []


async def test_closing_engine_refuses_new_work(harness: Harness) -> None:
    engine = await harness.engine()
    await engine.close()
    with pytest.raises(ShuttingDown):
        await engine.submit(request())


async def test_day_boundary_in_quota_timezone(harness: Harness) -> None:
    # 2026-01-01 15:30 UTC is 23:30 in Shanghai; thirty minutes later a new day starts there.
    harness.clock.now = 1_767_281_400.0
    engine = await harness.engine(tz="Asia/Shanghai", limits=Limits(user_images=1))
    await engine.submit(request())
    await engine.run_until_idle()
    with pytest.raises(QuotaExceeded):
        await engine.submit(request())
    harness.clock.now += 31 * 60
    ticket = await engine.submit(request())
    await engine.run_until_idle()
    days = await rows(harness, "SELECT day FROM jobs ORDER BY created_at")
    assert [d[0] for d in days] == ["2026-01-01", "2026-01-02"]
    assert (await status_of(harness, ticket.job_id))[0] == "succeeded"


# ---- restarts: a second engine on the database of one abandoned without shutdown ----------


async def test_restart_resumes_queued_jobs(harness: Harness) -> None:
    first = await harness.engine(start=False, max_pending_per_user=5)
    tickets = [await first.submit(request(prompt=f"p{i}")) for i in range(3)]
    await harness.abandon(first)
    second = await harness.engine(max_pending_per_user=5)
    await second.run_until_idle()
    for t in tickets:
        assert (await status_of(harness, t.job_id))[0] == "succeeded"
        assert harness.adapter.delivered(t.job_id) == 1


async def test_restart_reruns_a_running_job_without_task_id(harness: Harness) -> None:
    harness.provider.gate = asyncio.Event()
    first = await harness.engine()
    ticket = await first.submit(request())
    await asyncio.sleep(0.05)
    assert (await status_of(harness, ticket.job_id))[0] == "running"
    await harness.abandon(first)
    harness.provider.gate.set()
    second = await harness.engine()
    await second.run_until_idle()
    assert (await status_of(harness, ticket.job_id))[0] == "succeeded"
    assert harness.adapter.delivered(ticket.job_id) == 1


async def test_restart_resumes_a_submitted_task_instead_of_paying_again(harness: Harness) -> None:
    harness.provider.gate = asyncio.Event()
    harness.provider.task_ids = True
    first = await harness.engine()
    ticket = await first.submit(request(model="paid"))
    await asyncio.sleep(0.05)
    await harness.abandon(first)
    harness.provider.gate.set()
    second = await harness.engine()
    await second.run_until_idle()
    assert harness.provider.submits() == 1
    assert harness.provider.calls[-1].task_id == f"task-{ticket.job_id}"
    assert await status_of(harness, ticket.job_id) == ("succeeded", 0.5, None, 1)
    assert harness.adapter.delivered(ticket.job_id) == 1


async def test_restart_delivers_generated_but_undelivered_images(harness: Harness) -> None:
    harness.adapter.fail_deliveries = 1
    first = await harness.engine(deliver_attempts=1, deliver_timeout=0.01)  # given up at once
    ticket = await first.submit(request())
    await first.run_until_idle()
    assert harness.adapter.delivered(ticket.job_id) == 0
    await harness.abandon(first)
    calls = len(harness.provider.calls)
    second = await harness.engine(deliver_attempts=3)
    await second.run_until_idle()
    assert harness.adapter.delivered(ticket.job_id) == 1
    assert len(harness.provider.calls) == calls  # delivered from disk, not generated again


async def test_restart_never_resends_delivered_jobs(harness: Harness) -> None:
    first = await harness.engine()
    ticket = await first.submit(request())
    await first.run_until_idle()
    await harness.abandon(first)
    second = await harness.engine()
    await second.run_until_idle()
    assert harness.adapter.delivered(ticket.job_id) == 1


async def test_restart_rebuilds_quota_from_the_database(harness: Harness) -> None:
    first = await harness.engine(start=False, limits=Limits(user_images=3))
    await first.submit(request(n=2))
    await harness.abandon(first)
    second = await harness.engine(start=False, limits=Limits(user_images=3))
    await second.start()
    with pytest.raises(QuotaExceeded):
        await second.submit(request(n=2))
    await second.submit(request(n=1))


async def test_shutdown_parks_running_jobs_for_the_next_start(harness: Harness) -> None:
    harness.provider.gate = asyncio.Event()
    first = await harness.engine(shutdown_grace=0.05)
    ticket = await first.submit(request())
    await asyncio.sleep(0.05)
    await first.close()
    assert (await status_of(harness, ticket.job_id))[0] == "running"
    harness.provider.gate.set()
    second = await harness.engine()
    await second.run_until_idle()
    assert (await status_of(harness, ticket.job_id))[0] == "succeeded"
    assert harness.adapter.delivered(ticket.job_id) == 1


async def test_shutdown_grace_lets_a_running_job_finish(harness: Harness) -> None:
    harness.provider.gate = asyncio.Event()
    engine = await harness.engine(shutdown_grace=5)
    ticket = await engine.submit(request())
    await asyncio.sleep(0.05)
    closing = asyncio.create_task(engine.close())
    await asyncio.sleep(0.05)
    harness.provider.gate.set()
    await closing
    assert (await status_of(harness, ticket.job_id))[0] == "succeeded"
    assert harness.adapter.delivered(ticket.job_id) == 1


async def test_progress_reaches_the_adapter_coalesced(harness: Harness) -> None:
    harness.provider.progress_steps = (1, 2, 3, 10, 11, 50, 100)
    engine = await harness.engine()
    ticket = await engine.submit(request())
    await engine.run_until_idle()
    percents = [u.percent for j, u in harness.adapter.statuses if u.kind is StatusKind.PROGRESS]
    assert percents == [1, 10, 50, 100]
    assert ticket.job_id
