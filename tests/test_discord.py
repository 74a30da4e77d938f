"""The Discord adapter end to end: real discord.py over a websocket and HTTP against the fake,
with the real engine on a temp data dir and a scripted provider."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import aiosqlite
import pytest
from PIL import Image

from adapters.discord_adapter import DiscordAdapter
from bot.app import open_core, serve
from bot.engine import Engine
from bot.errors import Refused
from bot.jobs import GeneratedImage
from bot.providers.base import GenerationRequest, JobHooks
from bot.settings import load_settings
from tests.conftest import Harness
from tests.fake_discord import CHANNEL_ID, GUILD_ID, USER, FakeDiscord, FakeInteraction
from tests.fakes import ScriptedProvider, png_bytes

BOB = {**USER, "id": "1400000000000000002", "username": "bob"}
JOB = re.compile(r"job ([a-z0-9]{10})")


@dataclass
class Bot:
    engine: Engine
    adapter: DiscordAdapter


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    server = FakeDiscord()
    await server.start()
    yield server
    await server.close()


async def open_bot(
    harness: Harness, fake: FakeDiscord, *, clock: Any = time.time, **config: object
) -> Bot:
    config.setdefault("shutdown_grace", 0.1)
    engine = await harness.engine(start=False, **config)
    adapter = DiscordAdapter(
        engine,
        fake.token,
        fake.api_url,
        fake.gateway_url,
        guild_ids=[int(GUILD_ID)],
        clock=clock,
        guild_ready_timeout=0.05,
        edit_interval=0.05,
        first_edit_delay=0.0,
        position_interval=0.05,
    )
    await adapter.open()  # as bot.app.serve does: open, start the engine, then take input
    await engine.start()
    await adapter.start()
    await fake.wait_identified()
    return Bot(engine, adapter)


async def close_bot(bot: Bot) -> None:
    await bot.adapter.stop_intake()
    await bot.engine.close()
    await bot.adapter.close()


async def restart(harness: Harness, bot: Bot) -> None:
    """Shut one bot down the way `drawbridge run` does on SIGTERM, and close its database."""
    await close_bot(bot)
    for engine, store in list(harness.opened):
        if engine is bot.engine:
            await store.close()
            harness.opened.remove((engine, store))


@pytest.fixture
async def bot(
    harness: Harness, fake: FakeDiscord, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[Bot]:
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.WARNING, "aiohttp.access")
    b = await open_bot(harness, fake)
    yield b
    await close_bot(b)
    # discord.py only logs what a command or button raised: any such error fails the test.
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors


def content(fake: FakeDiscord, inter: FakeInteraction) -> str:
    """The interaction's response message as users see it now ("" before it exists)."""
    if inter.original_id is None or inter.original_id not in fake.messages:
        return ""
    return str(fake.messages[inter.original_id]["content"])


def buttons(message: dict[str, Any]) -> list[str]:
    return [c["custom_id"] for row in message["components"] for c in row["components"]]


def job_of(fake: FakeDiscord, inter: FakeInteraction) -> str:
    match = JOB.search(content(fake, inter))
    assert match, content(fake, inter)
    return match[1]


async def row(harness: Harness, job_id: str) -> dict[str, Any]:
    async with aiosqlite.connect(harness.data_dir / "drawbridge.db") as db:
        db.row_factory = aiosqlite.Row
        rows = await db.execute_fetchall("SELECT * FROM jobs WHERE id = ?", (job_id,))
    (found,) = rows
    return dict(found)


async def wait_ended(fake: FakeDiscord, inter: FakeInteraction, mark: str = "✅") -> str:
    await fake.wait_for(lambda: mark in content(fake, inter))
    return job_of(fake, inter)


def noise_png(side: int = 320) -> bytes:
    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buf, "PNG")
    return buf.getvalue()


class NoisyProvider(ScriptedProvider):
    """Scripted, but a prompt with "noise" gets big incompressible PNGs."""

    async def generate(self, request: GenerationRequest, hooks: JobHooks) -> list[GeneratedImage]:
        images = await super().generate(request, hooks)
        if "noise" not in request.prompt:
            return images
        return [GeneratedImage(noise_png(), "image/png", 320, 320) for _ in images]


# ---- start-up ----------------------------------------------------------------------------------


async def test_start_logs_in_syncs_commands_and_identifies_without_privileged_intents(
    bot: Bot, fake: FakeDiscord
) -> None:
    assert [c.path for c in fake.calls[:2]] == ["/users/@me", "/oauth2/applications/@me"]
    names = {"imagine", "usage", "jobs", "cancel", "models", "settings", "link", "history"}
    names |= {"show", "stats", "grant", "ban", "unban", "policy", "export"}
    assert {c["name"] for c in fake.commands[None]} == names  # global
    assert {c["name"] for c in fake.commands[GUILD_ID]} == names  # and the guild, at once
    imagine = next(c for c in fake.commands[None] if c["name"] == "imagine")
    options = {o["name"]: o for o in imagine["options"]}
    assert list(options) == ["prompt", "aspect_ratio", "model", "count", "size", "seed", "image"]
    assert options["prompt"]["required"] is True
    assert {"name": "16:9", "value": "16:9"} in options["aspect_ratio"]["choices"]
    assert options["model"]["autocomplete"] and options["size"]["autocomplete"]
    assert options["image"]["type"] == 11  # attachment
    assert (options["count"]["min_value"], options["count"]["max_value"]) == (1, 10)
    assert imagine["description_localizations"]["zh-CN"] == "根据提示词生成图片"
    assert fake.identify is not None and fake.identify["intents"] == 1  # GUILDS, not privileged
    assert fake.gateway_query["v"] == "10"
    await fake.wait_for(lambda: 1 in fake.gateway_ops)  # heartbeating, and ACKed


async def test_after_the_gateway_drops_the_bot_resumes_and_still_answers(
    bot: Bot, fake: FakeDiscord
) -> None:
    await fake.drop(4000)
    await fake.wait_for(lambda: 6 in fake.gateway_ops and fake._sockets)
    inter = await fake.slash("imagine", {"prompt": "after a resume"})
    await fake.wait_for(lambda: fake.followups(inter.token))


async def test_the_app_composition_root_serves_discord(fake: FakeDiscord, tmp_path: Path) -> None:
    """What `drawbridge run` does with DISCORD_BOT_TOKEN, DISCORD_API_URL and DISCORD_GATEWAY_URL."""
    settings = load_settings(
        {
            "DRAWBRIDGE_DATA_DIR": str(tmp_path / "data"),
            "DISCORD_BOT_TOKEN": fake.token,
            "DISCORD_API_URL": fake.api_url,
            "DISCORD_GATEWAY_URL": fake.gateway_url,
            "DISCORD_GUILD_IDS": GUILD_ID,
            "HTTP_PORT": "0",
        },
        env_file=None,
    )
    assert settings.discord_bot_token is not None
    async with open_core(settings, shutdown_grace=0.5) as core:
        adapter = DiscordAdapter(
            core.engine,
            settings.discord_bot_token.get_secret_value(),
            settings.discord_api_url,
            settings.discord_gateway_url,
            settings.discord_guild_ids,
        )
        async with serve(core, [adapter]):
            await fake.wait_identified()
            inter = await fake.slash("imagine", {"prompt": "a black box test"})
            (followup,) = await fake.wait_for(lambda: fake.followups(inter.token))
            assert inter.ack_delay is not None and inter.ack_delay < 3
            assert followup.files[0].data.startswith(b"\x89PNG")
    async with aiosqlite.connect(tmp_path / "data" / "drawbridge.db") as db:
        rows = list(await db.execute_fetchall("SELECT platform, status FROM jobs"))
    assert [tuple(r) for r in rows] == [("discord", "succeeded")]
    assert set(fake.commands) == {None, GUILD_ID}


async def answer(fake: FakeDiscord, inter: FakeInteraction) -> str:
    """The deferred reply's text once the bot has resolved it (how a refusal is told)."""

    def resolved() -> str | None:
        if not inter.original_id:
            return None
        message = fake.original(inter)
        return None if int(message.get("flags", 0)) & 128 else str(message.get("content", ""))

    return str(await fake.wait_for(resolved))


# ---- /imagine ----------------------------------------------------------------------------------


async def test_imagine_is_deferred_then_the_image_arrives_as_a_followup(
    bot: Bot, fake: FakeDiscord, harness: Harness
) -> None:
    inter = await fake.slash("imagine", {"prompt": "a fox in the snow"})
    (followup,) = await fake.wait_for(lambda: fake.followups(inter.token))
    assert inter.ack_type == 5 and inter.ack_delay is not None and inter.ack_delay < 3
    first = next(c for c in fake.calls if inter.token in c.path)
    assert first.path.endswith("/callback")  # the ack came before any other call for it
    assert followup.content_type.startswith("multipart/form-data")
    (part,) = followup.files
    assert part.data.startswith(b"\x89PNG") and part.filename.endswith(".png")
    assert "a fox in the snow" in followup.payload["content"]
    job_id = await wait_ended(fake, inter)
    assert fake.original(inter)["components"] == []  # no Cancel once it is done
    reroll = [m for m in fake.messages.values() if f"drawbridge:reroll:{job_id}" in buttons(m)]
    assert len(reroll) == 1 and reroll[0]["attachments"]
    found = await row(harness, job_id)
    assert (found["platform"], found["status"], found["user_id"]) == (
        "discord",
        "succeeded",
        USER["id"],
    )
    assert (found["chat_id"], found["guild_id"]) == (CHANNEL_ID, GUILD_ID)


async def test_every_imagine_option_reaches_the_provider(
    bot: Bot, fake: FakeDiscord, harness: Harness
) -> None:
    options = {
        "prompt": "a lighthouse",
        "aspect_ratio": "16:9",
        "model": "paid",
        "count": 2,
        "size": "4K",
        "seed": 42,
    }
    inter = await fake.slash("imagine", options)
    (followup,) = await fake.wait_for(lambda: fake.followups(inter.token))
    (call,) = harness.provider.calls
    assert (call.model, call.aspect_ratio, call.n, call.size, call.seed) == (
        "paid",
        "16:9",
        2,
        "4K",
        42,
    )
    assert len(followup.files) == 2
    assert "seed 42" in followup.payload["content"] and "paid" in followup.payload["content"]
    found = await row(harness, await wait_ended(fake, inter))
    assert found["cost_usd"] == pytest.approx(2.0)


async def test_a_refused_request_is_answered_in_the_deferred_reply(
    bot: Bot, fake: FakeDiscord, harness: Harness
) -> None:
    inter = await fake.slash("imagine", {"prompt": "too many", "count": 9})
    await fake.wait_for(
        lambda: inter.original_id and "1 to 4 images" in fake.original(inter).get("content", "")
    )
    assert not fake.calls_to("DELETE", r"/messages/@original$")  # the answer stays visible
    assert harness.provider.calls == []


async def test_a_reference_image_attachment_is_passed_to_the_provider(
    bot: Bot, fake: FakeDiscord, harness: Harness
) -> None:
    ref = png_bytes(16, 16, (1, 2, 3))
    att = fake.add_attachment(ref, "ref.png", "image/png")
    inter = await fake.slash("imagine", {"prompt": "make it blue", "model": "paid", "image": att})
    await fake.wait_for(lambda: fake.followups(inter.token))
    (call,) = harness.provider.calls
    assert call.reference_images == (ref,) and fake.fetched == [att["id"]]


@pytest.mark.parametrize(
    ("data", "ctype", "expected"),
    [
        (b"not an image at all", "text/plain", "PNG, JPEG or WebP"),
        (b"\x89PNG" + b"\0" * 3000, "image/png", "too large"),
    ],
)
async def test_an_attachment_that_is_not_a_small_image_is_refused(
    harness: Harness, fake: FakeDiscord, data: bytes, ctype: str, expected: str
) -> None:
    b = await open_bot(harness, fake)
    b.adapter.max_reference_bytes = 2000
    try:
        att = fake.add_attachment(data, "x.bin", ctype)
        inter = await fake.slash("imagine", {"prompt": "use this", "model": "paid", "image": att})
        assert expected in await answer(fake, inter)
        assert harness.provider.calls == []
        assert fake.fetched == []
    finally:
        await close_bot(b)


async def test_an_image_over_the_upload_limit_is_shrunk_to_fit_and_says_so(
    harness: Harness, fake: FakeDiscord
) -> None:
    harness.provider = NoisyProvider()
    b = await open_bot(harness, fake)
    try:
        inter = await fake.slash("imagine", {"prompt": "static noise"}, limit=20_000)
        (followup,) = await fake.wait_for(lambda: fake.followups(inter.token))
        (part,) = followup.files
        assert len(part.data) <= 20_000 and part.data.startswith(b"\xff\xd8")  # JPEG now
        assert part.filename.endswith(".jpg")
        assert "Shrunk to fit Discord's 20 KB upload limit" in followup.payload["content"]
        with Image.open(io.BytesIO(part.data)) as img:
            assert img.width < 320
    finally:
        await close_bot(b)


async def test_ten_images_at_most_per_message(harness: Harness, fake: FakeDiscord) -> None:
    spec = harness.catalog.get("paid")
    assert spec is not None
    harness.catalog._specs["paid"] = dataclasses.replace(spec, max_images=10)
    b = await open_bot(harness, fake)
    try:
        inter = await fake.slash("imagine", {"prompt": "many", "model": "paid", "count": 10})
        (followup,) = await fake.wait_for(lambda: fake.followups(inter.token))
        assert len(followup.files) == 10
    finally:
        await close_bot(b)


async def test_imagine_works_in_a_thread_and_in_dms(
    bot: Bot, fake: FakeDiscord, harness: Harness
) -> None:
    thread = fake.thread_channel("1300000000000000099")
    dm = fake.dm_channel("1300000000000000077")
    in_thread = await fake.slash("imagine", {"prompt": "in a thread"}, channel=thread)
    in_dm = await fake.slash("imagine", {"prompt": "in private"}, channel=dm)
    await fake.wait_for(lambda: fake.followups(in_thread.token) and fake.followups(in_dm.token))
    t_row = await row(harness, await wait_ended(fake, in_thread))
    d_row = await row(harness, await wait_ended(fake, in_dm))
    assert (t_row["chat_id"], t_row["thread_id"], t_row["guild_id"]) == (
        "1300000000000000099",
        "1300000000000000099",
        GUILD_ID,
    )
    assert (d_row["chat_id"], d_row["guild_id"]) == ("1300000000000000077", None)


async def test_a_chinese_locale_gets_chinese_status_and_buttons(
    bot: Bot, fake: FakeDiscord
) -> None:
    inter = await fake.slash("imagine", {"prompt": "雪中的狐狸"}, locale="zh-TW")
    (followup,) = await fake.wait_for(lambda: fake.followups(inter.token))
    assert "任务" in followup.payload["content"]
    labels = [c["label"] for row in followup.payload["components"] for c in row["components"]]
    assert labels == ["🔄 重新生成"]
    await fake.wait_for(lambda: "完成" in content(fake, inter))


async def test_status_shows_the_queue_position_and_progress_in_place(
    harness: Harness, fake: FakeDiscord
) -> None:
    harness.provider.gate = asyncio.Event()
    harness.provider.progress_steps = [10, 20, 30, 40, 50, 60, 70, 80, 90]
    b = await open_bot(harness, fake, concurrency=1, max_pending_per_user=5)
    try:
        first = await fake.slash("imagine", {"prompt": "one"})
        await fake.wait_for(lambda: "90%" in content(fake, first))
        edits = fake.calls_to("PATCH", rf"/{first.token}/messages/@original$")
        assert len(edits) < 9  # nine progress steps, coalesced into fewer edits of one message
        second = await fake.slash("imagine", {"prompt": "two"}, user=BOB)
        third = await fake.slash("imagine", {"prompt": "three"})
        await fake.wait_for(lambda: "Queued #2" in content(fake, third))
        assert "Queued #1" in content(fake, second)
        assert buttons(fake.original(third)) == [f"drawbridge:cancel:{job_of(fake, third)}"]
        await fake.slash("cancel", user=BOB)  # the job ahead leaves the queue
        await fake.wait_for(lambda: "Queued #1" in content(fake, third))  # it moved up
        harness.provider.gate.set()
        await wait_ended(fake, third)
    finally:
        await close_bot(b)


# ---- answers only the user sees ------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "locale", "expected"),
    [
        ("usage", "en-US", "Today: 0 of unlimited images"),
        ("usage", "zh-CN", "今天：0/不限 张图"),
        ("usage", "zh-TW", "今天"),
        ("jobs", "en-US", "You have no jobs yet"),
        ("models", "en-US", "paid · $0.50"),
        ("settings", "en-GB", "Default model: demo · language: en"),
        ("settings", "zh-CN", "默认模型：demo"),
        ("cancel", "en-US", "You have no queued or running job"),
    ],
)
async def test_commands_answer_ephemerally_in_the_users_language(
    bot: Bot, fake: FakeDiscord, command: str, locale: str, expected: str
) -> None:
    inter = await fake.slash(command, locale=locale)
    await fake.wait_for(lambda: expected in content(fake, inter))
    assert inter.ack_type == 5 and inter.ephemeral and inter.ack_delay is not None
    assert inter.ack_delay < 3


async def test_a_private_bot_refuses_strangers_everywhere_and_fetches_nothing(
    harness: Harness, fake: FakeDiscord
) -> None:
    # ALLOWED_IDS set, and neither this user nor this guild in it.
    b = await open_bot(harness, fake, allowed_ids=frozenset({"discord:1"}))
    try:
        for command in ("usage", "jobs", "models", "settings", "history", "link"):
            inter = await fake.slash(command)
            await fake.wait_for(lambda i=inter: "not open to you" in content(fake, i))
        att = fake.add_attachment(png_bytes(16, 16), "ref.png", "image/png")
        inter = await fake.slash("imagine", {"prompt": "a fox", "model": "paid", "image": att})
        assert "not open to you" in await answer(fake, inter)
        assert fake.fetched == []
        assert harness.provider.calls == []
    finally:
        await close_bot(b)


async def test_jobs_lists_the_users_jobs(bot: Bot, fake: FakeDiscord) -> None:
    made = await fake.slash("imagine", {"prompt": "a *bold* fox"})
    job_id = await wait_ended(fake, made)
    inter = await fake.slash("jobs")
    await fake.wait_for(lambda: job_id in content(fake, inter))
    assert "succeeded" in content(fake, inter) and r"a \*bold\* fox" in content(fake, inter)


async def test_autocomplete_offers_configured_models_and_their_sizes(
    bot: Bot, fake: FakeDiscord
) -> None:
    models = await fake.slash("imagine", {"prompt": "x", "model": ""}, focused="model")
    await fake.wait_for(lambda: models.choices is not None)
    assert models.ack_type == 8
    values = [c["value"] for c in models.choices or []]
    assert "paid" in values and "demo" in values
    assert "nano-banana" not in values  # its provider has no key here
    narrowed = await fake.slash("imagine", {"prompt": "x", "model": "pa"}, focused="model")
    await fake.wait_for(lambda: narrowed.choices is not None)
    assert [c["value"] for c in narrowed.choices or []] == ["paid"]
    sizes = await fake.slash(
        "imagine", {"prompt": "x", "model": "paid", "size": ""}, focused="size"
    )
    await fake.wait_for(lambda: sizes.choices is not None)
    assert [c["value"] for c in sizes.choices or []] == ["1K", "4K"]


async def test_cancel_command_with_a_job_id_and_its_autocomplete(
    harness: Harness, fake: FakeDiscord
) -> None:
    harness.provider.gate = asyncio.Event()
    b = await open_bot(harness, fake, concurrency=1)
    try:
        running = await fake.slash("imagine", {"prompt": "one"})
        queued = await fake.slash("imagine", {"prompt": "two"})
        await fake.wait_for(lambda: "Queued" in content(fake, queued))
        job_id = job_of(fake, queued)
        typed = await fake.slash("cancel", {"job": job_id[:3]}, focused="job")
        await fake.wait_for(lambda: typed.choices is not None)
        assert job_id in [c["value"] for c in typed.choices or []]
        inter = await fake.slash("cancel", {"job": job_id})
        await fake.wait_for(lambda: "cancelled, not charged" in content(fake, inter))
        await fake.wait_for(lambda: "Cancelled" in content(fake, queued))
        assert fake.original(queued)["components"] == []
        assert (await row(harness, job_id))["status"] == "cancelled"
        assert "Generating" in content(fake, running)
        harness.provider.gate.set()
    finally:
        await close_bot(b)


# ---- buttons -----------------------------------------------------------------------------------


async def test_the_cancel_button_cancels_only_for_its_owner(
    harness: Harness, fake: FakeDiscord
) -> None:
    harness.provider.gate = asyncio.Event()
    b = await open_bot(harness, fake)
    try:
        inter = await fake.slash("imagine", {"prompt": "slow"})
        await fake.wait_for(lambda: "Generating" in content(fake, inter))
        job_id = job_of(fake, inter)
        message_id = inter.original_id
        assert message_id is not None
        other = await fake.press(message_id, f"drawbridge:cancel:{job_id}", user=BOB)
        await fake.wait_for(lambda: "No job" in content(fake, other))
        assert other.ephemeral
        mine = await fake.press(message_id, f"drawbridge:cancel:{job_id}")
        await fake.wait_for(lambda: "cancelled, not charged" in content(fake, mine))
        await fake.wait_for(lambda: "Cancelled" in content(fake, inter))
        assert (await row(harness, job_id))["status"] == "cancelled"
    finally:
        await close_bot(b)


async def test_the_reroll_button_makes_a_new_job_with_its_own_status(
    bot: Bot, fake: FakeDiscord, harness: Harness
) -> None:
    inter = await fake.slash("imagine", {"prompt": "again please", "model": "paid", "count": 2})
    job_id = await wait_ended(fake, inter)
    (result,) = [m for m in fake.messages.values() if f"drawbridge:reroll:{job_id}" in buttons(m)]
    press = await fake.press(result["id"], f"drawbridge:reroll:{job_id}", user=BOB)
    new_id = await wait_ended(fake, press)
    assert new_id != job_id and press.ack_type == 5 and not press.ephemeral
    (followup,) = fake.followups(press.token)
    assert len(followup.files) == 2
    found = await row(harness, new_id)
    assert (found["user_id"], found["parent_id"], found["prompt"]) == (
        BOB["id"],
        job_id,
        "again please",
    )


# ---- Discord's errors -----------------------------------------------------------------------


async def test_a_late_ack_10062_never_loses_the_job_the_channel_gets_it(
    bot: Bot, fake: FakeDiscord, harness: Harness
) -> None:
    inter = await fake.slash("imagine", {"prompt": "lagged"}, deadline=0.0)
    posts = await fake.wait_for(
        lambda: [c for c in fake.channel_posts() if c.files] and fake.channel_posts()
    )
    assert inter.late and inter.acked_at is None
    result = next(c for c in posts if c.files)
    assert result.payload["content"].startswith(f"<@{USER['id']}> ")
    mentions = result.payload["allowed_mentions"]
    assert mentions["parse"] == [] and [str(u) for u in mentions["users"]] == [USER["id"]]
    assert result.files[0].data.startswith(b"\x89PNG")
    assert fake.followups(inter.token) == []
    job_id = JOB.search(result.payload["content"])
    assert job_id is not None
    assert (await row(harness, job_id[1]))["status"] == "succeeded"
    status = await fake.wait_for(
        lambda: [m for m in fake.messages.values() if "✅" in m["content"]]
    )
    assert status[0]["channel_id"] == CHANNEL_ID


async def test_after_fifteen_minutes_the_result_goes_to_the_channel(
    harness: Harness, fake: FakeDiscord
) -> None:
    harness.provider.gate = asyncio.Event()
    now = [time.time()]
    b = await open_bot(harness, fake, clock=lambda: now[0])
    try:
        inter = await fake.slash("imagine", {"prompt": "slow one"})
        await fake.wait_for(lambda: "Generating" in content(fake, inter))
        now[0] += 16 * 60
        harness.provider.gate.set()
        (post,) = await fake.wait_for(lambda: fake.channel_posts())
        assert post.files and post.payload["content"].startswith(f"<@{USER['id']}>")
        assert fake.followups(inter.token) == []
    finally:
        await close_bot(b)


async def test_a_token_discord_expired_falls_back_to_the_channel(
    harness: Harness, fake: FakeDiscord
) -> None:
    harness.provider.gate = asyncio.Event()
    b = await open_bot(harness, fake)
    try:
        inter = await fake.slash("imagine", {"prompt": "expired token"})
        await fake.wait_for(lambda: "Generating" in content(fake, inter))
        fake.expire(inter.token)
        harness.provider.gate.set()
        (post,) = await fake.wait_for(lambda: fake.channel_posts())
        assert post.files and post.payload["content"].startswith(f"<@{USER['id']}>")
        assert [c.status for c in fake.calls_to("POST", rf"/{inter.token}$")] == [401]
        # The stale "Generating…" message, edited by its author with the bot token.
        await fake.wait_for(lambda: "✅" in content(fake, inter))
        assert fake.original(inter)["components"] == []
    finally:
        await close_bot(b)


@pytest.mark.parametrize("acked", [True, False], ids=["interaction reply", "channel message"])
async def test_a_deleted_status_message_does_not_silence_the_outcome(
    harness: Harness, fake: FakeDiscord, acked: bool
) -> None:
    """Someone deletes the job's status message (the user dismisses the reply, a moderator
    tidies the channel) while it runs: the failure is posted anew in the channel (its edit
    answered 10008 Unknown Message and the outcome was dropped)."""
    harness.provider.gate = asyncio.Event()
    harness.provider.errors["doomed"] = [Refused("no")]
    b = await open_bot(harness, fake)
    try:
        inter = await fake.slash("imagine", {"prompt": "doomed"}, deadline=3.0 if acked else 0.0)
        if acked:
            await fake.wait_for(lambda: "Generating" in content(fake, inter))
            assert inter.original_id is not None
            fake.messages.pop(inter.original_id)
        else:
            (status_id,) = await fake.wait_for(
                lambda: [k for k, m in fake.messages.items() if "Generating" in m["content"]]
            )
            fake.messages.pop(status_id)
        harness.provider.gate.set()
        told = await fake.wait_for(
            lambda: [c for c in fake.channel_posts() if "not charged" in c.payload["content"]]
        )
        assert told[0].payload["content"].startswith(f"<@{USER['id']}> ")
        assert "🔄" in str(told[0].payload.get("components"))  # a new try is one press away
    finally:
        await close_bot(b)


async def test_missing_permissions_50013_is_logged_and_the_user_gets_a_dm(
    harness: Harness, fake: FakeDiscord, caplog: pytest.LogCaptureFixture
) -> None:
    b = await open_bot(harness, fake)
    fake.forbidden_channels.add(CHANNEL_ID)
    try:
        await fake.slash("imagine", {"prompt": "nowhere to go"}, deadline=0.0)
        dm_channel = await fake.wait_for(lambda: fake.dm_channels.get(USER["id"]))
        (dm,) = await fake.wait_for(lambda: fake.channel_posts(dm_channel))
        assert dm.files and "missing permissions" in dm.payload["content"]
        assert [c.status for c in fake.calls_to("POST", rf"^/channels/{CHANNEL_ID}/")] == [403, 403]
        assert any(
            "missing permissions in channel" in r.getMessage() and "50013" in r.getMessage()
            for r in caplog.records
        )
        harness.provider.errors["refused here"] = [Refused("no")]
        await fake.slash("imagine", {"prompt": "refused here"}, deadline=0.0)
        _, failed = await fake.wait_for(
            lambda: len(fake.channel_posts(dm_channel)) == 2 and fake.channel_posts(dm_channel)
        )
        assert "not charged" in failed.payload["content"]
        assert "Please ask a server admin" in failed.payload["content"]
    finally:
        await close_bot(b)


async def test_a_429_with_via_is_waited_out_and_retried(bot: Bot, fake: FakeDiscord) -> None:
    fake.rate_limit("POST", r"^/webhooks/\d+/[^/]+$", retry_after=0.3)
    inter = await fake.slash("imagine", {"prompt": "busy"})
    await fake.wait_for(lambda: fake.followups(inter.token))
    tries = fake.calls_to("POST", rf"/{inter.token}$")
    assert [c.status for c in tries] == [429, 200]
    assert tries[1].at - tries[0].at >= 0.29


async def test_after_stop_intake_new_work_is_declined(bot: Bot, fake: FakeDiscord) -> None:
    await bot.adapter.stop_intake()
    inter = await fake.slash("imagine", {"prompt": "too late"})
    assert "restarting" in await answer(fake, inter)


# ---- restarts ------------------------------------------------------------------------------


async def test_a_restart_resumes_a_pending_job_and_its_buttons_still_work(
    harness: Harness, fake: FakeDiscord
) -> None:
    harness.provider.gate = asyncio.Event()
    first = await open_bot(harness, fake, concurrency=1)
    running = await fake.slash("imagine", {"prompt": "survives"})
    waiting = await fake.slash("imagine", {"prompt": "waits"}, user=BOB)
    await fake.wait_for(lambda: "Queued" in content(fake, waiting))
    await fake.wait_for(lambda: "Generating" in content(fake, running))
    run_id, wait_id = job_of(fake, running), job_of(fake, waiting)
    await restart(harness, first)

    second = await open_bot(harness, fake, concurrency=1)
    try:
        assert waiting.original_id is not None
        press = await fake.press(waiting.original_id, f"drawbridge:cancel:{wait_id}", user=BOB)
        await fake.wait_for(lambda: "cancelled" in content(fake, press))
        await fake.wait_for(lambda: "Cancelled" in content(fake, waiting))
        assert (await row(harness, wait_id))["status"] == "cancelled"

        harness.provider.gate.set()
        (followup,) = await fake.wait_for(lambda: fake.followups(running.token))
        assert followup.files and "survives" in followup.payload["content"]
        await wait_ended(fake, running)
        # The restarted bot edited the same status message by its id, through the webhook.
        assert fake.calls_to("PATCH", rf"/{running.token}/messages/{running.original_id}$")
        assert (await row(harness, run_id))["status"] == "succeeded"

        (result,) = [
            m for m in fake.messages.values() if f"drawbridge:reroll:{run_id}" in buttons(m)
        ]
        again = await fake.press(result["id"], f"drawbridge:reroll:{run_id}")
        new_id = await wait_ended(fake, again)
        assert (await row(harness, new_id))["parent_id"] == run_id
        assert len(fake.followups(running.token)) == 1  # nothing was posted twice
    finally:
        await close_bot(second)


async def test_a_job_finishing_after_a_restart_and_its_token_posts_to_the_channel(
    harness: Harness, fake: FakeDiscord
) -> None:
    harness.provider.gate = asyncio.Event()
    first = await open_bot(harness, fake)
    inter = await fake.slash("imagine", {"prompt": "a long night"})
    await fake.wait_for(lambda: "Generating" in content(fake, inter))
    await restart(harness, first)
    later = time.time() + 20 * 60
    second = await open_bot(harness, fake, clock=lambda: later)
    try:
        harness.provider.gate.set()
        (result,) = await fake.wait_for(lambda: fake.channel_posts())
        assert result.files and result.payload["content"].startswith(f"<@{USER['id']}>")
        await fake.wait_for(lambda: "✅" in content(fake, inter))
        assert fake.followups(inter.token) == []
        late_edits = fake.calls_to("PATCH", rf"^/webhooks/\d+/{inter.token}/")
        assert all(c.at < result.at for c in late_edits)  # none once the 15 minutes are up
    finally:
        await close_bot(second)


# ---- the fake itself ---------------------------------------------------------------------------


async def test_the_fake_holds_the_rules_discord_holds(fake: FakeDiscord) -> None:
    """So that the tests above can fail: late and double acks, Content-Type, upload limits."""
    inter = await fake.interact(2, {"name": "x", "type": 1}, limit=100)
    late = await fake.interact(2, {"name": "x", "type": 1}, deadline=0.0)
    base = f"{fake.api_url}/interactions"
    async with aiohttp.ClientSession() as http:
        charset = {"Content-Type": "application/json; charset=utf-8"}
        url = f"{base}/{inter.id}/{inter.token}/callback"
        async with http.post(url, data=b'{"type": 5}', headers=charset) as resp:
            assert resp.status == 400
        async with http.post(url, json={"type": 5}) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"] == "application/json"
            assert (await resp.json())["interaction"]["response_message_loading"] is True
        async with http.post(url, json={"type": 5}) as resp:
            assert (resp.status, (await resp.json())["code"]) == (400, 40060)
        url = f"{base}/{late.id}/{late.token}/callback"
        async with http.post(url, json={"type": 5}) as resp:
            assert (resp.status, (await resp.json())["code"]) == (404, 10062)
        form = aiohttp.FormData()
        form.add_field("payload_json", '{"content": "big"}', content_type="application/json")
        form.add_field("files[0]", b"x" * 101, filename="big.png")
        url = f"{fake.api_url}/webhooks/{fake.app_id}/{inter.token}"
        async with http.post(url, data=form) as resp:
            assert (resp.status, (await resp.json())["code"]) == (413, 40005)
        fake.rate_limit("GET", r"^/users/@me$", retry_after=1.5)
        headers = {"Authorization": f"Bot {fake.token}"}
        async with http.get(f"{fake.api_url}/users/@me", headers=headers) as resp:
            assert resp.status == 429 and resp.headers["Via"]
            assert (await resp.json())["retry_after"] == 1.5
