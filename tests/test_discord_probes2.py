"""Adversarial probes for the Discord adapter, second round: what the other Discord test files
leave out. Each probe drives the real `DiscordAdapter` (real discord.py over the gateway and
REST) against the project's loopback fake, with the real engine on a temp data dir and a
scripted provider, as `tests/test_discord.py` does.

The fake is used through a subclass that can inject any REST failure Discord gives (a 5xx, a
404 Unknown Webhook for a token Discord dropped, …) on the routes a test names.

A probe marked xfail(strict) asserts the correct behaviour and names a defect in its reason.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import struct
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiosqlite
import pytest
from aiohttp import web
from PIL import Image

from tests import test_discord as base
from tests.conftest import Harness
from tests.fake_discord import CHANNEL_ID, USER, Call, FakeDiscord, FakeInteraction, HTTPError
from tests.fakes import png_bytes
from tests.test_discord import BOB, answer, buttons, close_bot, content, job_of, open_bot

bot = base.bot  # the base module's fixture (fails a test on any logged ERROR); uses `fake` below

FINAL = {"succeeded", "failed", "refused", "cancelled"}
FOLLOWUP = r"^/webhooks/\d+/[^/]+$"


@dataclass
class _Fault:
    method: str
    pattern: re.Pattern[str]
    status: int
    code: int
    message: str
    count: int


class ProbeDiscord(FakeDiscord):
    """The project's fake, plus injected REST failures (`fail`)."""

    def __init__(self) -> None:
        super().__init__()
        self._faults: list[_Fault] = []

    def fail(
        self,
        method: str,
        pattern: str,
        status: int,
        code: int = 0,
        message: str = "injected",
        *,
        count: int = 1,
    ) -> None:
        """Answer the next `count` requests matching `method` and `pattern` with this error."""
        self._faults.append(_Fault(method, re.compile(pattern), status, code, message, count))

    async def _route(self, request: web.Request, path: str, call: Call) -> tuple[int, Any]:
        for fault in self._faults:
            if fault.count > 0 and fault.method == request.method and fault.pattern.search(path):
                fault.count -= 1
                raise HTTPError(fault.status, fault.code, fault.message)
        return await super()._route(request, path, call)

    def results(self, inter: FakeInteraction) -> list[Call]:
        return [c for c in self.followups(inter.token) if c.files]

    def channel_results(self, channel_id: str = CHANNEL_ID) -> list[Call]:
        return [c for c in self.channel_posts(channel_id) if c.files]


@pytest.fixture
async def fake() -> AsyncIterator[ProbeDiscord]:
    server = ProbeDiscord()
    await server.start()
    yield server
    await server.close()


# ---- helpers -----------------------------------------------------------------------------


async def rows(harness: Harness) -> list[dict[str, Any]]:
    path = harness.data_dir / "drawbridge.db"
    if not path.exists():
        return []
    async with aiosqlite.connect(path) as db:
        db.row_factory = aiosqlite.Row
        found = await db.execute_fetchall("SELECT * FROM jobs ORDER BY created_at")
    return [dict(r) for r in found]


async def settled(
    harness: Harness, n: int, within: float = 8.0, *, delivered: bool = False
) -> list[dict[str, Any]]:
    """The `n` job rows once each has a final status (and, with `delivered`, its delivery)."""
    deadline = time.monotonic() + within
    while True:
        found = await rows(harness)
        ok = len(found) == n and all(r["status"] in FINAL for r in found)
        if ok and (not delivered or all(r["delivered_at"] for r in found)):
            return found
        if time.monotonic() > deadline:
            raise AssertionError([(r["id"], r["status"], r["delivered_at"]) for r in found])
        await asyncio.sleep(0.05)


def acked_in_time(fake: FakeDiscord, inter: FakeInteraction) -> None:
    assert inter.acked_at is not None and not inter.late, inter
    assert inter.ack_delay is not None and inter.ack_delay < 3, inter.ack_delay
    first = next(c for c in fake.calls if inter.token in c.path)
    assert first.path.endswith("/callback"), first.path


def pings_at_most(fake: FakeDiscord, user_id: str | None) -> None:
    """Every message the bot sent or edited with text carries allowed_mentions that parse
    nothing and name at most `user_id`."""
    calls = [
        c
        for c in fake.calls
        if c.status == 200 and isinstance(c.json, dict) and c.json.get("content")
    ]
    assert calls
    for c in calls:
        mentions = c.json.get("allowed_mentions")
        assert mentions is not None, (c.path, c.json["content"][:80])
        assert mentions.get("parse") == [], (c.path, mentions)
        assert not mentions.get("roles"), (c.path, mentions)
        users = [str(u) for u in mentions.get("users", [])]
        assert users in ([], [user_id] if user_id else []), (c.path, mentions)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming `width`×`height`, and one tiny IDAT: a bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def truncated_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, "PNG")
    data = buf.getvalue()
    return data[: len(data) // 2]


# ---- REST failures while a job runs ---------------------------------------------------------


async def test_a_429_without_via_on_the_result_is_posted_once_and_charged_once(
    bot: base.Bot, fake: ProbeDiscord, harness: Harness
) -> None:
    """A 429 with no `Via` header (Cloudflare's, not Discord's): discord.py raises it at once
    instead of waiting. The engine must try again: one result, one charge."""
    fake.rate_limit("POST", FOLLOWUP, retry_after=0.1, via=False)
    inter = await fake.slash("imagine", {"prompt": "cloudflare says no", "model": "paid"})
    await fake.wait_for(lambda: fake.results(inter), within=8)
    await fake.wait_for(lambda: "✅" in content(fake, inter))
    assert [c.status for c in fake.calls_to("POST", rf"/{inter.token}$")] == [429, 200]
    assert fake.channel_posts() == []
    (found,) = await settled(harness, 1, delivered=True)
    assert (found["status"], found["cost_usd"]) == ("succeeded", pytest.approx(0.5))


async def test_a_500_on_the_result_followup_is_retried_and_posted_once(
    bot: base.Bot, fake: ProbeDiscord, harness: Harness
) -> None:
    fake.fail("POST", FOLLOWUP, 500, 0, "Internal Server Error")
    inter = await fake.slash("imagine", {"prompt": "a flaky discord", "model": "paid"})
    await fake.wait_for(lambda: fake.results(inter), within=8)
    await fake.wait_for(lambda: "✅" in content(fake, inter))
    assert [c.status for c in fake.calls_to("POST", rf"/{inter.token}$")] == [500, 200]
    assert len(fake.results(inter)) == 1 and fake.channel_posts() == []
    (found,) = await settled(harness, 1, delivered=True)
    assert (found["status"], found["cost_usd"]) == ("succeeded", pytest.approx(0.5))


async def test_a_token_discord_dropped_mid_job_10015_puts_the_result_in_the_channel_once(
    harness: Harness, fake: ProbeDiscord
) -> None:
    """The interaction token dies early (404 10015 Unknown Webhook on every webhook route),
    though the bot's clock says it has minutes left: the result goes to the channel, with a
    mention, once; the user is charged once."""
    gate = harness.provider.gates["dropped"] = asyncio.Event()
    b = await open_bot(harness, fake)
    try:
        inter = await fake.slash("imagine", {"prompt": "dropped", "model": "paid"})
        await fake.wait_for(lambda: "Generating" in content(fake, inter))
        fake.fail("POST", rf"/{inter.token}$", 404, 10015, "Unknown Webhook", count=100)
        fake.fail("PATCH", rf"/{inter.token}/messages/", 404, 10015, "Unknown Webhook", count=100)
        gate.set()
        (post,) = await fake.wait_for(lambda: fake.channel_results(), within=8)
        assert post.payload["content"].startswith(f"<@{USER['id']}> ")
        await fake.wait_for(lambda: "✅" in content(fake, inter))  # edited with the bot token
        (found,) = await settled(harness, 1, delivered=True)
        assert (found["status"], found["cost_usd"]) == ("succeeded", pytest.approx(0.5))
        await asyncio.sleep(0.3)
        assert len(fake.channel_results()) == 1 and fake.results(inter) == []
        tries = fake.calls_to("POST", rf"/{inter.token}$")
        assert len(tries) == 1, [c.status for c in tries]  # a dead token is not tried again
    finally:
        await close_bot(b)


async def test_a_500_on_the_final_status_edit_still_ends_the_status_message(
    bot: base.Bot, fake: ProbeDiscord, harness: Harness
) -> None:
    """The "✅ done" edit meets one 500: discord.py retries it; the status message ends."""
    inter = await fake.slash("imagine", {"prompt": "done edit flakes"})
    await fake.wait_for(lambda: fake.results(inter))
    fake.fail("PATCH", rf"/{inter.token}/messages/", 500, 0, "Internal Server Error")
    await fake.wait_for(lambda: "✅" in content(fake, inter), within=8)
    assert fake.original(inter)["components"] == []
    (found,) = await settled(harness, 1, delivered=True)
    assert found["status"] == "succeeded"


async def test_a_result_keeps_its_caption_and_reroll_when_its_reply_could_not_be_settled(
    bot: base.Bot, fake: ProbeDiscord, harness: Harness
) -> None:
    """Every edit of the deferred reply before the result fails (two 429s without `Via`, which
    discord.py does not wait out), so it still says "thinking…" when the result is posted:
    Discord turns that followup into the reply itself. The "✅ done" edit that comes next
    must not overwrite the result's caption and its 🔄 button."""
    fake.rate_limit("PATCH", r"/messages/@original$", retry_after=0.1, via=False, count=2)
    inter = await fake.slash("imagine", {"prompt": "a quick fox"})
    await fake.wait_for(lambda: fake.results(inter), within=8)
    await fake.wait_for(lambda: any("✅" in m["content"] for m in fake.messages.values()))
    await settled(harness, 1, delivered=True)
    await asyncio.sleep(0.5)  # any edit still coming
    shown = [
        m for m in fake.messages.values() if m["attachments"] and "a quick fox" in m["content"]
    ]
    assert shown, {m["id"]: m["content"] for m in fake.messages.values()}
    assert any(cid.startswith("drawbridge:reroll:") for cid in buttons(shown[0])), shown[0]


async def test_a_result_whose_reply_stays_unsettled_goes_to_the_channel_whole(
    bot: base.Bot, fake: ProbeDiscord, harness: Harness
) -> None:
    """Every try to edit the deferred reply fails (a Cloudflare 429, which discord.py does not
    wait out): the result goes to the channel with its caption, its 🔄 and a mention of the
    user, not as the followup that would become the reply and lose both to the "done" edit."""
    fake.rate_limit("PATCH", r"/messages/@original$", retry_after=0.1, via=False, count=10)
    inter = await fake.slash("imagine", {"prompt": "a stubborn fox"})
    (post,) = await fake.wait_for(lambda: fake.channel_results(), within=10)
    assert fake.results(inter) == []
    assert post.payload["content"].startswith(f"<@{USER['id']}>")
    assert "a stubborn fox" in post.payload["content"]
    await settled(harness, 1, delivered=True)
    await asyncio.sleep(0.5)  # the "done" edit, refused too: nothing is posted in its place
    shown = [m for m in fake.messages.values() if m["attachments"]]
    assert len(shown) == 1 and any(c.startswith("drawbridge:reroll:") for c in buttons(shown[0]))


# ---- the acknowledgement -------------------------------------------------------------------


async def test_a_refusal_whose_ack_discord_refused_is_still_told_in_the_channel(
    bot: base.Bot, fake: ProbeDiscord, harness: Harness
) -> None:
    """A job whose ack came too late is served in the channel; a refusal must be too, or the
    user sees only "The application did not respond" and never learns why."""
    inter = await fake.slash("imagine", {"prompt": "too many", "count": 9}, deadline=0.0)
    await fake.wait_for(lambda: inter.late)
    told = await fake.wait_for(
        lambda: [c for c in fake.channel_posts() if "1 to 4 images" in c.payload["content"]],
        within=3,
    )
    assert told[0].payload["content"].startswith(f"<@{USER['id']}>")
    assert harness.provider.calls == [] and await rows(harness) == []


async def test_a_reroll_acknowledges_in_time_when_the_database_is_slow(
    bot: base.Bot, fake: ProbeDiscord, harness: Harness
) -> None:
    """🔄 reads the old job from SQLite; a 3.5 s read must not make the press miss 3 s."""
    inter = await fake.slash("imagine", {"prompt": "slow reroll"})
    job_id = await base.wait_ended(fake, inter)
    (result,) = [m for m in fake.messages.values() if f"drawbridge:reroll:{job_id}" in buttons(m)]
    store = bot.engine.store
    get_job = store.get_job

    async def slow_get_job(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(3.5)
        return await get_job(*args, **kwargs)

    store.get_job = slow_get_job  # type: ignore[method-assign]
    press = await fake.press(result["id"], f"drawbridge:reroll:{job_id}")
    await fake.wait_for(lambda: press.acked_at is not None or press.late, within=5)
    acked_in_time(fake, press)
    await fake.wait_for(lambda: fake.results(press), within=10)
    await settled(harness, 2)


async def test_a_late_reroll_press_is_served_in_the_channel_mentioning_only_the_presser(
    bot: base.Bot, fake: ProbeDiscord, harness: Harness
) -> None:
    """Bob's 🔄 on Alice's result reaches the bot too late to ack (10062): Bob's new job is
    posted in the channel mentioning Bob, and nobody else (not Alice, not @everyone)."""
    prompt = "@everyone <@&1500000000000000001> look"
    inter = await fake.slash("imagine", {"prompt": prompt})
    job_id = await base.wait_ended(fake, inter)
    (result,) = [m for m in fake.messages.values() if f"drawbridge:reroll:{job_id}" in buttons(m)]
    press = await fake.press(result["id"], f"drawbridge:reroll:{job_id}", user=BOB, deadline=0.0)
    (post,) = await fake.wait_for(lambda: fake.channel_results(), within=8)
    assert press.late
    assert post.payload["content"].startswith(f"<@{BOB['id']}> ")
    assert f"<@{USER['id']}>" not in post.payload["content"]
    assert [str(u) for u in post.payload["allowed_mentions"]["users"]] == [BOB["id"]]
    assert post.payload["allowed_mentions"]["parse"] == []
    found = await settled(harness, 2)
    assert sorted(r["user_id"] for r in found) == sorted([USER["id"], BOB["id"]])


# ---- who may press what ----------------------------------------------------------------------


async def test_a_stranger_on_a_private_bot_cannot_reroll_an_allowed_users_result(
    harness: Harness, fake: ProbeDiscord
) -> None:
    """ALLOWED_IDS lets Alice in; Bob, in the same channel, presses 🔄 on her result. The
    operator pays for what Bob makes, so Bob must be refused like his own /imagine is."""
    b = await open_bot(harness, fake, allowed_ids=frozenset({f"discord:{USER['id']}"}))
    try:
        inter = await fake.slash("imagine", {"prompt": "members only", "model": "paid"})
        job_id = await base.wait_ended(fake, inter)
        (result,) = [
            m for m in fake.messages.values() if f"drawbridge:reroll:{job_id}" in buttons(m)
        ]
        press = await fake.press(result["id"], f"drawbridge:reroll:{job_id}", user=BOB)
        text = await answer(fake, press)
        acked_in_time(fake, press)
        assert "not open to you" in text
        assert len(harness.provider.calls) == 1
        (found,) = await settled(harness, 1)
        assert found["user_id"] == USER["id"]
    finally:
        await close_bot(b)


async def test_another_users_cancel_on_a_queued_job_changes_nothing_and_tells_only_him(
    harness: Harness, fake: ProbeDiscord
) -> None:
    """Bob presses ✖ on Alice's *queued* job (the running case is covered elsewhere): his
    answer is private, Alice's status message keeps its Cancel, and her job runs."""
    gate = harness.provider.gate = asyncio.Event()
    b = await open_bot(harness, fake, concurrency=1)
    try:
        first = await fake.slash("imagine", {"prompt": "hog"})
        queued = await fake.slash("imagine", {"prompt": "queued one"})
        await fake.wait_for(lambda: "Queued" in content(fake, queued))
        job_id = job_of(fake, queued)
        assert queued.original_id is not None
        before = content(fake, queued)
        press = await fake.press(queued.original_id, f"drawbridge:cancel:{job_id}", user=BOB)
        text = await answer(fake, press)
        assert press.ephemeral and "No job" in text
        await asyncio.sleep(0.2)
        assert content(fake, queued) == before
        assert buttons(fake.original(queued)) == [f"drawbridge:cancel:{job_id}"]
        gate.set()
        await base.wait_ended(fake, first)
        await base.wait_ended(fake, queued)
        assert {r["status"] for r in await settled(harness, 2)} == {"succeeded"}
    finally:
        gate.set()
        await close_bot(b)


async def test_cancel_on_a_channel_status_message_after_a_refused_ack_cancels_it(
    harness: Harness, fake: ProbeDiscord
) -> None:
    """Discord refused the ack, so the job's status is a channel message with ✖: pressing it
    cancels the job (not charged) and that channel message says so, without its button."""
    gate = harness.provider.gate = asyncio.Event()
    b = await open_bot(harness, fake, concurrency=1)
    try:
        await fake.slash("imagine", {"prompt": "hog"})
        await fake.slash("imagine", {"prompt": "late one", "model": "paid"}, deadline=0.0)

        def status() -> dict[str, Any] | None:
            return next(
                (
                    m
                    for m in fake.messages.values()
                    if m["type"] == 0 and any("cancel" in c for c in buttons(m))
                ),
                None,
            )

        message = await fake.wait_for(status)
        (custom_id,) = buttons(message)
        press = await fake.press(message["id"], custom_id)
        assert "cancelled, not charged" in await answer(fake, press)
        await fake.wait_for(lambda: "Cancelled" in fake.messages[message["id"]]["content"])
        assert fake.messages[message["id"]]["components"] == []
        gate.set()
        found = {r["prompt"]: r for r in await settled(harness, 2)}
        assert (found["late one"]["status"], found["late one"]["cost_usd"]) == ("cancelled", 0)
    finally:
        gate.set()
        await close_bot(b)


# ---- hostile input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "ctype"),
    [
        (b"", "image/png"),  # a zero-byte file
        (truncated_png(), "image/png"),  # cut short
        (png_header_only(60000, 60000), "image/png"),  # a decompression bomb's header
        (png_header_only(64, 64), "image/png"),  # header fine, most pixels missing
        (b"hello, I am a text file\n", "text/plain"),  # a .txt
    ],
    ids=["zero-byte", "truncated", "bomb", "no-pixels", "txt"],
)
async def test_a_reference_that_is_not_a_whole_image_is_refused_before_any_charge(
    bot: base.Bot, fake: ProbeDiscord, harness: Harness, data: bytes, ctype: str
) -> None:
    att = fake.add_attachment(data, "ref.png", ctype)
    inter = await fake.slash("imagine", {"prompt": "use this", "model": "paid", "image": att})
    text = await asyncio.wait_for(answer(fake, inter), 6)
    acked_in_time(fake, inter)
    assert "PNG, JPEG or WebP" in text or "too large" in text, text
    assert len(text) < 300
    assert harness.provider.calls == [] and await rows(harness) == []


async def test_a_reference_for_a_model_that_is_not_there_is_not_fetched(
    bot: base.Bot, fake: ProbeDiscord, harness: Harness
) -> None:
    att = fake.add_attachment(png_bytes(), "ref.png", "image/png")
    inter = await fake.slash("imagine", {"prompt": "use this", "model": "nosuch", "image": att})
    text = await asyncio.wait_for(answer(fake, inter), 6)
    assert "There is no model called nosuch" in text, text
    assert fake.fetched == []
    assert harness.provider.calls == [] and await rows(harness) == []


@pytest.mark.parametrize("prompt", ["--ar 16:9 --n 2", "--seed 5", "  --model paid  "])
async def test_a_prompt_of_only_options_is_refused_as_empty(
    bot: base.Bot, fake: ProbeDiscord, harness: Harness, prompt: str
) -> None:
    inter = await fake.slash("imagine", {"prompt": prompt})
    text = await asyncio.wait_for(answer(fake, inter), 6)
    assert "Please describe the image" in text, text
    assert harness.provider.calls == [] and await rows(harness) == []


async def test_a_4000_character_prompt_is_refused_shortly_and_pings_no_one(
    bot: base.Bot, fake: ProbeDiscord, harness: Harness
) -> None:
    prompt = ("@everyone <@&1500000000000000001> **x** " * 100)[:3999] + "!"
    inter = await fake.slash("imagine", {"prompt": prompt})
    text = await asyncio.wait_for(answer(fake, inter), 6)
    assert "4000 characters; the limit is 2000" in text, text
    assert len(text) < 300 and "@everyone" not in text
    pings_at_most(fake, None)
    assert harness.provider.calls == [] and await rows(harness) == []


# ---- DMs versus guild channels ----------------------------------------------------------------


async def test_a_dm_job_that_outlives_its_token_is_posted_in_the_dm(
    harness: Harness, fake: ProbeDiscord
) -> None:
    """In a DM there is no "channel" but the DM: a job that ends after its 15 minutes goes
    there, once, and the status message still ends."""
    dm_id = "1300000000000000077"
    gate = harness.provider.gates["private slow"] = asyncio.Event()
    now = [time.time()]
    b = await open_bot(harness, fake, clock=lambda: now[0])
    try:
        inter = await fake.slash(
            "imagine", {"prompt": "private slow"}, channel=fake.dm_channel(dm_id)
        )
        await fake.wait_for(lambda: "Generating" in content(fake, inter))
        now[0] += 16 * 60
        fake.expire(inter.token)
        gate.set()
        (post,) = await fake.wait_for(lambda: fake.channel_results(dm_id), within=8)
        assert post.payload["content"].startswith(f"<@{USER['id']}> ")
        assert fake.results(inter) == [] and fake.channel_posts(CHANNEL_ID) == []
        (found,) = await settled(harness, 1, delivered=True)
        assert (found["chat_id"], found["guild_id"], found["status"]) == (
            dm_id,
            None,
            "succeeded",
        )
        await asyncio.sleep(0.3)
        assert len(fake.channel_results(dm_id)) == 1
        assert fake.dm_channels == {}  # no DM opened: the job's channel is the DM
    finally:
        await close_bot(b)


async def test_a_private_guild_does_not_serve_its_members_in_dms(
    harness: Harness, fake: ProbeDiscord, caplog: pytest.LogCaptureFixture
) -> None:
    """ALLOWED_IDS=discord-guild:G serves that guild; the same user's DM is not that guild."""
    caplog.set_level(logging.INFO)
    guild = fake.guild_channel()["guild_id"]
    b = await open_bot(harness, fake, allowed_ids=frozenset({f"discord-guild:{guild}"}))
    try:
        in_guild = await fake.slash("imagine", {"prompt": "in the guild"})
        await base.wait_ended(fake, in_guild)
        in_dm = await fake.slash(
            "imagine", {"prompt": "in my dm"}, channel=fake.dm_channel("1300000000000000077")
        )
        assert "not open to you" in await answer(fake, in_dm)
        assert len(harness.provider.calls) == 1
    finally:
        await close_bot(b)
