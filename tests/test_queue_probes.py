"""Adversarial probes of the job queue: bounds, fairness, quota holds, cancels and restarts.

Each probe drives the engine through the Harness (fake clock, recording adapter, scripted
provider with per-prompt gates) and checks what a user or the operator would see: who starts
first, who is refused, what is held and charged, and what a restart resumes. A probe that fails
named a product defect in its docstring (each is fixed; the docstring says what it was).
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiosqlite
import pytest

from bot.adapter import StatusKind
from bot.catalog import Catalog
from bot.dbwriter import Op
from bot.engine import Engine, EngineConfig
from bot.errors import (
    JobEnded,
    JobNotFound,
    QueueFull,
    QuotaExceeded,
    Refused,
    ShuttingDown,
    TooManyPending,
    Transient,
    UserError,
)
from bot.jobs import Job, Ticket, UserRef
from bot.quota import Limits, Quotas
from bot.routing import Router
from bot.store import Store
from tests.conftest import TEST_MODELS, Harness, request
from tests.fakes import ScriptedProvider

ALICE = UserRef("test", "alice")
BOB = UserRef("test", "bob")
PRICE = 0.5  # the test catalog's "paid" model, per image at the default size
STEP = 1.0  # seconds the fake clock moves between submits, so created_at orders them

# ---- helpers ------------------------------------------------------------------------------


async def job_rows(h: Harness) -> list[dict[str, Any]]:
    async with aiosqlite.connect(h.data_dir / "drawbridge.db") as db:
        db.row_factory = aiosqlite.Row
        found = await db.execute_fetchall(
            "SELECT j.id, j.platform, j.user_id, j.status, j.n_images, j.reserved_usd, "
            "j.cost_usd, j.day, j.cached_from, j.delivered_at, j.error_kind, j.task_id, "
            "COALESCE(a.account, j.platform || ':' || j.user_id) AS quota_key "
            "FROM jobs j LEFT JOIN accounts a ON a.member = j.platform || ':' || j.user_id"
        )
        return [dict(r) for r in found]


async def row(h: Harness, job_id: str) -> dict[str, Any]:
    (found,) = [r for r in await job_rows(h) if r["id"] == job_id]
    return found


async def books(engine: Engine, h: Harness, days: set[str] | None = None) -> None:
    """The engine's holds and charges equal what the jobs table says, per quota account.

    Queued and running rows hold their images and reserved dollars, succeeded rows are charged
    what they cost, every other row holds nothing and costs nothing. Only `days` (default:
    today) are checked: a restarted engine loads today's tallies, not yesterday's.
    """
    await engine.store.flush()
    found = await job_rows(h)
    days = days or {engine.quotas.today()}
    expected: dict[tuple[str, str], tuple[int, float]] = {}
    for r in found:
        key = (r["quota_key"], r["day"])
        images, usd = expected.get(key, (0, 0.0))
        if r["status"] in ("queued", "running"):
            images, usd = images + r["n_images"], usd + r["reserved_usd"]
        elif r["status"] == "succeeded" and r["cached_from"] is None:
            images, usd = images + r["n_images"], usd + r["cost_usd"]
        else:
            assert r["cost_usd"] == 0, f"job {r['id']} is {r['status']} but cost {r['cost_usd']}"
        expected[key] = (images, usd)
    for (account, day), (images, usd) in expected.items():
        if day not in days:
            continue
        got = engine.quotas.used(account, day)
        assert got[0] == images and got[1] == pytest.approx(usd), (
            f"{account} on {day}: the engine holds {got}, the jobs table says {(images, usd)}"
        )
    for day in days:
        total = sum(usd for (_, d), (_, usd) in expected.items() if d == day)
        assert engine.quotas.spent_total(day) == pytest.approx(total), f"budget on {day}"


async def until(check: Callable[[], bool], within: float = 3.0) -> None:
    """Wait (polling the loop) until `check()` holds; fail the probe if it never does."""
    try:
        async with asyncio.timeout(within):
            while not check():  # noqa: ASYNC110 - the conditions are fakes' counters
                await asyncio.sleep(0.002)
    except TimeoutError:
        raise AssertionError(f"condition never held: {check}") from None


async def holds_within(check: Callable[[], bool], within: float) -> bool:
    """Whether `check()` comes to hold within `within` seconds (for a probe's own assert)."""
    try:
        await until(check, within)
    except AssertionError:
        return False
    return True


def delivered_once(h: Harness, job_id: str) -> bool:
    return h.adapter.delivered(job_id) == 1


def at_least(items: list[str], n: int) -> bool:
    return len(items) >= n


def finals(h: Harness, job_id: str) -> list[StatusKind]:
    """The outcome messages a job's user saw (cancelled, failed, refused, timed out)."""
    return [k for k in h.adapter.kinds(job_id) if k.final]


def submits_of(provider: ScriptedProvider, job_id: str) -> int:
    """Provider calls for `job_id` that were new (paid) submissions, not resumes of a task."""
    return sum(1 for c in provider.calls if c.job_id == job_id and c.task_id is None)


async def graceful_restart(h: Harness, engine: Engine, **config: Any) -> Engine:
    """Shut down as the app does (engine.close(), then the store), then start a new engine."""
    await engine.close()
    for e, store in list(h.opened):
        if e is engine:
            await store.close()
            h.opened.remove((e, store))
    return await h.engine(**config)


async def crash_restart(h: Harness, engine: Engine, **config: Any) -> Engine:
    await h.abandon(engine)
    return await h.engine(**config)


def fail_write_once(engine: Engine, match: Callable[[Op], bool]) -> list[Op]:
    """Make the store's next `write` of a matching unit fail once, as a full disk would."""
    original = engine.store.write
    failed: list[Op] = []

    async def write(*ops: Op) -> None:
        if not failed:
            hit = [op for op in ops if match(op)]
            if hit:
                failed.extend(hit)
                raise sqlite3.OperationalError("database or disk is full")
        await original(*ops)

    engine.store.write = write  # type: ignore[method-assign]
    return failed


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


def end_update_of(job_id: str) -> Callable[[Op], bool]:
    """The unit `_finish` writes when it ends `job_id` without images."""
    return lambda op: (
        op[0].startswith("UPDATE jobs SET status = ?, cost_usd = 0") and op[1][-1] == job_id
    )


def is_job_insert(op: Op) -> bool:
    return op[0].startswith("INSERT INTO jobs")


async def submit(engine: Engine, h: Harness, user: str, prompt: str, **kw: Any) -> Ticket:
    """Submit one job, then move the fake clock on (so the table orders jobs as they came)."""
    ticket = await engine.submit(request(user, prompt, **kw))
    h.clock.now += STEP
    return ticket


def gate(h: Harness, *prompts: str) -> None:
    for prompt in prompts:
        h.provider.gates[prompt] = asyncio.Event()


def open_gate(h: Harness, prompt: str) -> None:
    h.provider.gates[prompt].set()


def open_all_gates(h: Harness) -> None:
    for event in h.provider.gates.values():
        event.set()
    if h.provider.gate is not None:
        h.provider.gate.set()


# ---- fairness -----------------------------------------------------------------------------


async def test_a_flooder_refilling_its_backlog_never_runs_ahead_of_single_jobs(
    harness: Harness,
) -> None:
    """One user keeps MAX_PENDING_PER_USER jobs in flight, topping up each time one ends;
    three others send one job each at different moments. Each single job must start after at
    most one more of the flooder's jobs (the flooder may hold the next turn, never two)."""
    engine = await harness.engine(concurrency=1, max_pending_per_user=3)
    prompt_of: dict[str, str] = {}
    counter = iter(range(1000))

    async def send(user: str) -> str | None:
        prompt = f"{user}-{next(counter)}"
        gate(harness, prompt)
        try:
            ticket = await submit(engine, harness, user, prompt)
        except TooManyPending:
            return None
        prompt_of[ticket.job_id] = prompt
        return ticket.job_id

    for _ in range(3):
        assert await send("flood") is not None
    assert await send("flood") is None  # the per-user bound
    await until(lambda: len(harness.provider.started) == 1)
    singles: dict[str, int] = {}  # job id → how many jobs had started when it was sent
    arrivals = {0: "bob", 2: "carol", 3: "dave"}
    for step in range(9):
        if step in arrivals:
            job_id = await send(arrivals[step])
            assert job_id is not None
            singles[job_id] = len(harness.provider.started)
        running = harness.provider.started[-1]
        open_gate(harness, prompt_of[running])
        await until(functools.partial(delivered_once, harness, running))
        while await send("flood") is not None:  # the flooder tops up to its bound again
            pass
        await until(functools.partial(at_least, harness.provider.started, step + 2))
    open_all_gates(harness)
    await engine.run_until_idle()
    started = harness.provider.started
    assert len(started) == len(set(started)) == len(prompt_of)  # each ran once
    for job_id, sent_at in singles.items():
        ahead = started[sent_at : started.index(job_id)]
        flood_ahead = [j for j in ahead if prompt_of[j].startswith("flood")]
        assert len(flood_ahead) <= 1, (
            f"{prompt_of[job_id]} waited for {len(flood_ahead)} of the flooder's jobs"
        )


async def test_queue_positions_are_the_start_order_and_close_up_after_a_cancel(
    harness: Harness,
) -> None:
    """Positions users are shown (engine.position, Ticket.position) number the waiting jobs
    1..N in the order they will start, and stay so after a cancel from the middle."""
    gate(harness, "x")
    engine = await harness.engine(concurrency=1, max_pending_per_user=5)
    await submit(engine, harness, "xavier", "x")
    await until(lambda: len(harness.provider.started) == 1)
    plan = [("alice", 4), ("bob", 1), ("carol", 2)]
    tickets: list[Ticket] = []
    for user, count in plan:
        for i in range(count):
            t = await submit(engine, harness, user, f"{user}{i}")
            assert t.position == engine.position(t.job_id)
            tickets.append(t)
    waiting = [t.job_id for t in tickets]
    positions = {j: engine.position(j) for j in waiting}
    assert sorted(positions.values()) == list(range(1, len(waiting) + 1))
    # Round robin: alice0, bob0, carol0, alice1, carol1, alice2, alice3.
    names = {
        t.job_id: n
        for t, n in zip(tickets, ["a0", "a1", "a2", "a3", "b0", "c0", "c1"], strict=True)
    }
    by_pos = [names[j] for j in sorted(waiting, key=positions.__getitem__)]
    assert by_pos == ["a0", "b0", "c0", "a1", "c1", "a2", "a3"]
    cancelled = tickets[1].job_id  # alice1, from the middle
    await engine.cancel(ALICE, cancelled)
    assert engine.position(cancelled) == 0
    waiting.remove(cancelled)
    after = {j: engine.position(j) for j in waiting}
    assert sorted(after.values()) == list(range(1, len(waiting) + 1))
    for j in waiting:  # a cancel never moves anyone back
        assert after[j] <= positions[j], (names[j], positions[j], after[j])
        if positions[j] < positions[cancelled]:
            assert after[j] == positions[j]
    open_all_gates(harness)
    await engine.run_until_idle()
    assert harness.provider.started[1:] == sorted(waiting, key=after.__getitem__)


async def test_fair_order_and_positions_survive_a_crash_restart(harness: Harness) -> None:
    """Queued jobs resumed from the database keep round-robin order (the flooder's backlog
    after the others' single jobs), the positions shown match it, and each runs once."""
    first = await harness.engine(start=False, max_pending_per_user=3)
    a = [(await submit(first, harness, "alice", f"a{i}")).job_id for i in range(3)]
    b = (await submit(first, harness, "bob", "b0")).job_id
    c = (await submit(first, harness, "carol", "c0")).job_id
    harness.provider.gate = asyncio.Event()
    second = await crash_restart(harness, first, concurrency=1, max_pending_per_user=3)
    await until(lambda: len(harness.provider.started) == 1)
    assert harness.provider.started == [a[0]]
    waiting = [a[1], a[2], b, c]
    positions = {j: second.position(j) for j in waiting}
    assert sorted(positions.values()) == [1, 2, 3, 4]
    harness.provider.gate.set()
    await second.run_until_idle()
    order = harness.provider.started
    assert order == [a[0], b, c, a[1], a[2]]
    assert order[1:] == sorted(waiting, key=positions.__getitem__)
    for job_id in [*a, b, c]:
        assert harness.adapter.delivered(job_id) == 1
        assert (await row(harness, job_id))["status"] == "succeeded"
    await books(second, harness)


async def test_fair_order_survives_a_graceful_restart_with_a_paid_task_running(
    harness: Harness,
) -> None:
    """A shutdown parks a running job whose provider task is known and leaves a flood queued:
    after the restart the task is resumed (not paid again), others' single jobs still start
    before the flooder's backlog, and every job runs to one delivery."""
    harness.provider.task_ids = True
    gate(harness, "a0")
    first = await harness.engine(concurrency=1, max_pending_per_user=3, shutdown_grace=0.05)
    a = [(await submit(first, harness, "alice", f"a{i}", model="paid")).job_id for i in range(3)]
    b = (await submit(first, harness, "bob", "b0", model="paid")).job_id
    c = (await submit(first, harness, "carol", "c0", model="paid")).job_id
    await until(lambda: harness.provider.started == [a[0]])
    second = await graceful_restart(harness, first, concurrency=1, max_pending_per_user=3)
    open_gate(harness, "a0")
    await second.run_until_idle()
    order = list(harness.provider.started[1:])  # the second engine's starts
    assert order[0] == a[0]  # the paid task first
    assert order.index(b) < order.index(a[2]) and order.index(c) < order.index(a[2])
    assert sorted(order) == sorted([*a, b, c])  # each started once after the restart
    assert submits_of(harness.provider, a[0]) == 1
    for job_id in [*a, b, c]:
        assert harness.adapter.delivered(job_id) == 1
        r = await row(harness, job_id)
        assert (r["status"], r["cost_usd"]) == ("succeeded", PRICE)
    await books(second, harness)


TWO_PROVIDER_MODELS = (
    TEST_MODELS
    + """
[models.other]
provider = "other"
price_usd = 0.0
max_images = 4
"""
)


async def two_provider_engine(
    h: Harness, tmp_path: Path, **config: Any
) -> tuple[Engine, ScriptedProvider]:
    """An engine with the harness's `demo` provider and a second one, `other`."""
    models = tmp_path / "two.toml"
    models.write_text(TWO_PROVIDER_MODELS)
    catalog = Catalog.load(models)
    other = ScriptedProvider()
    other.name = "other"
    providers = {"demo": h.provider, "other": other}
    store = await Store.open(h.data_dir)
    cfg = EngineConfig(shutdown_grace=0.5, retry_initial=0.01, deliver_backoff=0.01, **config)
    engine = Engine(
        store,
        catalog,
        providers,
        cfg,
        clock=h.clock,
        quotas=Quotas(cfg.limits, ZoneInfo("UTC"), h.clock),
        router=Router(catalog, providers),
    )
    engine.register(h.adapter)
    h.opened.append((engine, store))
    await engine.start()
    return engine, other


async def test_a_user_waiting_on_a_busy_provider_is_not_starved_by_a_batch(
    harness: Harness, tmp_path: Path
) -> None:
    """Round-robin kept a user's turn when their provider is busy (it lost it, before).

    Bob's one job and Fred's batch wait for the same provider (PROVIDER_CONCURRENCY 1); Carol's
    jobs run on another provider. Bob was in line before Fred. Every time Carol's provider
    frees up while Bob's is busy, the scheduler passes over Bob (`FairQueue.pop` moves a user
    whose head job is not ready to the back of the rotation, bot/fairqueue.py `pop`), which
    put Fred ahead of him, so each time Bob's provider freed up Fred's next job took it. What
    Bob saw: "queued #1", and his single image waited behind Fred's whole batch, as long as
    Carol kept the other provider busy. A user passed over now keeps their place.
    """
    p = harness.provider
    engine, other = await two_provider_engine(
        harness,
        tmp_path,
        concurrency=4,
        max_pending_per_user=10,
        provider_concurrency={"demo": 1, "other": 1},
    )
    demo_prompts = ["x0", "b0", *(f"f{i}" for i in range(4))]
    other_prompts = [f"c{i}" for i in range(5)]
    for prompt in demo_prompts:
        p.gates[prompt] = asyncio.Event()
    for prompt in other_prompts:
        other.gates[prompt] = asyncio.Event()
    ids: dict[str, str] = {}

    async def send(user: str, prompt: str, model: str | None = None) -> None:
        ids[prompt] = (await submit(engine, harness, user, prompt, model=model)).job_id

    await send("xavier", "x0")  # holds the demo provider
    await until(lambda: len(p.started) == 1)
    await send("carol", "c0", "other")  # holds the other provider
    await until(lambda: len(other.started) == 1)
    await send("bob", "b0")
    for i in range(1, 5):
        await send("carol", f"c{i}", "other")
    for i in range(4):
        await send("fred", f"f{i}")
    prompt_of = {v: k for k, v in ids.items()}
    for rnd in range(3):
        # Carol's running job is made: the other provider frees and her next one starts.
        other.gates[f"c{rnd}"].set()
        await until(functools.partial(at_least, other.started, rnd + 2))
        # Then the demo provider frees: whoever is next in turn for it starts.
        running = prompt_of[p.started[-1]]
        p.gates[running].set()
        await until(functools.partial(at_least, p.started, rnd + 2))
    for event in [*p.gates.values(), *other.gates.values()]:
        event.set()
    await engine.run_until_idle()
    demo_order = [prompt_of[j] for j in p.started]
    assert demo_order.index("b0") < demo_order.index("f1"), (
        f"bob's single job started after fred's batch: demo provider order {demo_order}"
    )


# ---- bounds -------------------------------------------------------------------------------


async def test_concurrent_submits_fill_queue_max_and_per_user_bounds_exactly(
    harness: Harness,
) -> None:
    """Sixty submits at once from six users, with jobs already running: QUEUE_MAX and
    MAX_PENDING_PER_USER (running jobs included) are each met exactly, never passed."""
    harness.provider.gate = asyncio.Event()
    engine = await harness.engine(concurrency=2, queue_max=12, max_pending_per_user=3)
    await submit(engine, harness, "u0", "warm0")
    await submit(engine, harness, "u0", "warm1")
    await until(lambda: harness.provider.running == 2)
    results = await asyncio.gather(
        *(engine.submit(request(f"u{i % 6}", f"p{i}")) for i in range(60)),
        return_exceptions=True,
    )
    passed = [r for r in results if isinstance(r, Ticket)]
    assert all(isinstance(r, (Ticket, TooManyPending, QueueFull)) for r in results), results
    assert len(passed) == 10  # 12 in all, two were already running
    per_user = [r["user_id"] for r in await job_rows(harness)]
    assert len(per_user) == 12
    assert max(per_user.count(f"u{i}") for i in range(6)) <= 3
    assert per_user.count("u0") == 3  # its two running jobs count: one more passed
    with pytest.raises(QueueFull):
        await engine.submit(request("newcomer"))
    harness.provider.gate.set()
    await engine.run_until_idle()
    assert len(harness.adapter.deliveries) == 12


async def test_bounds_free_again_after_a_cancel_a_failure_and_a_timeout(harness: Harness) -> None:
    """A user at MAX_PENDING_PER_USER gets a slot back for each job that ends without a
    result (cancelled, refused, timed out in the queue), once each; so does the global bound."""
    harness.provider.errors["refused"] = [Refused("no")]
    gate(harness, "blocker", "refused", "old", "again", "third", "c0")
    engine = await harness.engine(
        concurrency=1,
        queue_max=5,
        max_pending_per_user=3,
        queue_timeout=60,
        sweep_interval=0.005,
        image_retention_days=0,
    )
    await submit(engine, harness, "bob", "blocker")
    await until(lambda: harness.provider.running == 1)
    refused = await submit(engine, harness, "alice", "refused")
    await submit(engine, harness, "alice", "old")
    doomed = await submit(engine, harness, "alice", "doomed")
    with pytest.raises(TooManyPending):
        await engine.submit(request("alice", "fourth"))
    await submit(engine, harness, "carol", "c0")
    with pytest.raises(QueueFull):
        await engine.submit(request("dave", "full"))
    await engine.cancel(ALICE, doomed.job_id)  # a cancel
    with pytest.raises(JobNotFound):
        await engine.cancel(ALICE, doomed.job_id)  # a second cancel gives nothing back
    await submit(engine, harness, "alice", "again")
    with pytest.raises(QueueFull):  # (the global bound is checked first)
        await engine.submit(request("dave", "full"))
    open_gate(harness, "blocker")  # "refused" starts next and is refused
    await until(lambda: harness.provider.started[-1] == refused.job_id)
    open_gate(harness, "refused")
    await until(lambda: finals(harness, refused.job_id) == [StatusKind.REFUSED])
    await submit(engine, harness, "alice", "third")  # the refusal gave one back
    with pytest.raises(TooManyPending):
        await engine.submit(request("alice", "fourth"))
    await submit(engine, harness, "dave", "d0")  # and one of the global bound
    with pytest.raises(QueueFull):
        await engine.submit(request("erin", "full"))
    open_all_gates(harness)
    await engine.run_until_idle()
    assert len(harness.adapter.deliveries) == 6  # blocker, old, again, third, c0, d0
    # And a queue timeout gives slots back too.
    gate(harness, "blocker2")
    await submit(engine, harness, "bob", "blocker2")
    await until(lambda: harness.provider.running == 1)
    waiting = [await submit(engine, harness, "alice", f"w{i}") for i in range(3)]
    with pytest.raises(TooManyPending):
        await engine.submit(request("alice", "fourth"))
    harness.clock.now += 120
    await until(lambda: all(finals(harness, t.job_id) == [StatusKind.TIMEOUT] for t in waiting))
    late = [await submit(engine, harness, "alice", f"late{i}") for i in range(3)]
    with pytest.raises(TooManyPending):
        await engine.submit(request("alice", "fourth"))
    open_gate(harness, "blocker2")
    await engine.run_until_idle()
    for t in late:
        assert (await row(harness, t.job_id))["status"] == "succeeded"
    await books(engine, harness)


async def test_bounds_hold_after_a_restart_with_queued_jobs(harness: Harness) -> None:
    """Jobs resumed from the database count against both bounds at once: a restart is not a
    way around MAX_PENDING_PER_USER or QUEUE_MAX."""
    cfg: dict[str, Any] = {"queue_max": 5, "max_pending_per_user": 3}
    first = await harness.engine(start=False, **cfg)
    alice = [await submit(first, harness, "alice", f"a{i}") for i in range(3)]
    await submit(first, harness, "bob", "b0")
    harness.provider.gate = asyncio.Event()
    second = await crash_restart(harness, first, concurrency=1, **cfg)
    with pytest.raises(TooManyPending):
        await second.submit(request("alice", "more"))
    await submit(second, harness, "carol", "c0")
    with pytest.raises(QueueFull):
        await second.submit(request("dave", "more"))
    await second.cancel(ALICE, alice[2].job_id)
    await submit(second, harness, "alice", "again")
    with pytest.raises(QueueFull):
        await second.submit(request("dave", "more"))
    harness.provider.gate.set()
    await second.run_until_idle()
    assert len(harness.adapter.deliveries) == 5
    await books(second, harness)


async def test_admins_skip_quotas_but_not_the_queue_bounds(harness: Harness) -> None:
    """README: admins skip the user and chat quotas (not the budget); nothing says they skip
    the queue's bounds, which protect everyone else's turn. Both bind an admin too."""
    engine = await harness.engine(
        start=False,
        limits=Limits(user_images=1),
        admin_ids=frozenset({"test:boss"}),
        queue_max=4,
        max_pending_per_user=2,
    )
    await submit(engine, harness, "boss", "b0", n=4)  # four images, over the quota: fine
    await submit(engine, harness, "boss", "b1", n=4)
    with pytest.raises(TooManyPending):
        await engine.submit(request("boss", "b2"))
    await submit(engine, harness, "alice", "a0")
    await submit(engine, harness, "carol", "c0")
    await engine.cancel(UserRef("test", "boss"))
    await submit(engine, harness, "dave", "d0")
    with pytest.raises(QueueFull):
        await engine.submit(request("boss", "b3"))


async def test_rerolls_count_against_both_bounds(harness: Harness) -> None:
    """A reroll is a new job: it takes a per-user and a global slot like any other, from
    whoever asked, and an unknown job cannot be rerolled."""
    engine = await harness.engine(concurrency=1, queue_max=3, max_pending_per_user=2)
    done = await submit(engine, harness, "alice", "fox")
    await engine.run_until_idle()
    harness.provider.gate = asyncio.Event()
    r1 = await engine.reroll(ALICE, done.job_id)
    r2 = await engine.reroll(ALICE, done.job_id)
    with pytest.raises(TooManyPending):
        await engine.reroll(ALICE, done.job_id)
    theirs = await engine.reroll(BOB, done.job_id)  # charged to, and bounded for, bob
    with pytest.raises(QueueFull):
        await engine.reroll(UserRef("test", "carol"), done.job_id)
    with pytest.raises(JobNotFound):
        await engine.reroll(ALICE, "nosuchjob0")
    queued = r2 if engine.position(r2.job_id) else r1
    await engine.cancel(ALICE, queued.job_id)
    await engine.reroll(UserRef("test", "carol"), done.job_id)
    harness.provider.gate.set()
    await engine.run_until_idle()
    assert (await row(harness, theirs.job_id))["user_id"] == "bob"
    assert len(harness.adapter.deliveries) == 4


# ---- quota --------------------------------------------------------------------------------


async def test_last_usd_slot_race_exactly_one_passes(harness: Harness) -> None:
    engine = await harness.engine(start=False, limits=Limits(user_usd=1.0), max_pending_per_user=50)
    await engine.submit(request("alice", "first", model="paid"))
    results = await asyncio.gather(
        *(engine.submit(request("alice", f"p{i}", model="paid")) for i in range(20)),
        return_exceptions=True,
    )
    assert sum(isinstance(r, Ticket) for r in results) == 1
    assert sum(isinstance(r, QuotaExceeded) for r in results) == 19
    assert (await engine.usage(ALICE)).usd == pytest.approx(1.0)
    await books(engine, harness)


async def test_last_image_slot_race_across_linked_identities(harness: Harness) -> None:
    """Two identities linked into one account race for its last image: exactly one wins."""
    engine = await harness.engine(
        start=False, limits=Limits(user_images=2), max_pending_per_user=50
    )
    tg, dc = UserRef("test", "tg"), UserRef("test", "dc")
    await engine.submit(request("tg", "first"))
    await engine.link(dc, await engine.new_link_code(tg))
    results = await asyncio.gather(
        *(engine.submit(request(who, f"p{i}")) for i in range(10) for who in ("tg", "dc")),
        return_exceptions=True,
    )
    assert sum(isinstance(r, Ticket) for r in results) == 1
    assert sum(isinstance(r, QuotaExceeded) for r in results) == 19
    assert (await engine.usage(dc)).images == (await engine.usage(tg)).images == 2
    await books(engine, harness)


async def test_last_granted_images_race_exactly_as_many_pass(harness: Harness) -> None:
    engine = await harness.engine(
        start=False, limits=Limits(user_images=1), max_pending_per_user=50
    )
    day = engine.quotas.today()
    await engine.apply(engine.operator.grant("test:alice", day, 2, "test:boss", harness.clock()))
    results = await asyncio.gather(
        *(engine.submit(request("alice", f"p{i}")) for i in range(20)), return_exceptions=True
    )
    assert sum(isinstance(r, Ticket) for r in results) == 3
    assert sum(isinstance(r, QuotaExceeded) for r in results) == 17
    await books(engine, harness)


async def test_every_end_without_a_result_releases_its_hold_exactly_once(
    harness: Harness,
) -> None:
    """Refused, failed, generation timeout, queue timeout, cancel while queued, cancel while
    running: each gives back exactly what it held, a second cancel of each gives back nothing,
    and only the one success stays charged."""
    p = harness.provider
    p.errors["refused"] = [Refused("no")]
    p.errors["down"] = [Transient("503")] * 5
    p.hang_prompts.add("hang")
    limits = Limits(user_images=20, user_usd=20.0, budget_usd=20.0)
    engine = await harness.engine(
        concurrency=1,
        limits=limits,
        max_pending_per_user=10,
        retry_attempts=1,
        generate_timeout=0.1,
        queue_timeout=60,
        sweep_interval=0.005,
        image_retention_days=0,
    )
    ended: list[Ticket] = []
    ok = await submit(engine, harness, "alice", "ok", model="paid")
    for prompt in ("refused", "down", "hang"):
        ended.append(await submit(engine, harness, "alice", prompt, model="paid", n=2))
    await engine.run_until_idle()
    gate(harness, "blocker")
    await submit(engine, harness, "bob", "blocker")
    await until(lambda: p.running == 1)
    harness.clock.now += 100
    queued = await submit(engine, harness, "alice", "queued", model="paid", n=3)
    expired = await submit(engine, harness, "alice", "expired", model="paid", n=2)
    await engine.cancel(ALICE, queued.job_id)
    harness.clock.now += 120  # `expired` is past QUEUE_TIMEOUT now
    await until(lambda: finals(harness, expired.job_id) == [StatusKind.TIMEOUT])
    gate(harness, "running")
    running = await submit(engine, harness, "alice", "running", model="paid", n=2)
    open_gate(harness, "blocker")
    await until(lambda: p.started[-1] == running.job_id)
    await engine.cancel(ALICE, running.job_id)
    ended += [queued, expired, running]
    await books(engine, harness)
    for t in ended:
        with pytest.raises(JobEnded):
            await engine.cancel(ALICE, t.job_id)
        assert len(finals(harness, t.job_id)) == 1, harness.adapter.kinds(t.job_id)
    open_all_gates(harness)
    await engine.run_until_idle()
    usage = await engine.usage(ALICE)
    assert usage.images == 1 and usage.usd == pytest.approx(PRICE)
    assert engine.quotas.spent_total(engine.quotas.today()) == pytest.approx(PRICE)
    assert (await row(harness, ok.job_id))["cost_usd"] == pytest.approx(PRICE)
    await books(engine, harness)


async def test_a_linked_joiners_job_is_refunded_after_a_restart(harness: Harness) -> None:
    """A job queued before its owner linked accounts is refunded after a restart (it was not).

    dc queues a job, then links into tg's account: from then on the job counts against the
    account (the restart rebuilds it so, `Store.day_totals` joins `accounts`). But the job's row
    keeps no account (`link` only rewrites the live copies in `Engine._jobs`), so after a
    restart the resumed job's `quota_key` was dc's own id, and cancelling it released nothing:
    tg kept an image "used" for a job that was cancelled, and was refused a request that fit.
    """
    limits = Limits(user_images=2)
    first = await harness.engine(start=False, limits=limits, max_pending_per_user=5)
    tg, dc = UserRef("test", "tg"), UserRef("test", "dc")
    job = await submit(first, harness, "dc", "joiner's job")
    await first.link(dc, await first.new_link_code(tg))
    assert (await first.usage(tg)).images == 1
    gate(harness, "joiner's job")
    second = await crash_restart(harness, first, limits=limits, max_pending_per_user=5)
    await until(lambda: harness.provider.running == 1)
    assert (await second.usage(tg)).images == 1  # held for the account, as before
    await second.cancel(dc, job.job_id)
    assert (await row(harness, job.job_id))["status"] == "cancelled"
    assert (await second.usage(tg)).images == 0, "the cancelled job still holds tg's image"
    await books(second, harness)
    await second.submit(request("tg", "fits", n=2))


async def test_the_quota_day_rolls_over_in_quota_tz_while_jobs_wait_and_restart(
    harness: Harness,
) -> None:
    """Jobs queued at 23:30 in Shanghai stay on that day's books through midnight, a cancel
    and a restart; the new day starts with the full quota, and nothing is charged twice."""
    harness.clock.now = 1_767_281_400.0  # 2026-01-01 23:30 in Shanghai
    limits = Limits(user_images=2)
    cfg: dict[str, Any] = {
        "tz": "Asia/Shanghai",
        "limits": limits,
        "max_pending_per_user": 5,
        "concurrency": 1,
    }
    harness.provider.gate = asyncio.Event()
    first = await harness.engine(**cfg)
    j1 = await submit(first, harness, "alice", "j1")
    j2 = await submit(first, harness, "alice", "j2")
    with pytest.raises(QuotaExceeded):
        await first.submit(request("alice", "j3"))
    harness.clock.now += 31 * 60  # 2026-01-02 00:01 in Shanghai
    k1 = await submit(first, harness, "alice", "k1")
    k2 = await submit(first, harness, "alice", "k2")
    with pytest.raises(QuotaExceeded):
        await first.submit(request("alice", "k3"))
    await first.cancel(ALICE, j2.job_id)  # yesterday's hold is released, not today's
    with pytest.raises(QuotaExceeded):
        await first.submit(request("alice", "k3"))
    assert (await first.usage(ALICE)).images == 2
    await books(first, harness, {"2026-01-01", "2026-01-02"})
    second = await crash_restart(harness, first, **cfg)
    assert (await second.usage(ALICE)).images == 2
    with pytest.raises(QuotaExceeded):
        await second.submit(request("alice", "k3"))
    harness.provider.gate.set()
    await second.run_until_idle()
    found = {t.job_id: await row(harness, t.job_id) for t in (j1, j2, k1, k2)}
    assert [r["day"] for r in found.values()] == ["2026-01-01"] * 2 + ["2026-01-02"] * 2
    assert [r["status"] for r in found.values()] == [
        "succeeded",
        "cancelled",
        "succeeded",
        "succeeded",
    ]
    for t in (j1, k1, k2):
        assert harness.adapter.delivered(t.job_id) == 1
    assert (await second.usage(ALICE)).images == 2
    await books(second, harness)


# ---- cancel -------------------------------------------------------------------------------


async def test_cancel_queued_running_someone_elses_unknown_and_twice(harness: Harness) -> None:
    gate(harness, "run")
    engine = await harness.engine(
        concurrency=1, limits=Limits(user_images=10), max_pending_per_user=5
    )
    running = await submit(engine, harness, "alice", "run", model="paid")
    await until(lambda: harness.provider.running == 1)
    q1 = await submit(engine, harness, "alice", "q1", model="paid")
    q2 = await submit(engine, harness, "alice", "q2", model="paid")
    theirs = await submit(engine, harness, "bob", "b", model="paid")
    assert [engine.position(t.job_id) for t in (q1, theirs, q2)] == [1, 2, 3]
    with pytest.raises(JobNotFound) as not_mine:
        await engine.cancel(ALICE, theirs.job_id)
    assert not isinstance(not_mine.value, JobEnded)
    with pytest.raises(JobNotFound) as unknown:
        await engine.cancel(ALICE, "zzzzzzzzzz")
    assert not isinstance(unknown.value, JobEnded)
    cancelled = await engine.cancel(ALICE, q1.job_id.upper())  # ids are typed in any case
    assert cancelled.id == q1.job_id and cancelled.status == "cancelled"
    # Alice's turn in the rotation was ahead of Bob's and stays hers: q2 inherits it.
    assert [engine.position(t.job_id) for t in (q2, theirs)] == [1, 2]
    with pytest.raises(JobEnded):
        await engine.cancel(ALICE, q1.job_id)
    await engine.cancel(ALICE, running.job_id)
    with pytest.raises(JobEnded):
        await engine.cancel(ALICE, running.job_id)
    assert (await engine.usage(ALICE)).images == 1  # q2 only
    await books(engine, harness)
    await engine.run_until_idle()
    assert finals(harness, q1.job_id) == [StatusKind.CANCELLED]
    assert finals(harness, running.job_id) == [StatusKind.CANCELLED]
    assert harness.adapter.delivered(running.job_id) == 0
    assert [harness.adapter.delivered(t.job_id) for t in (q2, theirs)] == [1, 1]
    assert [c.job_id for c in harness.provider.calls].count(q1.job_id) == 0
    await books(engine, harness)


async def test_a_cancel_while_the_new_jobs_row_is_written_is_not_refused_as_finishing(
    harness: Harness,
) -> None:
    """/cancel sent right after /imagine was refused as "finishing", and the job ran.

    `submit` holds the job (it is the user's latest active job) while its row is committed,
    and only then queues it. A /cancel handled in that window (Telegram hands a bot the two
    commands in one batch) found the job neither queued nor generating, so `Engine.cancel`
    answered "error.job_finishing" ("can no longer be cancelled"), and the job then ran and
    was charged. The cancel now waits for the row, then cancels the queued job.
    """
    engine = await harness.engine(limits=Limits(user_images=5))
    entered, release = hold_writes(engine, is_job_insert)
    submitting = asyncio.create_task(engine.submit(request("alice", "fox", model="paid")))
    await asyncio.wait_for(entered.wait(), 3)

    async def cancel() -> Job | UserError:
        try:
            return await engine.cancel(ALICE)
        except UserError as exc:
            return exc

    cancelling = asyncio.create_task(cancel())
    for _ in range(20):
        await asyncio.sleep(0)
    assert not cancelling.done()  # waiting for the row, not answered "finishing"
    release.set()
    outcome = await asyncio.wait_for(cancelling, 5)
    ticket = await submitting
    await engine.run_until_idle()
    assert isinstance(outcome, Job), f"the cancel was answered {getattr(outcome, 'key', outcome)}"
    assert harness.provider.calls == []
    assert (await row(harness, ticket.job_id))["status"] == "cancelled"
    await books(engine, harness)


async def test_a_cancel_whose_write_failed_can_be_retried(harness: Harness) -> None:
    """A cancel that hit a database error left the job stuck until a restart; now it waits
    in line again and the cancel can be retried.

    `cancel` takes a queued job out of the queue before its end is written; when that write
    fails (a full disk, a locked database) the job stays held (a pending slot and its quota)
    but is in no queue: it never runs, it cannot time out, and every later /cancel answers
    "error.job_finishing". After a restart its row, still `queued`, runs and is charged.
    """
    gate(harness, "blocker")
    engine = await harness.engine(concurrency=1, max_pending_per_user=5, shutdown_grace=0.05)
    await submit(engine, harness, "bob", "blocker")
    await until(lambda: harness.provider.running == 1)
    queued = await submit(engine, harness, "alice", "queued", model="paid")
    fail_write_once(engine, end_update_of(queued.job_id))
    with pytest.raises((sqlite3.Error, UserError)):
        await engine.cancel(ALICE, queued.job_id)
    try:
        retried: Job | UserError = await engine.cancel(ALICE, queued.job_id)
    except UserError as exc:
        retried = exc
    assert isinstance(retried, Job), f"the retried cancel: {getattr(retried, 'key', retried)}"
    assert (await row(harness, queued.job_id))["status"] == "cancelled"
    open_gate(harness, "blocker")
    await engine.run_until_idle()
    await books(engine, harness)


async def test_cancels_during_the_shutdown_grace_end_jobs_for_good(harness: Harness) -> None:
    """While close() waits for running jobs, a user cancels a queued and a running job: both
    end cancelled, refunded, told once, and the next start runs neither."""
    gate(harness, "run")
    engine = await harness.engine(concurrency=1, shutdown_grace=5, limits=Limits(user_images=5))
    running = await submit(engine, harness, "alice", "run", model="paid")
    await until(lambda: harness.provider.running == 1)
    queued = await submit(engine, harness, "alice", "queued", model="paid")
    closing = asyncio.create_task(engine.close())
    await until(lambda: engine._closing)
    with pytest.raises(ShuttingDown):
        await engine.submit(request("alice", "late"))
    await engine.cancel(ALICE, queued.job_id)
    await engine.cancel(ALICE, running.job_id)
    await asyncio.wait_for(closing, 3)  # nothing left running: no need to wait out the grace
    assert (await engine.usage(ALICE)).images == 0
    second = await graceful_restart(harness, engine, limits=Limits(user_images=5))
    open_all_gates(harness)
    await second.run_until_idle()
    for t in (queued, running):
        r = await row(harness, t.job_id)
        assert (r["status"], r["cost_usd"]) == ("cancelled", 0.0)
        assert finals(harness, t.job_id) == [StatusKind.CANCELLED]
        assert harness.adapter.delivered(t.job_id) == 0
    assert [c.job_id for c in harness.provider.calls] == [running.job_id]
    assert (await second.usage(ALICE)).images == 0
    await books(second, harness)


# ---- shutdown and restart -----------------------------------------------------------------


async def test_close_with_jobs_queued_and_running_then_restart_ends_each_once(
    harness: Harness,
) -> None:
    """A shutdown with two paid tasks running, a flood queued, one job cancelled and one
    refused: after the next start every job has ended once, with one delivery or one outcome
    message, charged once, and no task the provider had named was paid for again."""
    p = harness.provider
    p.task_ids = True
    p.errors["refused"] = [Refused("no")]
    cfg: dict[str, Any] = {"concurrency": 2, "max_pending_per_user": 4, "shutdown_grace": 0.05}
    first = await harness.engine(**cfg)
    refused = await submit(first, harness, "erin", "refused", model="paid")
    await first.run_until_idle()
    gate(harness, "a0", "b0")
    a0 = await submit(first, harness, "alice", "a0", model="paid")
    b0 = await submit(first, harness, "bob", "b0", model="paid")
    await until(lambda: p.running == 2)
    flood = [await submit(first, harness, "alice", f"a{i}", model="paid") for i in (1, 2, 3)]
    c0 = await submit(first, harness, "carol", "c0", model="paid")
    d0 = await submit(first, harness, "dave", "d0", model="paid")
    await first.cancel(UserRef("test", "dave"), d0.job_id)
    parked_kinds = {t.job_id: list(harness.adapter.kinds(t.job_id)) for t in (a0, b0)}
    second = await graceful_restart(harness, first, **cfg)
    for t in (a0, b0):  # a shutdown is not an outcome: nobody was told their job failed
        assert not finals(harness, t.job_id) and parked_kinds[t.job_id] == [StatusKind.STARTED]
    open_all_gates(harness)
    await second.run_until_idle()
    succeeded = [a0, b0, *flood, c0]
    for t in succeeded:
        r = await row(harness, t.job_id)
        assert (r["status"], r["cost_usd"]) == ("succeeded", PRICE), r
        assert harness.adapter.delivered(t.job_id) == 1
        assert finals(harness, t.job_id) == []
        assert submits_of(p, t.job_id) == 1, f"{t.job_id} was submitted to the provider again"
    assert (await row(harness, refused.job_id))["status"] == "refused"
    assert finals(harness, refused.job_id) == [StatusKind.REFUSED]
    assert (await row(harness, d0.job_id))["status"] == "cancelled"
    assert finals(harness, d0.job_id) == [StatusKind.CANCELLED]
    assert [c.job_id for c in p.calls].count(d0.job_id) == 0
    usage = await second.usage(ALICE)
    assert usage.images == 4 and usage.usd == pytest.approx(4 * PRICE)
    await books(second, harness)


async def test_two_crashes_while_a_paid_task_runs_never_pay_for_it_again(harness: Harness) -> None:
    harness.provider.task_ids = True
    gate(harness, "slow")
    first = await harness.engine(limits=Limits(user_images=1))
    ticket = await submit(first, harness, "alice", "slow", model="paid")
    await until(lambda: harness.provider.running == 1)
    await first.store.flush()  # the task id is on disk before the first crash
    second = await crash_restart(harness, first, limits=Limits(user_images=1))
    await until(lambda: len(harness.provider.calls) == 2)
    third = await crash_restart(harness, second, limits=Limits(user_images=1))
    await until(lambda: len(harness.provider.calls) == 3)
    with pytest.raises(QuotaExceeded):  # still held for the resumed job
        await third.submit(request("alice", "more"))
    open_gate(harness, "slow")
    await third.run_until_idle()
    assert submits_of(harness.provider, ticket.job_id) == 1
    assert harness.adapter.delivered(ticket.job_id) == 1
    r = await row(harness, ticket.job_id)
    assert (r["status"], r["cost_usd"]) == ("succeeded", PRICE)
    await books(third, harness)


# ---- the queue-timeout sweep --------------------------------------------------------------


async def test_the_sweep_and_a_start_in_the_same_moment_have_one_outcome(harness: Harness) -> None:
    """The queue timeout passes exactly as the slot frees: the waiting job either ran (once,
    charged, delivered, no timeout message) or timed out (never sent to the provider, not
    charged, one timeout message) - never some of each."""
    gate(harness, "blocker")
    engine = await harness.engine(
        concurrency=1,
        max_pending_per_user=5,
        queue_timeout=60,
        sweep_interval=0.001,
        image_retention_days=0,
    )
    await submit(engine, harness, "bob", "blocker", model="paid")
    await until(lambda: harness.provider.running == 1)
    waiting = await submit(engine, harness, "alice", "waiting", model="paid")
    harness.clock.now += 120
    open_gate(harness, "blocker")  # in the same turn of the loop
    await engine.run_until_idle()
    r = await row(harness, waiting.job_id)
    calls = [c.job_id for c in harness.provider.calls].count(waiting.job_id)
    if r["status"] == "succeeded":
        assert (r["cost_usd"], calls, harness.adapter.delivered(waiting.job_id)) == (PRICE, 1, 1)
        assert finals(harness, waiting.job_id) == []
    else:
        assert (r["status"], r["error_kind"], r["cost_usd"]) == ("failed", "timeout", 0.0)
        assert (calls, harness.adapter.delivered(waiting.job_id)) == (0, 0)
        assert finals(harness, waiting.job_id) == [StatusKind.TIMEOUT]
    await books(engine, harness)


async def test_the_sweep_spares_resumed_paid_tasks_however_old(harness: Harness) -> None:
    """After a long outage two parked jobs with provider tasks wait for one slot: the queue
    timeout does not throw away a task already paid for; both finish, neither paid twice."""
    harness.provider.task_ids = True
    gate(harness, "a", "b")
    first = await harness.engine(concurrency=2, shutdown_grace=0.05)
    a = await submit(first, harness, "alice", "a", model="paid")
    b = await submit(first, harness, "bob", "b", model="paid")
    await until(lambda: harness.provider.running == 2)
    harness.clock.now += 7200  # the bot is down for two hours
    second = await graceful_restart(
        harness, first, concurrency=1, queue_timeout=60, sweep_interval=0.001
    )
    await until(lambda: harness.provider.running == 1)
    await asyncio.sleep(0.02)  # many sweeps go by
    assert not finals(harness, a.job_id) and not finals(harness, b.job_id)
    open_all_gates(harness)
    await second.run_until_idle()
    for t in (a, b):
        assert (await row(harness, t.job_id))["status"] == "succeeded"
        assert submits_of(harness.provider, t.job_id) == 1
        assert harness.adapter.delivered(t.job_id) == 1


async def test_the_sweep_goes_on_after_a_failed_write(harness: Harness) -> None:
    """One failed database write stopped the queue-timeout sweep for good (no longer).

    `Scheduler._sweep` awaits `_finish` for each expired job with no guard: when the write
    ending one of them fails (a full disk, a locked database), the exception ends the sweeper
    task. That job is already out of the queue but still held (a pending slot, its quota), and
    no job ever times out in the queue again until a restart: users wait with no answer.
    """
    gate(harness, "blocker")
    engine = await harness.engine(
        concurrency=1,
        max_pending_per_user=5,
        queue_timeout=60,
        sweep_interval=0.002,
        image_retention_days=0,
        shutdown_grace=0.05,
    )
    await submit(engine, harness, "bob", "blocker")
    await until(lambda: harness.provider.running == 1)
    first = await submit(engine, harness, "alice", "first")
    fail_write_once(engine, end_update_of(first.job_id))
    harness.clock.now += 120
    await until(lambda: first.job_id not in engine._queue)  # the sweep took it, and failed
    later = await submit(engine, harness, "carol", "later")
    harness.clock.now += 120
    timed_out = await holds_within(
        lambda: (
            finals(harness, later.job_id) == [StatusKind.TIMEOUT]
            and finals(harness, first.job_id) == [StatusKind.TIMEOUT]
        ),
        within=0.5,
    )
    assert engine._sweeper is not None and not engine._sweeper.done(), "the sweeper died"
    assert timed_out, "queued jobs past QUEUE_TIMEOUT were never ended"
