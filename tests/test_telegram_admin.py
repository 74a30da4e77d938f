"""The operator's commands on Telegram, through the real python-telegram-bot and the fake Bot API."""

from __future__ import annotations

import re

import pytest

from bot.quota import Limits
from tests import test_telegram as base
from tests.fake_telegram import FakeTelegram
from tests.test_telegram import Rig, jobs, rows

# The Telegram test rig's fixtures, shared with tests/test_telegram.py.
tg, provider, rig = base.tg, base.provider, base.rig

ADMIN = "telegram:42"  # the fake's default user is 42 (Alice)
BOB = 77


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("/stats", "Queue: 0 waiting"),
        ("/grant 77 5", "telegram:77 gets 5 extra image(s) today"),
        ("/ban 77", "telegram:77 is banned"),
        ("/unban 77", "telegram:77 is no longer banned"),
        ("/policy max_images=1", "max_images=1"),
    ],
)
async def test_admin_commands_for_an_admin_and_refused_to_others(
    rig: Rig, tg: FakeTelegram, command: str, expected: str
) -> None:
    engine, _ = await rig.start(admin_ids=frozenset({ADMIN}))
    bob = tg.user(BOB, name="Bob")
    tg.message(command, user=bob, chat=tg.chat(BOB))
    await tg.wait_text("Only the bot's admins can do that.")
    assert engine.operator.bans == set() and engine.operator.grants == {}
    tg.message(command)
    await tg.wait_text(expected)


async def test_export_sends_the_csv_as_a_document(rig: Rig, tg: FakeTelegram) -> None:
    await rig.start(admin_ids=frozenset({ADMIN}))
    tg.message("/export")
    (doc,) = await tg.wait_for("sendDocument")
    ((_, upload),) = doc.files.items()
    assert upload.data.startswith(b"day,platform,user_id")


async def test_a_chat_policy_holds_and_survives_a_restart(rig: Rig, tg: FakeTelegram) -> None:
    engine, adapter = await rig.start(admin_ids=frozenset({ADMIN}))
    group = tg.chat(-100500, kind="supergroup")
    tg.message("/policy max_images=1", chat=group)
    await tg.wait_text("max_images=1")
    await rig.stop(engine, adapter)
    await rig.start(admin_ids=frozenset({ADMIN}))
    bob = tg.user(BOB, name="Bob")
    tg.message("/imagine a fox --n 2", user=bob, chat=group)
    await tg.wait_text("This chat allows at most 1 images per request.")
    assert await jobs(rig.harness) == []


async def test_ban_grant_link_history_and_show(rig: Rig, tg: FakeTelegram) -> None:
    await rig.start(admin_ids=frozenset({ADMIN}), limits=Limits(user_images=1))
    bob, bob_chat = tg.user(BOB, name="Bob"), tg.chat(BOB)
    tg.message("/imagine a fox", user=bob, chat=bob_chat)
    await tg.wait_for("sendPhoto")
    await rig.idle()
    tg.message("/imagine a cat", user=bob, chat=bob_chat)
    await tg.wait_text("used 1 of your 1 images")
    tg.message("/grant 77 1")
    await tg.wait_text("gets 1 extra image")
    tg.message("/imagine a cat", user=bob, chat=bob_chat)
    await tg.wait_for("sendPhoto", count=2)
    await rig.idle()
    tg.message("/history", user=bob, chat=bob_chat)
    history = await tg.wait_text("Your recent jobs")
    job_id = re.findall(r"\b([a-z2-7]{10})\b", history.text or "")[0]
    tg.message(f"/show {job_id}", user=bob, chat=bob_chat)
    await tg.wait_for("sendPhoto", count=3)
    tg.message("/link", user=bob, chat=bob_chat)
    code = await tg.wait_text("Your link code")
    assert re.search(r"\b[A-Z2-9]{10}\b", code.text or "")
    tg.message("/ban 77")
    await tg.wait_text("is banned")
    tg.message("/imagine a dog", user=bob, chat=bob_chat)
    await tg.wait_text("not open to you")


async def test_a_command_telegram_sends_again_after_a_restart_is_not_applied_twice(
    rig: Rig, tg: FakeTelegram
) -> None:
    """Telegram re-sends the updates a killed bot had not confirmed: a /grant (or a /link) a
    bot applied just before it died comes again to the next one, which must not apply it
    twice (a second grant is images the operator pays for)."""
    engine, adapter = await rig.start(admin_ids=frozenset({ADMIN}))
    bob, bob_chat = tg.user(BOB, name="Bob"), tg.chat(BOB)
    grant = tg.message("/grant 77 5")
    await tg.wait_text("gets 5 extra image")
    tg.message("/link", user=bob, chat=bob_chat)
    code = re.findall(r"\b[A-Z2-9]{10}\b", (await tg.wait_text("Your link code")).text or "")[0]
    carol, carol_chat = tg.user(88, name="Carol"), tg.chat(88)
    link = tg.message(f"/link {code}", user=carol, chat=carol_chat)
    await tg.wait_text("Linked")
    await rig.stop(engine, adapter)
    engine, _ = await rig.start(admin_ids=frozenset({ADMIN}))
    tg.push({"message": grant})  # as Telegram re-sends them: same message, dated before
    tg.push({"message": link})
    tg.message("/grant 77 1")  # a new command is applied
    await tg.wait_text("gets 1 extra image")
    (account,) = {a for (a, _) in engine.operator.grants}
    assert engine.operator.granted(account, engine.quotas.today()) == 6
    assert len(await rows(rig.harness, "SELECT * FROM audit WHERE action = 'grant'")) == 2
    assert [c for c in tg.sent("sendMessage") if "gets 5" in (c.text or "")][1:] == []
    assert not [c for c in tg.sent("sendMessage") if "link code" in (c.text or "").lower()
                and "wrong" in (c.text or "").lower()]  # fmt: skip
