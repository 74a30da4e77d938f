"""The Telegram adapter end to end: the real python-telegram-bot over HTTP against a fake Bot API.

Every test starts a real engine (on a temp data dir, with a scripted provider) and a real
`TelegramAdapter` polling the loopback fake, pushes updates in as Telegram would, and asserts on
what the fake received: the calls, their text, their files, and the rows in SQLite.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image
from telegram.ext import AIORateLimiter

from adapters.telegram_adapter import TelegramAdapter
from adapters.telegram_send import utf16_prefix
from bot.app import open_core, serve
from bot.cli import telegram_webhook
from bot.engine import Engine
from bot.errors import Refused, SettingsError
from bot.jobs import GeneratedImage
from bot.providers.base import GenerationRequest, JobHooks
from bot.settings import load_settings
from tests.conftest import Harness
from tests.fake_telegram import NOT_MODIFIED, Call, FakeTelegram, utf16_len
from tests.fakes import ScriptedProvider, png_bytes

GROUP = -100123
ALICE = 42


def png(width: int, height: int, *, stored: bool = False) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 120, 200)).save(
        buf, "PNG", compress_level=0 if stored else 6
    )
    return buf.getvalue()


class ShapedProvider(ScriptedProvider):
    """The scripted provider, with images of a chosen size when `shape` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.shape: tuple[int, int] | None = None
        self.stored = False  # uncompressed PNG: as many bytes as pixels × 3

    async def generate(self, request: GenerationRequest, hooks: JobHooks) -> list[GeneratedImage]:
        images = await super().generate(request, hooks)
        if self.shape is None:
            return images
        w, h = self.shape
        data = png(w, h, stored=self.stored)
        return [GeneratedImage(data, "image/png", w, h) for _ in images]


@pytest.fixture(autouse=True)
def _ptb_timedelta(monkeypatch: pytest.MonkeyPatch) -> None:
    # PTB 22 warns on every RetryAfter unless it may hand out timedeltas already.
    monkeypatch.setenv("PTB_TIMEDELTA", "true")


@pytest.fixture
async def tg() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as fake:
        yield fake


@pytest.fixture
def provider(harness: Harness) -> ShapedProvider:
    harness.provider = ShapedProvider()
    return harness.provider


class Rig:
    """Starts engines and adapters the way `bot.app.serve` does, and stops them in reverse."""

    def __init__(self, harness: Harness, fake: FakeTelegram) -> None:
        self.harness = harness
        self.fake = fake
        self.running: list[tuple[Engine, TelegramAdapter]] = []

    async def start(
        self, adapter_options: dict[str, Any] | None = None, **config: object
    ) -> tuple[Engine, TelegramAdapter]:
        engine = await self.harness.engine(start=False, **config)
        options: dict[str, Any] = {"poll_timeout": 1, "edit_interval": 0.2, "action_interval": 0.2}
        options.update(adapter_options or {})
        adapter = TelegramAdapter(engine, self.fake.token, self.fake.url, **options)
        await adapter.open()
        await engine.start()
        await adapter.start()
        self.running.append((engine, adapter))
        return engine, adapter

    async def idle(self) -> None:
        """Wait until every engine has finished and recorded its jobs."""
        for engine, _ in self.running:
            await engine.run_until_idle()

    async def stop(self, engine: Engine, adapter: TelegramAdapter) -> None:
        self.running.remove((engine, adapter))
        await adapter.stop_intake()
        await engine.close()
        await adapter.close()
        assert list(adapter.errors) == []


@pytest.fixture
async def rig(harness: Harness, tg: FakeTelegram, provider: ShapedProvider) -> AsyncIterator[Rig]:
    r = Rig(harness, tg)
    yield r
    if provider.gate is not None:
        provider.gate.set()
    for engine, adapter in reversed(list(r.running)):
        await r.stop(engine, adapter)


async def rows(h: Harness, sql: str) -> list[tuple[Any, ...]]:
    async with aiosqlite.connect(h.data_dir / "drawbridge.db") as db:
        return [tuple(r) for r in await db.execute_fetchall(sql)]


async def jobs(h: Harness) -> list[tuple[Any, ...]]:
    return await rows(
        h,
        "SELECT id, status, cost_usd, chat_id, thread_id, delivery_ref, parent_id "
        "FROM jobs ORDER BY created_at, rowid",
    )


async def until(condition: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def button(call: Call, prefix: str) -> str:
    """The job id in the call's button whose callback data starts with `prefix`."""
    return next(d for _, d in call.buttons() if d.startswith(prefix)).split(":", 1)[1]


def is_status(c: Call) -> bool:
    return c.method == "sendMessage" and any(d.startswith("cx:") for _, d in c.buttons())


def group_chat(tg: FakeTelegram, forum: bool = False) -> dict[str, Any]:
    return tg.chat(GROUP, "supergroup", forum=forum)


# ---- the basic flow ----------------------------------------------------------------------


async def test_private_text_is_a_prompt_and_the_photo_replies_to_it(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start()
    msg = tg.message("a fox in the snow --model paid --seed 7")
    (photo,) = await tg.wait_for("sendPhoto")
    assert photo.chat_id == ALICE
    assert photo.params["reply_parameters"]["message_id"] == msg["message_id"]
    assert photo.files["photo"].data.startswith(b"\x89PNG")
    job_id = button(photo, "rr:")
    assert photo.text == f"a fox in the snow\npaid · seed 7 · job {job_id}"
    assert button(photo, "of:") == job_id
    (status,) = [c for c in tg.calls if is_status(c)]
    assert status.text == f"🕒 Queued #1 · paid ×1 · $0.50 · job {job_id}"  # charged if it works
    assert status.params["reply_parameters"]["message_id"] == msg["message_id"]
    # once the result is out, the status message says so (and loses its cancel button)
    (done,) = await tg.wait_for(lambda c: c.method == "editMessageText")
    assert done.params["message_id"] == status.result["message_id"]
    assert done.text == f"✅ Done · job {job_id}" and done.buttons() == []
    await rig.idle()
    ((row_id, status_, cost, chat, thread, ref, _),) = await jobs(rig.harness)
    assert (row_id, status_, cost, chat, thread) == (job_id, "succeeded", 0.5, "42", None)
    assert ref == str(photo.result["message_id"])


async def test_start_registers_the_command_menu_in_english_and_chinese(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start()
    menus = {c.params.get("language_code"): c.params["commands"] for c in tg.sent("setMyCommands")}
    assert set(menus) == {None, "zh"}
    assert [c["command"] for c in menus[None]][:3] == ["imagine", "usage", "jobs"]
    assert "今天" in menus["zh"][1]["description"]
    assert tg.methods()[:2] == ["getMe", "setMyCommands"]
    assert "deleteWebhook" in tg.methods()


async def test_several_images_are_an_album_then_a_message_with_the_buttons(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start()
    msg = tg.message("/imagine two foxes --n 3 --ar 16:9")
    (album,) = await tg.wait_for("sendMediaGroup")
    media = album.params["media"]
    assert [m["type"] for m in media] == ["photo"] * 3
    assert len(album.files) == 3 and "two foxes" in media[0]["caption"]
    assert "caption" not in media[1]
    assert album.params["reply_parameters"]["message_id"] == msg["message_id"]
    (buttons,) = await tg.wait_for(lambda c: c.method == "sendMessage" and "rr:" in str(c.params))
    first = album.result[0]["message_id"]
    assert buttons.params["reply_parameters"]["message_id"] == first
    assert "3 images" in (buttons.text or "")
    await rig.idle()
    ((_, status, _, _, _, ref, _),) = await jobs(rig.harness)
    ids = [m["message_id"] for m in album.result] + [buttons.result["message_id"]]
    assert status == "succeeded" and ref == ",".join(map(str, ids))


async def test_status_is_edited_in_place_with_the_upload_photo_action(
    rig: Rig, tg: FakeTelegram, provider: ShapedProvider
) -> None:
    provider.gate = asyncio.Event()
    await rig.start()
    tg.message("a slow lighthouse")
    (status,) = await tg.wait_for(is_status)
    status_id = status.result["message_id"]
    (edit,) = await tg.wait_for("editMessageText")
    assert edit.params["message_id"] == status_id and "Generating" in (edit.text or "")
    assert button(edit, "cx:") == button(status, "cx:")  # cancel stays while it runs
    action = (await tg.wait_for("sendChatAction"))[0]
    assert action.params == {"chat_id": ALICE, "action": "upload_photo"}
    provider.gate.set()
    await tg.wait_for("sendPhoto")
    await tg.wait_text("✅ Done")
    assert all(c.ok for c in tg.calls), [c.error for c in tg.calls if not c.ok]


async def test_progress_edits_are_coalesced_and_stale_ones_dropped(
    rig: Rig, tg: FakeTelegram, provider: ShapedProvider
) -> None:
    provider.gate = asyncio.Event()
    provider.progress_steps = list(range(5, 100, 5))  # 19 reports within a millisecond
    await rig.start()
    tg.message("a busy harbour")
    await tg.wait_for(lambda c: c.method == "editMessageText" and "95%" in (c.text or ""))
    edits = tg.sent("editMessageText")
    assert len(edits) <= 2  # "generating" at most once, then straight to the newest percent
    gaps = [b.at - a.at for a, b in itertools.pairwise(edits)]
    assert all(gap >= 0.19 for gap in gaps)
    provider.gate.set()
    await tg.wait_for("sendPhoto")


async def test_a_failed_job_says_why_and_that_it_was_not_charged(
    rig: Rig, tg: FakeTelegram, provider: ShapedProvider
) -> None:
    provider.errors["something forbidden"] = [Refused("no")]
    await rig.start()
    tg.message("something forbidden --model paid")
    edit = await tg.wait_text("refused")
    ((job_id, status, cost, *_),) = await jobs(rig.harness)
    assert (status, cost) == ("refused", 0)
    assert not tg.sent("sendPhoto")
    # As on Discord, an end without a result offers a new try (a new seed) with one press.
    assert "not charged" in (edit.text or "") and edit.buttons() == [("🔄 Reroll", f"rr:{job_id}")]
    query = tg.callback(f"rr:{job_id}", edit.result)
    await tg.wait_for("sendPhoto")
    await until(lambda: query in tg.callback_answers)
    assert "Rerolling as job" in tg.callback_answers[query]["text"]


# ---- groups, topics, languages -----------------------------------------------------------


async def test_in_groups_only_imagine_mentions_and_replies_to_the_bot_count(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start()
    chat = group_chat(tg)
    bob = tg.user(7, name="Bob")
    tg.message("just chatting about foxes", user=bob, chat=chat)
    tg.message("/imagine@otherbot a cat", user=bob, chat=chat)
    first = tg.message("/imagine@drawbot a red kite", user=bob, chat=chat)
    (photo,) = await tg.wait_for("sendPhoto")
    assert photo.chat_id == GROUP
    assert photo.params["reply_parameters"]["message_id"] == first["message_id"]
    tg.message("hey @drawbot a blue heron", user=bob, chat=chat)
    await tg.wait_for("sendPhoto", count=2)
    tg.message("now in the rain", user=bob, chat=chat, reply_to=photo.result)
    await tg.wait_for("sendPhoto", count=3)
    prompts = [r[0] for r in await rows(rig.harness, "SELECT prompt FROM jobs ORDER BY rowid")]
    assert prompts == ["a red kite", "hey a blue heron", "now in the rain"]
    # the reply to the bot's photo made that photo the reference image
    refs = [c.reference_images for c in rig.harness.provider.calls]
    assert refs[2] == (photo.files["photo"].data,) and refs[0] == refs[1] == ()


async def test_only_the_bots_mention_is_cut_from_the_prompt(rig: Rig, tg: FakeTelegram) -> None:
    # Entity offsets count UTF-16 units: the emoji before the mention counts two.
    await rig.start()
    tg.message(
        "🦊🦊 @DrawBot foxes for @drawbotfans @drawbot", user=tg.user(7), chat=group_chat(tg)
    )
    await tg.wait_for("sendPhoto")
    prompts = [r[0] for r in await rows(rig.harness, "SELECT prompt FROM jobs")]
    assert prompts == ["🦊🦊 foxes for @drawbotfans"]


@pytest.mark.parametrize(("units", "kept"), [(0, ""), (1, ""), (2, "🦊"), (3, "🦊a"), (4, "🦊a")])
def test_a_text_is_cut_by_the_utf16_units_telegram_counts(units: int, kept: str) -> None:
    assert utf16_prefix("🦊a🦊", units) == kept
    assert utf16_prefix("🦊a🦊", 5) == "🦊a🦊"


async def test_a_bare_mention_in_a_group_asks_for_a_prompt(rig: Rig, tg: FakeTelegram) -> None:
    await rig.start()
    tg.message("@drawbot", user=tg.user(7), chat=group_chat(tg))
    await tg.wait_text("Please describe the image")
    assert await jobs(rig.harness) == []


async def test_a_forum_topic_keeps_its_thread(rig: Rig, tg: FakeTelegram) -> None:
    await rig.start()
    chat = group_chat(tg, forum=True)
    tg.message("/imagine a quiet library", user=tg.user(7), chat=chat, thread_id=77)
    (photo,) = await tg.wait_for("sendPhoto")
    (status,) = [c for c in tg.calls if is_status(c)]
    assert photo.params["message_thread_id"] == 77 == status.params["message_thread_id"]
    ((_, _, _, chat_id, thread, _, _),) = await jobs(rig.harness)
    assert (chat_id, thread) == (str(GROUP), "77")


async def test_a_chinese_user_is_answered_in_chinese(rig: Rig, tg: FakeTelegram) -> None:
    await rig.start()
    tg.message("雪中的狐狸", user=tg.user(ALICE, lang="zh-hans"))
    (photo,) = await tg.wait_for("sendPhoto")
    (status,) = [c for c in tg.calls if is_status(c)]
    assert (status.text or "").startswith("🕒 排队第 1 位")
    assert "任务" in (photo.text or "") and photo.buttons()[0][0] == "🔄 重新生成"


# ---- reference images --------------------------------------------------------------------


async def test_a_photo_with_a_caption_is_a_reference_image(rig: Rig, tg: FakeTelegram) -> None:
    await rig.start()
    picture = png_bytes(64, 48)
    tg.message(photo=picture, caption="as a watercolor")
    await tg.wait_for("sendPhoto")
    (get_file,) = tg.sent("getFile")
    assert get_file.params["file_id"] == tg.messages[(ALICE, 100)]["photo"][-1]["file_id"]
    (call,) = rig.harness.provider.calls
    assert call.prompt == "as a watercolor" and call.reference_images == (picture,)


async def test_a_slow_reference_download_does_not_hold_other_users_commands(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start({"intake_wait": 30.0})
    asked, released = asyncio.Event(), asyncio.Event()
    serve_get_file = tg._m_getFile

    async def slow_get_file(p: dict[str, Any], f: dict[str, Any]) -> Any:
        asked.set()
        await released.wait()
        return await serve_get_file(p, f)

    tg._m_getFile = slow_get_file  # type: ignore[method-assign]
    tg.message(photo=png_bytes(64, 48), caption="as a watercolor")
    await asyncio.wait_for(asked.wait(), 10)  # the photo's handler is fetching its reference
    tg.message("/imagine a lighthouse", user=tg.user(7), chat=tg.chat(7))
    # Taken by the next poll, which does not wait for the download (with the gate's 30 s it would).
    await tg.wait_for("sendPhoto", within=10)
    assert [c.chat_id for c in tg.sent("sendPhoto")] == [7]
    released.set()
    await until(lambda: len(tg.sent("sendPhoto")) == 2, within=10)


async def test_imagine_replying_to_a_photo_uses_that_photo(rig: Rig, tg: FakeTelegram) -> None:
    await rig.start()
    chat = group_chat(tg)
    picture = png_bytes(32, 32, color=(1, 2, 3))
    posted = tg.message(user=tg.user(8), chat=chat, photo=picture)
    tg.message("/imagine as a poster", user=tg.user(7), chat=chat, reply_to=posted)
    await tg.wait_for("sendPhoto")
    (call,) = rig.harness.provider.calls
    assert call.reference_images == (picture,)


async def test_an_oversized_reference_is_refused_before_any_download(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start()
    # a photo Telegram says is 15 MB: too big to fetch as a reference
    msg_photo = tg.photo_sizes(png_bytes(), file_size=15_000_000)
    tg.message(caption="make it bigger", extra={"photo": msg_photo})
    reply = await tg.wait_text("too large")
    assert "10 MB" in (reply.text or "")
    assert not tg.sent("getFile") and rig.harness.provider.calls == []


async def test_a_strangers_photo_is_refused_before_any_download(rig: Rig, tg: FakeTelegram) -> None:
    # ALLOWED_IDS set and the sender not in it: one short refusal, and nothing fetched for them.
    await rig.start(allowed_ids=frozenset({"telegram:1"}))
    tg.message(photo=png_bytes(64, 48), caption="as a watercolor")
    await tg.wait_text("not open to you")
    tg.message(text="/models")
    await until(
        lambda: len([c for c in tg.sent("sendMessage") if "not open" in (c.text or "")]) == 2
    )
    assert not tg.sent("getFile") and rig.harness.provider.calls == []


# ---- delivery limits ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "stored"),
    [((2100, 100), False), ((5001, 5000), False), ((1900, 1800), True)],
    ids=["ratio-over-20", "sides-over-10000", "over-10MB"],
)
async def test_an_image_over_the_photo_limits_is_sent_as_a_document(
    rig: Rig, tg: FakeTelegram, provider: ShapedProvider, shape: tuple[int, int], stored: bool
) -> None:
    provider.shape, provider.stored = shape, stored
    await rig.start()
    tg.message("a very wide panorama")
    (doc,) = await tg.wait_for("sendDocument")
    assert not [c for c in tg.calls if c.method == "sendPhoto"]
    with Image.open(io.BytesIO(doc.files["document"].data)) as img:
        assert img.size == shape
    assert button(doc, "rr:") and "a very wide panorama" in (doc.text or "")


async def test_a_photo_telegram_refuses_goes_again_as_a_document(
    rig: Rig, tg: FakeTelegram
) -> None:
    tg.fail("sendPhoto", 400, "Bad Request: PHOTO_INVALID_DIMENSIONS")
    await rig.start()
    tg.message("a strange shape")
    (doc,) = await tg.wait_for("sendDocument")
    assert button(doc, "of:")
    ((_, status, *_),) = await jobs(rig.harness)
    assert status == "succeeded"


async def test_markup_in_a_prompt_is_escaped_in_the_caption(rig: Rig, tg: FakeTelegram) -> None:
    await rig.start()
    tg.message("/imagine <b>x</b> & <script>")
    (photo,) = await tg.wait_for("sendPhoto")  # the fake refuses captions that do not parse
    assert photo.params["parse_mode"] == "HTML"
    assert photo.params["caption"].startswith("&lt;b&gt;x&lt;/b&gt; &amp; &lt;script&gt;")
    assert (photo.text or "").startswith("<b>x</b> & <script>\n")


async def test_a_long_prompt_is_cut_so_the_caption_fits(rig: Rig, tg: FakeTelegram) -> None:
    await rig.start()
    tg.message("🦊 " * 900 + "end")  # 1803 characters, 2703 UTF-16 units
    (photo,) = await tg.wait_for("sendPhoto")
    text = photo.text or ""
    assert utf16_len(text) <= 1024 and "…\ndemo · job " in text


# ---- buttons -----------------------------------------------------------------------------


async def test_the_original_file_button_sends_the_stored_file_once(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start()
    tg.message("a crisp mountain")
    (photo,) = await tg.wait_for("sendPhoto")
    job_id = button(photo, "of:")
    query = tg.callback(f"of:{job_id}", photo.result)
    (doc,) = await tg.wait_for("sendDocument")
    (stored,) = await rows(rig.harness, f"SELECT path FROM images WHERE job_id = '{job_id}'")
    assert doc.files["document"].data == (rig.harness.data_dir / stored[0]).read_bytes()
    assert doc.params["reply_parameters"]["message_id"] == photo.result["message_id"]
    assert query in tg.callback_answers
    again = tg.callback(f"of:{job_id}", photo.result)
    await until(lambda: again in tg.callback_answers)
    assert "already" in tg.callback_answers[again]["text"]
    assert len(tg.sent("sendDocument")) == 1


async def test_the_reroll_button_makes_a_new_job_from_the_same_prompt(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start()
    tg.message("a tiny robot --model paid")
    (photo,) = await tg.wait_for("sendPhoto")
    first = button(photo, "rr:")
    query = tg.callback(f"rr:{first}", photo.result, user=tg.user(9, name="Carol"))
    second_photo = (await tg.wait_for("sendPhoto", count=2))[1]
    assert second_photo.params["reply_parameters"]["message_id"] == photo.result["message_id"]
    second = button(second_photo, "rr:")
    assert "Rerolling" in tg.callback_answers[query]["text"]
    rows_ = await rows(
        rig.harness, "SELECT id, user_id, prompt, parent_id FROM jobs ORDER BY rowid"
    )
    assert rows_ == [(first, "42", "a tiny robot", None), (second, "9", "a tiny robot", first)]


async def test_the_cancel_button_cancels_a_queued_job(
    rig: Rig, tg: FakeTelegram, provider: ShapedProvider
) -> None:
    provider.gate = asyncio.Event()
    await rig.start(concurrency=1)
    tg.message("first --model paid")
    await tg.wait_for(is_status)
    tg.message("second --model paid")
    statuses = await tg.wait_for(is_status, count=2)
    second = statuses[1]
    job_id = button(second, "cx:")
    assert "Queued #1" in (second.text or "")  # #1 of those waiting: the first one runs
    assert job_id != button(statuses[0], "cx:")
    query = tg.callback(f"cx:{job_id}", second.result)
    edit = await tg.wait_for(
        lambda c: (
            c.method == "editMessageText" and c.params["message_id"] == second.result["message_id"]
        )
    )
    assert "Cancelled" in (edit[0].text or "") and edit[0].buttons() == []
    await until(lambda: query in tg.callback_answers)
    assert "cancelled, not charged" in tg.callback_answers[query]["text"]
    status = await rows(rig.harness, f"SELECT status, cost_usd FROM jobs WHERE id = '{job_id}'")
    assert status == [("cancelled", 0)]


async def test_someone_else_cannot_cancel_my_job(
    rig: Rig, tg: FakeTelegram, provider: ShapedProvider
) -> None:
    provider.gate = asyncio.Event()
    await rig.start()
    tg.message("/imagine mine", chat=group_chat(tg))
    (status,) = await tg.wait_for(is_status)
    query = tg.callback(f"cx:{button(status, 'cx:')}", status.result, user=tg.user(66))
    await until(lambda: query in tg.callback_answers)
    assert tg.callback_answers[query]["show_alert"] is True
    assert "No job" in tg.callback_answers[query]["text"]


async def test_buttons_keep_working_after_a_restart(
    rig: Rig, tg: FakeTelegram, provider: ShapedProvider
) -> None:
    engine, adapter = await rig.start()
    tg.message("a lighthouse at dusk")
    (photo,) = await tg.wait_for("sendPhoto")
    provider.gate = asyncio.Event()
    tg.message("a ship in a storm")
    status = (await tg.wait_for(is_status, count=2))[-1]
    running = button(status, "cx:")
    await until(lambda: running in provider.started)
    await rig.stop(engine, adapter)  # the running job is parked for the next start

    await rig.start()
    tg.callback(f"rr:{button(photo, 'rr:')}", photo.result)
    tg.callback(f"cx:{running}", status.result)
    cancelled = await tg.wait_text("Cancelled")
    assert cancelled.method == "editMessageText"
    assert cancelled.params["message_id"] == status.result["message_id"]  # the same message
    provider.gate.set()
    await tg.wait_for("sendPhoto", count=2)
    await rig.idle()
    states = await rows(rig.harness, "SELECT status FROM jobs ORDER BY rowid")
    assert states == [("succeeded",), ("cancelled",), ("succeeded",)]


# ---- commands ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("/help", "/imagine <prompt>"),
        ("/start", "Hi!"),
        ("/usage", "Today: 0 of unlimited images"),
        ("/jobs", "You have no jobs yet"),
        ("/models", "demo · $0.00"),
        ("/settings", "Default model: demo"),
        ("/cancel", "no queued or running job"),
        ("/frobnicate", "I don't know /frobnicate"),
    ],
)
async def test_each_command_is_answered(
    rig: Rig, tg: FakeTelegram, command: str, expected: str
) -> None:
    await rig.start()
    msg = tg.message(command)
    reply = await tg.wait_text(expected)
    assert reply.params["reply_parameters"]["message_id"] == msg["message_id"]


async def test_cancel_command_and_jobs_list(
    rig: Rig, tg: FakeTelegram, provider: ShapedProvider
) -> None:
    provider.gate = asyncio.Event()
    await rig.start()
    tg.message("/img a patient heron")
    (status,) = await tg.wait_for(is_status)
    job_id = button(status, "cx:")
    tg.message("/jobs")
    await tg.wait_text(f"{job_id} · running · demo · a patient heron")
    tg.message(f"/cancel {job_id}")
    await tg.wait_text(f"Job {job_id} cancelled, not charged")
    edit = await tg.wait_text("✖ Cancelled")
    assert edit.params["message_id"] == status.result["message_id"]


# ---- hostile input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("update", "expected"),
    [
        ({"text": "/imagine"}, "Please describe the image"),
        ({"text": "/imagine   --ar 16:9"}, "Please describe the image"),
        ({"text": "/imagine " + "x" * 5000}, "That prompt has 5000 characters; the limit is 2000"),
        ({"text": "/imagine " + "word " * 1000}, "the limit is 2000"),
        ({"text": "/imagine a cat --foo 1"}, "I don't know the option --foo"),
        ({"text": "/imagine a cat --ar 99:1"}, "does not do aspect ratio 99:1"),
        ({"text": "/imagine a cat --n 50"}, "--n takes a number from 1 to 10, not 50"),
        ({"text": "/imagine a cat --model nope"}, "There is no model called nope"),
        (
            {
                "extra": {
                    "sticker": {
                        "file_id": "s1",
                        "file_unique_id": "us1",
                        "type": "regular",
                        "width": 512,
                        "height": 512,
                        "is_animated": False,
                        "is_video": False,
                    }
                }
            },
            "I read text and photos",
        ),
        ({"photo": True}, "Add a caption to the photo"),
    ],
    ids=[
        "empty",
        "only-options",
        "5000-chars",
        "1000-words",
        "unknown-option",
        "ar-99-1",
        "n-50",
        "unknown-model",
        "sticker",
        "photo-without-caption",
    ],
)
async def test_hostile_input_gets_a_short_clear_answer_and_no_job(
    rig: Rig, tg: FakeTelegram, update: dict[str, Any], expected: str
) -> None:
    await rig.start()
    photo = png_bytes() if update.get("photo") else None
    tg.message(update.get("text"), photo=photo, extra=update.get("extra"))
    reply = await tg.wait_text(expected)
    assert len(reply.text or "") < 200
    assert rig.harness.provider.calls == [] and await jobs(rig.harness) == []
    assert [c.method for c in tg.calls if c.method.startswith("send")] == ["sendMessage"]


async def test_a_burst_of_20_queues_at_most_the_pending_limit_and_answers_the_rest(
    rig: Rig, tg: FakeTelegram, provider: ShapedProvider
) -> None:
    provider.gate = asyncio.Event()
    await rig.start()  # MAX_PENDING_PER_USER = 3
    for i in range(20):
        tg.message(f"/imagine fox number {i}")

    def refused() -> int:
        total = 0
        for call in tg.sent("sendMessage"):
            for part in (call.text or "").split("\n\n"):
                if "You already have 3 jobs waiting" in part:
                    m = re.search(r"\(×(\d+)\)$", part)
                    total += int(m[1]) if m else 1
        return total

    def queued() -> int:  # acks sent together in one chat share a message, a line per job
        return len(
            {
                m
                for call in tg.sent("sendMessage")
                for m in re.findall(r"job (\w+)", call.text or "")
            }
        )

    await until(lambda: refused() == 17 and queued() == 3)
    # refusals that piled up while one was being sent went out together, and so did acks
    assert len(tg.sent("sendMessage")) < 3 + 17
    assert len([c for c in tg.calls if is_status(c)]) >= 1
    provider.gate.set()
    await tg.wait_for("sendPhoto", count=3)
    assert provider.submits() == 3
    await rig.idle()
    assert [r[1] for r in await jobs(rig.harness)] == ["succeeded"] * 3


# ---- Telegram's errors -------------------------------------------------------------------


async def test_a_flood_429_is_waited_out_without_losing_the_photo(
    rig: Rig, tg: FakeTelegram
) -> None:
    tg.fail("sendPhoto", 429, retry_after=1)
    await rig.start()
    tg.message("a patient snail")
    (photo,) = await tg.wait_for("sendPhoto")
    attempts = [c for c in tg.calls if c.method == "sendPhoto"]
    assert [c.ok for c in attempts] == [False, True]
    assert attempts[1].at - attempts[0].at >= 1.0  # retry_after honoured
    await rig.idle()
    ((_, status, _, _, _, ref, _),) = await jobs(rig.harness)
    assert status == "succeeded" and ref == str(photo.result["message_id"])


async def test_a_strict_per_chat_flood_rate_costs_time_but_loses_nothing(
    rig: Rig, tg: FakeTelegram, provider: ShapedProvider
) -> None:
    tg.chat_limit = (2, 2)  # this chat takes 2 messages, then one a second
    provider.progress_steps = [50]
    await rig.start()
    tg.message("a crowded chat --n 2")
    await tg.wait_for("sendMediaGroup")
    await tg.wait_for(lambda c: "rr:" in str(c.params.get("reply_markup")))  # the buttons
    await tg.wait_text("✅ Done")
    floods = [c for c in tg.calls if c.error is not None and c.error.code == 429]
    assert floods  # the fake did push back
    for flood in floods:  # every refused essential call went again, after its retry_after
        if flood.method != "editMessageText":
            later = [c for c in tg.sent(flood.method) if c.at >= flood.at + 1.0]
            assert later, flood.method


async def test_a_group_flood_limit_is_respected_by_acks_and_results(
    rig: Rig, tg: FakeTelegram
) -> None:
    tg.group_limit = (4, 2)  # a tight group: 4 messages, then one every half second
    limiter = AIORateLimiter(group_max_rate=4, group_time_period=2)
    _, adapter = await rig.start(adapter_options={"rate_limiter": limiter})
    adapter.sender.GROUP = (4.0, 2.0, 1.0)  # the adapter's own picture of the same budget
    chat = group_chat(tg)
    for i in range(3):
        tg.message(f"/imagine bird {i}", user=tg.user(10 + i), chat=chat)
    await tg.wait_for("sendPhoto", count=3)
    # Acks sent together share one message, which is not edited: each result says "done".
    acks = [c for c in tg.sent("sendMessage") if "job " in (c.text or "")]
    own = sum(1 for c in acks if "\n" not in (c.text or ""))
    assert own >= 1
    await tg.wait_for(lambda c: "✅ Done" in (c.text or ""), count=own)
    await rig.idle()
    assert [c for c in tg.calls if c.error is not None and c.error.code == 429] == []
    # results go first: no room went to progress edits, and "done" waited for the photos
    methods = tg.methods()
    last_photo = max(i for i, m in enumerate(methods) if m == "sendPhoto")
    edits = [c for c in tg.calls if c.method == "editMessageText"]
    assert methods.index("editMessageText") > last_photo
    assert [(e.text or "")[:6] for e in edits] == ["✅ Done"] * own


async def test_a_user_who_blocked_the_bot_ends_the_job_without_a_retry_loop(
    rig: Rig, tg: FakeTelegram
) -> None:
    tg.blocked.add(ALICE)
    engine, _ = await rig.start()
    tg.message("a lonely cloud")
    await until(lambda: any(c.method == "sendPhoto" for c in tg.calls))
    await engine.run_until_idle()
    photos = [c for c in tg.calls if c.method == "sendPhoto"]
    assert len(photos) == 1 and photos[0].error is not None and photos[0].error.code == 403
    (row,) = await rows(rig.harness, "SELECT status, delivered_at, delivery_attempts FROM jobs")
    assert row == ("succeeded", None, 3)  # given up at once: never retried, even after a restart


async def test_message_is_not_modified_is_ignored(
    rig: Rig, tg: FakeTelegram, provider: ShapedProvider
) -> None:
    provider.gate = asyncio.Event()
    tg.fail("editMessageText", 400, NOT_MODIFIED)
    await rig.start()
    tg.message("an unchanging sea")
    await until(lambda: any(c.method == "editMessageText" for c in tg.calls))
    provider.gate.set()
    await tg.wait_for("sendPhoto")
    await tg.wait_text("✅ Done")


async def test_a_migrated_group_is_followed(rig: Rig, tg: FakeTelegram) -> None:
    tg.migrated[GROUP] = -1009999
    await rig.start()
    tg.message("/imagine a moving day", user=tg.user(7), chat=group_chat(tg))
    (photo,) = await tg.wait_for("sendPhoto")
    assert photo.chat_id == -1009999
    (status,) = [c for c in tg.calls if is_status(c) and c.ok]
    assert status.chat_id == -1009999
    # calls made before the move was known were refused once each, then followed
    refused = [c for c in tg.calls if not c.ok]
    assert refused and all(c.error and c.error.parameters for c in refused)
    assert all(c.params["chat_id"] == GROUP for c in refused)
    assert len(refused) == len({c.method for c in refused})


async def test_a_service_message_about_the_move_is_followed_at_once(
    rig: Rig, tg: FakeTelegram
) -> None:
    tg.migrated[GROUP] = -1009999
    await rig.start()
    tg.message(chat=group_chat(tg), extra={"migrate_to_chat_id": -1009999})
    tg.message("/imagine a moving day", user=tg.user(7), chat=group_chat(tg))
    (photo,) = await tg.wait_for("sendPhoto")
    assert photo.chat_id == -1009999
    assert all(c.ok for c in tg.calls)


# ---- the app's composition ----------------------------------------------------------------


async def test_served_by_the_app_with_the_demo_model(tg: FakeTelegram, tmp_path: Path) -> None:
    """What `drawbridge run` does with TELEGRAM_BOT_TOKEN and TELEGRAM_API_URL set."""
    settings = load_settings(
        {
            "DRAWBRIDGE_DATA_DIR": str(tmp_path / "data"),
            "TELEGRAM_BOT_TOKEN": tg.token,
            "TELEGRAM_API_URL": tg.url + "/",
        },
        env_file=None,
    )
    assert settings.telegram_bot_token is not None
    async with open_core(settings, shutdown_grace=0.5) as core:
        adapter = TelegramAdapter(
            core.engine,
            settings.telegram_bot_token.get_secret_value(),
            settings.telegram_api_url,
            poll_timeout=1,
        )
        async with serve(core, [adapter]):
            tg.message(
                "/imagine a lighthouse --ar 16:9", chat=group_chat(tg, forum=True), thread_id=5
            )
            (photo,) = await tg.wait_for("sendPhoto")
            await core.engine.run_until_idle()
        assert list(adapter.errors) == []
    assert photo.chat_id == GROUP and photo.params["message_thread_id"] == 5
    with Image.open(io.BytesIO(photo.files["photo"].data)) as img:
        assert img.size[0] > img.size[1]  # the demo model drew 16:9
    async with aiosqlite.connect(settings.db_path) as db:
        row = list(await db.execute_fetchall("SELECT status, cost_usd, model FROM jobs"))
    assert [tuple(r) for r in row] == [("succeeded", 0.0, "demo")]


# ---- start-up ----------------------------------------------------------------------------


async def test_a_rejected_token_stops_start_up_with_one_clear_line(
    harness: Harness, tg: FakeTelegram
) -> None:
    engine = await harness.engine(start=False)
    adapter = TelegramAdapter(engine, "999:WRONG-secret", tg.url)
    with pytest.raises(SettingsError) as caught:
        await adapter.open()
    assert str(caught.value) == "TELEGRAM_BOT_TOKEN: Telegram rejected the token"
    unreachable = TelegramAdapter(engine, tg.token, "http://127.0.0.1:9")
    with pytest.raises(SettingsError, match=r"^TELEGRAM_API_URL: "):
        await unreachable.open()


# ---- webhook mode ------------------------------------------------------------------------


async def test_webhook_mode_sets_the_webhook_and_takes_updates_from_the_route(
    rig: Rig, tg: FakeTelegram
) -> None:
    _, adapter = await rig.start(
        adapter_options={"webhook_url": "https://bot.example/tg", "webhook_secret": "s3cret"}
    )
    (hook,) = tg.sent("setWebhook")
    assert hook.params["secret_token"] == "s3cret"
    assert adapter.webhook_secret_ok("s3cret") and not adapter.webhook_secret_ok("nope")
    msg = tg.message("a webhook fox")  # queued in the fake too, but nobody polls
    await adapter.process_webhook_update({"update_id": 9000, "message": msg})
    await tg.wait_for("sendPhoto")
    assert "getUpdates" not in tg.methods()


async def test_a_webhook_without_a_configured_secret_still_has_one(
    rig: Rig, tg: FakeTelegram
) -> None:
    # Without TELEGRAM_WEBHOOK_SECRET anyone who found the URL could post updates as anyone (an
    # admin's /grant, say): the bot gives Telegram a secret derived from its token instead.
    _, adapter = await rig.start(adapter_options={"webhook_url": "https://bot.example/tg"})
    (hook,) = tg.sent("setWebhook")
    secret = hook.params["secret_token"]
    assert len(secret) >= 32 and tg.token not in secret
    assert adapter.webhook_secret_ok(secret)
    assert not adapter.webhook_secret_ok(None) and not adapter.webhook_secret_ok("")
    # The route `drawbridge run` serves: a forged update is refused, Telegram's is taken.
    app = web.Application()
    app.router.add_post("/tg", telegram_webhook(adapter))
    async with TestClient(TestServer(app)) as client:
        update = {"update_id": 9100, "message": tg.message("a forged fox")}
        assert (await client.post("/tg", json=update)).status == 403
        wrong = {"X-Telegram-Bot-Api-Secret-Token": "guess"}
        assert (await client.post("/tg", json=update, headers=wrong)).status == 403
        await asyncio.sleep(0.1)
        assert not tg.sent("sendPhoto") and await jobs(rig.harness) == []
        right = {"X-Telegram-Bot-Api-Secret-Token": secret}
        assert (await client.post("/tg", json=update, headers=right)).status == 200
        await tg.wait_for("sendPhoto")


# ---- paid broadcasts: the overflow past 30 a second, for Stars, within a cap -----------------

ADMIN = 99


async def burst(tg: FakeTelegram, users: int) -> None:
    for i in range(users):
        user = tg.user(7000 + i, name=f"u{i}")
        tg.message(f"/imagine paid lane picture {i}", user=user, chat=tg.chat(7000 + i))


async def test_a_burst_goes_out_at_once_on_paid_broadcasts_within_the_cap(
    rig: Rig, tg: FakeTelegram
) -> None:
    engine, _ = await rig.start({"paid_broadcast_stars": 100.0}, max_pending_per_user=5)
    await burst(tg, 60)
    await until(lambda: len(tg.sent("sendPhoto")) == 60, within=30)
    await rig.idle()
    # Only 429s, and each refused call went again later: nothing was lost. (A loop running late
    # can bunch calls the budget admitted in time, so the count of 429s is timing, not tested.)
    failed = [c for c in tg.calls if c.error is not None]
    assert all(c.error is not None and c.error.code == 429 for c in failed)
    for call in failed:
        assert [
            c for c in tg.calls if c.ok and c.method == call.method and c.chat_id == call.chat_id
        ]
    assert tg.paid_messages > 0  # the overflow went paid
    paid_calls = [c for c in tg.calls if c.ok and c.params.get("allow_paid_broadcast")]
    assert len(paid_calls) == tg.paid_messages  # charged for what went, nothing else
    assert {c.method for c in paid_calls} <= {"sendMessage", "sendPhoto"}  # never an edit

    def counted() -> float | None:  # the bot counts a paid call once its answer is back
        return engine.metrics.registry.get_sample_value(
            "drawbridge_paid_messages_total", {"platform": "telegram"}
        )

    await until(lambda: counted() == tg.paid_messages)
    assert {row[1] for row in await jobs(rig.harness)} == {"succeeded"}


async def test_when_todays_stars_are_spent_the_bot_slows_down_and_tells_the_admin(
    rig: Rig, tg: FakeTelegram
) -> None:
    await rig.start(
        {"paid_broadcast_stars": 1.0},  # ten messages
        max_pending_per_user=5,
        admin_ids=frozenset({f"telegram:{ADMIN}"}),
    )
    await burst(tg, 60)
    await until(lambda: len(tg.sent("sendPhoto")) == 60, within=60)
    await rig.idle()
    assert tg.paid_messages == 10
    await until(lambda: any(c.chat_id == ADMIN for c in tg.sent("sendMessage")))
    (alert,) = [c for c in tg.sent("sendMessage") if c.chat_id == ADMIN]
    assert "Stars" in (alert.text or "") and "spent" in (alert.text or "")
    assert {row[1] for row in await jobs(rig.harness)} == {"succeeded"}


async def test_todays_paid_messages_still_count_after_a_restart(rig: Rig, tg: FakeTelegram) -> None:
    options = {"paid_broadcast_stars": 1.0}  # ten messages a day
    engine, adapter = await rig.start(options, max_pending_per_user=5)
    await burst(tg, 40)
    await until(lambda: len(tg.sent("sendPhoto")) == 40, within=60)
    await rig.idle()
    assert tg.paid_messages == 10
    await rig.stop(engine, adapter)
    assert await rows(rig.harness, "SELECT platform, messages FROM paid_messages") == [
        ("telegram", 10)
    ]
    # Restarted the same day: the ten are spent, so the next burst goes on the free lane only.
    await rig.start(options, max_pending_per_user=5)
    await burst(tg, 40)
    await until(lambda: len(tg.sent("sendPhoto")) == 80, within=60)
    await rig.idle()
    assert tg.paid_messages == 10
    assert {row[1] for row in await jobs(rig.harness)} == {"succeeded"}


async def test_a_bot_without_paid_broadcasts_falls_back_to_the_free_lane(
    rig: Rig, tg: FakeTelegram
) -> None:
    tg.paid_broadcasts = False
    await rig.start(
        {"paid_broadcast_stars": 100.0},
        max_pending_per_user=5,
        admin_ids=frozenset({f"telegram:{ADMIN}"}),
    )
    await burst(tg, 40)
    await until(lambda: len(tg.sent("sendPhoto")) == 40, within=60)
    await rig.idle()
    refused = [c for c in tg.calls if c.error is not None and c.error.code == 400]
    assert refused and all(c.params.get("allow_paid_broadcast") for c in refused)
    assert tg.paid_messages == 0
    # the lane is off after the first refusal came back: nothing later asks to be paid for
    first_back = min(c.at for c in refused) + 0.5
    assert not [c for c in tg.calls if c.params.get("allow_paid_broadcast") and c.at > first_back]
    await until(lambda: any(c.chat_id == ADMIN for c in tg.sent("sendMessage")))
    (alert,) = [c for c in tg.sent("sendMessage") if c.chat_id == ADMIN]
    assert "refused" in (alert.text or "")
    assert {row[1] for row in await jobs(rig.harness)} == {"succeeded"}


# ---- taking a burst in -----------------------------------------------------------------------


async def test_a_burst_is_taken_a_batch_at_a_time_and_every_command_answered_once(
    rig: Rig, tg: FakeTelegram, provider: ShapedProvider
) -> None:
    provider.gate = asyncio.Event()  # jobs wait: only the intake is measured
    engine, adapter = await rig.start({"intake_wait": 30.0}, queue_max=500, max_pending_per_user=5)
    assert adapter.app.update_queue is adapter.intake.queue  # the gate sees what is queued

    def accepted() -> float:
        return sum(
            sample.value
            for metric in engine.metrics.registry.collect()
            if metric.name == "drawbridge_jobs_submitted"
            for sample in metric.samples
            if sample.name.endswith("_total")
        )

    polls: list[tuple[int, float]] = []  # (the poll's offset, jobs accepted when it came)
    serve_poll = tg._m_getUpdates

    async def recording(p: dict[str, Any], f: dict[str, Any]) -> Any:
        polls.append((int(p.get("offset") or 0), accepted()))
        return await serve_poll(p, f)

    tg._m_getUpdates = recording  # type: ignore[method-assign]
    users = range(5000, 5120)  # a full batch of 100 and some
    for u in users:
        tg.message(f"/imagine a lighthouse number {u}", user=tg.user(u), chat=tg.chat(u))
    ids = [u["update_id"] for u in tg._updates]
    await until(lambda: {c.chat_id for c in tg.sent("sendMessage")} >= set(users), within=30)
    # Each poll that confirmed updates (its offset past them) came once they were all jobs.
    confirmed = [(sum(1 for i in ids if i < offset), jobs) for offset, jobs in polls if offset]
    assert confirmed and confirmed[-1][0] == 120
    assert all(jobs >= count for count, jobs in confirmed)
    assert len([c for c in tg.sent("sendMessage") if c.chat_id in set(users)]) == 120
