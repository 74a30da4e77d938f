"""Hostile and unusual input through the real Telegram adapter (and the console chat).

DESIGN rule 7, "hostile input is normal", and the README's promise: bad input gets a clear,
short answer, never a crash or a silent drop, and every job ends with a message to its user.
Each probe runs the real `TelegramAdapter` against the fake Bot API, as `tests/test_telegram.py`
does (its fixtures and helpers are reused here); the rig's stop asserts the handlers raised
nothing. A note on a probe says what it once found wrong.
"""

from __future__ import annotations

import asyncio
import io
import re
import time
from typing import Any

import pytest

from adapters.console_adapter import ConsoleAdapter
from tests import test_telegram as base
from tests.conftest import Harness
from tests.fake_telegram import Call, FakeTelegram, parse_html, utf16_len
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

# The base module's fixtures, found by pytest under these names.
_ptb_timedelta = base._ptb_timedelta
tg = base.tg
provider = base.provider
rig = base.rig

SHORT = 300  # a "short" answer, in characters
FINAL = {"succeeded", "failed", "refused", "cancelled"}
ANON_ADMIN = {
    "id": 1087968824,
    "is_bot": True,
    "first_name": "Group",
    "username": "GroupAnonymousBot",
}
CHANNEL_BOT = {"id": 136817688, "is_bot": True, "first_name": "Channel", "username": "Channel_Bot"}


# ---- helpers -----------------------------------------------------------------------------


def sends(tg: FakeTelegram) -> list[Call]:
    """Every successful call that posts or edits a message."""
    return [
        c
        for c in tg.sent()
        if c.method.startswith("edit")
        or (c.method.startswith("send") and c.method != "sendChatAction")
    ]


async def settle(tg: FakeTelegram, seconds: float = 0.1) -> None:
    """Give the adapter time to (not) answer; the fake's queue is drained first."""
    await until(lambda: not tg._updates, within=5)
    await asyncio.sleep(seconds)


async def nothing_sent(rig: Rig, tg: FakeTelegram, chat: dict[str, Any] | None = None) -> None:
    """The bot said nothing and made no job; proved by a later command that is answered."""
    before = len(sends(tg))
    tg.message("/help@drawbot", user=tg.user(5, name="Probe"), chat=chat or tg.chat(5))
    await tg.wait_text("/imagine")
    await settle(tg)
    assert len(sends(tg)) == before + 1, [(c.method, c.text) for c in sends(tg)]
    assert await jobs(rig.harness) == []


async def all_jobs_ended_and_told(rig: Rig, tg: FakeTelegram) -> list[tuple[Any, ...]]:
    """Every job is in a final state, and each one's chat heard its outcome."""
    await rig.idle()
    found = await jobs(rig.harness)
    assert {row[1] for row in found} <= FINAL, found
    for job_id, status, *_ in found:

        def told(job: str = job_id, result: bool = status == "succeeded") -> bool:
            # a result carries the job's buttons; any other outcome names the job in a text
            if result:
                return any(job in str(c.params.get("reply_markup")) for c in tg.sent())
            return any(job in (c.text or "") for c in tg.sent())

        await until(told)
    return found


def raw_message(
    tg: FakeTelegram,
    text: str,
    chat: dict[str, Any],
    *,
    sender: dict[str, Any] | None = None,
    sender_chat: dict[str, Any] | None = None,
    key: str = "message",
) -> dict[str, Any]:
    """A message pushed as it is, `from` left out when `sender` is None."""
    msg: dict[str, Any] = {
        "message_id": next(tg._message_ids),
        "date": int(time.time()),
        "chat": chat,
        "text": text,
    }
    if sender is not None:
        msg["from"] = sender
    if sender_chat is not None:
        msg["sender_chat"] = sender_chat
    entities = tg._entities(text)
    if entities:
        msg["entities"] = entities
    tg.messages[(chat["id"], msg["message_id"])] = msg
    tg.push({key: msg})
    return msg


def document(tg: FakeTelegram, data: bytes, name: str, mime: str | None) -> dict[str, Any]:
    doc = {**tg.add_file(data), "file_name": name}
    if mime is not None:
        doc["mime_type"] = mime
    return doc


# ---- prompts: empty, invisible, huge, options ----------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/imagine      ", "Please describe the image"),
        ("/imagine \n\n\t ", "Please describe the image"),
        ("/imagine " + "x" * 10_000, "the limit is 2000"),
        ("/imagine " + "--ar 16:9 " * 400, "Please describe the image"),  # 4000 chars of options
        ("/imagine " + "--foo 1 " * 500, "I don't know the option --foo"),
        ("/imagine a cat --foo", "I don't know the option --foo"),
        ("/imagine a cat --ar", "The option --ar needs a value"),
        ("/imagine a cat --ar --n 2", "The option --ar needs a value"),
        ("/imagine a cat --n=", "The option --n needs a value"),
        ("/imagine a cat --n 0", "--n takes a number from 1 to 10, not 0"),
        ("/imagine a cat --n 1e9", "--n takes a number from 1 to 10, not 1e9"),
        ("/imagine a cat --n -3", "--n takes a number from 1 to 10, not -3"),
        ("/imagine a cat --n 99999999999999999999999", "--n takes a number from 1 to 10"),
        ("/imagine a cat --seed -1", "The seed must be a whole number"),
        ("/imagine a cat --seed 4294967296", "The seed must be a whole number"),
        ("/imagine a cat --seed 0x10", "The seed must be a whole number"),
        ("/imagine a cat --ar 0:0", "--ar takes a ratio like 16:9, not 0:0"),
        ("/imagine a cat --ar 99999:1", "--ar takes a ratio like 16:9, not 99999:1"),
        ("/imagine a cat --ar 16:9:1", "--ar takes a ratio like 16:9"),
        ("/imagine a cat --ar -16:9", "--ar takes a ratio like 16:9"),
        ("/imagine a cat --size 8K", "does not do size 8K"),
        ("/imagine a cat --model ../../etc/passwd", "There is no model called ../../etc/passwd"),
        ("/imagine a cat —foo 1", "I don't know the option --foo"),  # the phone's em dash
        ("/IMAGINE a cat --N 0", "--n takes a number from 1 to 10"),
    ],
    ids=[
        "spaces",
        "newlines-tabs",
        "10000-chars",
        "4000-chars-of-options",
        "4000-chars-of-unknown-options",
        "unknown-option-at-end",
        "option-without-value-at-end",
        "option-followed-by-option",
        "option-equals-nothing",
        "n-0",
        "n-1e9",
        "n-negative",
        "n-huge",
        "seed-minus-1",
        "seed-2-32",
        "seed-hex",
        "ar-0-0",
        "ar-99999-1",
        "ar-three-parts",
        "ar-negative",
        "size-unknown",
        "model-path",
        "em-dash-unknown-option",
        "upper-case",
    ],
)
async def test_bad_prompt_gets_a_short_clear_answer_and_no_job(
    rig: Rig, tg: FakeTelegram, text: str, expected: str
) -> None:
    await rig.start()
    msg = tg.message(text)
    reply = await tg.wait_text(expected)
    assert reply.method == "sendMessage"
    assert reply.params["reply_parameters"]["message_id"] == msg["message_id"]
    assert len(reply.text or "") < SHORT
    await settle(tg)
    assert [c.method for c in sends(tg)] == ["sendMessage"]
    assert rig.harness.provider.calls == [] and await jobs(rig.harness) == []


@pytest.mark.parametrize(
    "text",
    [
        "/imagine \u200b",  # zero-width space
        "/imagine \u200b\u200c\u200d\u2060\ufeff",  # every zero-width character
        "\u200b\u200b\u200b",  # plain text in a private chat
        "/imagine \u3164",  # Hangul filler: looks blank
        "/imagine \u2800\u2800",  # braille blank
        "/imagine \u202e \u202d",  # bidi overrides only
    ],
    ids=["zwsp", "all-zero-width", "plain-zwsp", "hangul-filler", "braille-blank", "bidi-only"],
)
async def test_an_invisible_prompt_is_an_empty_prompt(
    rig: Rig, tg: FakeTelegram, text: str
) -> None:
    # A prompt of only invisible characters (zero-width, direction marks, U+3164, U+2800)
    # was queued and charged: it is an empty prompt now (`bot.commands.clean_prompt`).
    await rig.start()
    tg.message(text)
    reply = await tg.wait_for("sendMessage")
    await settle(tg)
    assert "Please describe the image" in (reply[0].text or "")
    assert rig.harness.provider.calls == [] and await jobs(rig.harness) == []


@pytest.mark.parametrize(
    "text",
    [
        "/imagine a cat --model " + "m" * 3000,
        "/imagine a cat --ar " + "1" * 3000,
        "/imagine a cat --n " + "9" * 3000,
        "/imagine a cat --seed " + "7" * 3000,
        "/imagine a cat --size " + "s" * 3000,
        "/imagine a cat --" + "z" * 3000,
        "/cancel " + "j" * 3000,
        "/show " + "j" * 3000,
    ],
    ids=["model", "ar", "n", "seed", "size", "option-name", "cancel-job", "show-job"],
)
async def test_a_huge_option_value_is_not_echoed_back_in_full(
    rig: Rig, tg: FakeTelegram, text: str
) -> None:
    # An error used to echo a 3,000-character value whole; `render_error` cuts what the user
    # typed to 64 characters.
    await rig.start()
    tg.message(text)
    (reply,) = await tg.wait_for("sendMessage")
    assert len(reply.text or "") < SHORT, len(reply.text or "")
    await settle(tg)
    assert await jobs(rig.harness) == []


async def test_repeated_options_take_the_last_one(rig: Rig, tg: FakeTelegram) -> None:
    await rig.start()
    tg.message("/imagine a cat --n 3 --n 1 --ar 16:9 --ar 1:1")
    await tg.wait_for("sendPhoto")
    ((_, status, *_),) = await all_jobs_ended_and_told(rig, tg)
    (call,) = rig.harness.provider.calls
    assert status == "succeeded" and call.n == 1


async def test_a_mistyped_long_command_in_a_private_chat_is_not_a_prompt(
    rig: Rig, tg: FakeTelegram
) -> None:
    # A slash command name over 32 characters used to fall through to "plain text is a
    # prompt"; it is an unknown command now.
    await rig.start()
    tg.message("/imagine_a_very_long_command_name_that_goes_on a cat")
    reply = (await tg.wait_for("sendMessage"))[0]
    await settle(tg)
    assert "I don't know" in (reply.text or "")
    assert await jobs(rig.harness) == []


# ---- markup in prompts --------------------------------------------------------------------

MARKUP = [
    "<b>bold</b> fox",
    '<a href="tg://user?id=1">click</a> fox',
    "fox &amp; hound &lt;3 &#65; &bogus;",
    "unbalanced <i>fox",
    "closing </code></pre> fox",
    "<tg-spoiler>secret</tg-spoiler> <blockquote>q",
    "*bold* _italic_ `code` [link](http://x.example) ~strike~ ||spoiler||",
    "<script>alert(1)</script> & <<>> fox",
]
MARKUP_IDS = ["b", "a-href", "entities", "unbalanced", "closing", "spoiler", "markdown", "script"]


@pytest.mark.parametrize("prompt", MARKUP, ids=MARKUP_IDS)
async def test_markup_in_a_prompt_shows_as_typed_in_the_caption(
    rig: Rig, tg: FakeTelegram, prompt: str
) -> None:
    await rig.start()
    tg.message(f"/imagine {prompt}")
    (photo,) = await tg.wait_for("sendPhoto")  # the fake refuses captions that do not parse
    assert photo.params["parse_mode"] == "HTML"
    assert parse_html(photo.params["caption"]).startswith(prompt + "\n")
    assert (await all_jobs_ended_and_told(rig, tg))[0][1] == "succeeded"


@pytest.mark.parametrize("prompt", MARKUP[:4], ids=MARKUP_IDS[:4])
async def test_markup_in_an_album_caption_and_in_jobs_is_as_typed(
    rig: Rig, tg: FakeTelegram, prompt: str
) -> None:
    await rig.start()
    tg.message(f"/imagine {prompt} --n 2")
    (album,) = await tg.wait_for("sendMediaGroup")
    first = album.params["media"][0]
    assert first["parse_mode"] == "HTML"
    assert parse_html(first["caption"]).startswith(prompt + "\n")
    await all_jobs_ended_and_told(rig, tg)
    tg.message("/jobs")
    listing = await tg.wait_text("succeeded")
    # plain text (no parse_mode), so what shows is what was typed
    assert listing.params.get("parse_mode") is None
    assert prompt[:30] in (listing.text or "")


async def test_a_prompt_that_is_all_markup_characters_still_fits_the_caption(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start()
    tg.message("/imagine " + "<&>" * 600)  # 1800 characters, 5 times as long escaped
    (photo,) = await tg.wait_for("sendPhoto")
    visible = parse_html(photo.params["caption"])
    assert utf16_len(visible) <= 1024 and visible.startswith("<&><&>")


async def test_markup_in_an_error_answer_is_plain_text(rig: Rig, tg: FakeTelegram) -> None:
    await rig.start()
    tg.message("/imagine a cat --model <b>x</b>&amp;")
    reply = await tg.wait_text("There is no model called")
    assert reply.params.get("parse_mode") is None
    assert "<b>x</b>&amp;" in (reply.text or "")


# ---- groups: who is addressed ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "/imagine@OtherBot a cat",
        "/imagine@drawbot_fan a cat",
        "/help@otherbot",
        "/frobnicate",  # an unknown bare command is some other bot's
        "just chatting, /imagine is cool",
        "a@drawbot.example mail address",
    ],
    ids=["other-bot", "similar-name", "help-other-bot", "unknown-bare", "not-first", "email"],
)
async def test_group_messages_for_others_are_ignored(rig: Rig, tg: FakeTelegram, text: str) -> None:
    await rig.start()
    chat = group_chat(tg)
    tg.message(text, user=tg.user(7, name="Bob"), chat=chat)
    await nothing_sent(rig, tg, chat)


@pytest.mark.parametrize(
    "text",
    ["/imagine@DrawBot a cat", "/IMAGINE@DRAWBOT a cat", "/img@drawbot a cat", "/draw a cat"],
    ids=["mixed-case", "upper-case", "alias", "bare-alias"],
)
async def test_imagine_addressed_to_this_bot_in_a_group_works(
    rig: Rig, tg: FakeTelegram, text: str
) -> None:
    await rig.start()
    tg.message(text, user=tg.user(7), chat=group_chat(tg))
    (photo,) = await tg.wait_for("sendPhoto")
    assert photo.chat_id == GROUP
    assert [r[0] for r in await rows(rig.harness, "SELECT prompt FROM jobs")] == ["a cat"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/imagine@drawbot", "Please describe the image"),
        ("/imagine@drawbot --n 2", "Please describe the image"),
        ("/frobnicate@drawbot", "I don't know /frobnicate"),
        ("@drawbot --foo", "I don't know the option --foo"),
    ],
    ids=["empty", "only-options", "unknown-command", "mention-unknown-option"],
)
async def test_bad_input_addressed_to_this_bot_in_a_group_is_answered(
    rig: Rig, tg: FakeTelegram, text: str, expected: str
) -> None:
    await rig.start()
    msg = tg.message(text, user=tg.user(7), chat=group_chat(tg))
    reply = await tg.wait_text(expected)
    assert reply.chat_id == GROUP
    assert reply.params["reply_parameters"]["message_id"] == msg["message_id"]
    assert await jobs(rig.harness) == []


# ---- updates that are not plain user messages -----------------------------------------------


async def test_an_edited_message_is_ignored_without_an_error(rig: Rig, tg: FakeTelegram) -> None:
    # Telegram sends no edited_message (not in allowed_updates); if one comes it is not a job.
    await rig.start()
    msg = tg.message("/imagine a cat")
    await tg.wait_for("sendPhoto")
    await rig.idle()
    edited = {**msg, "text": "/imagine a dog", "edit_date": int(time.time())}
    tg.push({"edited_message": edited})
    await settle(tg)
    assert len(tg.sent("sendPhoto")) == 1
    assert [r[0] for r in await rows(rig.harness, "SELECT prompt FROM jobs")] == ["a cat"]


async def test_a_channel_post_is_ignored_without_an_error(rig: Rig, tg: FakeTelegram) -> None:
    await rig.start()
    channel = {"id": -100777, "type": "channel", "title": "News"}
    raw_message(tg, "/imagine a cat", channel, sender_chat=channel, key="channel_post")
    raw_message(tg, "/imagine a cat", channel, sender_chat=channel, key="edited_channel_post")
    await nothing_sent(rig, tg)


@pytest.mark.parametrize(
    "who",
    ["anonymous-admin", "as-channel", "no-from"],
)
async def test_imagine_from_a_group_identity_without_a_user_is_answered(
    rig: Rig, tg: FakeTelegram, who: str
) -> None:
    # An anonymous group admin (from @GroupAnonymousBot), a member posting as a channel, or a
    # message with only sender_chat was dropped in silence; it is served as that chat now.
    await rig.start()
    chat = group_chat(tg)
    channel = {"id": -100555, "type": "channel", "title": "My channel"}
    sender = {"anonymous-admin": ANON_ADMIN, "as-channel": CHANNEL_BOT, "no-from": None}[who]
    sender_chat = chat if who == "anonymous-admin" else channel
    raw_message(tg, "/imagine@drawbot a cat", chat, sender=sender, sender_chat=sender_chat)
    reply = (
        await tg.wait_for(lambda c: c.method == "sendMessage" and c.chat_id == GROUP, within=3)
    )[0]
    assert len(reply.text or "") < SHORT
    await all_jobs_ended_and_told(rig, tg)


async def test_another_bots_message_is_ignored(rig: Rig, tg: FakeTelegram) -> None:
    await rig.start()
    chat = group_chat(tg)
    other = {"id": 555, "is_bot": True, "first_name": "Other", "username": "otherbot"}
    raw_message(tg, "/imagine@drawbot a cat", chat, sender=other)
    await nothing_sent(rig, tg, chat)


async def test_a_forwarded_prompt_in_a_private_chat_is_a_prompt(rig: Rig, tg: FakeTelegram) -> None:
    await rig.start()
    origin = {"type": "user", "date": int(time.time()), "sender_user": tg.user(8, name="Eve")}
    tg.message("a forwarded fox", extra={"forward_origin": origin})
    await tg.wait_for("sendPhoto")
    assert (await all_jobs_ended_and_told(rig, tg))[0][1] == "succeeded"


async def test_the_bots_own_result_forwarded_back_does_not_feed_its_caption_as_the_prompt(
    rig: Rig, tg: FakeTelegram
) -> None:
    # Forwarding one of the bot's results back used to start a job whose prompt was its own
    # caption ("a red kite demo · job …"); a forwarded photo gets a hint now.
    await rig.start()
    chat = group_chat(tg)
    tg.message("/imagine a red kite", user=tg.user(ALICE), chat=chat)
    (photo,) = await tg.wait_for("sendPhoto")
    await rig.idle()
    origin = {"type": "chat", "date": int(time.time()), "sender_chat": chat}
    result = photo.result
    tg.message(
        extra={
            "forward_origin": origin,
            "photo": result["photo"],
            "caption": result["caption"],
        }
    )
    await settle(tg, 0.5)
    await rig.idle()
    prompts = [r[0] for r in await rows(rig.harness, "SELECT prompt FROM jobs ORDER BY rowid")]
    assert not [p for p in prompts[1:] if "job " in p], prompts


async def test_a_reply_to_the_bots_status_in_a_group_is_a_prompt(
    rig: Rig, tg: FakeTelegram
) -> None:
    # Passes, by the documented rule "replies to the bot count": a "thanks!" to the bot's
    # "✅ Done" in a group is a new (charged) job with the prompt "thanks!".
    await rig.start()
    chat = group_chat(tg)
    tg.message("/imagine a red kite", user=tg.user(7), chat=chat)
    await tg.wait_for("sendPhoto")
    (status,) = [c for c in tg.calls if is_status(c)]
    tg.message("thanks!", user=tg.user(7), chat=chat, reply_to=status.result)
    await tg.wait_for("sendPhoto", count=2)
    found = await all_jobs_ended_and_told(rig, tg)
    prompts = [r[0] for r in await rows(rig.harness, "SELECT prompt FROM jobs ORDER BY rowid")]
    assert prompts == ["a red kite", "thanks!"] and len(found) == 2


async def test_a_service_message_in_a_group_is_ignored(rig: Rig, tg: FakeTelegram) -> None:
    await rig.start()
    chat = group_chat(tg)
    members = [tg.user(9, name="Newcomer")]
    tg.message(user=tg.user(9), chat=chat, extra={"new_chat_members": members})
    tg.message(
        user=tg.user(9),
        chat=chat,
        extra={"pinned_message": {"message_id": 1, "date": 0, "chat": chat}},
    )
    await nothing_sent(rig, tg, chat)


# ---- attachments ---------------------------------------------------------------------------

STICKER = {
    "file_id": "s1",
    "file_unique_id": "us1",
    "type": "regular",
    "width": 512,
    "height": 512,
    "is_animated": False,
    "is_video": False,
}


@pytest.mark.parametrize(
    "extra",
    [
        {"sticker": STICKER},
        {"voice": {"file_id": "v1", "file_unique_id": "uv1", "duration": 3}},
        {"video_note": {"file_id": "n1", "file_unique_id": "un1", "length": 240, "duration": 2}},
        {"location": {"latitude": 51.5, "longitude": -0.1}},
        {"contact": {"phone_number": "+100", "first_name": "Zed"}},
        {"dice": {"emoji": "🎲", "value": 3}},
    ],
    ids=["sticker", "voice", "video-note", "location", "contact", "dice"],
)
async def test_a_non_text_message_in_private_gets_a_hint(
    rig: Rig, tg: FakeTelegram, extra: dict[str, Any]
) -> None:
    await rig.start()
    tg.message(extra=extra)
    reply = await tg.wait_text("I read text and photos")
    assert len(reply.text or "") < SHORT
    await settle(tg)
    assert await jobs(rig.harness) == []


@pytest.mark.parametrize(
    "extra",
    [{"sticker": STICKER}, {"voice": {"file_id": "v1", "file_unique_id": "uv1", "duration": 3}}],
    ids=["sticker", "voice"],
)
async def test_a_non_text_message_in_a_group_is_ignored(
    rig: Rig, tg: FakeTelegram, extra: dict[str, Any]
) -> None:
    await rig.start()
    chat = group_chat(tg)
    tg.message(user=tg.user(7), chat=chat, extra=extra)
    await nothing_sent(rig, tg, chat)


async def test_a_png_sent_as_a_file_with_a_caption_is_the_reference(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start()
    picture = png_bytes(40, 30)
    doc = document(tg, picture, "sketch.png", "image/png")
    tg.message(caption="as a watercolor", extra={"document": doc})
    await tg.wait_for("sendPhoto")
    (call,) = rig.harness.provider.calls
    assert call.prompt == "as a watercolor" and call.reference_images == (picture,)


async def test_an_image_file_without_a_caption_asks_for_one(rig: Rig, tg: FakeTelegram) -> None:
    await rig.start()
    doc = document(tg, png_bytes(40, 30), "sketch.png", "image/png")
    tg.message(extra={"document": doc})
    await tg.wait_text("Add a caption")
    await settle(tg)
    assert await jobs(rig.harness) == []


async def test_a_non_image_file_without_a_caption_gets_a_hint(rig: Rig, tg: FakeTelegram) -> None:
    await rig.start()
    doc = document(tg, b"%PDF-1.4 not an image", "report.pdf", "application/pdf")
    tg.message(extra={"document": doc})
    await tg.wait_text("I read text and photos")
    await settle(tg)
    assert await jobs(rig.harness) == [] and not tg.sent("getFile")


async def test_a_non_image_file_with_a_caption_is_not_silently_dropped(
    rig: Rig, tg: FakeTelegram
) -> None:
    # A PDF with the caption "make this prettier" used to become a text-only job, the file
    # silently ignored; it is refused now, with what the bot can use.
    await rig.start()
    doc = document(tg, b"%PDF-1.4 not an image", "report.pdf", "application/pdf")
    tg.message(caption="make this prettier", extra={"document": doc})
    reply = (await tg.wait_for("sendMessage"))[0]
    await settle(tg)
    assert not tg.sent("sendPhoto") and await jobs(rig.harness) == []
    assert "image" in (reply.text or "").lower() and len(reply.text or "") < SHORT


async def test_a_file_that_says_image_but_is_not_one_is_refused_clearly(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start()
    doc = document(tg, b"GIF89a-but-really-garbage" * 10, "fake.png", "image/png")
    tg.message(caption="as a watercolor", extra={"document": doc})
    reply = await tg.wait_text("not a PNG, JPEG or WebP")
    assert len(reply.text or "") < SHORT
    await settle(tg)
    assert rig.harness.provider.calls == []
    for row in await jobs(rig.harness):  # refused at submit, or a job that ended and said so
        assert row[1] in FINAL and row[2] == 0


@pytest.mark.parametrize("caption", ["", "   ", "\n"], ids=["empty", "spaces", "newline"])
async def test_a_photo_with_a_blank_caption_asks_for_one(
    rig: Rig, tg: FakeTelegram, caption: str
) -> None:
    await rig.start()
    tg.message(photo=png_bytes(), caption=caption)
    reply = await tg.wait_text("Add a caption")
    assert len(reply.text or "") < SHORT
    await settle(tg)
    assert await jobs(rig.harness) == [] and not tg.sent("getFile")


async def test_a_photo_with_only_options_as_caption_asks_for_a_prompt(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start()
    tg.message(photo=png_bytes(), caption="--ar 16:9")
    await tg.wait_text("Please describe the image")
    await settle(tg)
    assert await jobs(rig.harness) == [] and not tg.sent("getFile")


async def test_a_photo_with_a_bad_option_is_refused_before_any_download(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start()
    tg.message(photo=png_bytes(), caption="as a poster --n 99")
    await tg.wait_text("--n takes a number")
    await settle(tg)
    assert not tg.sent("getFile") and await jobs(rig.harness) == []


async def test_a_captioned_photo_in_a_group_needs_the_bot_addressed(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start()
    chat = group_chat(tg)
    picture = png_bytes(20, 20)
    tg.message(user=tg.user(7), chat=chat, photo=picture, caption="my holiday")
    await nothing_sent(rig, tg, chat)
    tg.message(user=tg.user(7), chat=chat, photo=picture, caption="/imagine@drawbot as a poster")
    await tg.wait_for("sendPhoto")
    (call,) = rig.harness.provider.calls
    assert call.prompt == "as a poster" and call.reference_images == (picture,)


async def test_a_reply_to_the_bots_result_with_a_new_prompt_reuses_the_image(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start()
    tg.message("a red kite")
    (photo,) = await tg.wait_for("sendPhoto")
    tg.message("now at night --ar 16:9", reply_to=photo.result)
    second = (await tg.wait_for("sendPhoto", count=2))[1]
    assert second.params["reply_parameters"]["message_id"] != photo.result["message_id"]
    calls = rig.harness.provider.calls
    assert calls[1].prompt == "now at night"
    assert calls[1].reference_images == (photo.files["photo"].data,)
    assert {r[1] for r in await all_jobs_ended_and_told(rig, tg)} == {"succeeded"}


async def test_a_reply_to_a_sticker_with_imagine_has_no_reference(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start()
    chat = group_chat(tg)
    sticker = tg.message(user=tg.user(8), chat=chat, extra={"sticker": STICKER})
    tg.message("/imagine a cat", user=tg.user(7), chat=chat, reply_to=sticker)
    await tg.wait_for("sendPhoto")
    (call,) = rig.harness.provider.calls
    assert call.reference_images == ()


async def test_a_reference_that_vanished_from_telegram_is_answered(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start()
    sizes = tg.photo_sizes(png_bytes())
    tg.files.pop(sizes[-1]["file_id"])  # getFile: "invalid file_id"
    tg.message(caption="as a watercolor", extra={"photo": sizes})
    reply = await tg.wait_text("could not fetch that image")
    assert len(reply.text or "") < SHORT
    await settle(tg)
    assert await jobs(rig.harness) == []


# ---- spam ------------------------------------------------------------------------------------


async def test_30_imagines_in_a_second_are_all_answered_and_every_job_ends(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start()  # MAX_PENDING_PER_USER = 3
    start = time.monotonic()
    for i in range(30):
        tg.message(f"/imagine spam fox {i}")
    assert time.monotonic() - start < 1

    def refused() -> int:
        total = 0
        for call in tg.sent("sendMessage"):
            for part in (call.text or "").split("\n\n"):
                if "You already have 3 jobs waiting" in part:
                    m = re.search(r"\(×(\d+)\)$", part)
                    total += int(m[1]) if m else 1
        return total

    def acked() -> int:
        return len({m for c in tg.sent() for m in re.findall(r"job (\w+)", c.text or "")})

    await until(lambda: refused() + acked() == 30, within=15)
    found = await all_jobs_ended_and_told(rig, tg)
    assert 3 <= len(found) == acked()
    # coalesced: far fewer messages than commands, and no flood errors
    assert len(tg.sent("sendMessage")) <= 15
    assert not [c for c in tg.calls if c.error is not None and c.error.code == 429]


async def test_30_garbage_commands_in_a_second_are_answered_in_few_messages(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start()
    for i in range(30):
        tg.message(f"/imagine cat --bogus{i % 3} 1")
    await until(
        lambda: (
            sum(
                (c.text or "").count("I don't know the option")
                + sum(int(x) - 1 for x in re.findall(r"×(\d+)", c.text or ""))
                for c in tg.sent("sendMessage")
            )
            >= 30
        ),
        within=15,
    )
    assert len(tg.sent("sendMessage")) <= 10
    assert all(len(c.text or "") < 1000 for c in tg.sent("sendMessage"))


async def test_30_users_with_hostile_prompts_at_once_crash_nothing(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start()
    bad = ["", "--n 0", "--ar 0:0", "<b>", "x" * 3000, "--foo", "a --seed -1", "ok fox"]
    for i in range(30):
        tg.message(f"/imagine {bad[i % len(bad)]}", user=tg.user(3000 + i), chat=tg.chat(3000 + i))
    await until(lambda: {c.chat_id for c in tg.sent()} >= {3000 + i for i in range(30)}, within=15)
    found = await all_jobs_ended_and_told(rig, tg)
    assert len(found) == 7  # "<b>" four times and "ok fox" three: the rest were answered


# ---- buttons ---------------------------------------------------------------------------------


async def _result(rig: Rig, tg: FakeTelegram, text: str = "a crisp mountain") -> Call:
    await rig.start()
    tg.message(text)
    (photo,) = await tg.wait_for("sendPhoto")
    await rig.idle()
    return photo


@pytest.mark.parametrize(
    "data",
    ["garbage", ":", "xx:yy:zz", "rr:", "of:", "rr:" + "f" * 61, "of:../../etc", "rr:🦊🦊"],
    ids=[
        "no-colon",
        "colon",
        "unknown-action",
        "rr-empty",
        "of-empty",
        "rr-long",
        "of-path",
        "rr-emoji",
    ],
)
async def test_a_button_with_garbage_data_is_answered_without_an_error(
    rig: Rig, tg: FakeTelegram, data: str
) -> None:
    photo = await _result(rig, tg)
    query = tg.callback(data, photo.result)
    await until(lambda: query in tg.callback_answers)
    answer = tg.callback_answers[query]
    assert len(str(answer.get("text") or "")) <= 200
    await settle(tg)
    assert len(await jobs(rig.harness)) == 1 and len(tg.sent("sendPhoto")) == 1


async def test_cx_with_no_job_id_does_not_cancel_anything(
    rig: Rig, tg: FakeTelegram, provider: ShapedProvider
) -> None:
    # Forged data "cx:" reaches engine.cancel(user, "") — falsy, so "your latest job"?
    provider.gate = asyncio.Event()
    await rig.start()
    tg.message("a slow heron")
    (status,) = await tg.wait_for(is_status)
    query = tg.callback("cx:", status.result)
    await until(lambda: query in tg.callback_answers)
    provider.gate.set()
    found = await all_jobs_ended_and_told(rig, tg)
    assert [r[1] for r in found] == ["succeeded"]


async def test_a_button_on_an_old_inaccessible_message_still_works(
    rig: Rig, tg: FakeTelegram
) -> None:
    photo = await _result(rig, tg)
    old = {"chat": {"id": ALICE, "type": "private"}, "message_id": 1, "date": 0}
    query = tg.callback(f"rr:{button(photo, 'rr:')}", old)
    await until(lambda: query in tg.callback_answers)
    await tg.wait_for("sendPhoto", count=2)
    assert {r[1] for r in await all_jobs_ended_and_told(rig, tg)} == {"succeeded"}


async def test_someone_elses_button_from_another_chat_reaches_nothing(
    rig: Rig, tg: FakeTelegram
) -> None:
    photo = await _result(rig, tg)
    job_id = button(photo, "rr:")
    mallory = tg.user(666, name="Mallory")
    elsewhere = {**photo.result, "chat": {"id": 666, "type": "private"}}
    for data in (f"rr:{job_id}", f"of:{job_id}", f"cx:{job_id}"):
        query = tg.callback(data, elsewhere, user=mallory)
        await until(lambda: query in tg.callback_answers)  # noqa: B023 (awaited at once)
        answer = tg.callback_answers[query]
        assert answer.get("show_alert") is True and "No job" in answer["text"]
    await settle(tg)
    assert len(await jobs(rig.harness)) == 1 and not tg.sent("sendDocument")


async def test_cancel_on_a_finished_job_says_so(rig: Rig, tg: FakeTelegram) -> None:
    photo = await _result(rig, tg)
    query = tg.callback(f"cx:{button(photo, 'rr:')}", photo.result)
    await until(lambda: query in tg.callback_answers)
    answer = tg.callback_answers[query]
    assert answer.get("show_alert") is True and answer.get("text")


async def test_a_button_pressed_twice_at_once_rerolls_once_per_press(
    rig: Rig, tg: FakeTelegram
) -> None:
    photo = await _result(rig, tg)
    job_id = button(photo, "rr:")
    queries = [tg.callback(f"rr:{job_id}", photo.result) for _ in range(5)]
    await until(lambda: all(q in tg.callback_answers for q in queries))
    found = await all_jobs_ended_and_told(rig, tg)
    # every press was answered; pending limit 3 caps how many new jobs one impatient user gets
    assert 2 <= len(found) <= 1 + 5
    assert {r[1] for r in found} == {"succeeded"}


async def test_a_button_press_with_no_message_is_answered(rig: Rig, tg: FakeTelegram) -> None:
    photo = await _result(rig, tg)
    query_id = "cbq-inline"
    tg.push(
        {
            "callback_query": {
                "id": query_id,
                "from": tg.user(),
                "chat_instance": "ci1",
                "inline_message_id": "AAAA",
                "data": f"of:{button(photo, 'of:')}",
            }
        }
    )
    await until(lambda: query_id in tg.callback_answers)


# ---- the console chat -----------------------------------------------------------------------


async def converse(harness: Harness, lines: list[str]) -> str:
    engine = await harness.engine()
    out = io.StringIO()
    console = ConsoleAdapter(
        engine, stdin=io.StringIO("".join(f"{line}\n" for line in lines)), stdout=out, user="u"
    )
    await console.open()
    await console.start()
    await asyncio.wait_for(console.finished.wait(), 15)
    await console.stop_intake()
    return out.getvalue()


async def test_console_answers_hostile_lines_and_keeps_going(harness: Harness) -> None:
    lines = [
        "",
        "   ",
        "/imagine",
        "/imagine " + "x" * 10_000,
        "/imagine cat --foo",
        "/imagine cat --n 0",
        "/imagine cat --ar 0:0",
        "/imagine cat --seed -1",
        "/imagine cat --ar",
        "/bogus",
        "/cancel nope",
        "/show",
        "/link WRONG",
        "/grant someone 5",
        "/imagine <b>fox</b> & \x1b[31mred",
    ]
    out = await converse(harness, lines)
    for expected in [
        "Please describe the image",
        "the limit is 2000",
        "I don't know the option --foo",
        "--n takes a number from 1 to 10, not 0",
        "--ar takes a ratio like 16:9, not 0:0",
        "The seed must be a whole number",
        "The option --ar needs a value",
        "I don't know /bogus",
        "No job nope",
        "Which job?",
        "link code is wrong",
        "Only the bot's admins",
    ]:
        assert expected in out, (expected, out)
    assert "x" * 100 not in out
    assert len(harness.provider.calls) == 1  # only the last line made a job
    assert out.rstrip().count("\n") < 60


async def test_console_invisible_prompt_is_an_empty_prompt(harness: Harness) -> None:
    # As on Telegram: a line of zero-width spaces is an empty prompt.
    out = await converse(harness, ["\u200b\u200b", "/imagine \u2060"])
    assert harness.provider.calls == []
    assert out.count("Please describe the image") == 2


async def test_console_huge_option_value_is_not_echoed_in_full(harness: Harness) -> None:
    # As on Telegram: the value comes back cut short.
    out = await converse(harness, ["/imagine cat --model " + "m" * 3000])
    assert "There is no model called" in out
    assert "m" * 200 not in out
