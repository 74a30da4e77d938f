"""Adversarial probes of how the Telegram adapter takes input: topics, albums, buttons, bursts.

Each probe runs the real `TelegramAdapter` (real python-telegram-bot over HTTP) against the
loopback fake Bot API, with the rig of `tests/test_telegram.py`; the rig's stop asserts that no
handler raised. Three defects they found are fixed: an album whose caption was not on its first
photo reached the provider out of order; an album over the model's reference limit was
downloaded whole before it was refused; an update the webhook got twice made two paid jobs.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import pytest

from bot.quota import Limits
from tests import test_telegram as base
from tests.fake_telegram import Call, FakeTelegram
from tests.fakes import png_bytes
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
from tests.test_telegram_hostile import all_jobs_ended_and_told, nothing_sent, sends, settle

# The base module's fixtures, found by pytest under these names.
_ptb_timedelta = base._ptb_timedelta
tg = base.tg
provider = base.provider
rig = base.rig

SHORT = 300
TOPIC = 77


def texts(tg: FakeTelegram) -> list[str]:
    """Every visible text the bot sent or edited, and every button-press answer."""
    out = [c.text or "" for c in sends(tg)]
    out += [str(a.get("text") or "") for a in tg.callback_answers.values()]
    return out


def said(tg: FakeTelegram, needle: str) -> bool:
    return any(needle in text for text in texts(tg))


def album(
    tg: FakeTelegram,
    pictures: list[bytes],
    *,
    caption: str | None,
    caption_at: int = 0,
    user: dict[str, Any] | None = None,
    chat: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    group_id: str = "24680",
) -> list[dict[str, Any]]:
    """An album as Telegram delivers it: one message per photo, one caption, one media group."""
    return [
        tg.message(
            user=user,
            chat=chat,
            photo=picture,
            caption=caption if i == caption_at else None,
            extra={"media_group_id": group_id, **(extra or {})},
        )
        for i, picture in enumerate(pictures)
    ]


def pictures(n: int) -> list[bytes]:
    return [png_bytes(30 + i, 30, color=(i * 20, 10, 10)) for i in range(n)]


async def one_result(rig: Rig, tg: FakeTelegram) -> Call:
    (photo,) = await tg.wait_for("sendPhoto")
    await rig.idle()
    return photo


# ---- groups and forum topics ----------------------------------------------------------------


async def test_in_a_topic_another_bots_imagine_is_ignored_and_ours_answers_in_the_topic(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start()
    chat = group_chat(tg, forum=True)
    bob = tg.user(7, name="Bob")
    picture = png_bytes(33, 22, color=(9, 8, 7))
    posted = tg.message(user=tg.user(8), chat=chat, photo=picture, thread_id=TOPIC)
    tg.message("/imagine@otherbot a cat", user=bob, chat=chat, thread_id=TOPIC, reply_to=posted)
    ours = tg.message(
        "/imagine@drawbot as a poster", user=bob, chat=chat, thread_id=TOPIC, reply_to=posted
    )
    photo = await one_result(rig, tg)
    assert photo.chat_id == GROUP and photo.params["message_thread_id"] == TOPIC
    assert photo.params["reply_parameters"]["message_id"] == ours["message_id"]
    assert all(c.params.get("message_thread_id") == TOPIC for c in sends(tg))
    (call,) = rig.harness.provider.calls
    assert call.prompt == "as a poster" and call.reference_images == (picture,)
    assert [(r[3], r[4]) for r in await jobs(rig.harness)] == [(str(GROUP), str(TOPIC))]


async def test_a_reply_thread_in_a_plain_supergroup_is_not_sent_as_a_forum_topic(
    rig: Rig, tg: FakeTelegram
) -> None:
    # Telegram puts a message_thread_id on replies in any supergroup; only is_topic_message
    # makes it a forum topic. Sent back as a topic, Telegram answers "message thread not found".
    await rig.start()
    tg.message(
        "/imagine@drawbot a lantern",
        user=tg.user(7),
        chat=group_chat(tg),
        extra={"message_thread_id": 555},
    )
    await one_result(rig, tg)
    assert sends(tg) and all("message_thread_id" not in c.params for c in sends(tg))
    assert [r[4] for r in await jobs(rig.harness)] == [None]


async def test_reroll_pressed_in_a_forum_topic_queues_and_answers_in_that_topic(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start()
    chat = group_chat(tg, forum=True)
    tg.message("/imagine a quiet harbour", user=tg.user(7), chat=chat, thread_id=TOPIC)
    photo = await one_result(rig, tg)
    query = tg.callback(f"rr:{button(photo, 'rr:')}", photo.result, user=tg.user(7))
    second = (await tg.wait_for("sendPhoto", count=2))[1]
    await until(lambda: query in tg.callback_answers)
    assert second.params["message_thread_id"] == TOPIC
    await rig.idle()
    assert [r[4] for r in await jobs(rig.harness)] == [str(TOPIC), str(TOPIC)]


# ---- buttons ------------------------------------------------------------------------------


async def test_cancel_pressed_twice_quickly_cancels_once_and_answers_both(
    rig: Rig, tg: FakeTelegram, provider: ShapedProvider
) -> None:
    provider.gate = asyncio.Event()
    await rig.start(concurrency=1)
    tg.message("first --model paid")
    await tg.wait_for(is_status)
    tg.message("second --model paid")
    second = (await tg.wait_for(is_status, count=2))[1]
    job_id = button(second, "cx:")
    queries = [tg.callback(f"cx:{job_id}", second.result) for _ in range(2)]
    await until(lambda: all(q in tg.callback_answers for q in queries))
    answers = [str(tg.callback_answers[q].get("text") or "") for q in queries]
    assert all(answers) and sum("cancelled, not charged" in a for a in answers) == 1, answers
    provider.gate.set()
    found = await all_jobs_ended_and_told(rig, tg)
    assert [(r[1], r[2]) for r in found] == [("succeeded", 0.5), ("cancelled", 0)]

    def cancel_edit(c: Call) -> bool:
        return (
            c.method == "editMessageText"
            and c.params["message_id"] == second.result["message_id"]
            and "Cancelled" in (c.text or "")
        )

    await tg.wait_for(cancel_edit)
    await settle(tg, 0.5)
    assert len([c for c in tg.sent() if cancel_edit(c)]) == 1


@pytest.mark.parametrize("action", ["rr", "cx", "of"])
async def test_a_button_for_a_job_that_does_not_exist_says_so(
    rig: Rig, tg: FakeTelegram, action: str
) -> None:
    await rig.start()
    tg.message("a crisp mountain")
    photo = await one_result(rig, tg)
    query = tg.callback(f"{action}:zzzzzzzzzz", photo.result)
    await until(lambda: query in tg.callback_answers)
    answer = tg.callback_answers[query]
    assert answer.get("show_alert") is True and "No job" in str(answer.get("text"))
    await settle(tg)
    assert len(await jobs(rig.harness)) == 1 and len(tg.sent("sendPhoto")) == 1


async def test_a_reroll_pressed_by_a_member_the_bot_does_not_serve_makes_no_job(
    rig: Rig, tg: FakeTelegram
) -> None:
    # ALLOWED_IDS names Alice only; she uses the bot in a group. Bob pressing her 🔄 must not
    # get a job on the operator's bill.
    await rig.start(allowed_ids=frozenset({f"telegram:{ALICE}"}))
    chat = group_chat(tg)
    tg.message("/imagine a red fox", chat=chat)
    photo = await one_result(rig, tg)
    query = tg.callback(f"rr:{button(photo, 'rr:')}", photo.result, user=tg.user(7, name="Bob"))
    await until(lambda: query in tg.callback_answers)
    await settle(tg)
    assert len(await jobs(rig.harness)) == 1 and len(rig.harness.provider.calls) == 1
    assert tg.callback_answers[query].get("show_alert") is True


# ---- albums -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "caption_at",
    [
        0,
        2,
    ],
    ids=["caption-on-first", "caption-on-third"],
)
async def test_an_album_of_four_references_is_one_job_with_every_photo_in_order(
    rig: Rig, tg: FakeTelegram, caption_at: int
) -> None:
    # "put the cat of image 1 into the room of image 2": the order the user sees is the order
    # the model gets. A client may put the album's caption on any photo; the demo model takes 4.
    await rig.start()
    photos = pictures(4)
    parts = album(tg, photos, caption="merge these into one scene", caption_at=caption_at)
    photo = await one_result(rig, tg)
    await settle(tg)
    assert photo.params["reply_parameters"]["message_id"] == parts[caption_at]["message_id"]
    (call,) = rig.harness.provider.calls
    assert call.reference_images == tuple(photos)
    assert len(await jobs(rig.harness)) == 1 and not said(tg, "Add a caption")


async def test_an_album_of_five_references_over_the_models_limit_is_refused_and_not_charged(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start()
    album(tg, pictures(5), caption="merge these --model paid")
    await until(lambda: said(tg, "takes at most 2 reference images"), within=10)
    await settle(tg)
    assert rig.harness.provider.calls == [] and not tg.sent("sendPhoto")
    assert all(r[1] != "succeeded" and r[2] == 0 for r in await jobs(rig.harness))
    assert len([t for t in texts(tg) if "reference" in t]) == 1  # one answer for the album


async def test_an_album_over_the_models_reference_limit_is_refused_before_any_download(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start()
    album(tg, pictures(5), caption="merge these --model paid")
    await until(lambda: said(tg, "takes at most 2 reference images"), within=10)
    assert not tg.sent("getFile")


async def test_a_group_album_for_another_bot_is_ignored_and_nothing_downloaded(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start()
    chat = group_chat(tg)
    album(tg, pictures(3), caption="/imagine@otherbot merge", user=tg.user(7), chat=chat)
    await asyncio.sleep(1.0)  # the album is gathered for 0.8 s
    await nothing_sent(rig, tg, chat)
    assert not tg.sent("getFile")


async def test_an_album_with_a_video_is_refused_clearly_without_download(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start()
    parts = album(tg, pictures(1), caption="merge these")
    video = {**tg.add_file(b"\x00\x00\x00\x18ftypmp42"), "width": 8, "height": 8, "duration": 1}
    tg.message(extra={"media_group_id": "24680", "video": video})
    await until(lambda: said(tg, "not a PNG, JPEG or WebP"), within=10)
    await settle(tg)
    assert not tg.sent("getFile") and await jobs(rig.harness) == []
    (reply,) = [c for c in sends(tg) if "PNG" in (c.text or "")]
    assert reply.params["reply_parameters"]["message_id"] == parts[0]["message_id"]


async def test_a_forwarded_album_in_private_gets_one_hint_not_one_per_photo(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start()
    origin = {"type": "user", "date": int(time.time()), "sender_user": tg.user(8, name="Eve")}
    album(tg, pictures(5), caption="look at these", extra={"forward_origin": origin})
    await until(lambda: said(tg, "reply to it with /imagine"), within=10)
    await settle(tg, 1.0)
    hints = sum(t.count("reply to it with /imagine") for t in texts(tg))
    assert hints == 1, texts(tg)
    assert await jobs(rig.harness) == [] and not tg.sent("getFile")


# ---- the webhook route's input ----------------------------------------------------------------


def _webhook_message(tg: FakeTelegram, text: str) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "message_id": next(tg._message_ids),
        "date": int(time.time()),
        "chat": tg.chat(ALICE),
        "from": tg.user(ALICE),
        "text": text,
        "entities": tg._entities(text),
    }
    tg.messages[(ALICE, msg["message_id"])] = msg
    return msg


async def test_an_update_the_webhook_gets_twice_is_one_job(rig: Rig, tg: FakeTelegram) -> None:
    _, adapter = await rig.start()
    update = {
        "update_id": 5000,
        "message": _webhook_message(tg, "/imagine a snow owl --model paid"),
    }
    assert await adapter.process_webhook_update(update)
    await tg.wait_for("sendPhoto")
    assert await adapter.process_webhook_update(dict(update))  # Telegram's retry
    await settle(tg, 0.5)
    await rig.idle()
    assert [(r[1], r[2]) for r in await jobs(rig.harness)] == [("succeeded", 0.5)]


async def test_an_edited_message_through_the_webhook_is_not_a_second_job(
    rig: Rig, tg: FakeTelegram
) -> None:
    _, adapter = await rig.start()
    msg = _webhook_message(tg, "/imagine a snow owl --model paid")
    assert await adapter.process_webhook_update({"update_id": 6000, "message": msg})
    await tg.wait_for("sendPhoto")
    edited = {**msg, "text": "/imagine a snow hare --model paid", "edit_date": int(time.time())}
    assert await adapter.process_webhook_update({"update_id": 6001, "edited_message": edited})
    await settle(tg, 0.5)
    await rig.idle()
    assert [r[0] for r in await rows(rig.harness, "SELECT prompt FROM jobs")] == ["a snow owl"]
    assert len(tg.sent("sendPhoto")) == 1


# ---- captions, deep links -------------------------------------------------------------------


@pytest.mark.parametrize("caption", ["/imagine", "/imagine@drawbot", "/img --ar 16:9"])
async def test_a_photo_captioned_with_only_the_command_asks_for_a_prompt_without_download(
    rig: Rig, tg: FakeTelegram, caption: str
) -> None:
    await rig.start()
    tg.message(photo=png_bytes(), caption=caption)
    reply = await tg.wait_text("Please describe the image")
    assert len(reply.text or "") < SHORT
    await settle(tg)
    assert await jobs(rig.harness) == [] and not tg.sent("getFile")


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("/start promo_2024", "private"),
        ("/start imagine_a_cat", "private"),
        ("/start@drawbot ref-77", "group"),
    ],
    ids=["payload", "payload-looks-like-prompt", "group"],
)
async def test_start_with_a_deep_link_payload_is_a_welcome_not_a_job(
    rig: Rig, tg: FakeTelegram, text: str, where: str
) -> None:
    await rig.start()
    chat = tg.chat(ALICE) if where == "private" else group_chat(tg)
    msg = tg.message(text, chat=chat)
    reply = await tg.wait_text("Hi!")
    assert reply.params["reply_parameters"]["message_id"] == msg["message_id"]
    await settle(tg)
    assert await jobs(rig.harness) == [] and len(sends(tg)) == 1


# ---- spam ---------------------------------------------------------------------------------


def _count(tg: FakeTelegram, needle: str) -> int:
    """How many answers contain `needle`, counting coalesced repeats ("… (×7)")."""
    total = 0
    for call in sends(tg):
        for part in (call.text or "").split("\n\n"):
            if needle in part:
                m = re.search(r"\(×(\d+)\)$", part)
                total += int(m[1]) if m else 1
    return total


def _acked(tg: FakeTelegram) -> int:
    return len({m for c in tg.sent() for m in re.findall(r"job (\w+)", c.text or "")})


async def test_50_imagines_in_a_second_in_a_group_are_capped_answered_and_never_flooded(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start()  # MAX_PENDING_PER_USER = 3; the group allows 20 messages a minute
    chat = group_chat(tg)
    bob = tg.user(7, name="Bob")
    for i in range(50):
        tg.message(f"/imagine spam heron {i} --model paid", user=bob, chat=chat)
    await until(lambda: _count(tg, "You already have 3 jobs waiting") + _acked(tg) == 50, within=30)
    found = await all_jobs_ended_and_told(rig, tg)
    assert 3 <= len(found) < 50
    assert not [c for c in tg.calls if c.error is not None and c.error.code == 429]
    charged = sum(r[2] for r in found)
    assert charged == 0.5 * len([r for r in found if r[1] == "succeeded"])


async def test_a_burst_cannot_overrun_the_daily_image_quota(rig: Rig, tg: FakeTelegram) -> None:
    await rig.start(max_pending_per_user=100, limits=Limits(user_images=5))
    for i in range(50):
        tg.message(f"/imagine quota fox {i} --model paid")
    await until(lambda: _count(tg, "of your 5 images today") + _acked(tg) == 50, within=30)
    found = await all_jobs_ended_and_told(rig, tg)
    succeeded = [r for r in found if r[1] == "succeeded"]
    assert len(succeeded) == 5 and len(rig.harness.provider.calls) == 5
    assert await rows(rig.harness, "SELECT SUM(cost_usd) FROM jobs") == [(2.5,)]
    assert len(sends(tg)) <= 25  # refusals are coalesced, not 45 messages
