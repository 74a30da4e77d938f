"""Quotas, budgets and the quota day, probed a third time: DST days, half-hour zones, grants,
failovers, the budget beside `drawbridge generate`, and what a refused user is told.

Everything runs the real engine on a real store (the conftest harness), the real chat syntax
(`bot.chat.Chat`) and the real `drawbridge usage` program. A probe that found a defect asserts
the behaviour that is owed and is marked `xfail(strict=True)` with what is wrong.
"""

from __future__ import annotations

import asyncio
import json
import re
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import aiosqlite
import pytest

from bot import engine as engine_module
from bot.catalog import Catalog
from bot.chat import Chat
from bot.errors import BudgetExceeded, QuotaExceeded, Refused, SettingsError, Transient
from bot.jobs import BATCH_PLATFORM, Options, Request, Target, UserRef
from bot.quota import Limits
from bot.settings import load_settings
from tests.conftest import Harness, request
from tests.test_accounting import balanced, failover_engine, job_rows, row, until
from tests.test_engine_probes2 import FewerProvider, write_catalog
from tests.test_operator_numbers import cli

ALICE = UserRef("test", "alice")
BOB = UserRef("test", "bob")
BOSS = UserRef("test", "boss")
PRICE = 0.5  # the test catalog's "paid" model, per image at the default size
DIME = '\n[models.dime]\nprovider = "demo"\nprice_usd = 0.1\nmax_images = 4\n'


def at(tz: str, local: str, fold: int = 0) -> float:
    """The instant a wall clock in `tz` shows `local` (`fold=1`: the second of a repeated hour)."""
    return datetime.fromisoformat(local).replace(tzinfo=ZoneInfo(tz), fold=fold).timestamp()


async def days_of(h: Harness) -> dict[str, tuple[str, str]]:
    """prompt → (day, status), from the jobs table."""
    async with aiosqlite.connect(h.data_dir / "drawbridge.db") as db:
        rows = await db.execute_fetchall("SELECT prompt, day, status FROM jobs")
    return {str(r[0]): (str(r[1]), str(r[2])) for r in rows}


async def say(chat: Chat, user: UserRef, text: str, target: Target | None = None) -> str:
    reply = await chat.handle(
        user, target or Target(user.platform, chat_id=f"dm-{user.user_id}"), text
    )
    assert reply is not None, text
    return reply.text


# ---- the quota day across DST changes and in a half-hour zone ---------------------------------


async def test_a_23_hour_day_in_new_york_resets_at_local_midnight(harness: Harness) -> None:
    """2026-03-08 has 23 hours in New York: the quota day still runs midnight to midnight."""
    tz = "America/New_York"
    assert at(tz, "2026-03-09T00:00") - at(tz, "2026-03-08T00:00") == 23 * 3600
    harness.clock.now = at(tz, "2026-03-07T23:59:30")
    engine = await harness.engine(tz=tz, limits=Limits(user_images=2), max_pending_per_user=9)
    await engine.submit(request(prompt="saturday night", model="paid", n=2))
    await engine.run_until_idle()
    harness.clock.now = at(tz, "2026-03-08T00:00:10")  # a new day: the whole quota again
    assert (await engine.usage(ALICE)).images == 0
    await engine.submit(request(prompt="just after midnight", model="paid"))
    harness.clock.now = at(tz, "2026-03-08T03:30")  # 02:00-03:00 never happened
    await engine.submit(request(prompt="after the jump", model="paid"))
    harness.clock.now = at(tz, "2026-03-08T23:59:59")  # 22 h 59 min into the day: still it
    with pytest.raises(QuotaExceeded):
        await engine.submit(request(prompt="late sunday", model="paid"))
    harness.clock.now = at(tz, "2026-03-09T00:00:01")  # 23 h after the last reset, not 24
    usage = await engine.usage(ALICE)
    assert (usage.day, usage.images) == ("2026-03-09", 0)
    await engine.submit(request(prompt="monday", model="paid", n=2))
    await engine.run_until_idle()
    assert await days_of(harness) == {
        "saturday night": ("2026-03-07", "succeeded"),
        "just after midnight": ("2026-03-08", "succeeded"),
        "after the jump": ("2026-03-08", "succeeded"),
        "monday": ("2026-03-09", "succeeded"),
    }
    await balanced(engine, harness)


async def test_a_25_hour_day_in_london_counts_both_one_thirties_on_one_day(
    harness: Harness,
) -> None:
    """2026-10-25 has 25 hours in London: 01:30 comes twice, and both are that one day."""
    tz = "Europe/London"
    first, second = at(tz, "2026-10-25T01:30"), at(tz, "2026-10-25T01:30", fold=1)
    assert second - first == 3600
    harness.clock.now = at(tz, "2026-10-25T00:30")
    engine = await harness.engine(tz=tz, limits=Limits(user_images=3), max_pending_per_user=9)
    await engine.submit(request(prompt="half past midnight", model="paid"))
    harness.clock.now = first
    await engine.submit(request(prompt="one thirty BST", model="paid"))
    harness.clock.now = second
    await engine.submit(request(prompt="one thirty GMT", model="paid"))
    harness.clock.now = at(tz, "2026-10-25T23:59:59")  # 24 h 59 min after the day began
    with pytest.raises(QuotaExceeded):
        await engine.submit(request(prompt="last minute", model="paid"))
    harness.clock.now = at(tz, "2026-10-26T00:00:01")
    await engine.submit(request(prompt="monday", model="paid", n=3))
    await engine.run_until_idle()
    assert await days_of(harness) == {
        "half past midnight": ("2026-10-25", "succeeded"),
        "one thirty BST": ("2026-10-25", "succeeded"),
        "one thirty GMT": ("2026-10-25", "succeeded"),
        "monday": ("2026-10-26", "succeeded"),
    }
    await balanced(engine, harness)


async def test_kolkatas_day_starts_at_1830_utc(harness: Harness) -> None:
    """A half-hour zone: the quota day turns at 18:30 UTC, to the second."""
    tz = "Asia/Kolkata"
    midnight = at(tz, "2026-01-02T00:00")
    assert datetime.fromtimestamp(midnight, ZoneInfo("UTC")).strftime("%H:%M") == "18:30"
    harness.clock.now = midnight - 1
    engine = await harness.engine(tz=tz, limits=Limits(user_images=1), max_pending_per_user=9)
    await engine.submit(request(prompt="last second", model="paid"))
    with pytest.raises(QuotaExceeded):
        await engine.submit(request(prompt="still today", model="paid"))
    harness.clock.now = midnight
    assert (await engine.usage(ALICE)).day == "2026-01-02"
    await engine.submit(request(prompt="first second", model="paid"))
    await engine.run_until_idle()
    days = await days_of(harness)
    assert days["last second"] == ("2026-01-01", "succeeded")
    assert days["first second"] == ("2026-01-02", "succeeded")
    await balanced(engine, harness)


async def test_a_job_straddling_the_short_days_midnight_agrees_everywhere(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Reserved at 23:59 on the 23-hour day, charged after midnight: charged to the 8th (the
    day it held), released nowhere else; /usage, `usage --json` and `--days 1` agree."""
    tz = "America/New_York"  # what `cli` sets QUOTA_TZ to
    harness.clock.now = at(tz, "2026-03-08T23:59")
    harness.provider.gates["straddle"] = asyncio.Event()
    engine = await harness.engine(tz=tz, limits=Limits(user_images=2), max_pending_per_user=9)
    chat = Chat(engine)
    straddle = await engine.submit(request(prompt="straddle", model="paid", n=2))
    await until(lambda: harness.provider.running == 1)
    harness.clock.now = at(tz, "2026-03-09T00:05")
    assert "Today: 0 of 2 images" in await say(chat, ALICE, "/usage")
    harness.provider.gates["straddle"].set()
    await engine.run_until_idle()
    await engine.submit(request(prompt="monday", model="paid"))
    await engine.run_until_idle()
    assert (await row(harness, straddle.job_id))["day"] == "2026-03-08"
    assert engine.quotas.used("test:alice", "2026-03-08") == (2, pytest.approx(1.0))
    assert "Today: 1 of 2 images · spent $0.50" in await say(chat, ALICE, "/usage")
    every = json.loads(await cli(harness, monkeypatch, capsys, "--json"))
    assert [(r["day"], r["images"], r["cost_usd"]) for r in every] == [
        ("2026-03-08", 2, 1.0),
        ("2026-03-09", 1, 0.5),
    ]
    today = json.loads(await cli(harness, monkeypatch, capsys, "--json", "--days", "1"))
    assert [r["day"] for r in today] == ["2026-03-09"]
    await balanced(engine, harness)


async def test_a_reroll_after_local_midnight_is_charged_to_the_new_day(harness: Harness) -> None:
    tz = "Asia/Kolkata"
    harness.clock.now = at(tz, "2026-01-01T23:59")
    engine = await harness.engine(tz=tz, limits=Limits(user_images=1), max_pending_per_user=9)
    first = await engine.submit(request(prompt="a kite", model="paid"))
    await engine.run_until_idle()
    with pytest.raises(QuotaExceeded):
        await engine.reroll(ALICE, first.job_id)
    harness.clock.now = at(tz, "2026-01-02T00:01")
    again = await engine.reroll(ALICE, first.job_id)
    await engine.run_until_idle()
    r = await row(harness, again.job_id)
    assert (r["day"], r["status"], r["cost_usd"], r["parent_id"]) == (
        "2026-01-02",
        "succeeded",
        PRICE,
        first.job_id,
    )
    assert (await engine.usage(ALICE)).images == 1
    await balanced(engine, harness)


LINK_DAYS = [
    # (the evening the joiner's job was queued, the moment of the link just after midnight)
    pytest.param("2026-03-10T23:50", "2026-03-11T00:30", id="a-24-hour-day"),
    pytest.param(
        "2026-03-08T23:50",
        "2026-03-09T00:30",  # 24 h back is 2026-03-07 23:30, two quota days back
        id="just-after-the-23-hour-day",
    ),
]


@pytest.mark.parametrize(("queued", "linked"), LINK_DAYS)
async def test_a_link_just_after_midnight_moves_yesterdays_held_job(
    harness: Harness, queued: str, linked: str
) -> None:
    tz = "America/New_York"
    harness.clock.now = at(tz, queued)
    harness.provider.gates["late"] = asyncio.Event()
    harness.provider.errors["late"] = [Refused("no")]
    engine = await harness.engine(tz=tz, max_pending_per_user=9)
    chat = Chat(engine)
    late = await engine.submit(request("bob", prompt="late", model="paid"))
    await until(lambda: harness.provider.running == 1)
    harness.clock.now = at(tz, linked)
    text = await say(chat, ALICE, "/link")
    code = re.search(r"\b([A-Z2-9]{10})\b", text)
    assert code is not None, text
    assert "linked" in (await say(chat, BOB, f"/link {code[1]}")).lower()
    harness.provider.gates["late"].set()  # refused: bob's job of yesterday is released
    await engine.run_until_idle()
    r = await row(harness, late.job_id)
    assert (r["status"], r["day"]) == ("refused", queued[:10])
    assert {
        "bob's tally yesterday": engine.quotas.used("test:bob", queued[:10]),
        "held yesterday": engine.quotas.spent_total(queued[:10]),
    } == {"bob's tally yesterday": (0, 0.0), "held yesterday": 0.0}


# ---- grants -----------------------------------------------------------------------------------


async def test_a_granted_user_past_the_base_limit_can_still_fail_over(
    harness: Harness, tmp_path: Path
) -> None:
    harness.provider.errors["fox"] = [Transient("503")] * 10  # the main route stays down
    engine = await failover_engine(
        harness, tmp_path, retry_attempts=2, limits=Limits(user_images=2), admin_ids=frozenset()
    )
    chat = Chat(engine)
    day = engine.quotas.today()
    await engine.apply(engine.operator.grant("test:alice", day, 2, "test:boss", harness.clock()))
    assert "Today: 0 of 4 images" in await say(chat, ALICE, "/usage")
    ticket = await engine.submit(request(prompt="fox", model="fam-main", n=4))  # 4 of 4: fits
    await engine.run_until_idle()
    r = await row(harness, ticket.job_id)
    assert (r["status"], r["provider"], r["n_images"]) == ("succeeded", "backup", 4)
    assert r["cost_usd"] == pytest.approx(4 * 0.8)
    await balanced(engine, harness)


async def test_an_ungranted_user_at_the_limit_fails_over(harness: Harness, tmp_path: Path) -> None:
    """The same failover without a grant (4 images of a limit of 4) is taken: the grant is what
    the probe above differs by."""
    harness.provider.errors["fox"] = [Transient("503")] * 10
    engine = await failover_engine(
        harness, tmp_path, retry_attempts=2, limits=Limits(user_images=4)
    )
    ticket = await engine.submit(request(prompt="fox", model="fam-main", n=4))
    await engine.run_until_idle()
    r = await row(harness, ticket.job_id)
    assert (r["status"], r["provider"], r["cost_usd"]) == (
        "succeeded",
        "backup",
        pytest.approx(3.2),
    )
    await balanced(engine, harness)


async def test_a_grant_to_a_telegram_username_is_not_reported_as_done(harness: Harness) -> None:
    boss = UserRef("telegram", "1")
    engine = await harness.engine(admin_ids=frozenset({"telegram:1"}), limits=Limits(user_images=1))
    chat = Chat(engine)
    reply = await chat.handle(boss, Target("telegram", chat_id="-100"), "/grant @alice_smith 5")
    assert reply is not None
    assert (reply.error, engine.operator.grants) == (True, {}), reply.text


async def test_a_grant_to_a_numeric_telegram_id_reaches_that_user(harness: Harness) -> None:
    boss, alice = UserRef("telegram", "1"), UserRef("telegram", "42")
    engine = await harness.engine(
        admin_ids=frozenset({"telegram:1"}), limits=Limits(user_images=1), max_pending_per_user=9
    )
    chat = Chat(engine)
    assert "telegram:42 gets 2 extra" in await say(chat, boss, "/grant 42 2")
    assert "Today: 0 of 3 images" in await say(chat, alice, "/usage")
    assert "Queued" in await say(chat, alice, "/imagine a fox --n 3")
    text = await say(chat, UserRef("telegram", "43"), "/imagine a fox --n 2")
    assert "asked for 2 images; 1 of your 1 are left" in text


# ---- what a refused user is told --------------------------------------------------------------


@pytest.mark.parametrize("limit", ["images", "usd"])
async def test_asking_for_more_than_is_left_says_what_is_left(harness: Harness, limit: str) -> None:
    limits = Limits(user_images=10) if limit == "images" else Limits(user_usd=5.0)
    engine = await harness.engine(limits=limits, max_pending_per_user=9)
    chat = Chat(engine)
    for _ in range(2):
        assert "Queued" in await say(chat, ALICE, "/imagine a fox --model paid --n 3")
    assert "Queued" in await say(chat, ALICE, "/imagine a fox --model paid")  # 7 used, $3.50
    await engine.run_until_idle()
    text = await say(chat, ALICE, "/imagine four foxes --model paid --n 4")  # 3 / $1.50 left
    left = r"\b3\b" if limit == "images" else r"\$1\.50\b"
    assert re.search(left, text), f"told {text!r}: not that 3 images ($1.50) are left today"


async def test_the_last_images_fit_exactly_and_one_more_is_refused(harness: Harness) -> None:
    engine = await harness.engine(limits=Limits(user_images=10), max_pending_per_user=9)
    chat = Chat(engine)
    await engine.submit(request(model="paid", n=4))
    await engine.submit(request(model="paid", n=3))
    assert "Queued" in await say(chat, ALICE, "/imagine three foxes --model paid --n 3")
    text = await say(chat, ALICE, "/imagine one more --model paid")
    assert text == "You have used 10 of your 10 images today. The limit resets tomorrow."
    await engine.run_until_idle()
    await balanced(engine, harness)


async def test_dimes_add_up_to_a_thirty_cent_limit_and_show_as_cents(
    harness: Harness,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """0.1 + 0.1 + 0.1 is 0.30000000000000004 in floats: three fit $0.30, and every surface
    says $0.30."""
    harness.catalog = Catalog.load(write_catalog(tmp_path, DIME))
    engine = await harness.engine(
        limits=Limits(user_usd=0.3, budget_usd=0.3), max_pending_per_user=9
    )
    chat = Chat(engine)
    for i in range(3):
        assert "Queued" in await say(chat, ALICE, f"/imagine dime {i} --model dime")
    await engine.run_until_idle()
    refused = await say(chat, ALICE, "/imagine dime 3 --model dime")
    assert refused == "The bot has reached its spending limit for today. Please try again tomorrow."
    assert "spent $0.30 of $0.30" in await say(chat, ALICE, "/usage")
    rows = json.loads(await cli(harness, monkeypatch, capsys, "--json"))
    assert [(r["model"], r["images"], r["cost_usd"]) for r in rows] == [("dime", 3, 0.3)]
    await balanced(engine, harness)


# ---- the budget -------------------------------------------------------------------------------


def budget_alerts(h: Harness) -> list[str]:
    return [text for t, text in h.adapter.notices if t.meta == "dm" and "budget" in text]


async def batch_run(h: Harness, prompts: list[str], n: int) -> None:
    """`drawbridge generate` on the same data dir: its own engine, started without resuming."""
    batch = await h.engine(start=False, admin_ids=frozenset({f"{BATCH_PLATFORM}:operator"}))
    await batch.start(resume=False)
    for prompt in prompts:
        await batch.submit(
            Request(
                user=UserRef(BATCH_PLATFORM, "operator"),
                target=Target(BATCH_PLATFORM, chat_id="out"),
                prompt=prompt,
                options=Options(n=n),
                model="paid",
            )
        )
    await batch.run_until_idle()


async def test_budget_alerts_count_what_drawbridge_generate_spent(harness: Harness) -> None:
    harness.clock.now += 10 * 3600
    bot = await harness.engine(admin_ids=frozenset({"test:boss"}), limits=Limits(budget_usd=1.0))
    await batch_run(harness, ["two lighthouses"], n=2)  # $1.00: the whole budget
    assert sum(r["cost_usd"] for r in await job_rows(harness)) == pytest.approx(1.0)
    with pytest.raises(BudgetExceeded):  # the bot sees it: the budget holds
        await bot.submit(request(prompt="a fox", model="paid"))
    await asyncio.sleep(0.02)  # alerts go out in the background
    alerts = budget_alerts(harness)
    spent = [
        m for a in alerts for m in re.findall(r"has spent (\$\S+) of|\((\$\S+) spent so far", a)
    ]
    assert alerts and {a or b for a, b in spent} == {"$1.00"}, alerts


async def test_the_bot_refuses_once_drawbridge_generate_spent_the_budget(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bot read the other process's spend before the batch ran; it reads it again."""
    monkeypatch.setattr(engine_module, "OUTSIDE_EVERY", 0.0)  # no second to wait out
    harness.clock.now += 10 * 3600
    bot = await harness.engine(limits=Limits(budget_usd=1.0), max_pending_per_user=9)
    await bot.submit(request(prompt="before", model="paid"))
    await bot.run_until_idle()
    await batch_run(harness, ["one lighthouse"], n=1)
    with pytest.raises(BudgetExceeded):
        await bot.submit(request("bob", prompt="after", model="paid"))
    rows = await job_rows(harness)
    assert sum(r["cost_usd"] for r in rows) == pytest.approx(1.0)


async def test_an_admin_skips_the_image_quota_but_not_the_budget_it_fills(
    harness: Harness,
) -> None:
    engine = await harness.engine(
        admin_ids=frozenset({"test:boss"}),
        limits=Limits(user_images=1, user_usd=0.5, budget_usd=2.0),
        max_pending_per_user=9,
    )
    chat = Chat(engine)
    assert "Queued" in await say(chat, BOSS, "/imagine banners --model paid --n 3")
    assert "Queued" in await say(chat, ALICE, "/imagine a fox --model paid")
    await engine.run_until_idle()
    text = await say(chat, BOSS, "/imagine one more banner --model paid")
    assert "spending limit" in text
    assert "Today: 3 of unlimited images · spent $1.50 of unlimited" in await say(
        chat, BOSS, "/usage"
    )
    assert engine.quotas.charged_total(engine.quotas.today()) == pytest.approx(2.0)
    await balanced(engine, harness)


async def test_a_short_result_frees_the_budget_it_did_not_spend(harness: Harness) -> None:
    harness.provider = FewerProvider({"four": 1})
    engine = await harness.engine(limits=Limits(budget_usd=2.0), max_pending_per_user=9)
    await engine.submit(request(prompt="four", model="paid", n=4))  # holds all $2.00
    with pytest.raises(BudgetExceeded):
        await engine.submit(request("bob", prompt="meanwhile", model="paid"))
    await engine.run_until_idle()  # made one: $0.50 charged, $1.50 free again
    await engine.submit(request("bob", prompt="three more", model="paid", n=3))
    await engine.run_until_idle()
    day = engine.quotas.today()
    assert engine.quotas.charged_total(day) == pytest.approx(2.0)
    with pytest.raises(BudgetExceeded):
        await engine.submit(request("carol", prompt="none left", model="paid"))
    await balanced(engine, harness)


# ---- the settings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("QUOTA_USER_DAILY_USD", "inf"),
        ("BUDGET_DAILY_USD", "1e400"),
        ("GENERATE_TIMEOUT", "inf"),
        ("IMAGE_RETENTION_DAYS", "nan"),
    ],
)
def test_an_infinite_dollar_limit_stops_start_up_naming_the_setting(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as refused:
        load_settings({name: value}, env_file=None)
    assert str(refused.value).startswith(f"{name}:")


@pytest.mark.parametrize(
    ("name", "value"),
    [("QUOTA_TZ", "America/NewYork"), ("QUOTA_TZ", "UTC+8"), ("QUOTA_USER_DAILY_IMAGES", "-1")],
)
def test_a_bad_quota_setting_is_one_line_naming_it(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as refused:
        load_settings({name: value}, env_file=None)
    assert str(refused.value).startswith(f"{name}:") and "\n" not in str(refused.value)
