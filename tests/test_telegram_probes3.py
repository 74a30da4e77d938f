"""Probes of the Telegram adapter in groups, supergroups and forum topics, and of its admin
commands there: who a message speaks for (anonymous admins, members posting as a channel), what
a group can read of someone's answers, bans and grants by the names people type, a group that
became a supergroup, topics, and the recovery paths the README promises.

Each probe runs the real `TelegramAdapter` (real python-telegram-bot over HTTP) against the
loopback fake Bot API with the rig of `tests/test_telegram.py`, whose stop asserts that no
handler raised. A probe marked xfail asserts what should hold and names what does not.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from bot.errors import Refused
from bot.quota import Limits
from tests import test_telegram as base
from tests.fake_telegram import ApiError, Call, FakeTelegram
from tests.test_telegram import (
    ALICE,
    GROUP,
    Rig,
    ShapedProvider,
    button,
    group_chat,
    is_status,
    jobs,
    rows,
    until,
)
from tests.test_telegram_hostile import (
    ANON_ADMIN,
    CHANNEL_BOT,
    all_jobs_ended_and_told,
    raw_message,
    sends,
    settle,
)

# The base module's fixtures, found by pytest under these names.
_ptb_timedelta = base._ptb_timedelta
tg = base.tg
provider = base.provider
rig = base.rig

ADMIN = f"telegram:{ALICE}"  # the fake's default user, Alice (42), runs the bot
BOB = 77
CAROL = 88
TOPIC = 77
BASIC_GROUP = -4321  # a basic group (type "group"), before Telegram upgrades it
SUPERGROUP = -1004321  # the supergroup it becomes
CHANNEL = {"id": -100555, "type": "channel", "title": "Bob's channel"}
LINK_CODE = re.compile(r"\b[A-Z2-9]{10}\b")


def bob(tg: FakeTelegram) -> dict[str, Any]:
    user = tg.user(BOB, name="Bob")
    user["username"] = "bob"
    return user


def carol(tg: FakeTelegram) -> dict[str, Any]:
    return tg.user(CAROL, name="Carol")


def to_chat(tg: FakeTelegram, chat: int) -> list[Call]:
    """Successful sends and edits to `chat`."""
    return [c for c in sends(tg) if c.chat_id == chat]


async def answer_to(tg: FakeTelegram, chat: int, needle: str) -> Call:
    calls = await tg.wait_for(lambda c: c.chat_id == chat and needle in (c.text or ""))
    return calls[0]


async def reply_to(tg: FakeTelegram, msg: dict[str, Any]) -> Call:
    """The bot's first message that replies to `msg`."""

    def answers(c: Call) -> bool:
        replied = c.params.get("reply_parameters") or {}
        return c.method == "sendMessage" and replied.get("message_id") == msg["message_id"]

    return (await tg.wait_for(answers))[0]


async def audit(rig: Rig) -> list[tuple[Any, ...]]:
    return await rows(
        rig.harness,
        "SELECT actor, action, subject FROM audit WHERE action != 'alert' ORDER BY rowid",
    )


# ---- who a group message speaks for ---------------------------------------------------------


async def test_an_anonymous_admin_is_the_group_not_the_anonymous_bot_nor_an_admin(
    rig: Rig, tg: FakeTelegram
) -> None:
    # The real admin (Alice) posts anonymously: Telegram sends the message from
    # @GroupAnonymousBot (1087968824) with sender_chat = the group. It is the group that asks.
    await rig.start(admin_ids=frozenset({ADMIN, "telegram:1087968824"}))
    chat = group_chat(tg)
    raw_message(tg, "/ban@drawbot 77", chat, sender=ANON_ADMIN, sender_chat=chat)
    await answer_to(tg, GROUP, "Only the bot's admins can do that.")
    raw_message(tg, "/imagine@drawbot a lighthouse", chat, sender=ANON_ADMIN, sender_chat=chat)
    await tg.wait_for("sendPhoto")
    await all_jobs_ended_and_told(rig, tg)
    assert await rows(rig.harness, "SELECT user_id, chat_id FROM jobs") == [
        (str(GROUP), str(GROUP))
    ]
    assert await audit(rig) == []


async def test_posting_as_a_channel_has_the_channels_own_quota(rig: Rig, tg: FakeTelegram) -> None:
    # README: a member posting as a channel is served as that chat, with its own quota.
    await rig.start(limits=Limits(user_images=1))
    chat = group_chat(tg)
    tg.message("/imagine a fox", user=bob(tg), chat=chat)
    await tg.wait_for("sendPhoto")
    await rig.idle()
    raw_message(tg, "/imagine@drawbot a heron", chat, sender=CHANNEL_BOT, sender_chat=CHANNEL)
    await tg.wait_for("sendPhoto", count=2)
    await rig.idle()
    raw_message(tg, "/imagine@drawbot a crane", chat, sender=CHANNEL_BOT, sender_chat=CHANNEL)
    await answer_to(tg, GROUP, "used 1 of your 1 images")
    owners = await rows(rig.harness, "SELECT user_id, status FROM jobs ORDER BY rowid")
    assert owners == [(str(BOB), "succeeded"), (str(CHANNEL["id"]), "succeeded")]


async def test_a_channel_identity_can_be_banned_by_its_id_and_the_member_stays_served(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start(admin_ids=frozenset({ADMIN}))
    chat = group_chat(tg)
    tg.message(f"/ban {CHANNEL['id']}")
    await tg.wait_text(f"telegram:{CHANNEL['id']} is banned")
    raw_message(tg, "/imagine@drawbot a heron", chat, sender=CHANNEL_BOT, sender_chat=CHANNEL)
    await answer_to(tg, GROUP, "not open to you")
    tg.message("/imagine a heron", user=bob(tg), chat=chat)
    await tg.wait_for("sendPhoto")
    await all_jobs_ended_and_told(rig, tg)
    assert await rows(rig.harness, "SELECT user_id FROM jobs") == [(str(BOB),)]


async def test_an_anonymous_admins_job_is_cancelled_by_command_but_not_by_a_member(
    rig: Rig, tg: FakeTelegram, provider: ShapedProvider
) -> None:
    provider.gate = asyncio.Event()
    await rig.start()
    chat = group_chat(tg)
    raw_message(tg, "/imagine@drawbot a red kite", chat, sender=ANON_ADMIN, sender_chat=chat)
    (ack,) = await tg.wait_for(is_status)
    job_id = button(ack, "cx:")
    tg.message(f"/cancel {job_id}", user=bob(tg), chat=chat)
    await answer_to(tg, GROUP, f"No job {job_id} of yours")
    raw_message(tg, f"/cancel@drawbot {job_id}", chat, sender=ANON_ADMIN, sender_chat=chat)
    await answer_to(tg, GROUP, f"Job {job_id} cancelled, not charged")
    await rig.idle()
    assert await rows(rig.harness, "SELECT status, cost_usd FROM jobs") == [("cancelled", 0)]


# ---- what the group gets to read -------------------------------------------------------------


async def test_jobs_in_a_group_lists_only_the_callers_jobs(rig: Rig, tg: FakeTelegram) -> None:
    await rig.start()
    chat = group_chat(tg)
    tg.message("/imagine bob's secret garden", user=bob(tg), chat=tg.chat(BOB))
    tg.message("/imagine carol's quiet lake", user=carol(tg), chat=chat)
    await tg.wait_for("sendPhoto", count=2)
    await rig.idle()
    tg.message("/jobs", user=carol(tg), chat=chat)
    listing = await answer_to(tg, GROUP, "Your recent jobs")
    assert "carol's quiet lake" in (listing.text or "")
    assert "secret garden" not in (listing.text or "")


async def test_a_link_code_asked_for_in_a_group_cannot_be_taken_by_another_member(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start(admin_ids=frozenset({ADMIN}))
    chat = group_chat(tg)
    tg.message("/link", chat=chat)  # the admin, in a group, as people do
    await tg.wait_for(lambda c: "link code" in (c.text or "").lower())
    await settle(tg, 0.3)
    # Bob reads the group and redeems every code he sees there, from his own DM.
    seen = {code for c in to_chat(tg, GROUP) for code in LINK_CODE.findall(c.text or "")}
    for code in seen:
        await reply_to(tg, tg.message(f"/link {code}", user=bob(tg), chat=tg.chat(BOB)))
    await reply_to(tg, tg.message("/ban 99", user=bob(tg), chat=tg.chat(BOB)))
    await settle(tg, 0.2)
    bans = [r for r in await audit(rig) if r[1] == "ban"]
    assert bans == [], f"Bob, a member, banned someone with the code the group read: {seen}"
    assert seen == set()


# ---- admin commands: the names people type ---------------------------------------------------


async def test_ban_by_username_bans_that_member_or_says_it_cannot(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start(admin_ids=frozenset({ADMIN}))
    chat = group_chat(tg)
    tg.message("/imagine a fox", user=bob(tg), chat=chat)  # the bot has seen @bob
    await tg.wait_for("sendPhoto")
    await rig.idle()
    answer = await reply_to(tg, tg.message("/ban @bob", chat=chat))
    tg.message("/imagine another fox", user=bob(tg), chat=chat)
    await settle(tg, 0.5)
    await rig.idle()
    served = len(await jobs(rig.harness)) == 2
    assert not ("is banned" in (answer.text or "") and served), answer.text


async def test_grant_by_username_reaches_that_member_or_says_it_cannot(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start(admin_ids=frozenset({ADMIN}), limits=Limits(user_images=1))
    tg.message("/imagine a fox", user=bob(tg), chat=tg.chat(BOB))
    await tg.wait_for("sendPhoto")
    await rig.idle()
    answer = await reply_to(tg, tg.message("/grant @bob 5"))
    tg.message("/imagine another fox", user=bob(tg), chat=tg.chat(BOB))
    await settle(tg, 0.5)
    await rig.idle()
    granted = len(await jobs(rig.harness)) == 2
    assert granted or "gets 5 extra" not in (answer.text or ""), answer.text


async def test_admin_commands_addressed_to_another_bot_change_nothing(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start(admin_ids=frozenset({ADMIN}))
    chat = group_chat(tg, forum=True)
    tg.message("/ban@otherbot 77", chat=chat, thread_id=TOPIC)
    tg.message("/grant@otherbot 77 5", chat=chat, thread_id=TOPIC)
    tg.message("/stats@drawbot", chat=chat, thread_id=TOPIC)
    stats = await answer_to(tg, GROUP, "Queue: 0 waiting")
    assert stats.params["message_thread_id"] == TOPIC
    await settle(tg, 0.2)
    assert await audit(rig) == []
    assert len(to_chat(tg, GROUP)) == 1


async def test_a_members_admin_commands_in_a_topic_are_refused_there_and_change_nothing(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start(admin_ids=frozenset({ADMIN}))
    chat = group_chat(tg, forum=True)
    for command in ("/grant 77 5", "/ban 42", "/unban 77", "/policy max_images=9", "/export"):
        tg.message(command, user=bob(tg), chat=chat, thread_id=TOPIC)
    await tg.wait_for(lambda c: "Only the bot's admins" in (c.text or ""))
    await settle(tg, 0.3)
    refusals = to_chat(tg, GROUP)
    assert refusals and all(c.params.get("message_thread_id") == TOPIC for c in refusals)
    assert not tg.sent("sendDocument")
    assert await audit(rig) == []
    tg.message("/imagine a fox", chat=chat, thread_id=TOPIC)  # the admin is not banned
    await tg.wait_for("sendPhoto")


async def test_an_admin_cancels_a_members_job_by_id_and_the_member_hears_it(
    rig: Rig, tg: FakeTelegram, provider: ShapedProvider
) -> None:
    provider.gate = asyncio.Event()
    await rig.start(admin_ids=frozenset({ADMIN}))
    chat = group_chat(tg)
    tg.message("/imagine a noisy parade --model paid", user=bob(tg), chat=chat)
    (ack,) = await tg.wait_for(is_status)
    job_id = button(ack, "cx:")
    tg.message(f"/cancel {job_id}", user=carol(tg), chat=chat)  # not hers
    await answer_to(tg, GROUP, f"No job {job_id} of yours")
    tg.message(f"/cancel {job_id}", chat=tg.chat(ALICE))
    await answer_to(tg, ALICE, f"Job {job_id} cancelled, not charged")
    edit = await tg.wait_text("✖ Cancelled")
    assert edit.chat_id == GROUP and edit.params["message_id"] == ack.result["message_id"]
    await rig.idle()
    assert await rows(rig.harness, "SELECT status, cost_usd FROM jobs") == [("cancelled", 0)]


# ---- bans and the jobs a banned member still has ---------------------------------------------


async def test_a_banned_members_queued_job_is_not_generated_nor_charged(
    rig: Rig, tg: FakeTelegram, provider: ShapedProvider
) -> None:
    provider.gate = asyncio.Event()
    await rig.start(admin_ids=frozenset({ADMIN}), concurrency=1)
    chat = group_chat(tg)
    tg.message("/imagine a slow sunrise", user=carol(tg), chat=chat)
    await until(lambda: len(provider.started) == 1)
    tg.message("/imagine spam spam spam --model paid", user=bob(tg), chat=chat)
    acks = await tg.wait_for(is_status, count=2)
    spam = button(acks[1], "cx:")
    tg.message("/ban 77")
    await tg.wait_text("telegram:77 is banned")
    provider.gate.set()
    await rig.idle()
    await settle(tg, 0.3)
    (row,) = await rows(rig.harness, f"SELECT status, cost_usd FROM jobs WHERE id = '{spam}'")
    assert spam not in provider.started, f"the banned member's job was generated: {row}"
    assert row[0] != "succeeded" and row[1] == 0


async def test_the_original_file_button_posts_nothing_for_a_banned_member(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start(admin_ids=frozenset({ADMIN}))
    chat = group_chat(tg)
    tg.message("/imagine something vile", user=bob(tg), chat=chat)
    (photo,) = await tg.wait_for("sendPhoto")
    await rig.idle()
    job_id = button(photo, "of:")
    tg.message("/ban 77")
    await tg.wait_text("telegram:77 is banned")
    tg.message(f"/show {job_id}", user=bob(tg), chat=chat)
    await answer_to(tg, GROUP, "not open to you")
    reroll = tg.callback(f"rr:{job_id}", photo.result, user=bob(tg))
    await until(lambda: reroll in tg.callback_answers)
    query = tg.callback(f"of:{job_id}", photo.result, user=bob(tg))
    await until(lambda: query in tg.callback_answers)
    await settle(tg, 0.3)
    assert len(await jobs(rig.harness)) == 1  # 🔄 was refused
    assert tg.sent("sendDocument") == [], "the banned member's images were posted again"


# ---- a group that became a supergroup --------------------------------------------------------


async def test_a_chat_policy_follows_the_group_into_its_supergroup(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start(admin_ids=frozenset({ADMIN}))
    basic = tg.chat(BASIC_GROUP, "group")
    tg.message("/policy max_images=1 models=demo", chat=basic)
    await answer_to(tg, BASIC_GROUP, "max_images=1")
    # An admin turns on a supergroup feature: Telegram moves the group, and says so in both.
    tg.migrated[BASIC_GROUP] = SUPERGROUP
    supergroup = tg.chat(SUPERGROUP, "supergroup")
    tg.message(chat=basic, extra={"migrate_to_chat_id": SUPERGROUP})
    tg.message(chat=supergroup, extra={"migrate_from_chat_id": BASIC_GROUP})
    tg.message("/imagine a fox --n 2 --model paid", user=bob(tg), chat=supergroup)
    await tg.wait_for(lambda c: c.chat_id == SUPERGROUP and c.method == "sendMessage")
    await settle(tg, 0.3)
    await rig.idle()
    assert await jobs(rig.harness) == [], "the chat's policy no longer held"


# ---- forum topics ------------------------------------------------------------------------------


async def test_in_a_topic_errors_answers_and_an_export_stay_in_the_topic(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start(admin_ids=frozenset({ADMIN}))
    chat = group_chat(tg, forum=True)
    tg.message("/imagine a fox --ar 99:1", user=bob(tg), chat=chat, thread_id=TOPIC)
    tg.message("/usage", user=carol(tg), chat=chat, thread_id=TOPIC)
    tg.message("/export", chat=chat, thread_id=TOPIC)
    await tg.wait_for("sendDocument")
    await tg.wait_text("does not do aspect ratio 99:1")
    await tg.wait_text("Today: 0 of")
    await settle(tg, 0.2)
    out = [c for c in tg.sent() if c.method in ("sendMessage", "sendDocument")]
    assert len(out) == 3 and all(c.params.get("message_thread_id") == TOPIC for c in out)


async def test_the_general_topic_of_a_forum_is_answered_without_a_thread(
    rig: Rig, tg: FakeTelegram
) -> None:
    # Messages in a forum's General topic carry no message_thread_id (and are no topic
    # message); sending one with thread 1 is refused by Telegram. The answer goes plain.
    await rig.start()
    chat = group_chat(tg, forum=True)
    tg.message("/imagine a lighthouse", user=bob(tg), chat=chat)
    (photo,) = await tg.wait_for("sendPhoto")
    await all_jobs_ended_and_told(rig, tg)
    assert all("message_thread_id" not in c.params for c in tg.calls)
    assert all(c.ok for c in tg.calls)
    assert [r[4] for r in await jobs(rig.harness)] == [None]
    assert photo.chat_id == GROUP


async def test_one_users_jobs_in_two_topics_each_answer_in_their_own_topic(
    rig: Rig, tg: FakeTelegram, provider: ShapedProvider
) -> None:
    provider.gate = asyncio.Event()
    provider.errors["doomed in 2"] = [Refused("no")]
    await rig.start(max_pending_per_user=9)
    chat = group_chat(tg, forum=True)
    prompts = {"calm in 1": 11, "doomed in 2": 22, "busy in 1": 11, "busy in 2": 22}
    for prompt, topic in prompts.items():
        tg.message(f"/imagine {prompt}", user=bob(tg), chat=chat, thread_id=topic)
    await until(lambda: len(provider.started) == 4)
    provider.gate.set()
    found = await all_jobs_ended_and_told(rig, tg)
    await settle(tg, 0.3)
    assert sorted(r[1] for r in found) == ["refused", "succeeded", "succeeded", "succeeded"]
    topic_of = {r[0]: int(r[4]) for r in found}
    placed = set()
    for c in tg.sent():
        if c.method in ("editMessageText", "sendChatAction"):
            continue
        named = [j for j in topic_of if j in (c.text or "") + str(c.params.get("reply_markup"))]
        for job_id in named:
            assert c.params.get("message_thread_id") == topic_of[job_id], (c.method, c.text)
            placed.add((job_id, c.method))
    # every job's ack, and each result, was checked
    assert {j for j, m in placed if m == "sendMessage"} == set(topic_of)
    assert len({j for j, m in placed if m == "sendPhoto"}) == 3


def close_topic(tg: FakeTelegram, chat: int, thread: int) -> None:
    """An admin closed the topic: Telegram refuses whatever the bot sends into it."""
    check = tg._check_failures

    def closed(call: Call) -> None:
        if call.chat_id == chat and call.params.get("message_thread_id") == thread:
            raise ApiError(400, "Bad Request: TOPIC_CLOSED")
        check(call)

    tg._check_failures = closed  # type: ignore[method-assign]


async def test_a_topic_closed_mid_job_says_so_on_the_status_and_show_gets_the_result(
    rig: Rig, tg: FakeTelegram, provider: ShapedProvider
) -> None:
    provider.gate = asyncio.Event()
    await rig.start()
    chat = group_chat(tg, forum=True)
    tg.message("/imagine a quiet library --model paid", user=bob(tg), chat=chat, thread_id=TOPIC)
    (ack,) = await tg.wait_for(is_status)
    job_id = button(ack, "cx:")
    close_topic(tg, GROUP, TOPIC)
    provider.gate.set()
    told = await tg.wait_text(f"could not post the picture here. Send /show {job_id}")
    assert (
        told.method == "editMessageText" and told.params["message_id"] == ack.result["message_id"]
    )
    await rig.idle()
    photos = [c for c in tg.calls if c.method == "sendPhoto"]
    assert len(photos) == 1 and not photos[0].ok  # refused for good: not tried again
    assert await rows(rig.harness, "SELECT status, cost_usd, delivered_at FROM jobs") == [
        ("succeeded", 0.5, None)  # stored, so charged (README), and /show has it
    ]
    tg.message(f"/show {job_id}", user=bob(tg), chat=chat)  # from the General topic
    (shown,) = await tg.wait_for(lambda c: c.method == "sendPhoto" and c.ok)
    assert shown.chat_id == GROUP and "message_thread_id" not in shown.params


async def test_after_a_kick_mid_job_the_member_gets_the_result_in_a_dm_with_show(
    rig: Rig, tg: FakeTelegram, provider: ShapedProvider
) -> None:
    provider.gate = asyncio.Event()
    await rig.start()
    tg.message("/imagine a stormy harbour", user=bob(tg), chat=group_chat(tg))
    (ack,) = await tg.wait_for(is_status)
    job_id = button(ack, "cx:")
    tg.fail(None, 403, "Forbidden: bot was kicked from the group chat", times=99, chat_id=GROUP)
    provider.gate.set()
    await rig.idle()
    await settle(tg, 0.3)
    assert [c.ok for c in tg.calls if c.method == "sendPhoto"] == [False]  # never retried
    tg.message(f"/show {job_id}", user=bob(tg), chat=tg.chat(BOB))
    (photo,) = await tg.wait_for(lambda c: c.method == "sendPhoto" and c.ok)
    assert photo.chat_id == BOB and button(photo, "rr:") == job_id
    await tg.wait_text(f"Here are the 1 image(s) of job {job_id}")


async def test_show_in_another_chat_never_edits_a_message_there(rig: Rig, tg: FakeTelegram) -> None:
    await rig.start()
    tg.message("/imagine a harbour at noon", user=bob(tg), chat=group_chat(tg))
    (ack,) = await tg.wait_for(is_status)
    job_id = button(ack, "cx:")
    await tg.wait_text("✅ Done")
    await rig.idle()
    # Message ids count per chat: Bob's DM with the bot has its own message with that id, an
    # answer the bot once sent him there.
    status_id = ack.result["message_id"]
    earlier = "Today: 3 of 20 images, $0.00 spent."
    tg.messages[(BOB, status_id)] = {
        "message_id": status_id,
        "date": 0,
        "chat": {"id": BOB, "type": "private"},
        "from": {"id": tg.bot_id, "is_bot": True, "first_name": "Drawbridge"},
        "text": earlier,
    }
    tg.message(f"/show {job_id}", user=bob(tg), chat=tg.chat(BOB))
    await tg.wait_text(f"Here are the 1 image(s) of job {job_id}")
    await settle(tg, 0.5)
    edits = [c for c in tg.calls if c.method == "editMessageText" and c.chat_id == BOB]
    assert tg.messages[(BOB, status_id)]["text"] == earlier, "Bob's earlier message was rewritten"
    assert edits == []


async def test_a_failure_after_the_status_was_deleted_is_told_in_the_jobs_topic(
    rig: Rig, tg: FakeTelegram, provider: ShapedProvider
) -> None:
    provider.gate = asyncio.Event()
    provider.errors["a doomed kite"] = [Refused("no")]
    await rig.start()
    chat = group_chat(tg, forum=True)
    command = tg.message("/imagine a doomed kite", user=bob(tg), chat=chat, thread_id=TOPIC)
    (ack,) = await tg.wait_for(is_status)
    job_id = button(ack, "cx:")
    await until(lambda: job_id in provider.started)
    tg.messages[(GROUP, ack.result["message_id"])]["deleted"] = True  # someone deleted it
    provider.gate.set()
    (failure,) = await tg.wait_for(
        lambda c: c.method == "sendMessage" and "not charged" in (c.text or "")
    )
    assert f"job {job_id}" in (failure.text or "")
    assert failure.params["message_thread_id"] == TOPIC
    assert failure.params["reply_parameters"]["message_id"] == command["message_id"]
    await rig.idle()
    assert await rows(rig.harness, "SELECT status, cost_usd FROM jobs") == [("refused", 0)]


# ---- ALLOWED_IDS naming a group ----------------------------------------------------------------


async def test_an_allowed_group_serves_its_members_and_channel_identities_there_only(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start(allowed_ids=frozenset({f"telegram-chat:{GROUP}"}))
    chat = group_chat(tg)
    tg.message("/imagine a fox", user=bob(tg), chat=chat)
    raw_message(tg, "/imagine@drawbot a heron", chat, sender=CHANNEL_BOT, sender_chat=CHANNEL)
    await tg.wait_for("sendPhoto", count=2)
    tg.message("/imagine a fox", user=bob(tg), chat=tg.chat(BOB))  # not in his DM
    await answer_to(tg, BOB, "not open to you")
    await all_jobs_ended_and_told(rig, tg)
    assert sorted(r[0] for r in await rows(rig.harness, "SELECT chat_id FROM jobs")) == [
        str(GROUP),
        str(GROUP),
    ]


async def test_an_allowed_group_is_still_served_after_it_became_a_supergroup(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start(allowed_ids=frozenset({f"telegram-chat:{BASIC_GROUP}"}))
    basic = tg.chat(BASIC_GROUP, "group")
    tg.message("/imagine a fox", user=bob(tg), chat=basic)
    await tg.wait_for("sendPhoto")
    await rig.idle()
    tg.migrated[BASIC_GROUP] = SUPERGROUP
    supergroup = tg.chat(SUPERGROUP, "supergroup")
    tg.message(chat=basic, extra={"migrate_to_chat_id": SUPERGROUP})
    tg.message(chat=supergroup, extra={"migrate_from_chat_id": BASIC_GROUP})
    answer = await reply_to(tg, tg.message("/imagine a fox", user=bob(tg), chat=supergroup))
    assert "not open to you" not in (answer.text or ""), answer.text
