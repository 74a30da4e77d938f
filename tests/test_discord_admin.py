"""The operator's and the account commands on Discord (issue 6), end to end: real discord.py over
the loopback fake, the real engine and `Chat.admin` on a temp data dir, a scripted provider."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiosqlite
import pytest

from bot.errors import Refused
from bot.quota import Limits
from bot.texts import EN, ZH
from tests.conftest import Harness
from tests.fake_discord import CHANNEL_ID, GUILD_ID, USER, FakeDiscord, FakeInteraction
from tests.test_discord import (
    BOB,
    Bot,
    answer,
    close_bot,
    content,
    job_of,
    open_bot,
    restart,
    row,
    wait_ended,
)

ADMIN = f"discord:{USER['id']}"  # alice is the bot's admin; bob is not
REFUSAL = EN["error.admin_only"]
ADMIN_COMMANDS = ("stats", "grant", "ban", "unban", "policy", "export")
ACCOUNT_COMMANDS = ("link", "history", "show")


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    server = FakeDiscord()
    await server.start()
    yield server
    await server.close()


@pytest.fixture
def clean_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """discord.py only logs what a command raised: any such error fails the test."""
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.WARNING, "aiohttp.access")
    yield
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors


@pytest.fixture
async def bot(harness: Harness, fake: FakeDiscord, clean_logs: None) -> AsyncIterator[Bot]:
    b = await open_bot(harness, fake, admin_ids=frozenset({ADMIN}))
    yield b
    await close_bot(b)


async def slash_user(
    fake: FakeDiscord,
    name: str,
    member: dict[str, Any],
    options: dict[str, Any] | None = None,
    *,
    user: dict[str, Any] = USER,
) -> FakeInteraction:
    """`/name user:@member …` as Discord sends a user option: the id, and the user resolved."""
    opts: list[dict[str, Any]] = [{"name": "user", "type": 6, "value": member["id"]}]
    for key, value in (options or {}).items():
        opts.append({"name": key, "type": 4 if isinstance(value, int) else 3, "value": value})
    data = {
        "id": fake.command_id(name),
        "name": name,
        "type": 1,
        "options": opts,
        "resolved": {
            "users": {member["id"]: member},
            "members": {
                member["id"]: {
                    "roles": [],
                    "joined_at": "2026-01-01T00:00:00+00:00",
                    "deaf": False,
                    "mute": False,
                    "flags": 0,
                    "permissions": "0",
                }
            },
        },
    }
    return await fake.interact(2, data, user=user)


async def answered(fake: FakeDiscord, inter: FakeInteraction, expected: str) -> str:
    """Wait for `expected` in the ephemeral response; check it was deferred in time."""
    await fake.wait_for(lambda: expected in content(fake, inter))
    assert inter.ack_type == 5 and inter.ephemeral
    assert inter.ack_delay is not None and inter.ack_delay < 3
    first = next(c for c in fake.calls if inter.token in c.path)
    assert first.path.endswith("/callback")  # deferred before any other call for it
    return content(fake, inter)


async def refused_imagine(fake: FakeDiscord, user: dict[str, Any], **options: Any) -> str:
    """Bob's /imagine, refused: the reason, in the deferred reply."""
    inter = await fake.slash("imagine", {"prompt": "a fox", **options}, user=user)
    return await answer(fake, inter)


async def imagined(fake: FakeDiscord, user: dict[str, Any], **options: Any) -> str:
    inter = await fake.slash("imagine", {"prompt": "a fox", **options}, user=user)
    await fake.wait_for(lambda: fake.followups(inter.token))
    return await wait_ended(fake, inter)


async def audit(harness: Harness) -> list[tuple[str, str, str]]:
    async with aiosqlite.connect(harness.data_dir / "drawbridge.db") as db:
        rows = await db.execute_fetchall("SELECT actor, action, subject FROM audit ORDER BY at")
    return [(str(r[0]), str(r[1]), str(r[2])) for r in rows]


def plain(text: str) -> str:
    """The text without Discord's markdown escapes."""
    return re.sub(r"\\(.)", r"\1", text)


# ---- registration --------------------------------------------------------------------------


async def test_the_commands_are_registered_with_their_options_and_chinese_descriptions(
    bot: Bot, fake: FakeDiscord
) -> None:
    synced = {c["name"]: c for c in fake.commands[GUILD_ID]}
    assert {*ADMIN_COMMANDS, *ACCOUNT_COMMANDS} <= set(synced)
    assert {c["name"] for c in fake.commands[None]} == set(synced)
    for name in (*ADMIN_COMMANDS, *ACCOUNT_COMMANDS):
        key = f"discord.cmd.{name}"
        assert synced[name]["description"] == EN[key]
        assert synced[name]["description_localizations"]["zh-CN"] == ZH[key]
        for option in synced[name].get("options", []):
            assert 0 < len(option["description"]) <= 100
            assert option["description_localizations"]["zh-TW"]
    grant = {o["name"]: o for o in synced["grant"]["options"]}
    assert (grant["user"]["type"], grant["user"]["required"]) == (6, True)  # a user picker
    assert (grant["images"]["type"], grant["images"]["min_value"]) == (4, 1)
    policy = {o["name"]: o for o in synced["policy"]["options"]}
    assert list(policy) == ["models", "max_images", "daily_images", "blocklist"]
    assert all(o["type"] == 3 and not o.get("required") for o in policy.values())
    assert [c["value"] for c in policy["blocklist"]["choices"]] == ["on", "off"]
    (job,) = synced["show"]["options"]
    assert job["required"] and job["autocomplete"]
    (code,) = synced["link"]["options"]
    assert not code.get("required")


# ---- admins, and everyone else -------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("stats", {}),
        ("grant", {"user": BOB["id"], "images": 5}),
        ("ban", {"user": USER["id"]}),
        ("unban", {"user": BOB["id"]}),
        ("policy", {"max_images": "1"}),
        ("policy", {}),
        ("export", {}),
    ],
)
async def test_a_non_admin_is_refused_and_nothing_changes(
    bot: Bot, fake: FakeDiscord, harness: Harness, command: str, options: dict[str, Any]
) -> None:
    inter = await fake.slash(command, options, user=BOB)
    assert await answered(fake, inter, REFUSAL) == REFUSAL
    assert fake.followups(inter.token) == []  # no file either
    assert await audit(harness) == []
    assert not bot.engine.operator.bans and not bot.engine.operator.grants
    assert not bot.engine.operator.policies
    assert await imagined(fake, BOB, count=2)  # bob is neither banned nor limited


async def test_a_non_admin_is_refused_in_chinese(bot: Bot, fake: FakeDiscord) -> None:
    inter = await fake.slash("stats", user=BOB, locale="zh-CN")
    await answered(fake, inter, ZH["error.admin_only"])


async def test_stats_for_an_admin(bot: Bot, fake: FakeDiscord) -> None:
    await imagined(fake, BOB, count=2)
    inter = await fake.slash("stats")
    text = await answered(fake, inter, "Queue:")
    assert "Today: 1 jobs · 2 images" in text and "7 days: 1 jobs" in text
    assert "Queue: 0 waiting · 0 running" in text
    zh = await fake.slash("stats", locale="zh-TW")
    assert "今天" in await answered(fake, zh, "队列")


async def test_ban_with_a_user_option_refuses_that_users_imagine_until_unban(
    bot: Bot, fake: FakeDiscord, harness: Harness
) -> None:
    inter = await slash_user(fake, "ban", BOB)
    bob = f"discord:{BOB['id']}"
    assert await answered(fake, inter, "banned") == f"⛔ {bob} is banned."
    assert "not open to you" in await refused_imagine(fake, BOB)
    assert harness.provider.calls == []
    assert await imagined(fake, USER)  # only bob
    # An id typed as a string, or as a mention, is a Discord user's too.
    unban = await fake.slash("unban", {"user": f"<@{BOB['id']}>"})
    assert await answered(fake, unban, "no longer") == f"✅ {bob} is no longer banned."
    assert await imagined(fake, BOB)
    assert await audit(harness) == [(ADMIN, "ban", bob), (ADMIN, "unban", bob)]


async def test_grant_raises_the_users_daily_limit(harness: Harness, fake: FakeDiscord) -> None:
    b = await open_bot(harness, fake, admin_ids=frozenset({ADMIN}), limits=Limits(user_images=1))
    try:
        await imagined(fake, BOB)
        assert "used 1 of your 1 images" in await refused_imagine(fake, BOB)
        inter = await slash_user(fake, "grant", BOB, {"images": 2})
        text = await answered(fake, inter, "extra")
        assert text == f"✅ discord:{BOB['id']} gets 2 extra image(s) today."
        assert await imagined(fake, BOB, count=2)
        assert "used 3 of your 3 images" in await refused_imagine(fake, BOB)
        usage = await fake.slash("usage", user=BOB)
        await answered(fake, usage, "Today: 3 of 3 images")
    finally:
        await close_bot(b)


async def test_policy_limits_the_guild_and_survives_a_restart(
    harness: Harness, fake: FakeDiscord, clean_logs: None
) -> None:
    first = await open_bot(harness, fake, admin_ids=frozenset({ADMIN}))
    inter = await fake.slash("policy", {"max_images": "1", "blocklist": "off"})
    text = plain(await answered(fake, inter, "Policy for"))
    assert text == (
        f"Policy for discord-guild:{GUILD_ID}: models=all max_images=1 daily_images=- blocklist=off"
    )
    assert r"max\_images" in content(fake, inter)  # not italics in Discord's markdown
    refusal = await refused_imagine(fake, BOB, count=2)
    assert refusal == EN["error.policy_max_images"].format(max=1)
    await restart(harness, first)

    second = await open_bot(harness, fake, admin_ids=frozenset({ADMIN}))
    try:
        shown = await fake.slash("policy")
        assert "max_images=1" in plain(await answered(fake, shown, "Policy for"))
        assert await refused_imagine(fake, BOB, count=2) == refusal
        assert await imagined(fake, BOB, count=1)
        assert await imagined(fake, USER, count=2)  # admins are not held to it
        bad = await fake.slash("policy", {"daily_images": "lots"})
        assert "daily_images=<number>" in plain(await answered(fake, bad, "Use: /policy"))
        assert [a for a in await audit(harness) if a[1] == "policy"] == [
            (ADMIN, "policy", f"discord-guild:{GUILD_ID}")
        ]
    finally:
        await close_bot(second)


async def test_policy_in_a_dm_is_the_dm_channels(bot: Bot, fake: FakeDiscord) -> None:
    dm = fake.dm_channel("1300000000000000009")
    inter = await fake.slash("policy", {"models": "demo, paid"}, channel=dm)
    text = plain(await answered(fake, inter, "Policy for"))
    assert text.startswith("Policy for discord-chat:1300000000000000009: models=demo, paid ")
    assert not any(p.startswith("discord-guild:") for p in bot.engine.operator.policies)


async def test_export_sends_the_usage_csv_as_an_ephemeral_file(bot: Bot, fake: FakeDiscord) -> None:
    await imagined(fake, BOB, count=2)
    inter = await fake.slash("export")
    await answered(fake, inter, EN["export.done"])
    (sent,) = await fake.wait_for(lambda: fake.followups(inter.token))
    assert sent.payload["flags"] & 64  # only the admin sees it
    (part,) = sent.files
    assert part.filename == "drawbridge-usage.csv"
    lines = part.data.decode().splitlines()
    assert lines[0].startswith("day,platform,user_id")
    assert lines[1].startswith(f"2026-01-01,discord,{BOB['id']},demo,1,1,2,")
    # The response was edited before the file went: Discord would otherwise make the first
    # followup after the defer the response itself.
    edit = fake.calls_to("PATCH", rf"/{inter.token}/messages/@original$")[0]
    assert edit.at <= sent.at


# ---- everyone's: /link, /history, /show ----------------------------------------------------


async def test_link_gives_a_code_that_joins_two_accounts(bot: Bot, fake: FakeDiscord) -> None:
    inter = await fake.slash("link", locale="zh-CN")
    text = await answered(fake, inter, "链接码")
    code = re.search(r"\b([A-Z2-9]{10})\b", text)
    assert code, text
    join = await fake.slash("link", {"code": code[1]}, user=BOB)
    await answered(fake, join, f"Linked: your accounts now share one daily limit ({ADMIN})")
    assert bot.engine.operator.account_of(f"discord:{BOB['id']}") == ADMIN
    wrong = await fake.slash("link", {"code": "000000"}, user=BOB)
    await answered(fake, wrong, EN["error.link_code"])


async def test_history_lists_the_users_jobs(bot: Bot, fake: FakeDiscord) -> None:
    first = await imagined(fake, BOB)
    second = await imagined(fake, BOB, prompt="a *bold* owl")
    mine = await imagined(fake, USER)
    inter = await fake.slash("history", user=BOB)
    text = await answered(fake, inter, second)
    assert first in text and mine not in text
    assert r"a \*bold\* owl" in text and text.startswith(EN["jobs.header"])


async def test_show_reposts_a_jobs_images_and_the_ephemeral_reply_confirms(
    bot: Bot, fake: FakeDiscord, harness: Harness
) -> None:
    made = await fake.slash("imagine", {"prompt": "a heron", "model": "paid", "count": 2})
    job_id = await wait_ended(fake, made)
    (original,) = fake.followups(made.token)
    await bot.engine.run_until_idle()  # the delivery's row is committed, not just posted
    delivered = await row(harness, job_id)
    typed = await fake.slash("show", {"job": job_id[:4]}, focused="job")
    await fake.wait_for(lambda: typed.choices is not None)
    assert [c["value"] for c in typed.choices or []] == [job_id]

    inter = await fake.slash("show", {"job": job_id}, locale="zh-CN")
    done = ZH["show.done"].format(job=job_id, n=2)
    assert await answered(fake, inter, done) == done
    (post,) = await fake.wait_for(lambda: fake.followups(inter.token))
    assert not post.payload.get("flags", 0) & 64  # the images are for the channel
    assert [p.data for p in post.files] == [p.data for p in original.files]
    assert post.files[0].data.startswith(b"\x89PNG")
    assert "a heron" in post.payload["content"] and "任务" in post.payload["content"]
    edits = fake.calls_to("PATCH", rf"/{inter.token}/messages/@original$")
    assert len(edits) == 1 and edits[0].at <= post.at  # the reply was resolved first
    # A re-post is no new delivery: the job's own messages and row stay as they were.
    assert "✅" in content(fake, made) and fake.channel_posts(CHANNEL_ID) == []
    assert len(fake.followups(made.token)) == 1
    assert len(harness.provider.calls) == 1
    assert await row(harness, job_id) == delivered


async def test_show_refuses_someone_elses_job_and_a_job_without_images(
    bot: Bot, fake: FakeDiscord, harness: Harness
) -> None:
    job_id = await imagined(fake, USER)
    other = await fake.slash("show", {"job": job_id}, user=BOB)
    await answered(fake, other, EN["error.job_not_found"].format(job=job_id))
    harness.provider.errors["not this"] = [Refused("no")]
    refused = await fake.slash("imagine", {"prompt": "not this"})
    failed = await wait_ended(fake, refused, "not charged")
    empty = await fake.slash("show", {"job": failed})
    await answered(fake, empty, EN["error.no_images"].format(job=failed))
    unknown = await fake.slash("show", {"job": "zzzzzzzzzz"})
    await answered(fake, unknown, "No job zzzzzzzzzz")
    assert not any(fake.followups(i.token) for i in (other, empty, unknown))


async def test_an_admin_may_show_anyones_job(bot: Bot, fake: FakeDiscord) -> None:
    job_id = await imagined(fake, BOB)
    inter = await fake.slash("show", {"job": job_id})
    await answered(fake, inter, EN["show.done"].format(job=job_id, n=1))
    (post,) = await fake.wait_for(lambda: fake.followups(inter.token))
    assert post.files and job_of(fake, inter) == job_id


async def test_admin_alerts_arrive_as_a_direct_message(bot: Bot, fake: FakeDiscord) -> None:
    bot.engine.alert("auth:grsai", "alert.auth", provider="grsai")
    bot.engine.alert("auth:grsai", "alert.auth", provider="grsai")  # once a day per event
    await fake.wait_for(lambda: fake.dm_channels.get(str(USER["id"])))
    dm = fake.dm_channels[str(USER["id"])]
    (post,) = await fake.wait_for(lambda: fake.channel_posts(dm))
    assert "grsai API rejected" in post.payload["content"]
