"""Hostile and unusual use of the admin and account commands, through `Chat.handle`.

Each probe checks that the answer is short and clear, nothing crashes, the admin check holds,
the operator's state (grants, bans, policies, links, quotas) is what an operator would expect,
and every change an admin makes leaves an `audit` row. A note on a probe says what it once
found wrong.
"""

from __future__ import annotations

import asyncio
import re

import aiosqlite

from bot.chat import Chat, Reply
from bot.engine import Engine
from bot.errors import NotAllowed, Refused
from bot.jobs import Target, UserRef
from bot.quota import Limits
from tests.conftest import Harness

BOSS = UserRef("test", "boss")
BOSS2 = UserRef("test", "boss2")
ALICE = UserRef("test", "alice")
MALLORY = UserRef("test", "mallory")
TG = UserRef("telegram", "1")
DC = UserRef("discord", "2")
DC3 = UserRef("discord", "3")
GROUP = Target("test", chat_id="group-1")
ADMINS = frozenset({"test:boss", "test:boss2"})
MAX_REPLY = 400  # a "short clear answer" to a command fits easily in this


async def ask(chat: Chat, user: UserRef, text: str, target: Target = GROUP) -> Reply:
    private = str(target.chat_id).startswith("dm-")  # (`dm`'s chats)
    reply = await chat.handle(user, target, text, private=private)
    assert reply is not None, text
    return reply


async def say(chat: Chat, user: UserRef, text: str, target: Target = GROUP) -> str:
    return (await ask(chat, user, text, target)).text


def dm(user: UserRef) -> Target:
    return Target("test", chat_id=f"dm-{user.user_id}")


async def audit(harness: Harness) -> list[tuple[str, str, str, str]]:
    async with aiosqlite.connect(harness.data_dir / "drawbridge.db") as db:
        rows = await db.execute_fetchall(
            "SELECT actor, action, subject, detail FROM audit WHERE action != 'alert' "
            "ORDER BY rowid"
        )
    return [(str(r[0]), str(r[1]), str(r[2]), str(r[3])) for r in rows]


async def table(harness: Harness, sql: str) -> list[tuple[object, ...]]:
    async with aiosqlite.connect(harness.data_dir / "drawbridge.db") as db:
        return [tuple(r) for r in await db.execute_fetchall(sql)]


async def link_code(chat: Chat, user: UserRef) -> str:
    text = await say(chat, user, "/link", dm(user))
    match = re.search(r"\b([A-Z2-9]{10})\b", text)
    assert match is not None, text
    return match[1]


async def link(chat: Chat, owner: UserRef, joiner: UserRef) -> str:
    """`joiner` enters the code `owner` asked for; returns the reply."""
    code = await link_code(chat, owner)
    return await say(chat, joiner, f"/link {code}", dm(joiner))


async def admin_engine(harness: Harness, **config: object) -> Engine:
    config.setdefault("admin_ids", ADMINS)
    config.setdefault("max_pending_per_user", 9)
    return await harness.engine(**config)


# ---- /grant ----------------------------------------------------------------------------------


async def test_grant_with_bad_counts_and_arguments_is_a_clear_refusal(harness: Harness) -> None:
    engine = await admin_engine(harness, limits=Limits(user_images=1))
    chat = Chat(engine)
    for args in (
        "alice -1",
        "alice 0",
        "alice 00",
        "alice 1.5",
        "alice 1e3",
        "alice +3",
        "alice five",
        "alice",
        "",
        "alice 2 3",
        "telegram:1 2 5",  # an id with a space reads as three words
        "5 alice",
    ):
        reply = await ask(chat, BOSS, f"/grant {args}")
        assert reply.error and reply.text.startswith("Use: /grant"), args
        assert len(reply.text) < MAX_REPLY
    assert engine.operator.grants == {}
    assert await audit(harness) == []
    assert await table(harness, "SELECT * FROM grants") == []


async def test_grant_to_oneself_adds_up_and_a_count_past_a_million_is_refused(
    harness: Harness,
) -> None:
    engine = await admin_engine(harness, limits=Limits(user_images=1))
    chat = Chat(engine)
    assert "Use: /grant" in await say(chat, BOSS, "/grant alice 1000000000000")  # > 1,000,000
    assert "gets 1000000 extra image(s)" in await say(chat, BOSS, "/grant alice 1000000")
    assert "gets 3 extra image(s)" in await say(chat, BOSS, "/grant @alice 3")  # adds up
    assert "test:boss gets 2 extra" in await say(chat, BOSS, "/grant boss 2")  # oneself
    usage = await engine.usage(ALICE)
    assert usage.image_limit == 1 + 1_000_003
    assert "Queued" in await say(chat, ALICE, "/imagine a fox --n 2")
    rows = await audit(harness)
    assert [r[:3] for r in rows] == [
        ("test:boss", "grant", "test:alice"),
        ("test:boss", "grant", "test:alice"),
        ("test:boss", "grant", "test:boss"),
    ]
    assert "now 1000003" in rows[1][3]
    await engine.run_until_idle()
    engine2 = await admin_engine(harness, limits=Limits(user_images=1))
    assert (await engine2.usage(ALICE)).image_limit == 1 + 1_000_003


async def test_grant_with_a_unicode_digit_answers_instead_of_crashing(harness: Harness) -> None:
    # `/grant alice ²` once raised ValueError ("²".isdigit() is true, int("²") fails).
    engine = await admin_engine(harness)
    chat = Chat(engine)
    reply = await ask(chat, BOSS, "/grant alice ²")
    assert reply.error and "Use: /grant" in reply.text
    assert engine.operator.grants == {}


async def test_grant_past_what_sqlite_can_store_is_refused_and_changes_nothing(
    harness: Harness,
) -> None:
    # A 20-digit count once passed the check, changed memory, then overflowed SQLite's integer.
    engine = await admin_engine(harness, limits=Limits(user_images=1))
    chat = Chat(engine)
    reply = await ask(chat, BOSS, "/grant alice 99999999999999999999")
    assert reply.error and len(reply.text) < MAX_REPLY
    assert engine.operator.grants == {}
    assert (await engine.usage(ALICE)).image_limit == 1


# ---- user ids in odd formats ------------------------------------------------------------------


async def test_malformed_user_ids_are_refused_not_reported_as_done(harness: Harness) -> None:
    # `_member` once took anything with a colon as an id (`telegram:`, `:5`, `telegarm:1`).
    engine = await admin_engine(harness)
    chat = Chat(engine)
    for member in ("telegram:", ":5", ":", "telegarm:1"):
        for command in (f"/ban {member}", f"/grant {member} 1"):
            reply = await ask(chat, BOSS, command)
            assert reply.error, f"{command!r} → {reply.text!r}"
    assert engine.operator.bans == set() and engine.operator.grants == {}
    assert await audit(harness) == []


async def test_odd_ids_are_refused_and_well_formed_ones_banned_and_audited(
    harness: Harness,
) -> None:
    engine = await admin_engine(harness)
    chat = Chat(engine)
    for member in ("discord:4242", "@alice", "telegram:12345", "telegram:-1001234"):
        reply = await ask(chat, BOSS, f"/ban {member}")
        assert not reply.error and "is banned" in reply.text
        assert "\n" not in reply.text and len(reply.text) < MAX_REPLY
    # Telegram and Discord know users by number: a name there names nobody.
    for member in ("discord:abc", "telegram:alice_smith", "telegram:1.5"):
        reply = await ask(chat, BOSS, f"/ban {member}")
        assert reply.error and "by number" in reply.text, member
    # Ids that could never name a user are refused, not "banned": markup, an empty id, an
    # unknown platform (a typo), no platform at all.
    for member in ("<b>", "telegram:<i>1</i>", "telegram:", ":5", "telegarm:1"):
        assert "Use: /ban" in await say(chat, BOSS, f"/ban {member}"), member
    assert "Use: /ban" in await say(chat, BOSS, "/ban telegram:1 2")
    assert "Use: /unban" in await say(chat, BOSS, "/unban")
    assert engine.operator.bans == {
        "discord:4242",
        "test:alice",
        "telegram:12345",
        "telegram:-1001234",
    }
    subjects = [r[2] for r in await audit(harness)]
    assert subjects == ["discord:4242", "test:alice", "telegram:12345", "telegram:-1001234"]
    assert "not open to you" in await say(chat, ALICE, "/imagine a fox")


# ---- /ban and /unban --------------------------------------------------------------------------


async def test_unban_of_someone_not_banned_is_harmless_and_audited(harness: Harness) -> None:
    engine = await admin_engine(harness)
    chat = Chat(engine)
    assert "no longer banned" in await say(chat, BOSS, "/unban test:carol")
    assert engine.operator.bans == set()
    assert [r[:3] for r in await audit(harness)] == [("test:boss", "unban", "test:carol")]
    assert "Queued" in await say(chat, UserRef("test", "carol"), "/imagine a fox")


async def test_banning_an_admin_is_not_reported_as_done_when_it_does_nothing(
    harness: Harness,
) -> None:
    # Banning an admin (another, or oneself) once answered "banned" and did nothing.
    engine = await admin_engine(harness)
    chat = Chat(engine)
    for admin in (BOSS2, BOSS):
        reply = await ask(chat, BOSS, f"/ban {admin}")
        if "is banned" in reply.text:
            assert "not open to you" in await say(chat, admin, "/imagine a fox"), admin
            assert "Only the bot's admins" in await say(chat, admin, "/stats"), admin
        else:
            assert reply.error


async def test_banning_a_linked_member_bans_the_person_on_both_platforms(
    harness: Harness,
) -> None:
    # A ban once covered only the member named, not the person on the other platform.
    engine = await admin_engine(harness)
    chat = Chat(engine)
    assert "Linked" in await link(chat, TG, DC)  # account telegram:1
    assert "is banned" in await say(chat, BOSS, "/ban discord:2")
    assert "not open to you" in await say(chat, DC, "/imagine a fox")
    assert "not open to you" in await say(chat, TG, "/imagine a fox")


async def test_unban_of_a_member_banned_through_its_account_is_not_a_false_success(
    harness: Harness,
) -> None:
    # /unban of a member banned through its account once said "no longer banned" and wasn't.
    engine = await admin_engine(harness)
    chat = Chat(engine)
    assert "Linked" in await link(chat, TG, DC)
    assert "is banned" in await say(chat, BOSS, "/ban telegram:1")
    assert "not open to you" in await say(chat, DC, "/imagine a fox")
    reply = await ask(chat, BOSS, "/unban discord:2")
    if "no longer banned" in reply.text:
        assert "Queued" in await say(chat, DC, "/imagine a fox")
    else:
        assert reply.error


async def test_a_ban_follows_a_fresh_link_made_from_the_banned_side(harness: Harness) -> None:
    engine = await admin_engine(harness)
    chat = Chat(engine)
    assert "is banned" in await say(chat, BOSS, "/ban telegram:1")
    # the banned user asks for a code, a fresh Discord account enters it: it joins the banned
    # account, and is banned with it
    assert "Linked" in await link(chat, TG, DC)
    assert engine.operator.account_of(DC) == "telegram:1"
    assert "not open to you" in await say(chat, DC, "/imagine a fox")
    assert "not open to you" in await say(chat, TG, "/imagine a fox")
    assert [r[1] for r in await audit(harness)] == ["ban", "link"]


async def test_a_banned_user_cannot_escape_by_linking_into_a_fresh_account(
    harness: Harness,
) -> None:
    # A ban once stayed behind when the banned person linked into a fresh account.
    engine = await admin_engine(harness)
    chat = Chat(engine)
    assert "is banned" in await say(chat, BOSS, "/ban telegram:1")
    assert "Linked" in await link(chat, DC, TG)  # banned telegram:1 joins fresh discord:2
    assert "not open to you" in await say(chat, TG, "/imagine a fox")
    escaped = []
    if "Queued" in await say(chat, DC, "/imagine a fox"):
        escaped.append("discord:2 linked to a banned member is served")

    a, b, c = UserRef("telegram", "7"), UserRef("discord", "8"), UserRef("discord", "9")
    assert "Linked" in await link(chat, a, b)  # account telegram:7
    assert "is banned" in await say(chat, BOSS, "/ban telegram:7")
    assert "not open to you" in await say(chat, b, "/imagine a fox")
    assert "Linked" in await link(chat, c, b)  # b moves the pair into fresh c's account
    if "Queued" in await say(chat, b, "/imagine a fox"):
        escaped.append("discord:8 banned through its account escaped by re-linking")
    assert escaped == []


async def test_a_banned_user_is_refused_imagine_and_rerolls_at_no_cost(harness: Harness) -> None:
    engine = await admin_engine(harness)
    chat = Chat(engine)
    first = await ask(chat, ALICE, "/imagine a fox")
    assert first.ticket is not None
    await engine.run_until_idle()
    assert "is banned" in await say(chat, BOSS, "/ban alice")
    assert "not open to you" in await say(chat, ALICE, "/imagine a fox")
    plain = await chat.handle(ALICE, dm(ALICE), "plain text prompt", private=True)
    assert plain is not None and "not open to you" in plain.text
    try:
        await engine.reroll(ALICE, first.ticket.job_id, GROUP)  # the 🔄 button on an old job
    except NotAllowed:
        pass
    else:
        raise AssertionError("a banned user's reroll was queued")
    usage_text = await say(chat, ALICE, "/usage")
    assert len(usage_text) < MAX_REPLY
    await engine.run_until_idle()
    assert harness.provider.submits() == 1
    assert await table(harness, "SELECT COUNT(*) FROM jobs") == [(1,)]
    assert (await engine.usage(ALICE)).images == 1


async def test_a_banned_user_cannot_make_the_bot_post_images(harness: Harness) -> None:
    # /show once re-posted a banned user's old images: only submit checked bans.
    engine = await admin_engine(harness)
    chat = Chat(engine)
    first = await ask(chat, ALICE, "/imagine a fox")
    assert first.ticket is not None
    await engine.run_until_idle()
    assert "is banned" in await say(chat, BOSS, "/ban alice")
    delivered = len(harness.adapter.deliveries)
    reply = await ask(chat, ALICE, f"/show {first.ticket.job_id}", Target("test", chat_id="big"))
    assert reply.error
    assert len(harness.adapter.deliveries) == delivered


# ---- /policy ----------------------------------------------------------------------------------


async def test_policy_with_unknown_keys_or_bad_values_changes_nothing(harness: Harness) -> None:
    engine = await admin_engine(harness)
    chat = Chat(engine)
    assert "max_images=2" in await say(chat, BOSS, "/policy max_images=2")
    for args in (
        "colour=red",
        "max_images=-1",
        "max_images=1.5",
        "max_images=",
        "daily_images=abc",
        "blocklist=maybe",
        "blocklist",
        "=3",
        "max_images",
        "max_images=3 bogus=1",  # a bad word after a good one: nothing applied
        "x" * 100_000,
    ):
        reply = await ask(chat, BOSS, f"/policy {args}")
        assert reply.error and reply.text.startswith("Use: /policy"), args[:40]
        assert len(reply.text) < MAX_REPLY
    policy = engine.operator.policy(GROUP)
    assert (policy.max_images, policy.models, policy.daily_images, policy.blocklist) == (
        2,
        (),
        0,
        True,
    )
    assert [r[1] for r in await audit(harness)] == ["policy"]
    assert "Only the bot's admins" in await say(chat, ALICE, "/policy max_images=9")
    assert "Only the bot's admins" in await say(chat, ALICE, "/policy")


async def test_policy_huge_but_valid_input_gives_a_short_answer(harness: Harness) -> None:
    engine = await admin_engine(harness)
    chat = Chat(engine)
    reply = await ask(chat, BOSS, "/policy " + "max_images=2 " * 5000 + "BLOCKLIST=OFF")
    assert not reply.error and len(reply.text) < MAX_REPLY
    assert "max_images=2" in reply.text and "blocklist=off" in reply.text
    policy = engine.operator.policy(GROUP)
    assert policy.max_images == 2 and policy.blocklist is False
    assert len(await audit(harness)) == 1


async def test_policy_naming_a_model_that_does_not_exist_is_refused(harness: Harness) -> None:
    # `/policy models=nonexistent` was once stored, and refused every request in the chat.
    engine = await admin_engine(harness)
    chat = Chat(engine)
    reply = await ask(chat, BOSS, "/policy models=nonexistent")
    assert reply.error, reply.text
    assert engine.operator.policy(GROUP).models == ()
    assert "Queued" in await say(chat, ALICE, "/imagine a fox")


async def test_policy_numbers_sqlite_cannot_hold_or_int_cannot_read_are_refused(
    harness: Harness,
) -> None:
    # `max_images=²` once raised ValueError, as /grant did.
    engine = await admin_engine(harness)
    chat = Chat(engine)
    for args in ("max_images=²", "daily_images=" + "9" * 30):
        reply = await ask(chat, BOSS, f"/policy {args}")
        assert reply.error and len(reply.text) < MAX_REPLY, args
    assert engine.operator.policies == {}
    assert await audit(harness) == []


async def test_policy_set_in_a_private_chat_stays_there(harness: Harness) -> None:
    engine = await admin_engine(harness)
    chat = Chat(engine)
    text = await say(chat, BOSS, "/policy max_images=1 daily_images=1", dm(BOSS))
    assert "test-chat:dm-boss" in text
    assert engine.operator.policy(GROUP).max_images == 0
    assert "Queued" in await say(chat, ALICE, "/imagine a fox --n 2")  # the group is untouched
    assert "Only the bot's admins" in await say(chat, ALICE, "/policy max_images=9", dm(ALICE))
    assert "daily_images=-" in await say(chat, BOSS, "/policy")  # the group's own, unchanged
    assert [r[2] for r in await audit(harness)] == ["test-chat:dm-boss"]


# ---- /link ------------------------------------------------------------------------------------


async def test_link_codes_are_one_use_expire_and_are_replaced(harness: Harness) -> None:
    engine = await admin_engine(harness)
    chat = Chat(engine)
    wrong = "wrong or has expired"
    assert wrong in await say(chat, DC, "/link 000000")
    assert wrong in await say(chat, DC, "/link <b>1</b>")
    code = await link_code(chat, TG)
    assert wrong in await say(chat, DC, f"/link {code} extra")
    newer = await link_code(chat, TG)  # a new code replaces the old one
    if newer != code:
        assert wrong in await say(chat, DC, f"/link {code}")
    harness.clock.now += 601  # past the ten minutes
    assert wrong in await say(chat, DC, f"/link {newer}")
    assert engine.operator.accounts == {}
    code = await link_code(chat, TG)
    assert "Linked" in await say(chat, DC, f"/link {code}")
    assert wrong in await say(chat, DC3, f"/link {code}")  # used: gone
    assert engine.operator.account_of(DC3) == "discord:3"
    assert [r[1] for r in await audit(harness)] == ["link"]


async def test_linking_an_account_to_itself_changes_nothing(harness: Harness) -> None:
    engine = await admin_engine(harness)
    chat = Chat(engine)
    code = await link_code(chat, ALICE)
    reply = await ask(chat, ALICE, f"/link {code}")
    assert len(reply.text) < MAX_REPLY
    assert engine.operator.accounts == {}
    assert await table(harness, "SELECT * FROM accounts") == []
    assert await audit(harness) == []


async def test_link_codes_cannot_be_guessed(harness: Harness) -> None:
    # A guessed code joins the guesser into its owner's account: their quota, /history, /show
    # and, for an admin, every admin command. Codes were 6 digits with no limit on tries; they
    # are 10 letters of 31 now, and five wrong ones lock the guesser out for the code's life.
    engine = await admin_engine(harness)
    chat = Chat(engine)
    code = await link_code(chat, BOSS)
    assert re.fullmatch(r"[A-Z2-9]{10}", code)
    for i in range(5):
        assert "wrong or has expired" in await say(
            chat, MALLORY, f"/link WRONG{i:05d}", dm(MALLORY)
        )
    locked = await say(chat, MALLORY, f"/link {code}", dm(MALLORY))
    assert "Too many wrong link codes" in locked
    assert "Only the bot's admins" in await say(chat, MALLORY, "/ban test:alice")
    harness.clock.now += 601  # the lock lasts as long as a code lives
    assert "wrong or has expired" in await say(chat, MALLORY, f"/link {code}", dm(MALLORY))
    # The owner's friend, typing it in lower case, is not locked out by someone else's tries.
    fresh = await link_code(chat, BOSS)
    assert "Linked" in await say(chat, UserRef("test", "boss2"), f"/link {fresh.lower()}")


async def test_a_third_account_and_a_second_pair_join_one_account(harness: Harness) -> None:
    engine = await admin_engine(harness)
    chat = Chat(engine)
    assert "Linked" in await link(chat, TG, DC)
    assert "Linked" in await link(chat, DC, DC3)  # code from the joined member: same account
    assert engine.operator.members("telegram:1") == ["discord:2", "discord:3", "telegram:1"]
    t5, d6 = UserRef("telegram", "5"), UserRef("discord", "6")
    assert "Linked" in await link(chat, t5, d6)  # a second pair, account telegram:5
    assert "Linked" in await link(chat, DC3, t5)  # the whole second pair moves in
    members = ["discord:2", "discord:3", "discord:6", "telegram:1", "telegram:5"]
    assert engine.operator.members("telegram:1") == members
    assert engine.operator.account_of(d6) == "telegram:1"
    rows = await audit(harness)
    assert [r[1] for r in rows] == ["link"] * 4
    assert rows[-1][0] == "telegram:5" and rows[-1][3] == '["discord:6", "telegram:5"]'
    await engine.run_until_idle()
    engine2 = await admin_engine(harness)
    assert engine2.operator.members("telegram:1") == members


async def test_linking_merges_what_both_sides_used_today(harness: Harness) -> None:
    engine = await admin_engine(harness, limits=Limits(user_images=2))
    chat = Chat(engine)
    assert "Queued" in await say(chat, TG, "/imagine a fox --n 2")
    assert "Queued" in await say(chat, DC, "/imagine a cat")
    await engine.run_until_idle()
    assert "Linked" in await link(chat, DC, TG)
    for user in (TG, DC):
        assert "used 3 of your 2 images" in await say(chat, user, "/imagine a fox"), user
    assert (await engine.usage(TG)).images == 3
    assert "gets 2 extra" in await say(chat, BOSS, "/grant telegram:1 2")  # lands on the account
    assert engine.operator.grants == {("discord:2", engine.quotas.today()): 2}
    assert "Queued" in await say(chat, DC, "/imagine a fox")
    assert "used 4 of your 4 images" in await say(chat, TG, "/imagine a fox")
    await engine.run_until_idle()
    engine2 = await admin_engine(harness, limits=Limits(user_images=2))
    assert "used 4 of your 4 images" in await say(Chat(engine2), TG, "/imagine a fox")


async def test_a_job_that_fails_after_its_owner_linked_is_refunded(harness: Harness) -> None:
    # A job queued before a link once settled under the old account key, which the link had
    # dropped: its failure released nothing until a restart.
    engine = await admin_engine(harness, limits=Limits(user_images=1))
    chat = Chat(engine)
    gate = harness.provider.gates["doomed fox"] = asyncio.Event()
    harness.provider.errors["doomed fox"] = [Refused("no")]
    assert "Queued" in await say(chat, TG, "/imagine doomed fox --model paid")
    assert "Linked" in await link(chat, DC, TG)  # telegram:1 moves into account discord:2
    gate.set()
    await engine.run_until_idle()
    status = await table(harness, "SELECT status, cost_usd FROM jobs")
    assert status == [("refused", 0.0)]  # ended, not charged
    assert (await engine.usage(DC)).images == 0
    assert engine.quotas.spent_total(engine.quotas.today()) == 0.0
    assert "Queued" in await say(chat, TG, "/imagine a fox")


async def test_a_grant_follows_its_member_into_a_linked_account(harness: Harness) -> None:
    # A grant once stayed under the old account when its member linked into another.
    engine = await admin_engine(harness, limits=Limits(user_images=1))
    chat = Chat(engine)
    assert "gets 5 extra" in await say(chat, BOSS, "/grant discord:2 5")
    assert (await engine.usage(DC)).image_limit == 6
    assert "Linked" in await link(chat, TG, DC)
    assert (await engine.usage(DC)).image_limit == 6


# ---- /show, /export, /stats -------------------------------------------------------------------


async def test_show_of_others_failed_and_odd_job_ids(harness: Harness) -> None:
    engine = await admin_engine(harness)
    chat = Chat(engine)
    ok = await ask(chat, ALICE, "/imagine a fox")
    harness.provider.errors["a broken fox"] = [Refused("no")]
    failed = await ask(chat, ALICE, "/imagine a broken fox")
    assert ok.ticket is not None and failed.ticket is not None
    await engine.run_until_idle()
    delivered = len(harness.adapter.deliveries)
    reply = await ask(chat, MALLORY, f"/show {ok.ticket.job_id}")
    assert reply.error and "No job" in reply.text
    reply = await ask(chat, ALICE, f"/show {failed.ticket.job_id}")
    assert reply.error and "no stored images" in reply.text
    for job in ("<b>x</b>", "#" + "A" * 5000, "'; DROP TABLE jobs; --", "\u202e123"):
        reply = await ask(chat, ALICE, f"/show {job}")
        assert reply.error and "No job" in reply.text, job[:20]
        assert "\n" not in reply.text and len(reply.text) < MAX_REPLY
    assert "Which job?" in await say(chat, ALICE, "/show")
    assert len(harness.adapter.deliveries) == delivered
    # the owner, and an admin, may post it again
    assert "1 image(s)" in await say(chat, ALICE, f"/show #{ok.ticket.job_id.upper()}")
    assert "1 image(s)" in await say(chat, BOSS, f"/show {ok.ticket.job_id}")
    assert await table(harness, "SELECT COUNT(*) FROM jobs") == [(2,)]


async def test_export_and_stats_stay_with_admins(harness: Harness) -> None:
    engine = await admin_engine(harness)
    chat = Chat(engine)
    assert "Queued" in await say(chat, ALICE, "/imagine a fox")
    await engine.run_until_idle()
    for user in (ALICE, MALLORY, TG):
        for command in ("/export", "/stats", "/stats everything", "/export all --csv"):
            reply = await ask(chat, user, command)
            assert reply.error and "Only the bot's admins" in reply.text
            assert reply.document is None
        reply = await chat.handle(user, dm(user), "/export", private=True)
        assert reply is not None and reply.document is None
    reply = await ask(chat, BOSS, "/export")
    assert reply.document is not None and b"alice" in reply.document[1]
    assert "Today" in await say(chat, BOSS, "/stats")
    assert await audit(harness) == []  # reading is not a change


async def test_every_admin_change_leaves_one_audit_row_and_refusals_none(
    harness: Harness,
) -> None:
    engine = await admin_engine(harness)
    chat = Chat(engine)
    for command in ("/grant alice 2", "/ban mallory", "/unban mallory", "/policy max_images=3"):
        assert not (await ask(chat, BOSS, command)).error
        assert (await ask(chat, ALICE, command)).error  # a non-admin's try: no row
    assert not (await ask(chat, BOSS, "/policy")).error  # showing is not a change
    rows = await audit(harness)
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("test:boss", "grant", "test:alice"),
        ("test:boss", "ban", "test:mallory"),
        ("test:boss", "unban", "test:mallory"),
        ("test:boss", "policy", "test-chat:group-1"),
    ]
    ats = await table(harness, "SELECT at FROM audit")
    assert all(at == (harness.clock.now,) for at in ats)
