"""Long-uptime probes: nothing in memory (or in tables meant to be pruned) grows with the work.

An operator runs the bot for weeks without a restart. Each probe drives many jobs, users,
chats or days through the real engine (and, where the state lives there, the real adapters
over their loopback fakes), lets everything go idle, and measures every container keyed by
job, user, chat, interaction, message or day. A probe that fails names what grows and where.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import aiosqlite
import pytest

from adapters.discord_adapter import DiscordAdapter
from adapters.telegram_adapter import TelegramAdapter
from adapters.telegram_budget import SendBudget
from bot.engine import Engine
from bot.errors import InvalidRequest, JobNotFound, Refused, Transient, UserError
from bot.jobs import Options, Request, Target, UserRef
from bot.quota import Limits
from tests.conftest import Harness
from tests.fake_discord import USER, FakeDiscord
from tests.fake_telegram import FakeTelegram

DAY = 86400.0


def sizes(obj: object, names: list[str]) -> dict[str, int]:
    return {name: len(getattr(obj, name)) for name in names}


ENGINE_TABLES = [
    "_jobs",
    "_active_by_user",
    "_running",
    "_slots",
    "_slot_waiters",
    "_generating",
    "_inserting",
    "_cancelled",
    "_ending",
    "_background",
]
QUEUE_TABLES = ["_by_user", "_rotation", "_owner", "_stamp"]


def engine_sizes(engine: Engine) -> dict[str, int]:
    found = sizes(engine, ENGINE_TABLES)
    found.update({f"queue.{k}": v for k, v in sizes(engine._queue, QUEUE_TABLES).items()})
    found["queue._levels(non-empty)"] = sum(1 for level in engine._queue._levels if level)
    found["queue._levels"] = len(engine._queue._levels)
    found["_running_by_provider"] = len(engine._running_by_provider)
    return found


def req(user: str, prompt: str, chat: str | None = None, guild: str | None = None) -> Request:
    return Request(
        user=UserRef("test", user),
        target=Target("test", chat_id=chat or f"chat-{user}", guild_id=guild),
        prompt=prompt,
        options=Options(n=1),
        model="paid",
    )


async def db_count(h: Harness, table: str) -> int:
    async with aiosqlite.connect(h.data_dir / "drawbridge.db") as db:
        ((n,),) = await db.execute_fetchall(f"SELECT COUNT(*) FROM {table}")
    return int(n)


async def run_round(
    h: Harness, engine: Engine, users: int, per_user: int, tag: str, *, fail_every: int = 0
) -> int:
    """Submit `per_user` jobs for each of `users` users (within the bounds), then go idle."""
    submitted = 0
    for k in range(per_user):
        for u in range(users):
            prompt = f"{tag} u{u} k{k}"
            if fail_every and (u + k) % fail_every == 0:
                h.provider.errors[prompt] = [Refused("no")]
            await engine.submit(req(f"{tag}-u{u}", prompt))
            submitted += 1
        await engine.run_until_idle()
    return submitted


def label_sets(engine: Engine) -> int:
    return sum(len(m.samples) for m in engine.metrics.registry.collect())


# ---- the engine ---------------------------------------------------------------------------


async def test_engine_job_tables_empty_again_after_many_jobs_users_and_days(
    harness: Harness,
) -> None:
    """Succeeded, refused and cancelled jobs from many users over several days: every table
    keyed by job or user in the engine and its fair queue is empty once idle."""
    engine = await harness.engine(queue_max=400, max_pending_per_user=3)
    ran = 0
    for day in range(3):
        harness.clock.now += DAY
        ran += await run_round(harness, engine, 150, 2, f"d{day}", fail_every=5)
    # and cancels: queued jobs behind a gate, cancelled one by one
    gate = asyncio.Event()
    harness.provider.gate = gate
    ids = [(await engine.submit(req(f"c{u}", f"cx {u}"))).job_id for u in range(120)]
    for u, job_id in enumerate(ids):
        with contextlib.suppress(UserError):  # started already: it ends when the gate opens
            await engine.cancel(UserRef("test", f"c{u}"), job_id)
    gate.set()
    harness.provider.gate = None
    await engine.run_until_idle()
    ran += len(ids)
    found = engine_sizes(engine)
    bounded = {k: v for k, v in found.items() if k not in ("queue._levels", "_running_by_provider")}
    assert all(v == 0 for v in bounded.values()), f"after {ran} jobs: {found}"
    assert found["queue._levels"] <= 3 and found["_running_by_provider"] <= 1, found


async def test_tasks_do_not_accumulate_over_many_jobs(harness: Harness) -> None:
    """asyncio tasks alive after two equal rounds of jobs: the second adds none."""
    engine = await harness.engine()
    await run_round(harness, engine, 100, 2, "warm")
    before = len(asyncio.all_tasks())
    n = 0
    for day in range(3):
        harness.clock.now += DAY
        n += await run_round(harness, engine, 100, 2, f"r{day}", fail_every=4)
    await asyncio.sleep(0)
    after = len(asyncio.all_tasks())
    assert after <= before, f"tasks {before} → {after} after {n} more jobs"


async def test_metrics_label_sets_do_not_grow_per_user_or_job(harness: Harness) -> None:
    """Prometheus samples (one per label set) are the same after 300 more jobs by new users."""
    engine = await harness.engine()
    await run_round(harness, engine, 60, 1, "a", fail_every=3)
    with pytest.raises(UserError):
        await engine.submit(req("x", ""))
    first = label_sets(engine)
    n = 0
    for day in range(3):
        harness.clock.now += DAY
        n += await run_round(harness, engine, 100, 1, f"b{day}", fail_every=3)
        with pytest.raises(UserError):
            await engine.submit(req(f"x{day}", ""))
    second = label_sets(engine)
    assert second <= first, f"metric samples {first} → {second} after {n} more jobs"


async def test_quota_tables_keep_two_days_as_days_pass(harness: Harness) -> None:
    """Quotas keep today and yesterday only: per-day tallies, totals, charges, chat scopes and
    the interned day names. Thirty days of jobs in many users and chats.

    After weeks an operator saw one entry per day served in `Quotas._charged` (and
    `_day_names`) that nothing ever removed: `_prune` dropped `_days`, `_totals` and `_scopes`
    of old days but not those two. It drops them too now.
    """
    engine = await harness.engine(limits=Limits(user_images=50))
    days = 30
    for day in range(days):
        harness.clock.now += DAY
        for u in range(20):
            await engine.submit(req(f"u{day}-{u}", f"q {day} {u}", guild=f"g{u % 5}"))
        await engine.run_until_idle()
    q = engine.quotas
    found = sizes(q, ["_days", "_totals", "_charged", "_scopes", "_day_names"])
    per_day_scopes = 20  # (a chat each: the guild is a scope on Discord only)
    assert found["_days"] <= 2 and found["_totals"] <= 2, f"after {days} days: {found}"
    assert found["_scopes"] <= 2 * per_day_scopes, f"after {days} days: {found}"
    assert found["_charged"] <= 2, f"after {days} days: {found} (_charged grows 1 a day)"
    # (The interned names: the kept days and one more, today's before its first job, say.)
    assert found["_day_names"] <= 3, f"after {days} days: {found} (_day_names grows 1 a day)"


async def test_quota_user_tallies_of_today_hold_only_users_who_asked_today(
    harness: Harness,
) -> None:
    """Tallies are kept for the last few days only: 400 users of one day go once two later
    days have had jobs (today and yesterday are kept, plus at most the day being pruned)."""
    engine = await harness.engine()
    for u in range(400):
        await engine.submit(req(f"big{u}", f"t {u}"))
        if u % 100 == 99:
            await engine.run_until_idle()
    harness.clock.now += 2 * DAY
    for u in range(5):
        await engine.submit(req(f"small{u}", f"s {u}"))
    harness.clock.now += DAY
    await engine.submit(req("next", "next"))
    harness.clock.now += DAY
    await engine.submit(req("last", "last"))
    await engine.run_until_idle()
    held = sum(len(users) for users in engine.quotas._days.values())
    assert held <= 7, f"tallies held after 400 users two days ago: {held}"


async def test_alerted_set_stays_bounded_as_days_pass(harness: Harness) -> None:
    """The once-a-day alert memory keeps only today's keys.

    With a daily budget that is reached every day, `Engine._alerted` gained two or three
    `(key, day)` pairs a day and nothing removed old days. A new day now drops the old marks.
    """
    engine = await harness.engine(limits=Limits(budget_usd=1.0))
    days = 40
    for _day in range(days):
        harness.clock.now += DAY
        for u in range(3):
            with contextlib.suppress(UserError):
                await engine.submit(req(f"b{u}", f"budget {_day} {u}"))
        await engine.run_until_idle()
    found = len(engine._alerted)
    assert found <= 4, f"_alerted holds {found} keys after {days} days (≈{found / days:.1f}/day)"


async def test_alerted_set_stays_bounded_while_a_breaker_flaps(harness: Harness) -> None:
    """A provider that keeps failing opens its breaker again after every cool-down.

    `breaker_changed` alerted with a key that embedded the clock (`breaker:demo:<seconds>`),
    so every reopening was a new key in `Engine._alerted`, never removed (and a message to the
    admins each time). The key is the hour now: one alert an hour at most.
    """
    engine = await harness.engine(retry_attempts=1)
    breaker = engine.router.breakers["demo"]
    breaker.clock = harness.clock
    opens = 0
    for cycle in range(40):  # five failures open it; after the cool-down a probe succeeds
        for i in range(breaker.threshold):
            prompt = f"down {cycle} {i}"
            harness.provider.errors[prompt] = [Transient("503")]
            await engine.submit(req(f"f{i}", prompt))
            await engine.run_until_idle()
        opens += 1
        harness.clock.now += breaker.cooldown + 1
        await engine.submit(req("ok", f"up {cycle}"))
        await engine.run_until_idle()
    found = len(engine._alerted)
    assert found <= 4, f"_alerted holds {found} keys after {opens} breaker cool-downs"


async def test_wrong_link_code_tries_are_forgotten_after_their_window(harness: Harness) -> None:
    """Wrong /link codes are counted per user for LINK_CODE_TTL; after that they mean nothing.

    `Engine._link_tries` kept a user's entry until that user linked successfully: every user
    who ever mistyped a code once stayed in memory for good. A wrong try now drops the entries
    past their window.
    """
    engine = await harness.engine()
    users = 500
    for u in range(users):
        if u % 100 == 0:
            harness.clock.now += DAY
        with pytest.raises(InvalidRequest):
            await engine.link(UserRef("test", f"typo{u}"), "WRONGCODE1")
    harness.clock.now += DAY
    with pytest.raises(InvalidRequest):
        await engine.link(UserRef("test", "today"), "WRONGCODE1")
    found = len(engine._link_tries)
    assert found <= 1, f"_link_tries holds {found} users after {users} wrong codes days ago"


async def test_commands_table_is_pruned_as_days_pass(harness: Harness) -> None:
    """The `commands` table (replayed-update guard) keeps about two days of rows."""
    engine = await harness.engine()
    days, per_day = 10, 60
    for day in range(days):
        harness.clock.now += DAY
        for i in range(per_day):
            user = UserRef("test", f"cmd{i}")
            target = Target("test", chat_id=f"chat{i}", reply_to=f"{day}-{i}")
            await engine.apply([], (user, target))
    await engine.store.flush()
    found = await db_count(harness, "commands")
    assert found <= 3 * per_day, f"commands rows after {days} days × {per_day}: {found}"


async def test_link_codes_table_is_pruned(harness: Harness) -> None:
    """Expired link codes go: the table holds the codes made within LINK_CODE_TTL."""
    engine = await harness.engine()
    made = 0
    for day in range(5):
        harness.clock.now += DAY
        for u in range(80):
            await engine.new_link_code(UserRef("test", f"lc{day}-{u}"))
            made += 1
    await engine.store.flush()
    found = await db_count(harness, "link_codes")
    assert found <= 80, f"link_codes rows after {made} codes over 5 days: {found}"


async def test_engine_second_round_grows_nothing(harness: Harness) -> None:
    """Every engine and quota container after round 1 vs after a round 2 of new users/days."""
    engine = await harness.engine()

    def snapshot() -> dict[str, int]:
        found = engine_sizes(engine)
        found.update(
            {f"quotas.{k}": v for k, v in sizes(engine.quotas, ["_days", "_scopes"]).items()}
        )
        found["quotas.tallies"] = sum(len(u) for u in engine.quotas._days.values())
        found["_link_tries"] = len(engine._link_tries)
        found["router.breakers"] = len(engine.router.breakers)
        found["router._slots"] = len(engine.router._slots)
        found["router._limiters"] = len(engine.router._limiters)
        found["operator.accounts"] = len(engine.operator.accounts)
        found["store._paid"] = len(engine.store._paid)
        return found

    harness.clock.now += DAY
    await run_round(harness, engine, 150, 2, "one", fail_every=7)
    harness.clock.now += 2 * DAY
    await run_round(harness, engine, 5, 1, "settle")
    first = snapshot()
    n = 0
    for day in range(4):
        harness.clock.now += DAY
        n += await run_round(harness, engine, 150, 2, f"two{day}", fail_every=7)
    harness.clock.now += 2 * DAY
    await run_round(harness, engine, 5, 1, "settle2")
    second = snapshot()
    grew = {k: (first[k], second[k]) for k in first if second[k] > first[k]}
    assert not grew, f"grew over {n} more jobs: {grew}"


# ---- Telegram -----------------------------------------------------------------------------


class FastClock:
    """The adapter's monotonic clock, a thousand times fast (send budgets refill at once),
    plus `offset`, which a probe moves on to let a window pass."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() * 1000 + self.offset


def product_tasks() -> int:
    """Live asyncio tasks, less the fakes' own per-connection server handlers (aiohttp's
    `RequestHandler.start`: one per keep-alive connection the client's bounded pool holds)."""
    return sum(
        1
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "__qualname__", "") != "RequestHandler.start"
    )


@pytest.fixture
def _ptb_timedelta(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PTB_TIMEDELTA", "true")


@pytest.fixture
async def tg(_ptb_timedelta: None) -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram(overall_limit=None, group_limit=None) as fake:
        yield fake


@pytest.fixture
async def telegram(harness: Harness, tg: FakeTelegram) -> AsyncIterator[tuple[Engine, Any]]:
    engine = await harness.engine(start=False, queue_max=400)
    adapter = TelegramAdapter(
        engine,
        tg.token,
        tg.url,
        poll_timeout=1,
        edit_interval=0.2,
        action_interval=0.2,
        rate_limiter=SendBudget(overall=None, group=None),
        clock=FastClock(),
    )
    await adapter.open()
    await engine.start()
    await adapter.start()
    yield engine, adapter
    await adapter.stop_intake()
    await engine.close()
    await adapter.close()


def telegram_sizes(adapter: TelegramAdapter) -> dict[str, int]:
    board = adapter.board
    found = {
        f"board.{k}": v
        for k, v in sizes(
            board,
            [
                "_lines",
                "_outboxes",
                "_waiting_acks",
                "_acks_in_flight",
                "_typing",
                "_typing_keys",
                "_typing_tasks",
                "_tasks",
            ],
        ).items()
    }
    found.update(
        {f"albums.{k}": v for k, v in sizes(adapter.albums, ["_parts", "_timers"]).items()}
    )
    found["buttons._originals"] = len(adapter.buttons._originals)
    found["sender.migrated"] = len(adapter.sender.migrated)
    budget = adapter.sender.budget
    if budget is not None:
        found["budget._waiting"] = len(budget._waiting)
        found["budget._paused"] = len(budget._paused)
    found["errors"] = len(adapter.errors)
    return found


async def drive_telegram(
    tg: FakeTelegram, engine: Engine, first_user: int, users: int, *, group: bool = False
) -> int:
    """`users` users each send one prompt (private chats, or one group); wait for results."""
    photos = len(tg.sent("sendPhoto"))
    for u in range(first_user, first_user + users):
        user = tg.user(1000 + u)
        chat = tg.chat(-100500 - (u % 7), "supergroup") if group else None
        text = f"/imagine probe {u}" if group else f"probe {u}"
        tg.message(text, user=user, chat=chat)
    deadline = time.monotonic() + 20
    while len(tg.sent("sendPhoto")) < photos + users:
        assert time.monotonic() < deadline, "results not all delivered"
        await asyncio.sleep(0.02)
    await engine.run_until_idle()
    return users


async def settle_telegram(adapter: TelegramAdapter) -> None:
    deadline = time.monotonic() + 10
    while adapter.board._lines or adapter.board._tasks or adapter.board._typing_tasks:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)


async def test_telegram_adapter_tables_empty_again_after_many_chats(
    telegram: tuple[Engine, TelegramAdapter], tg: FakeTelegram
) -> None:
    """Status lines, outboxes, typing heartbeats, waiting acks: back to empty once idle."""
    engine, adapter = telegram
    n = await drive_telegram(tg, engine, 0, 120)
    n += await drive_telegram(tg, engine, 200, 120, group=True)
    await settle_telegram(adapter)
    found = telegram_sizes(adapter)
    grown = {k: v for k, v in found.items() if v}
    assert not grown, f"after {n} jobs in {n} chats: {found}"
    assert len(engine._jobs) == 0 and len(engine._running) == 0


async def test_telegram_second_round_grows_nothing(
    telegram: tuple[Engine, TelegramAdapter], tg: FakeTelegram
) -> None:
    """Round 2 (new users and chats) leaves every adapter table and the task count as round 1
    did; the per-chat send buckets are capped (10,000), so they are measured against it."""
    engine, adapter = telegram
    await drive_telegram(tg, engine, 0, 80)
    await settle_telegram(adapter)
    first = telegram_sizes(adapter)
    tasks_before = product_tasks()
    n = await drive_telegram(tg, engine, 1000, 150)
    n += await drive_telegram(tg, engine, 2000, 50, group=True)
    await settle_telegram(adapter)
    second = telegram_sizes(adapter)
    tasks_after = product_tasks()
    grew = {k: (first[k], second[k]) for k in first if second[k] > first[k]}
    assert not grew, f"grew over {n} more jobs: {grew}"
    assert tasks_after <= tasks_before, f"tasks {tasks_before} → {tasks_after} over {n} jobs"
    assert len(adapter.sender._buckets) <= 10_001
    budget = adapter.sender.budget
    assert budget is not None and len(budget._chats) <= 10_001


async def test_telegram_originals_presses_are_forgotten_after_their_window(
    telegram: tuple[Engine, TelegramAdapter], tg: FakeTelegram
) -> None:
    """ "Originals" presses are remembered per chat and job only for the resend window."""
    engine, adapter = telegram
    await drive_telegram(tg, engine, 0, 60)
    photos = tg.sent("sendPhoto")
    for photo in photos:
        data = next(d for _, d in photo.buttons() if d.startswith("of:"))
        tg.callback(data, photo.result, user=tg.user(int(photo.chat_id or 0)))
    deadline = time.monotonic() + 20
    while len(tg.callback_answers) < len(photos):
        assert time.monotonic() < deadline, "presses not all answered"
        await asyncio.sleep(0.02)
    assert isinstance(adapter.clock, FastClock)
    adapter.clock.offset += 3600  # an hour on: every resend window has passed
    last = photos[-1]
    data = next(d for _, d in last.buttons() if d.startswith("of:"))
    tg.callback(data, last.result, user=tg.user(int(last.chat_id or 0)))
    while len(tg.callback_answers) < len(photos) + 1:
        assert time.monotonic() < deadline, "last press not answered"
        await asyncio.sleep(0.02)
    await settle_telegram(adapter)
    found = len(adapter.buttons._originals)
    assert found <= 2, f"originals remembered after {len(photos)} presses: {found}"


# ---- Discord ------------------------------------------------------------------------------


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    server = FakeDiscord()
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def discord_bot(harness: Harness, fake: FakeDiscord) -> AsyncIterator[DiscordAdapter]:
    from tests.fake_discord import GUILD_ID

    engine = await harness.engine(start=False, shutdown_grace=0.1, queue_max=400)
    adapter = DiscordAdapter(
        engine,
        fake.token,
        fake.api_url,
        fake.gateway_url,
        guild_ids=[int(GUILD_ID)],
        guild_ready_timeout=0.05,
        edit_interval=0.01,
        first_edit_delay=0.0,
        position_interval=0.05,
    )
    await adapter.open()
    await engine.start()
    await adapter.start()
    await fake.wait_identified()
    yield adapter
    await adapter.stop_intake()
    await engine.close()
    await adapter.close()


def discord_sizes(adapter: DiscordAdapter) -> dict[str, int]:
    outbox = adapter.outbox
    found = {
        f"outbox.{k}": v
        for k, v in sizes(
            outbox, ["_live", "_status_refs", "_dead", "_edited", "_queued", "_reposts"]
        ).items()
    }
    found["board._slots"] = len(outbox._board._slots)
    found["adapter._tasks"] = len(adapter._tasks)
    return found


async def board_drained(adapter: DiscordAdapter, deadline: float) -> None:
    """Until the status board has sent its last edits (or the deadline passes)."""
    while time.monotonic() < deadline:
        if not adapter.outbox._board._slots:
            return
        await asyncio.sleep(0.02)


async def drive_discord(
    fake: FakeDiscord, adapter: DiscordAdapter, first: int, users: int
) -> list[Any]:
    inters = []
    for u in range(first, first + users):
        user = {**USER, "id": str(1400000000000100000 + u), "username": f"u{u}"}
        inters.append(await fake.slash("imagine", {"prompt": f"probe {u}"}, user=user))
    engine = adapter.engine

    def done() -> bool:
        return all(
            i.original_id in fake.messages and "✅" in str(fake.messages[i.original_id]["content"])
            for i in inters
        )

    await fake.wait_for(done, within=30)
    await engine.run_until_idle()
    deadline = time.monotonic() + 5
    await board_drained(adapter, deadline)
    return inters


async def test_discord_outbox_tables_empty_again_after_many_interactions(
    discord_bot: DiscordAdapter, fake: FakeDiscord
) -> None:
    """_live, _status_refs, _dead, _edited, _queued, _reposts and the status board: empty."""
    inters = await drive_discord(fake, discord_bot, 0, 120)
    found = discord_sizes(discord_bot)
    grown = {k: v for k, v in found.items() if k != "adapter._tasks" and v}
    assert not grown, f"after {len(inters)} interactions: {found}"


async def test_discord_second_round_grows_nothing(
    discord_bot: DiscordAdapter, fake: FakeDiscord
) -> None:
    """Round 2 leaves the outbox, the board, the adapter's tasks and asyncio's as round 1;
    the client's seen-interaction memory stays within its cap."""
    await drive_discord(fake, discord_bot, 0, 60)
    first = discord_sizes(discord_bot)
    tasks_before = product_tasks()
    inters = await drive_discord(fake, discord_bot, 1000, 140)
    second = discord_sizes(discord_bot)
    tasks_after = product_tasks()
    grew = {k: (first[k], second[k]) for k in first if second[k] > first[k]}
    assert not grew, f"grew over {len(inters)} more interactions: {grew}"
    assert tasks_after <= tasks_before, f"tasks {tasks_before} → {tasks_after}"
    from adapters.discord_parts import SEEN_INTERACTIONS

    assert discord_bot.client is not None
    assert len(discord_bot.client._seen) <= SEEN_INTERACTIONS


async def test_discord_cancelled_jobs_leave_no_outbox_state(
    discord_bot: DiscordAdapter, fake: FakeDiscord, harness: Harness
) -> None:
    """Jobs cancelled while queued (by the engine, as /cancel does) leave nothing behind."""
    engine = discord_bot.engine
    gate = asyncio.Event()
    harness.provider.gate = gate
    inters = []
    for u in range(60):
        user = {**USER, "id": str(1400000000000200000 + u), "username": f"c{u}"}
        inters.append(await fake.slash("imagine", {"prompt": f"cx {u}"}, user=user))
    await fake.wait_for(lambda: len(engine._jobs) == 60)
    for job in list(engine._jobs.values()):
        with contextlib.suppress(UserError, JobNotFound):
            await engine.cancel(job.user, job.id)
    gate.set()
    harness.provider.gate = None
    await engine.run_until_idle()
    deadline = time.monotonic() + 5
    await board_drained(discord_bot, deadline)
    await asyncio.sleep(0.2)  # a position refresh or two
    found = discord_sizes(discord_bot)
    grown = {k: v for k, v in found.items() if k != "adapter._tasks" and v}
    assert not grown, f"after {len(inters)} cancelled interactions: {found}"
