"""Discord lifecycle probes, third round: what the other Discord test files leave out.

Each probe drives the real `DiscordAdapter` (real discord.py over the gateway and REST) against
the project's loopback fake Discord, with the real engine on a temp data dir and a scripted
provider. The fake is `tests.test_discord_resilience.ResilientDiscord` (gateway sessions, held
reconnects, channels that refuse us), plus, here:

- a 429 from Cloudflare (no `Via`, which discord.py does not wait out) on the requests a test's
  predicate picks, and 429s that carry Discord's bucket headers;
- a thread a moderator archived and locked (400 50083 on every route into it);
- a CDN that resets the connection in the middle of an attachment.

A probe marked xfail(strict) asserts the correct behaviour and names a defect in its reason.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import io
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from PIL import Image

from bot.errors import Refused
from bot.jobs import GeneratedImage
from bot.providers.base import GenerationRequest, JobHooks
from tests.conftest import Harness
from tests.fake_discord import CHANNEL_ID, USER, Call, FakeInteraction, MiB, _json
from tests.fakes import ScriptedProvider, png_bytes
from tests.test_discord import BOB, buttons, close_bot, content, job_of, restart
from tests.test_discord_resilience import (
    ResilientDiscord,
    answered_once,
    done,
    library_errors,
    resolved,
    rows,
    settled,
    start_bot,
)

ADMIN = f"discord:{USER['id']}"
THREAD_ID = "1300000000000000099"
ARCHIVED = (400, 50083, "Thread is archived")
WEBHOOK_MESSAGE = r"^/webhooks/\d+/[^/]+/messages/(@original|\d+)$"


class ProbeDiscord(ResilientDiscord):
    """ResilientDiscord, plus Cloudflare 429s, bucketed 429s and a CDN that breaks off."""

    def __init__(self) -> None:
        super().__init__()
        # (method, path) → True: answer 429 without `Via` (Cloudflare's, not Discord's API's).
        self.cloudflare: Callable[[str, str], bool] | None = None
        # (method, path) → True: answer 429 with Discord's bucket headers (and `Via`).
        self.bucketed: Callable[[str, str], bool] | None = None
        self.broken_cdn: set[str] = set()  # attachment ids whose download is cut off
        self.resume_url: str | None = None  # READY's resume_gateway_url (default: this fake)

    def _ready_payload(self, session_id: str = "fake-session") -> dict[str, Any]:
        ready = super()._ready_payload(session_id)
        if self.resume_url is not None:
            ready["resume_gateway_url"] = self.resume_url
        return ready

    async def invalidate(self, *, resumable: bool) -> None:
        """Send op 9 INVALID_SESSION on the live connections."""
        for ws in list(self._ready):
            await ws.send_str(json.dumps({"op": 9, "d": resumable}))

    async def _rest(self, request: web.Request) -> web.Response:
        path = "/" + request.match_info["tail"]
        for picks, via in ((self.cloudflare, False), (self.bucketed, True)):
            if picks is None or not picks(request.method, path):
                continue
            self.calls.append(
                Call(request.method, path, dict(request.query), "", status=429, at=time.monotonic())
            )
            await self._touch()
            body = {"message": "You are being rate limited.", "retry_after": 0.3, "global": False}
            headers = {}
            if via:
                headers = {
                    "Via": "1.1 google",
                    "X-RateLimit-Limit": "5",
                    "X-RateLimit-Remaining": "0",
                    "X-RateLimit-Reset": f"{time.time() + 0.3:.3f}",
                    "X-RateLimit-Reset-After": "0.300",
                    "X-RateLimit-Bucket": "d721dea6054f6322373d361f98e5c38b",
                    "X-RateLimit-Scope": "user",
                }
            return _json(body, 429, headers)
        return await super()._rest(request)

    async def _attachment(self, request: web.Request) -> web.StreamResponse:  # type: ignore[override]
        aid = request.match_info["id"]
        if aid not in self.broken_cdn:
            return await super()._attachment(request)
        self.fetched.append(aid)
        data = self.attachments[aid]
        response = web.StreamResponse(headers={"Content-Length": str(len(data))})
        response.content_type = "application/octet-stream"
        await response.prepare(request)
        await response.write(data[: len(data) // 3])
        assert request.transport is not None
        request.transport.close()  # the connection breaks off mid-body
        return response

    def results(self, inter: FakeInteraction) -> list[Call]:
        return [c for c in self.followups(inter.token) if c.files]

    def channel_results(self, channel_id: str = CHANNEL_ID) -> list[Call]:
        return [c for c in self.channel_posts(channel_id) if c.files]


@pytest.fixture
async def fake() -> AsyncIterator[ProbeDiscord]:
    server = ProbeDiscord()
    await server.start()
    yield server
    server.gateway_open.set()
    await server.close()


@pytest.fixture
async def bot(harness: Harness, fake: ProbeDiscord) -> AsyncIterator[Any]:
    b = await start_bot(harness, fake)
    yield b
    await close_bot(b)


@pytest.fixture(autouse=True)
def _logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.WARNING, "aiohttp.access")


async def eventually(predicate: Callable[[], Any], within: float = 3.0) -> bool:
    """Whether `predicate()` becomes true within `within` seconds (polled; never raises)."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


# ---- the gateway --------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["close-1000", "close-4007-session-gone", "op9-resumable"])
async def test_a_gateway_closed_mid_job_comes_back_and_every_job_posts_once(
    harness: Harness, fake: ProbeDiscord, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """Discord closes the gateway while one job generates and one waits: with 1000 (which
    Discord sends "for unknown reasons", discord.py resumes), or with 4007 after which the
    session is gone (RESUME → op 9 → a fresh IDENTIFY), or it sends op 9 with d=true (the
    session may be resumed). A command sent afterwards is served once; every job posts its
    result once, through its own token."""
    b = await start_bot(harness, fake, concurrency=1)
    gates = {p: asyncio.Event() for p in ("running", "waiting")}
    harness.provider.gates.update(gates)
    try:
        running = await fake.slash("imagine", {"prompt": "running"})
        waiting = await fake.slash("imagine", {"prompt": "waiting"}, user=BOB)
        await fake.wait_for(lambda: "Generating" in content(fake, running))
        await fake.wait_for(lambda: "Queued" in content(fake, waiting))
        if how == "close-1000":
            await fake.drop(1000)
            await fake.wait_for(lambda: fake.resumes and fake._ready, within=10)
            assert fake.identifies == 1 and fake.invalid_sessions == 0
        elif how == "op9-resumable":
            await fake.invalidate(resumable=True)
            await fake.wait_for(lambda: fake.resumes and fake._ready, within=10)
            assert fake.identifies == 1
        else:
            await fake.drop_session(4007)
            await fake.wait_for(lambda: fake.identifies == 2 and fake._ready, within=15)
        after = await fake.slash("imagine", {"prompt": "after"}, user=BOB)
        for gate in gates.values():
            gate.set()
        for inter in (running, waiting, after):
            await done(fake, inter)
            answered_once(fake, inter)
            assert len(fake.results(inter)) == 1
        found = await settled(harness, 3, delivered=True)
        assert {r["status"] for r in found} == {"succeeded"}
        assert not fake.channel_posts()
    finally:
        await close_bot(b)
    assert not [e for e in library_errors(caplog) if "Attempting a reconnect" not in e]


async def test_healthz_says_unwell_while_the_gateway_is_away(
    harness: Harness, fake: ProbeDiscord
) -> None:
    """`healthy()` ("for /healthz: connected to the gateway and ready") while the gateway is
    held closed: no command can reach the bot, and an operator's health check should know."""
    b = await start_bot(harness, fake)
    try:
        assert await eventually(b.adapter.healthy)  # READY, then guild_ready_timeout
        fake.gateway_open.clear()
        await fake.drop(4000)
        await fake.wait_for(lambda: not fake._ready)
        await asyncio.sleep(0.3)  # the client has seen the close and is reconnecting
        away = b.adapter.healthy()
        fake.gateway_open.set()
        await fake.wait_for(lambda: fake.resumes and fake._ready, within=10)
        back = await eventually(b.adapter.healthy)
        assert (away, back) == (False, True), "healthy() while away, and after the resume"
    finally:
        fake.gateway_open.set()
        await close_bot(b)


async def test_behind_a_gateway_proxy_a_dropped_connection_comes_back_through_the_proxy(
    harness: Harness, fake: ProbeDiscord
) -> None:
    """DISCORD_GATEWAY_URL is a proxy (the network reaches Discord's gateway only through it),
    and READY names Discord's own `resume_gateway_url`, as Discord's READY does. After a
    drop the bot must come back through the configured URL and go on serving."""
    elsewhere: list[str] = []  # connections tried at the resume URL, around the proxy

    async def unreachable(request: web.Request) -> web.Response:
        elsewhere.append(request.path)
        return web.Response(status=503)

    app = web.Application()
    app.router.add_get("/gw/", unreachable)
    runner = web.AppRunner(app, shutdown_timeout=0.5, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.resume_url = f"ws://127.0.0.1:{runner.addresses[0][1]}/gw/"
    b = await start_bot(harness, fake)
    try:
        await fake.drop(4000)
        back = await eventually(
            lambda: (fake.resumes or fake.identifies > 1) and fake._ready, within=6
        )
        assert back, f"not back through the proxy; {len(elsewhere)} tries at the resume URL"
        inter = await fake.slash("imagine", {"prompt": "after the drop"})
        await done(fake, inter)
    finally:
        await close_bot(b)
        await runner.cleanup()


# ---- rate limits on status edits --------------------------------------------------------------


def once_after(fake: ProbeDiscord, inter: FakeInteraction, started: Callable[[], bool]) -> None:
    """Refuse (Cloudflare 429) the first edit of `inter`'s messages made once `started()`."""
    refused: list[str] = []

    def picks(method: str, path: str) -> bool:
        if refused or method != "PATCH" or not re.match(WEBHOOK_MESSAGE, path):
            return False
        if inter.token not in path or not started():
            return False
        refused.append(path)
        return True

    fake.cloudflare = picks


async def test_a_done_edit_refused_once_by_cloudflare_still_ends_the_status_message(
    bot: Any, fake: ProbeDiscord, harness: Harness
) -> None:
    """The result followup is posted; the "✅ Done" edit of the deferred reply meets one 429
    without `Via` (discord.py raises it at once). The reply must not stay "Generating…" with a
    live ✖ Cancel under a delivered result, and nothing else is posted for it."""
    harness.provider.gates["edit me"] = gate = asyncio.Event()
    inter = await fake.slash("imagine", {"prompt": "edit me"})
    await fake.wait_for(lambda: "Generating" in content(fake, inter))
    once_after(fake, inter, lambda: bool(fake.results(inter)))
    gate.set()
    await fake.wait_for(lambda: fake.results(inter))
    await settled(harness, 1, delivered=True)
    ended = await eventually(lambda: "✅" in content(fake, inter))
    shown, extra = content(fake, inter), [c.payload["content"] for c in fake.channel_posts()]
    assert ended and not fake.original(inter)["components"] and not extra, (shown, extra)


async def test_a_reply_that_could_not_be_settled_does_not_stay_thinking(
    bot: Any, fake: ProbeDiscord, harness: Harness
) -> None:
    """Every edit of the deferred reply fails (Cloudflare 429) until the result has gone to the
    channel, and the "✅ Done" edit right after it fails once more: the reply must still
    end, not show "drawbridge is thinking…" until Discord says the application did not
    respond."""
    seen: list[str] = []

    def picks(method: str, path: str) -> bool:
        if method != "PATCH" or not re.match(WEBHOOK_MESSAGE, path):
            return False
        if not fake.channel_results() or not seen:
            if fake.channel_results():
                seen.append(path)
            return True
        return False

    fake.cloudflare = picks
    inter = await fake.slash("imagine", {"prompt": "a stubborn fox"})
    await fake.wait_for(lambda: fake.channel_results(), within=10)
    await settled(harness, 1, delivered=True)
    assert seen, "the done edit was not refused"
    ended = await eventually(lambda: "✅" in content(fake, inter))
    reply = fake.original(inter)
    assert ended, f"the reply still says {reply['content']!r} (flags {reply['flags']})"


@pytest.mark.parametrize("where", ["followup", "channel"])
async def test_a_bucketed_429_on_the_status_edit_is_waited_out_and_the_status_ends(
    harness: Harness, fake: ProbeDiscord, where: str
) -> None:
    """A 429 as Discord's API sends it (`Via`, bucket headers, `X-RateLimit-Scope: user`) on
    the status edits, through the interaction token and, after the token's 15 minutes,
    through the bot token: waited out, the status message ends, one result, nothing twice."""
    gate = harness.provider.gates["bucketed"] = asyncio.Event()
    now = [time.time()]
    b = await start_bot(harness, fake, clock=lambda: now[0])
    try:
        inter = await fake.slash("imagine", {"prompt": "bucketed"})
        await fake.wait_for(lambda: "Generating" in content(fake, inter))
        route = WEBHOOK_MESSAGE if where == "followup" else r"^/channels/\d+/messages/\d+$"
        limited: list[str] = []

        def picks(method: str, path: str) -> bool:
            if method == "PATCH" and re.match(route, path) and len(limited) < 2:
                limited.append(path)
                return True
            return False

        if where == "channel":
            now[0] += 16 * 60
            fake.expire(inter.token)
        fake.bucketed = picks
        gate.set()
        await done(fake, inter)
        assert len(limited) == 2
        assert fake.original(inter)["components"] == []
        posts = fake.results(inter) if where == "followup" else fake.channel_results()
        assert len(posts) == 1
        assert len(fake.results(inter)) + len(fake.channel_results()) == 1
        (found,) = await settled(harness, 1, delivered=True)
        assert found["status"] == "succeeded"
    finally:
        await close_bot(b)


async def test_an_ack_held_past_three_seconds_by_a_429_is_served_in_the_channel_once(
    harness: Harness, fake: ProbeDiscord
) -> None:
    """The acknowledgement meets a 429 whose wait outlasts the interaction's deadline:
    discord.py waits it out, Discord then refuses the late ack (10062), and the job is served
    in the channel, once, mentioning its user."""
    b = await start_bot(harness, fake)
    try:
        fake.rate_limit("POST", r"^/interactions/\d+/[^/]+/callback$", retry_after=0.8)
        inter = await fake.slash("imagine", {"prompt": "held ack"}, deadline=0.5)
        (post,) = await fake.wait_for(lambda: fake.channel_results(), within=8)
        assert inter.late and inter.acked_at is None
        assert post.payload["content"].startswith(f"<@{USER['id']}> ")
        (found,) = await settled(harness, 1, delivered=True)
        assert found["status"] == "succeeded"
        await asyncio.sleep(0.3)
        assert len(fake.channel_results()) == 1 and fake.followups(inter.token) == []
    finally:
        await close_bot(b)


# ---- a press or a command Discord would not let the bot acknowledge ---------------------------


@pytest.mark.parametrize("how", ["button", "slash"])
async def test_a_cancel_the_bot_was_too_late_to_acknowledge_still_cancels(
    harness: Harness, fake: ProbeDiscord, how: str
) -> None:
    """Alice presses ✖ (or sends /cancel) on her queued paid job; the bot is more than three
    seconds late (a busy loop, a replay after a RESUME), so Discord refuses the ack. She asked:
    the job must not run and charge her for it. (Its own status message can say so.)"""
    gate = harness.provider.gate = asyncio.Event()
    b = await start_bot(harness, fake, concurrency=1)
    try:
        await fake.slash("imagine", {"prompt": "hog"}, user=BOB)
        victim = await fake.slash("imagine", {"prompt": "changed my mind", "model": "paid"})
        await fake.wait_for(lambda: "Queued" in content(fake, victim))
        job_id = job_of(fake, victim)
        assert victim.original_id is not None
        if how == "button":
            late = await fake.press(victim.original_id, f"drawbridge:cancel:{job_id}", deadline=0)
        else:
            late = await fake.slash("cancel", {"job": job_id}, deadline=0)
        await fake.wait_for(lambda: late.late)
        await asyncio.sleep(0.3)  # what the bot does with the press, it does now
        gate.set()
        found = {r["prompt"]: r for r in await settled(harness, 2)}
        mine = found["changed my mind"]
        assert (mine["status"], mine["cost_usd"]) == ("cancelled", 0), (
            mine["status"],
            mine["cost_usd"],
        )
    finally:
        gate.set()
        await close_bot(b)


async def test_an_admins_cancel_on_another_users_job_cancels_it_and_both_are_told(
    harness: Harness, fake: ProbeDiscord
) -> None:
    """A moderator (ADMIN_IDS) presses ✖ on Bob's queued paid job: it is cancelled, not
    charged; Bob's status message says so (without its button), the admin's answer is private."""
    gate = harness.provider.gate = asyncio.Event()
    b = await start_bot(harness, fake, concurrency=1, admin_ids=frozenset({ADMIN}))
    try:
        await fake.slash("imagine", {"prompt": "hog"}, user=BOB)
        bobs = await fake.slash("imagine", {"prompt": "bob's", "model": "paid"}, user=BOB)
        await fake.wait_for(lambda: "Queued" in content(fake, bobs))
        job_id = job_of(fake, bobs)
        assert bobs.original_id is not None
        press = await fake.press(bobs.original_id, f"drawbridge:cancel:{job_id}")
        assert "cancelled, not charged" in await resolved(fake, press)
        assert press.ephemeral
        await fake.wait_for(lambda: "Cancelled" in content(fake, bobs))
        assert fake.original(bobs)["components"] == []
        gate.set()
        found = {r["prompt"]: r for r in await settled(harness, 2)}
        assert (found["bob's"]["status"], found["bob's"]["cost_usd"]) == ("cancelled", 0)
    finally:
        gate.set()
        await close_bot(b)


async def test_a_failed_jobs_reroll_still_works_after_a_restart(
    harness: Harness, fake: ProbeDiscord
) -> None:
    """A job that failed carries 🔄 on its status message; after a restart (a new session, a
    fresh READY) a press on it makes a new job of the same prompt, for the presser."""
    harness.provider.errors["unlucky"] = [Refused("no")]
    first = await start_bot(harness, fake)
    inter = await fake.slash("imagine", {"prompt": "unlucky", "model": "paid"})
    await fake.wait_for(lambda: "not charged" in content(fake, inter))
    job_id = job_of(fake, inter)
    assert buttons(fake.original(inter)) == [f"drawbridge:reroll:{job_id}"]
    await restart(harness, first)
    second = await start_bot(harness, fake)
    try:
        assert fake.identifies == 2  # a fresh session, not a resume
        assert inter.original_id is not None
        press = await fake.press(inter.original_id, f"drawbridge:reroll:{job_id}", user=BOB)
        new_id = await done(fake, press)
        assert new_id != job_id and len(fake.results(press)) == 1
        found = {r["id"]: r for r in await settled(harness, 2)}
        assert (found[new_id]["prompt"], found[new_id]["parent_id"]) == ("unlucky", job_id)
        assert found[new_id]["user_id"] == BOB["id"]
        assert (found[job_id]["status"], found[job_id]["cost_usd"]) == ("refused", 0)
    finally:
        await close_bot(second)


# ---- threads ------------------------------------------------------------------------------


async def test_a_thread_locked_and_archived_before_delivery_still_reaches_the_user(
    harness: Harness, fake: ProbeDiscord
) -> None:
    """A moderator locks and archives the thread while the job generates: Discord answers 400
    50083 on every route into it (the followup, the reply's edits, channel posts). The user
    must hear of the result somewhere: in their DMs, as for a channel that refuses us or is
    gone."""
    gate = harness.provider.gates["archived"] = asyncio.Event()
    b = await start_bot(harness, fake)
    try:
        thread = fake.thread_channel(THREAD_ID)
        inter = await fake.slash("imagine", {"prompt": "archived", "model": "paid"}, channel=thread)
        await fake.wait_for(lambda: "Generating" in content(fake, inter))
        fake.gone_channels[THREAD_ID] = ARCHIVED
        gate.set()
        (found,) = await settled(harness, 1)
        assert (found["status"], found["cost_usd"]) == ("succeeded", pytest.approx(0.5))
        await asyncio.sleep(0.5)
        dm = fake.dm_channels.get(str(USER["id"]))
        told = fake.channel_posts(dm) if dm else []
        assert told and told[0].files, "the user was told nothing, anywhere"
    finally:
        await close_bot(b)


async def test_a_thread_job_after_its_token_edits_and_posts_in_the_thread_only(
    harness: Harness, fake: ProbeDiscord
) -> None:
    """A job in a thread that fails after its token's 15 minutes: the outcome (not charged,
    with 🔄) lands in the thread, never in the parent channel."""
    harness.provider.errors["late in a thread"] = [Refused("no")]
    gate = harness.provider.gates["late in a thread"] = asyncio.Event()
    now = [time.time()]
    b = await start_bot(harness, fake, clock=lambda: now[0])
    try:
        thread = fake.thread_channel(THREAD_ID)
        inter = await fake.slash("imagine", {"prompt": "late in a thread"}, channel=thread)
        await fake.wait_for(lambda: "Generating" in content(fake, inter))
        now[0] += 16 * 60
        fake.expire(inter.token)
        gate.set()
        await fake.wait_for(lambda: "not charged" in content(fake, inter))
        edits = fake.calls_to("PATCH", rf"^/channels/{THREAD_ID}/messages/{inter.original_id}$")
        assert edits and edits[-1].status == 200
        assert "drawbridge:reroll:" in str(fake.original(inter)["components"])
        assert not [c for c in fake.calls if c.path.startswith(f"/channels/{CHANNEL_ID}/")]
        (found,) = await settled(harness, 1)
        assert (found["status"], found["thread_id"]) == ("refused", THREAD_ID)
    finally:
        await close_bot(b)


# ---- attachments and upload limits -------------------------------------------------------


@functools.lru_cache(maxsize=1)
def big_png() -> bytes:
    """An incompressible PNG of about 11 MB: over Discord's default 10 MiB upload limit."""
    side = 1920
    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buf, "PNG")
    data = buf.getvalue()
    assert 10 * MiB < len(data) < 50 * MiB
    return data


class BigProvider(ScriptedProvider):
    """Scripted, but each image is `big_png()`."""

    async def generate(self, request: GenerationRequest, hooks: JobHooks) -> list[GeneratedImage]:
        images = await super().generate(request, hooks)
        return [GeneratedImage(big_png(), "image/png", 1920, 1920) for _ in images]


async def test_a_boosted_guilds_upload_limit_carries_an_11_mb_png_as_it_is(
    harness: Harness, fake: ProbeDiscord
) -> None:
    """A level-2 boosted guild (`attachment_size_limit` 50 MiB): an 11 MB PNG goes as the
    followup byte for byte, not shrunk to the default 10 MiB."""
    harness.provider = BigProvider()
    b = await start_bot(harness, fake)
    try:
        inter = await fake.slash("imagine", {"prompt": "boosted"}, limit=50 * MiB)
        (post,) = await fake.wait_for(lambda: fake.results(inter), within=20)
        (part,) = post.files
        assert part.data == big_png() and part.filename.endswith(".png")
        assert "Shrunk" not in post.payload["content"]
    finally:
        await close_bot(b)


@pytest.mark.parametrize("channel_limit", [50 * MiB, 10 * MiB], ids=["boosted", "refused"])
async def test_a_boosted_guilds_late_result_in_the_channel_is_not_shrunk(
    harness: Harness, fake: ProbeDiscord, channel_limit: int
) -> None:
    """The same guild, the job ending after its token's 15 minutes: the result goes to the
    channel, where the guild's boost lets the bot post 50 MiB too. The 11 MB PNG the user paid
    for should arrive as it is, not scaled down with "(Shrunk to fit … 10 MB …)". A channel
    that takes only 10 MiB after all (413 40005) gets it again, shrunk, not lost as too large."""
    fake.channel_file_limit = channel_limit  # what the guild's boost lets the bot upload
    harness.provider = BigProvider()
    gate = harness.provider.gates["boosted late"] = asyncio.Event()
    now = [time.time()]
    b = await start_bot(harness, fake, clock=lambda: now[0])
    try:
        inter = await fake.slash("imagine", {"prompt": "boosted late"}, limit=50 * MiB)
        await fake.wait_for(lambda: "Generating" in content(fake, inter))
        now[0] += 16 * 60
        fake.expire(inter.token)
        gate.set()
        (post,) = await fake.wait_for(lambda: fake.channel_results(), within=30)
        (part,) = post.files
        if channel_limit == 10 * MiB:
            assert len(part.data) <= 10 * MiB < len(big_png())
            assert "Shrunk" in post.payload["content"]
            return
        assert (len(part.data), part.filename[-4:]) == (len(big_png()), ".png"), (
            len(part.data),
            part.filename,
            post.payload["content"][-60:],
        )
    finally:
        await close_bot(b)


async def test_an_attachment_download_cut_off_midway_is_refused_as_unreadable(
    bot: Any, fake: ProbeDiscord, harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """The CDN drops the connection a third of the way through the reference image: the user
    is told the attachment could not be read (as for a 404 or a timeout), nothing is charged,
    and the operator's log holds no traceback for a network blip."""
    att = fake.add_attachment(png_bytes(256, 256), "ref.png", "image/png")
    fake.broken_cdn.add(att["id"])
    inter = await fake.slash("imagine", {"prompt": "use this", "model": "paid", "image": att})
    text = await resolved(fake, inter)
    assert fake.fetched == [att["id"]]
    assert harness.provider.calls == [] and await rows(harness) == []
    tracebacks = library_errors(caplog)
    assert "PNG, JPEG or WebP" in text and not tracebacks, (text, tracebacks)


# ---- the operator's /export ---------------------------------------------------------------


async def test_export_over_the_upload_limit_goes_gzipped_and_too_big_says_so(
    harness: Harness, fake: ProbeDiscord
) -> None:
    """/export's CSV is sent as `.csv.gz` when the CSV itself would not fit the interaction's
    upload limit, and is refused with a pointer to `drawbridge usage --csv` when neither fits;
    the admin sees both privately."""
    b = await start_bot(harness, fake, admin_ids=frozenset({ADMIN}))
    try:
        made = [
            await fake.slash("imagine", {"prompt": "a row"}, user=who)
            for who in (USER, BOB, {**BOB, "id": "1400000000000000003", "username": "carol"})
        ]
        made.append(await fake.slash("imagine", {"prompt": "a paid row", "model": "paid"}))
        for inter in made:
            await done(fake, inter)
        csv = await b.engine.usage_csv()
        packed = len(gzip.compress(csv))
        assert packed < len(csv)
        fits_gzipped = await fake.slash("export", limit=(packed + len(csv)) // 2)
        (sent,) = await fake.wait_for(lambda: fake.followups(fits_gzipped.token))
        (part,) = sent.files
        assert part.filename == "drawbridge-usage.csv.gz"
        assert gzip.decompress(part.data) == csv
        assert fits_gzipped.ephemeral and sent.payload.get("flags", 0) & 64
        too_big = await fake.slash("export", limit=packed // 2)
        await fake.wait_for(lambda: "too large for Discord" in content(fake, too_big))
        assert "drawbridge usage --csv" in content(fake, too_big)
        assert fake.followups(too_big.token) == []
    finally:
        await close_bot(b)
