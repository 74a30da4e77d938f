"""The operator's controls through the chat syntax: admins, bans, grants, policy, links, blocklist."""

from __future__ import annotations

import asyncio
import re

import aiosqlite

from bot.chat import Chat
from bot.jobs import Target, UserRef
from bot.operator import Blocklist, Operator
from bot.quota import Limits
from bot.routing import BreakerState
from tests.conftest import Harness

ADMIN = UserRef("test", "boss")
ALICE = UserRef("test", "alice")
GROUP = Target("test", chat_id="group-1")


async def say(chat: Chat, user: UserRef, text: str, target: Target = GROUP) -> str:
    reply = await chat.handle(user, target, text, private=target != GROUP)
    assert reply is not None
    return reply.text


async def test_admin_commands_are_refused_to_others(harness: Harness) -> None:
    engine = await harness.engine(admin_ids=frozenset({"test:boss"}))
    chat = Chat(engine)
    for command in (
        "/stats",
        "/grant test:alice 5",
        "/ban test:bob",
        "/unban test:bob",
        "/policy",
        "/export",
    ):
        assert "Only the bot's admins" in await say(chat, ALICE, command)
    assert engine.operator.bans == set() and engine.operator.grants == {}
    assert "Today" in await say(chat, ADMIN, "/stats")
    reply = await chat.handle(ADMIN, GROUP, "/export", private=False)
    assert reply is not None and reply.document is not None
    assert reply.document[1].startswith(b"day,platform,user_id")


async def test_ban_grant_and_policy_hold_and_survive_a_restart(harness: Harness) -> None:
    engine = await harness.engine(
        admin_ids=frozenset({"test:boss"}), limits=Limits(user_images=1), max_pending_per_user=9
    )
    chat = Chat(engine)
    assert "Queued" in await say(chat, ALICE, "/imagine a fox")
    assert "used 1 of your 1 images" in await say(chat, ALICE, "/imagine a fox")
    assert "2 extra image" in await say(chat, ADMIN, "/grant alice 2")
    assert "Queued" in await say(chat, ALICE, "/imagine a fox")
    assert "max_images=1" in await say(chat, ADMIN, "/policy max_images=1 models=demo,paid")
    assert "at most 1 images" in await say(chat, ALICE, "/imagine a fox --n 2")
    assert "is banned" in await say(chat, ADMIN, "/ban test:alice")
    assert "not open to you" in await say(chat, ALICE, "/imagine a fox")
    await engine.run_until_idle()

    engine2 = await harness.engine(admin_ids=frozenset({"test:boss"}), limits=Limits(user_images=1))
    chat2 = Chat(engine2)
    assert engine2.operator.banned("test:alice")
    assert "max_images=1" in await say(chat2, ADMIN, "/policy")
    assert "unban" not in await say(chat2, ADMIN, "/unban test:alice")
    assert "Queued" in await say(chat2, ALICE, "/imagine a fox")  # the grant's last image
    assert "used 3 of your 3 images" in await say(chat2, ALICE, "/imagine a fox")
    async with aiosqlite.connect(harness.data_dir / "drawbridge.db") as db:
        actions = [r[0] for r in await db.execute_fetchall("SELECT action FROM audit ORDER BY at")]
    assert actions == ["grant", "policy", "ban", "unban"]


async def test_linked_identities_share_one_daily_limit(harness: Harness) -> None:
    engine = await harness.engine(limits=Limits(user_images=2), max_pending_per_user=9)
    chat = Chat(engine)
    tg, dc = UserRef("telegram", "1"), UserRef("discord", "2")
    tg_chat, dc_chat = Target("telegram", chat_id="1"), Target("discord", chat_id="9")
    assert "Queued" in await say(chat, tg, "/imagine a fox", tg_chat)
    code_text = await say(chat, tg, "/link", tg_chat)
    code = re.findall(r"\b[A-Z2-9]{10}\b", code_text)[0]
    assert "Linked" in await say(chat, dc, f"/link {code.rstrip('.')}", dc_chat)
    assert "wrong or has expired" in await say(chat, dc, f"/link {code.rstrip('.')}", dc_chat)
    assert "Queued" in await say(chat, dc, "/imagine a fox", dc_chat)
    assert "used 2 of your 2 images" in await say(chat, tg, "/imagine a fox", tg_chat)
    assert "used 2 of your 2 images" in await say(chat, dc, "/imagine a fox", dc_chat)
    await engine.run_until_idle()
    engine2 = await harness.engine(limits=Limits(user_images=2))
    assert "used 2 of your 2 images" in await say(Chat(engine2), dc, "/imagine a fox", dc_chat)


async def test_the_blocklist_refuses_at_once_for_free_in_any_language(harness: Harness) -> None:
    engine = await harness.engine(start=False)
    engine.operator = Operator(
        blocklist=Blocklist(["gore", "血腥", "re:\\bnsfw\\b", "# a comment"])
    )
    await engine.start()
    chat = Chat(engine)
    for prompt in ("GORE in the snow", "一个血腥的场景", "a nsfw fox"):
        assert "not allowed here" in await say(chat, ALICE, f"/imagine {prompt}")
    assert "Queued" in await say(
        chat, ALICE, "/imagine a gorilla? no: a fox"
    )  # "gore" is not in it
    await engine.run_until_idle()
    assert harness.provider.submits() == 1
    async with aiosqlite.connect(harness.data_dir / "drawbridge.db") as db:
        refused = list(
            await db.execute_fetchall("SELECT cost_usd, error FROM jobs WHERE status = 'refused'")
        )
    assert len(refused) == 3 and all(r[0] == 0 and r[1].startswith("blocklist") for r in refused)
    usage = await engine.usage(ALICE)
    assert usage.images == 1
    # an admin can switch the blocklist off for one chat
    engine.config = engine.config.__class__(admin_ids=frozenset({"test:boss"}))
    await say(chat, ADMIN, "/policy blocklist=off")
    assert "Queued" in await say(chat, ALICE, "/imagine gore")


async def test_history_and_show(harness: Harness) -> None:
    engine = await harness.engine()
    chat = Chat(engine)
    reply = await chat.handle(ALICE, GROUP, "/imagine a fox", private=False)
    assert reply is not None and reply.ticket is not None
    await engine.run_until_idle()
    assert reply.ticket.job_id in await say(chat, ALICE, "/history")
    assert "1 image(s)" in await say(chat, ALICE, f"/show {reply.ticket.job_id}")
    assert harness.adapter.delivered(reply.ticket.job_id) == 2
    assert "No job" in await say(chat, UserRef("test", "mallory"), f"/show {reply.ticket.job_id}")


async def test_admins_hear_about_the_budget_a_rejected_key_and_an_open_breaker(
    harness: Harness,
) -> None:
    from bot.errors import AuthFailed

    engine = await harness.engine(
        admin_ids=frozenset({"test:boss"}), limits=Limits(budget_usd=1.2), max_pending_per_user=9
    )
    chat = Chat(engine)
    for _ in range(2):
        await say(chat, ALICE, "/imagine a fox --model paid")  # $0.50 each
        await engine.run_until_idle()
    assert "spending limit" in await say(chat, ALICE, "/imagine a fox --model paid")
    harness.provider.errors["a fox with a bad key"] = [AuthFailed("bad key")]
    await say(chat, ALICE, "/imagine a fox with a bad key")
    await engine.run_until_idle()
    texts = [(target.chat_id, target.meta, text) for target, text in harness.adapter.notices]
    assert [t[:2] for t in texts] == [("boss", "dm")] * 3
    assert "$1.00 of today's $1.20 budget (80 %)" in texts[0][2]
    assert "turning requests away: today's $1.20 budget" in texts[1][2]  # the refusal above
    assert "rejected drawbridge's key" in texts[2][2]
    engine.breaker_changed("demo", BreakerState.OPEN)
    await engine.run_until_idle()
    assert "keeps failing" in harness.adapter.notices[-1][1]


async def test_result_cache_serves_an_identical_request_free_but_never_a_reroll(
    harness: Harness,
) -> None:
    engine = await harness.engine(result_cache_ttl=3600, max_pending_per_user=9)
    chat = Chat(engine)
    first = await chat.handle(ALICE, GROUP, "/imagine a fox --model paid --seed 7", private=False)
    assert first is not None and first.ticket is not None
    await engine.run_until_idle()
    again = await chat.handle(ALICE, GROUP, "/imagine a fox --model paid --seed 7", private=False)
    assert again is not None and again.ticket is not None and "free" in again.text
    assert again.ticket.cached_from == first.ticket.job_id
    await engine.run_until_idle()
    assert harness.provider.submits() == 1
    (_, first_images), (_, cached_images) = harness.adapter.deliveries
    assert [i.path for i in first_images] == [i.path for i in cached_images]
    usage = await engine.usage(ALICE)
    assert (usage.images, usage.usd) == (1, 0.5)  # the copy cost nothing
    other = await chat.handle(ALICE, GROUP, "/imagine a fox --model paid --seed 8", private=False)
    assert other is not None and other.ticket is not None and other.ticket.cached_from is None
    reroll = await engine.reroll(ALICE, first.ticket.job_id)
    assert reroll.cached_from is None
    await engine.run_until_idle()
    assert harness.provider.submits() == 3


async def test_old_images_are_deleted_and_show_says_so(harness: Harness) -> None:
    engine = await harness.engine(image_retention_days=1, sweep_interval=0.01)
    chat = Chat(engine)
    reply = await chat.handle(ALICE, GROUP, "/imagine a fox", private=False)
    assert reply is not None and reply.ticket is not None
    await engine.run_until_idle()
    ((_, images),) = harness.adapter.deliveries
    assert images[0].path.exists()
    harness.clock.now += 2 * 86400
    for _ in range(200):
        if not images[0].path.exists():
            break
        await asyncio.sleep(0.01)
    assert not images[0].path.exists()
    assert "no stored images" in await say(chat, ALICE, f"/show {reply.ticket.job_id}")


async def test_allowed_ids_restrict_the_bot_to_listed_users_chats_and_guilds(
    harness: Harness,
) -> None:
    engine = await harness.engine(
        allowed_ids=frozenset({"test:alice", "test-chat:team", "discord-guild:g1"}),
        admin_ids=frozenset({"test:boss"}),
        max_pending_per_user=9,
    )
    chat = Chat(engine)
    mallory = UserRef("test", "mallory")
    assert "Queued" in await say(chat, ALICE, "/imagine a fox", Target("test", chat_id="anywhere"))
    assert "not open to you" in await say(
        chat, mallory, "/imagine a fox", Target("test", chat_id="x")
    )
    assert "Queued" in await say(chat, mallory, "/imagine a fox", Target("test", chat_id="team"))
    guild = Target("discord", chat_id="chan", guild_id="g1")
    assert "Queued" in await say(chat, UserRef("discord", "9"), "/imagine a fox", guild)
    assert "Queued" in await say(chat, ADMIN, "/imagine a fox", Target("test", chat_id="y"))


async def test_allowed_ids_keep_every_command_from_strangers(harness: Harness) -> None:
    # "Only those users are served": a stranger learns nothing of the models, the limits or the
    # jobs of a private bot, and hears one short refusal instead of silence.
    engine = await harness.engine(allowed_ids=frozenset({"test:alice"}))
    chat = Chat(engine)
    mallory = UserRef("test", "mallory")
    for command in (
        "/usage",
        "/jobs",
        "/history",
        "/models",
        "/settings",
        "/help",
        "/start",
        "/cancel",
        "/link",
        "/show abc123",
        "/stats",
    ):
        assert "not open to you" in await say(chat, mallory, command), command
    assert "Today" in await say(chat, ALICE, "/usage")
    assert "not open to you" not in await say(chat, ALICE, "/models")


async def test_a_moved_chat_keeps_its_policy_and_its_place_in_allowed_ids_after_a_restart(
    harness: Harness,
) -> None:
    """A Telegram group upgraded to a supergroup gets a new chat id: what the operator set for
    the group (its policy, ALLOWED_IDS naming it) holds for the supergroup, after a restart too,
    and for a second move (supergroup to another id) as well."""
    allowed = frozenset({"test-chat:group-1"})
    engine = await harness.engine(admin_ids=frozenset({"test:boss"}), allowed_ids=allowed)
    chat = Chat(engine)
    assert "max_images=1" in await say(chat, ADMIN, "/policy max_images=1")
    moved = Target("test", chat_id="super-1")
    assert "not open to you" in await say(chat, ALICE, "/imagine a fox", moved)
    await engine.chat_moved("test", "group-1", "super-1")
    await engine.chat_moved("test", "group-1", "super-1")  # Telegram says it in both chats
    assert "at most 1 images" in await say(chat, ALICE, "/imagine a fox --n 2", moved)
    await engine.run_until_idle()

    engine2 = await harness.engine(admin_ids=frozenset({"test:boss"}), allowed_ids=allowed)
    chat2 = Chat(engine2)
    assert "at most 1 images" in await say(chat2, ALICE, "/imagine a fox --n 2", moved)
    await engine2.chat_moved("test", "super-1", "super-2")
    again = Target("test", chat_id="super-2")
    assert "Queued" in await say(chat2, ALICE, "/imagine a fox", again)
    assert "not open to you" in await say(
        chat2, ALICE, "/imagine a fox", Target("test", chat_id="x")
    )
    await engine2.run_until_idle()
    async with aiosqlite.connect(harness.data_dir / "drawbridge.db") as db:
        actions = [r[0] for r in await db.execute_fetchall("SELECT action FROM audit ORDER BY at")]
    assert actions == ["policy", "move", "policy", "move", "policy"]
