"""Resilience probes for the Discord adapter: what a server operator hits on a bad day.

Each probe drives the real `DiscordAdapter` (real discord.py over a websocket and HTTP) against
the project's loopback fake Discord, with the real engine on a temp data dir and a scripted
provider, as `tests/test_discord.py` does. The fake is used through a subclass that adds what
real Discord does and the fake leaves out:

- the gateway keeps a session: a RESUME replays the events sent after the client's sequence
  (also those dispatched while it was away), and a session Discord dropped (close 4009, say)
  answers the RESUME with INVALID_SESSION (op 9, d=false), which forces a new IDENTIFY;
- the gateway can be held closed for a moment, so an interaction lands while the bot is away;
- a global 429 carries `X-RateLimit-Global` and `X-RateLimit-Scope: global`;
- a channel can be deleted (404 10003 Unknown Channel, on channel and webhook routes alike) or
  closed to the bot (403 50001 Missing Access).

A probe that fails names a defect: its docstring says what a user or an operator would see.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiosqlite
import pytest
from aiohttp import web

from adapters.discord_adapter import DiscordAdapter
from bot.errors import Transient
from bot.quota import Limits
from tests.conftest import Harness
from tests.fake_discord import (
    CHANNEL_ID,
    GUILD_ID,
    USER,
    Call,
    FakeDiscord,
    FakeInteraction,
    HTTPError,
)
from tests.test_discord import BOB, Bot, buttons, close_bot, content, job_of, restart

FINAL = {"succeeded", "failed", "refused", "cancelled"}
CAROL = {**USER, "id": "1400000000000000003", "username": "carol"}
DAVE = {**USER, "id": "1400000000000000004", "username": "dave"}
ERIN = {**USER, "id": "1400000000000000005", "username": "erin"}
USERS = [USER, BOB, CAROL, DAVE, ERIN]
FOLLOWUP = r"^/webhooks/\d+/[^/]+$"
ORIGINAL_EDIT = r"^/webhooks/\d+/[^/]+/messages/@original$"


class ResilientDiscord(FakeDiscord):
    """The project's fake, plus gateway sessions, held reconnects, and more REST failures."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[int, str, dict[str, Any]]] = []  # (seq, event, data) sent
        self.session_id = ""
        self.session_valid = False
        self.identifies = 0
        self.resumes: list[int | None] = []  # the seq each RESUME asked to resume from
        self.invalid_sessions = 0
        self.gateway_open = asyncio.Event()
        self.gateway_open.set()
        self.gone_channels: dict[str, tuple[int, int, str]] = {}  # channel id → error
        self._ready: list[web.WebSocketResponse] = []

    # ---- gateway -------------------------------------------------------------------------

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        """One sequence number per event, kept for a RESUME; sent to live sessions only."""
        self._seq += 1
        self.events.append((self._seq, event, data))
        for ws in list(self._ready):
            await ws.send_str(json.dumps({"op": 0, "t": event, "s": self._seq, "d": data}))

    async def drop_session(self, code: int = 4009) -> None:
        """Close with a code after which Discord will not resume the session."""
        self.session_valid = False
        await self.drop(code)

    async def request_reconnect(self) -> None:
        """Send op 7 RECONNECT, as Discord does before it moves a session."""
        for ws in list(self._ready):
            await ws.send_str(json.dumps({"op": 7, "d": None}))

    async def _gateway_opening(self) -> None:
        await self.gateway_open.wait()

    async def _gateway_closed(self, ws: web.WebSocketResponse) -> None:
        if ws in self._ready:
            self._ready.remove(ws)
        await self._touch()

    async def _identify(self, ws: web.WebSocketResponse, data: dict[str, Any]) -> None:
        self.identify = data
        self.identifies += 1
        self.session_id = f"fake-session-{self.identifies}"
        self.session_valid = True
        self._seq += 1
        ready = self._ready_payload(self.session_id)
        await ws.send_str(json.dumps({"op": 0, "t": "READY", "s": self._seq, "d": ready}))
        self._ready.append(ws)

    async def _resume(self, ws: web.WebSocketResponse, data: dict[str, Any]) -> None:
        seq = data.get("seq")
        self.resumes.append(seq)
        if not self.session_valid or data.get("session_id") != self.session_id:
            self.invalid_sessions += 1
            await ws.send_str(json.dumps({"op": 9, "d": False}))
            return
        after = seq if isinstance(seq, int) else 0
        for s, event, payload in list(self.events):
            if s > after:
                await ws.send_str(json.dumps({"op": 0, "t": event, "s": s, "d": payload}))
        self._seq += 1
        await ws.send_str(json.dumps({"op": 0, "t": "RESUMED", "s": self._seq, "d": {}}))
        self._ready.append(ws)

    async def wait_live(self, within: float = 10.0) -> None:
        await self.wait_for(lambda: self._ready, within)

    # ---- REST ----------------------------------------------------------------------------

    async def _rest(self, request: web.Request) -> web.Response:
        response = await super()._rest(request)
        body = response.body
        if response.status == 429 and isinstance(body, bytes) and json.loads(body)["global"]:
            response.headers["X-RateLimit-Global"] = "true"
            response.headers["X-RateLimit-Scope"] = "global"
        return response

    async def _route(self, request: web.Request, path: str, call: Call) -> tuple[int, Any]:
        channel = None
        if m := re.fullmatch(r"/channels/(\d+)/messages(?:/\d+)?", path):
            channel = m[1]
        elif m := re.fullmatch(rf"/webhooks/{self.app_id}/([^/]+)(?:/.*)?", path):
            inter = next((i for i in self.interactions.values() if i.token == m[1]), None)
            channel = None if inter is None else str(inter.payload["channel_id"])
        if channel is not None and channel in self.gone_channels:
            raise HTTPError(*self.gone_channels[channel])
        return await super()._route(request, path, call)

    # ---- what the probes read --------------------------------------------------------------

    def callbacks(self, inter: FakeInteraction) -> list[Call]:
        return self.calls_to("POST", rf"^/interactions/{inter.id}/[^/]+/callback$")

    def results(self, inter: FakeInteraction) -> list[Call]:
        """The interaction's successful followups that carried images."""
        return [c for c in self.followups(inter.token) if c.files]


UNKNOWN_CHANNEL = (404, 10003, "Unknown Channel")
# The adapter's own defaults, as `drawbridge run` uses them (the probes use shorter ones).
SHIPPED_TIMING = {
    name: param.default
    for name, param in inspect.signature(DiscordAdapter).parameters.items()
    if name in ("edit_interval", "first_edit_delay", "position_interval")
}
MISSING_ACCESS = (403, 50001, "Missing Access")


@pytest.fixture
async def fake() -> AsyncIterator[ResilientDiscord]:
    server = ResilientDiscord()
    await server.start()
    yield server
    server.gateway_open.set()
    await server.close()


@pytest.fixture(autouse=True)
def _logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.WARNING, "aiohttp.access")


async def start_bot(
    harness: Harness,
    fake: FakeDiscord,
    *,
    clock: Callable[[], float] = time.time,
    timing: dict[str, float] | None = None,
    **config: object,
) -> Bot:
    """The bot as `drawbridge run` composes it; `timing` overrides the adapter's edit timing
    (the probes use short intervals unless they test the shipped ones)."""
    config.setdefault("shutdown_grace", 0.1)
    engine = await harness.engine(start=False, **config)
    knobs = {"edit_interval": 0.05, "first_edit_delay": 0.0, "position_interval": 0.05}
    knobs.update(timing or {})
    adapter = DiscordAdapter(
        engine,
        fake.token,
        fake.api_url,
        fake.gateway_url,
        guild_ids=[int(GUILD_ID)],
        clock=clock,
        guild_ready_timeout=0.05,
        **knobs,
    )
    await adapter.open()
    await engine.start()
    await adapter.start()
    await fake.wait_identified()
    return Bot(engine, adapter)


async def rows(harness: Harness) -> list[dict[str, Any]]:
    path = harness.data_dir / "drawbridge.db"
    if not path.exists():
        return []
    async with aiosqlite.connect(path) as db:
        db.row_factory = aiosqlite.Row
        found = await db.execute_fetchall("SELECT * FROM jobs ORDER BY created_at")
    return [dict(r) for r in found]


async def settled(
    harness: Harness, n: int | None = None, within: float = 10.0, *, delivered: bool = False
) -> list[dict[str, Any]]:
    """The job rows once every one has a final status (and there are `n` of them; and, with
    `delivered`, each has its delivery recorded, which is committed just after the post)."""
    deadline = time.monotonic() + within
    while True:
        found = await rows(harness)
        ok = (n is None or len(found) == n) and all(r["status"] in FINAL for r in found)
        if ok and (not delivered or all(r["delivered_at"] for r in found)):
            return found
        if time.monotonic() > deadline:
            raise AssertionError([(r["id"], r["status"], r["delivered_at"]) for r in found])
        await asyncio.sleep(0.05)


async def done(fake: FakeDiscord, inter: FakeInteraction, within: float = 10.0) -> str:
    """The job id, once the interaction's status message shows it delivered."""
    await fake.wait_for(lambda: "✅" in content(fake, inter), within)
    return job_of(fake, inter)


def answered_once(fake: ResilientDiscord, inter: FakeInteraction) -> None:
    """Exactly one acknowledgement reached Discord, in time; nothing was refused as a repeat."""
    tries = fake.callbacks(inter)
    assert [c.status for c in tries if c.status != 429] == [200], [c.status for c in tries]
    assert inter.acked_at is not None and not inter.late, inter


def library_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What discord.py or the adapter logged as an unhandled exception."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and (r.exc_info or "Ignoring exception" in r.getMessage())
    ]


async def resolved(fake: FakeDiscord, inter: FakeInteraction, within: float = 6.0) -> str:
    """The deferred reply's text once the bot has replaced "thinking…" with an answer."""

    def text() -> str | None:
        if not inter.original_id or inter.original_id not in fake.messages:
            return None
        message = fake.messages[inter.original_id]
        return None if int(message.get("flags", 0)) & 128 else str(message.get("content", ""))

    return str(await fake.wait_for(text, within))


# ---- the gateway drops mid-job ------------------------------------------------------------


async def _jobs_in_flight(
    harness: Harness, fake: ResilientDiscord
) -> tuple[list[FakeInteraction], dict[str, asyncio.Event]]:
    """Three jobs from two users with concurrency 1: one generating, two queued."""
    gates = {p: asyncio.Event() for p in ("first", "second", "third")}
    harness.provider.gates.update(gates)
    inters = [
        await fake.slash("imagine", {"prompt": "first"}),
        await fake.slash("imagine", {"prompt": "second"}, user=BOB),
        await fake.slash("imagine", {"prompt": "third"}),
    ]
    await fake.wait_for(lambda: "Generating" in content(fake, inters[0]))
    await fake.wait_for(lambda: all("Queued" in content(fake, i) for i in inters[1:]))
    return inters, gates


@pytest.mark.parametrize("how", ["close-4000", "close-1001", "close-4008", "op7-reconnect"])
async def test_a_resumed_gateway_loses_no_job_and_posts_nothing_twice(
    harness: Harness, fake: ResilientDiscord, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """The gateway drops (a close Discord lets the bot RESUME) while one job generates and two
    wait, and a new /imagine is sent while the bot is away: Discord replays it on RESUME.
    Every job ends with one result, and the replayed command is answered once."""
    b = await start_bot(harness, fake, concurrency=1)
    try:
        inters, gates = await _jobs_in_flight(harness, fake)
        fake.gateway_open.clear()  # the bot's reconnect waits until the command is sent
        if how == "op7-reconnect":
            await fake.request_reconnect()
        else:
            await fake.drop(int(how.split("-")[1]))
        await fake.wait_for(lambda: not fake._ready)
        away = await fake.slash("imagine", {"prompt": "while away"}, user=BOB)
        fake.gateway_open.set()
        await fake.wait_for(lambda: fake.resumes and fake._ready)
        assert fake.identifies == 1 and fake.invalid_sessions == 0
        await fake.wait_for(lambda: away.acked_at is not None or away.late)
        for gate in gates.values():
            gate.set()
        for inter in [*inters, away]:
            await done(fake, inter)
            answered_once(fake, inter)
            assert len(fake.results(inter)) == 1, [c.path for c in fake.results(inter)]
        found = await settled(harness, 4, delivered=True)
        assert {r["status"] for r in found} == {"succeeded"}
        assert not fake.channel_posts()  # every token was alive: nothing went to the channel
    finally:
        await close_bot(b)
    assert not library_errors(caplog)


async def test_a_command_replayed_too_late_to_acknowledge_is_served_in_the_channel(
    harness: Harness, fake: ResilientDiscord
) -> None:
    """The bot is away longer than the interaction's deadline: the RESUME replays the command,
    Discord refuses the late ack (10062), and the job is answered in the channel, once."""
    b = await start_bot(harness, fake)
    try:
        fake.gateway_open.clear()
        await fake.drop(4000)
        await fake.wait_for(lambda: not fake._ready)
        away = await fake.slash("imagine", {"prompt": "long away"}, deadline=0.2)
        await asyncio.sleep(0.5)  # past its (shortened) deadline before the bot is back
        fake.gateway_open.set()
        await fake.wait_for(lambda: fake.resumes and fake._ready)
        (post,) = await fake.wait_for(lambda: [c for c in fake.channel_posts() if c.files])
        assert away.late and away.acked_at is None
        assert post.payload["content"].startswith(f"<@{USER['id']}> ")
        (found,) = await settled(harness, 1, delivered=True)
        assert found["status"] == "succeeded"
        await asyncio.sleep(0.3)
        assert len([c for c in fake.channel_posts() if c.files]) == 1
    finally:
        fake.gateway_open.set()
        await close_bot(b)


async def test_a_session_discord_invalidated_reidentifies_and_jobs_still_end_once(
    harness: Harness, fake: ResilientDiscord, caplog: pytest.LogCaptureFixture
) -> None:
    """Close 4009 (session timed out): discord.py tries to RESUME, Discord answers op 9, the
    bot IDENTIFYs afresh. The jobs already queued and generating still end, each posted once,
    and a command sent after the new session is served."""
    b = await start_bot(harness, fake, concurrency=1)
    try:
        inters, gates = await _jobs_in_flight(harness, fake)
        await fake.drop_session(4009)
        await fake.wait_for(lambda: fake.identifies == 2 and fake._ready, within=15)
        assert fake.invalid_sessions >= 1
        for gate in gates.values():
            gate.set()
        after = await fake.slash("imagine", {"prompt": "after a new session"}, user=BOB)
        for inter in [*inters, after]:
            await done(fake, inter)
            answered_once(fake, inter)
            assert len(fake.results(inter)) == 1
        found = await settled(harness, 4)
        assert {r["status"] for r in found} == {"succeeded"}
    finally:
        await close_bot(b)
    assert not library_errors(caplog)


async def test_a_failure_while_the_gateway_is_down_still_reaches_the_user(
    harness: Harness, fake: ResilientDiscord
) -> None:
    """A job fails while the gateway is away: its status says so (REST needs no gateway)."""
    harness.provider.errors["doomed"] = [Transient("upstream down")] * 10
    gate = harness.provider.gates["doomed"] = asyncio.Event()
    b = await start_bot(harness, fake, retry_attempts=1)
    try:
        inter = await fake.slash("imagine", {"prompt": "doomed"})
        await fake.wait_for(lambda: "Generating" in content(fake, inter))
        fake.gateway_open.clear()
        await fake.drop(4000)
        gate.set()
        await fake.wait_for(lambda: "not charged" in content(fake, inter))
        (found,) = await settled(harness, 1)
        assert (found["status"], found["cost_usd"]) == ("failed", 0)
        fake.gateway_open.set()
        await fake.wait_for(lambda: fake.resumes and fake._ready)
    finally:
        fake.gateway_open.set()
        await close_bot(b)


async def test_an_interaction_delivered_twice_starts_one_job(
    harness: Harness, fake: ResilientDiscord
) -> None:
    """The same INTERACTION_CREATE arrives a second time (a replay around a reconnect). The
    bot acked it again, took Discord's 40060 (already acknowledged) as "acknowledged" and ran
    the command again: a second job and a second result followup, the first job's finished
    status message overwritten by the new job's, and the user charged twice. An interaction
    this process has had is now dropped before anything acts on it."""
    b = await start_bot(harness, fake)
    try:
        inter = await fake.slash("imagine", {"prompt": "only once", "model": "paid"})
        await done(fake, inter)
        await fake.dispatch("INTERACTION_CREATE", inter.payload)  # the same event again
        await asyncio.sleep(0.5)  # what a second job would do, it would do now
        assert len(fake.callbacks(inter)) == 1  # not even acked again
        found = await settled(harness)
        assert len(found) == 1, [(r["id"], r["status"], r["cost_usd"]) for r in found]
        assert len(fake.results(inter)) == 1
    finally:
        await close_bot(b)


async def test_a_button_press_delivered_twice_rerolls_once(
    harness: Harness, fake: ResilientDiscord
) -> None:
    """A 🔄 press whose event comes twice makes one new job, not two (two bills)."""
    b = await start_bot(harness, fake)
    try:
        inter = await fake.slash("imagine", {"prompt": "once more", "model": "paid"})
        job_id = await done(fake, inter)
        (result,) = [
            m for m in fake.messages.values() if f"drawbridge:reroll:{job_id}" in buttons(m)
        ]
        press = await fake.press(result["id"], f"drawbridge:reroll:{job_id}")
        await fake.dispatch("INTERACTION_CREATE", press.payload)  # the same press again
        await asyncio.sleep(0.5)
        found = await settled(harness, 2)
        assert len(found) == 2, [(r["id"], r["status"]) for r in found]
        assert len(fake.callbacks(press)) == 1
    finally:
        await close_bot(b)


# ---- REST 429s --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "is_global"),
    [
        (FOLLOWUP, False),  # the result upload (the interaction's followup)
        (FOLLOWUP, True),
        (ORIGINAL_EDIT, False),  # the status message (the deferred response)
        (ORIGINAL_EDIT, True),
    ],
    ids=["followup", "followup-global", "original-edit", "original-edit-global"],
)
async def test_429s_on_the_interaction_routes_lose_nothing_and_post_nothing_twice(
    harness: Harness, fake: ResilientDiscord, route: str, is_global: bool
) -> None:
    """Three 429s in a row (Via set, JSON `retry_after`) on one route: waited out, retried."""
    b = await start_bot(harness, fake)
    try:
        method = "POST" if route == FOLLOWUP else "PATCH"
        fake.rate_limit(method, route, retry_after=0.2, count=3, is_global=is_global)
        inter = await fake.slash("imagine", {"prompt": "rate limited"})
        job_id = await done(fake, inter)
        answered_once(fake, inter)
        assert [c.status for c in fake.calls_to(method, route)][:4] == [429, 429, 429, 200]
        (result,) = fake.results(inter)
        assert result.files[0].data.startswith(b"\x89PNG")
        assert not fake.channel_posts()
        reroll = [m for m in fake.messages.values() if f"drawbridge:reroll:{job_id}" in buttons(m)]
        assert len(reroll) == 1
        (found,) = await settled(harness, 1, delivered=True)
        assert found["status"] == "succeeded"
    finally:
        await close_bot(b)


async def test_a_429_on_the_acknowledgement_is_retried_within_three_seconds(
    harness: Harness, fake: ResilientDiscord
) -> None:
    b = await start_bot(harness, fake)
    try:
        fake.rate_limit("POST", r"^/interactions/\d+/[^/]+/callback$", retry_after=0.3)
        inter = await fake.slash("imagine", {"prompt": "a busy ack"})
        await done(fake, inter)
        assert [c.status for c in fake.callbacks(inter)] == [429, 200]
        answered_once(fake, inter)
        assert len(fake.results(inter)) == 1
        assert len(await settled(harness, 1)) == 1
    finally:
        await close_bot(b)


async def test_a_global_429_on_a_channel_upload_after_the_token_expired_posts_once(
    harness: Harness, fake: ResilientDiscord
) -> None:
    """A job finishing after its token's 15 minutes goes to the channel; that upload meets a
    global 429 first (bot-token route: discord.py's global lock)."""
    gate = harness.provider.gates["late"] = asyncio.Event()
    now = [time.time()]
    b = await start_bot(harness, fake, clock=lambda: now[0])
    try:
        inter = await fake.slash("imagine", {"prompt": "late"})
        await fake.wait_for(lambda: "Generating" in content(fake, inter))
        now[0] += 16 * 60
        fake.expire(inter.token)
        fake.rate_limit(
            "POST", rf"^/channels/{CHANNEL_ID}/messages$", retry_after=0.3, count=2, is_global=True
        )
        gate.set()
        await fake.wait_for(lambda: "✅" in content(fake, inter))
        uploads = fake.calls_to("POST", rf"^/channels/{CHANNEL_ID}/messages$")
        assert [c.status for c in uploads][:3] == [429, 429, 200]
        posts = [c for c in fake.channel_posts() if c.files]
        assert len(posts) == 1, [c.status for c in fake.calls_to("POST", "^/channels/")]
        assert posts[0].payload["content"].startswith(f"<@{USER['id']}> ")
        assert fake.followups(inter.token) == []
        (found,) = await settled(harness, 1, delivered=True)
        assert found["status"] == "succeeded"
    finally:
        await close_bot(b)


async def test_with_the_shipped_edit_timing_a_fast_result_keeps_its_caption_and_reroll(
    harness: Harness, fake: ResilientDiscord
) -> None:
    """With the adapter's shipped timing (first status edit 0.3 s after the ack), a job that
    ends quickly posts its result while the deferred reply still shows "thinking…". Discord
    then turns that first followup into the deferred reply itself; the "✅ done" status edit
    that follows overwrites it: the result loses its caption (prompt, model, job id) and its
    🔄 Reroll button. The test rig hides this by setting `first_edit_delay=0`."""
    b = await start_bot(harness, fake, timing=SHIPPED_TIMING)
    try:
        inter = await fake.slash("imagine", {"prompt": "a quick fox"})
        await fake.wait_for(lambda: fake.results(inter))
        await fake.wait_for(lambda: any("✅" in m["content"] for m in fake.messages.values()))
        await asyncio.sleep(0.5)  # any edit still coming
        shown = [
            m for m in fake.messages.values() if m["attachments"] and "a quick fox" in m["content"]
        ]
        assert shown, {m["id"]: m["content"] for m in fake.messages.values()}
        assert any(cid.startswith("drawbridge:reroll:") for cid in buttons(shown[0])), shown[0]
    finally:
        await close_bot(b)


# ---- the 3-second rule ------------------------------------------------------------------


async def test_a_slow_database_at_submit_still_acknowledges_at_once(
    harness: Harness, fake: ResilientDiscord
) -> None:
    """Writing the new job row takes 4 s (a busy disk, a long checkpoint)."""
    b = await start_bot(harness, fake)
    insert = b.engine.store.insert_job

    async def slow_insert(job: Any) -> None:
        await asyncio.sleep(4.0)
        await insert(job)

    b.engine.store.insert_job = slow_insert  # type: ignore[method-assign]
    try:
        inter = await fake.slash("imagine", {"prompt": "a slow disk"})
        await done(fake, inter, within=15)
        answered_once(fake, inter)
        assert len(fake.results(inter)) == 1
    finally:
        await close_bot(b)


def slow_reads(bot: Bot, seconds: float = 3.5) -> None:
    """Every job read from SQLite takes `seconds` (a busy disk, a long checkpoint)."""
    store = bot.engine.store
    select = store._select_jobs

    async def slow(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(seconds)
        return await select(*args, **kwargs)

    store._select_jobs = slow  # type: ignore[method-assign]


@pytest.mark.parametrize("command", ["jobs", "cancel", "show"])
async def test_a_slow_database_still_answers_the_ephemeral_commands(
    harness: Harness, fake: ResilientDiscord, command: str
) -> None:
    b = await start_bot(harness, fake)
    slow_reads(b)
    try:
        inter = await fake.slash(command, {"job": "abcdefghij"} if command != "jobs" else {})
        text = await resolved(fake, inter, within=15)
        answered_once(fake, inter)
        assert text
    finally:
        await close_bot(b)


@pytest.mark.parametrize("command", ["cancel", "show"])
async def test_job_autocomplete_answers_in_time_when_the_database_is_slow(
    harness: Harness, fake: ResilientDiscord, command: str
) -> None:
    """`/cancel job:` and `/show job:` autocomplete read the user's jobs from SQLite before
    they answered, with no time bound. An autocomplete cannot be deferred, so a 3.5 s read made
    Discord refuse the late answer (10062): the user saw "Loading options failed" and
    discord.py logged "Ignoring exception in autocomplete". /cancel's list now comes from
    memory, /show's within 2 s or empty."""
    b = await start_bot(harness, fake)
    slow_reads(b)
    try:
        typed = await fake.slash(command, {"job": "ab"}, focused="job")
        await fake.wait_for(lambda: typed.acked_at is not None or typed.late, within=10)
        assert typed.acked_at is not None and not typed.late, "autocomplete answered too late"
        assert typed.ack_type == 8
    finally:
        await close_bot(b)


@pytest.mark.parametrize("why", ["queue-full", "too-many-pending", "quota", "bad-option"])
async def test_a_refusal_answers_the_interaction_in_time(
    harness: Harness, fake: ResilientDiscord, why: str
) -> None:
    """A refused /imagine is answered in its deferred reply, never left "thinking…"."""
    gate = harness.provider.gate = asyncio.Event()
    config: dict[str, Any] = {"concurrency": 1}
    if why == "queue-full":
        config["queue_max"] = 2
    if why == "quota":
        config["limits"] = Limits(user_images=2)
    b = await start_bot(harness, fake, **config)
    try:
        expected = {
            "queue-full": "The queue is full",
            "too-many-pending": "You already have 3 jobs waiting",
            "quota": "You have used 2 of your 2 images today",
            "bad-option": "1 to 4 images",
        }[why]
        taken = []
        if why != "bad-option":
            fill = 3 if why == "too-many-pending" else 2
            for i in range(fill):
                taken.append(await fake.slash("imagine", {"prompt": f"fill {i}"}))
            for inter in taken:
                await fake.wait_for(lambda i=inter: "job " in content(fake, i))
        options: dict[str, Any] = {"prompt": "one more"}
        if why == "bad-option":
            options["count"] = 9
        refused = await fake.slash("imagine", options)
        text = await resolved(fake, refused)
        assert expected in text, text
        answered_once(fake, refused)
        assert fake.followups(refused.token) == []
        gate.set()
        for inter in taken:
            await done(fake, inter)
    finally:
        gate.set()
        await close_bot(b)


# ---- interaction tokens expire after 15 minutes ------------------------------------------


async def test_a_job_that_fails_after_fifteen_minutes_still_tells_the_channel(
    harness: Harness, fake: ResilientDiscord
) -> None:
    """A job waits past its token's life, then fails: the user still sees why, not charged."""
    harness.provider.errors["too slow"] = [Transient("upstream down")] * 10
    gate = harness.provider.gates["too slow"] = asyncio.Event()
    now = [time.time()]
    b = await start_bot(harness, fake, clock=lambda: now[0], retry_attempts=1)
    try:
        inter = await fake.slash("imagine", {"prompt": "too slow"})
        await fake.wait_for(lambda: "Generating" in content(fake, inter))
        now[0] += 16 * 60
        fake.expire(inter.token)
        gate.set()

        def told() -> bool:
            posts = [c.payload.get("content", "") for c in fake.channel_posts()]
            return "not charged" in content(fake, inter) or any("not charged" in p for p in posts)

        await fake.wait_for(told)
        (found,) = await settled(harness, 1)
        assert (found["status"], found["cost_usd"]) == ("failed", 0)
        late = fake.calls_to("POST", rf"^/webhooks/\d+/{inter.token}")
        assert all(c.status != 200 for c in late)
    finally:
        await close_bot(b)


async def test_a_job_in_a_thread_that_ends_after_its_token_posts_in_the_thread(
    harness: Harness, fake: ResilientDiscord
) -> None:
    thread_id = "1300000000000000099"
    gate = harness.provider.gates["threaded"] = asyncio.Event()
    now = [time.time()]
    b = await start_bot(harness, fake, clock=lambda: now[0])
    try:
        inter = await fake.slash(
            "imagine", {"prompt": "threaded"}, channel=fake.thread_channel(thread_id)
        )
        await fake.wait_for(lambda: "Generating" in content(fake, inter))
        now[0] += 20 * 60
        gate.set()
        (post,) = await fake.wait_for(lambda: [c for c in fake.channel_posts(thread_id) if c.files])
        assert post.payload["content"].startswith(f"<@{USER['id']}> ")
        assert fake.channel_posts(CHANNEL_ID) == []
        await settled(harness, 1, delivered=True)
    finally:
        await close_bot(b)


async def test_a_job_queued_past_fifteen_minutes_is_cancellable_and_says_so(
    harness: Harness, fake: ResilientDiscord
) -> None:
    """A job still queued when its token dies: /cancel works and its status message says so."""
    gate = harness.provider.gate = asyncio.Event()
    now = [time.time()]
    b = await start_bot(harness, fake, clock=lambda: now[0], concurrency=1)
    try:
        first = await fake.slash("imagine", {"prompt": "hogging"})
        waiting = await fake.slash("imagine", {"prompt": "waiting"}, user=BOB)
        await fake.wait_for(lambda: "Queued" in content(fake, waiting))
        job_id = job_of(fake, waiting)
        now[0] += 16 * 60
        fake.expire(waiting.token)
        cancel = await fake.slash("cancel", {"job": job_id}, user=BOB)
        assert "cancelled, not charged" in await resolved(fake, cancel)
        await fake.wait_for(lambda: "Cancelled" in content(fake, waiting))
        gate.set()
        await fake.wait_for(lambda: "✅" in content(fake, first))
        statuses = {r["id"]: r["status"] for r in await settled(harness, 2)}
        assert statuses[job_id] == "cancelled"
    finally:
        gate.set()
        await close_bot(b)


# ---- the channel is gone or closed at delivery ---------------------------------------------


async def test_a_channel_deleted_before_delivery_ends_the_job_without_a_retry_loop(
    harness: Harness, fake: ResilientDiscord, caplog: pytest.LogCaptureFixture
) -> None:
    """The channel is deleted while the job generates (404 10003 on every route into it).
    The job ends (its row final, nothing left running), the result goes to the user's DMs
    after a bounded number of tries, and a restart does not try it all again."""
    gate = harness.provider.gates["gone"] = asyncio.Event()
    b = await start_bot(harness, fake)
    try:
        inter = await fake.slash("imagine", {"prompt": "gone"})
        await fake.wait_for(lambda: "Generating" in content(fake, inter))
        fake.gone_channels[CHANNEL_ID] = UNKNOWN_CHANNEL
        gate.set()
        (found,) = await settled(harness, 1)
        await asyncio.sleep(0.5)
        tries = len(fake.calls_to("POST", rf"/{inter.token}$"))
        assert 1 <= tries <= 3, tries
        assert found["finished_at"] is not None
        await settled(harness, 1, delivered=True)
        (found,) = await rows(harness)
        assert str(found["delivery_ref"]).startswith("dm:")
    finally:
        await restart(harness, b)
    before = len(fake.calls)
    again = await start_bot(harness, fake)
    try:
        await asyncio.sleep(0.5)
        assert not fake.calls_to("POST", rf"/{inter.token}$")[tries:]
        assert not [c for c in fake.calls[before:] if CHANNEL_ID in c.path]
    finally:
        await close_bot(again)
    assert not library_errors(caplog)


@pytest.mark.parametrize("when", ["token-alive", "token-expired"])
async def test_a_channel_deleted_before_delivery_tells_the_user_by_dm(
    harness: Harness, fake: ResilientDiscord, when: str
) -> None:
    """The channel was deleted (404 10003 Unknown Channel) while the job generated. The job was
    charged ("succeeded", images kept) but the user heard nothing anywhere: the adapter fell
    back to the user's DMs only on 403/50001/50013, not when the channel is gone. The result
    now goes to the DMs."""
    gate = harness.provider.gates["gone"] = asyncio.Event()
    now = [time.time()]
    b = await start_bot(harness, fake, clock=lambda: now[0])
    try:
        inter = await fake.slash("imagine", {"prompt": "gone"})
        await fake.wait_for(lambda: "Generating" in content(fake, inter))
        fake.gone_channels[CHANNEL_ID] = UNKNOWN_CHANNEL
        if when == "token-expired":
            now[0] += 16 * 60
            fake.expire(inter.token)
        gate.set()
        await settled(harness, 1)
        await asyncio.sleep(0.5)
        dm = fake.dm_channels.get(USER["id"])
        assert dm is not None, "no DM channel was ever opened to tell the user"
        (post,) = fake.channel_posts(dm)  # the result, once: no "done" after it
        assert post.files and "is gone or closed, so here it is" in post.payload["content"]
    finally:
        await close_bot(b)


@pytest.mark.parametrize("error", [MISSING_ACCESS, UNKNOWN_CHANNEL], ids=["50001", "10003"])
async def test_a_refused_ack_and_a_channel_closed_to_the_bot_ends_the_job(
    harness: Harness, fake: ResilientDiscord, error: tuple[int, int, str]
) -> None:
    """Discord refused the ack (10062), so everything goes by channel, and the channel says
    Missing Access or Unknown Channel: the job ends (row final) and its posts are bounded."""
    b = await start_bot(harness, fake)
    fake.gone_channels[CHANNEL_ID] = error
    try:
        await fake.slash("imagine", {"prompt": "closed"}, deadline=0.0)
        (found,) = await settled(harness, 1)
        await asyncio.sleep(0.5)
        assert found["status"] in FINAL and found["finished_at"] is not None
        tries = fake.calls_to("POST", rf"^/channels/{CHANNEL_ID}/messages$")
        assert 1 <= len(tries) <= 4, len(tries)
        if error is MISSING_ACCESS:
            dm = await fake.wait_for(lambda: fake.dm_channels.get(USER["id"]))
            (post,) = await fake.wait_for(lambda: fake.channel_posts(dm))
            assert post.files
    finally:
        await close_bot(b)


# ---- many at once -------------------------------------------------------------------------


async def test_fifty_imagines_from_five_users_at_once_are_each_answered_once(
    harness: Harness, fake: ResilientDiscord, caplog: pytest.LogCaptureFixture
) -> None:
    """50 /imagine in one burst, ten from each of five users: each acknowledged exactly once,
    each job posted exactly once, every row succeeded."""
    gate = harness.provider.gate = asyncio.Event()
    b = await start_bot(harness, fake, max_pending_per_user=10)
    try:
        inters = await asyncio.gather(
            *(fake.slash("imagine", {"prompt": f"crowd {i}"}, user=USERS[i % 5]) for i in range(50))
        )
        await fake.wait_for(lambda: all(i.acked_at or i.late for i in inters), within=10)
        for inter in inters:
            answered_once(fake, inter)
        await fake.wait_for(lambda: all("job " in content(fake, i) for i in inters), within=10)
        gate.set()
        for inter in inters:
            await done(fake, inter, within=20)
        for inter in inters:
            assert len(fake.results(inter)) == 1, inter.id
        found = await settled(harness, 50)
        assert {r["status"] for r in found} == {"succeeded"}
        assert len({r["id"] for r in found}) == 50
        assert not [c for c in fake.calls if c.status == 400]
    finally:
        gate.set()
        await close_bot(b)
    assert not library_errors(caplog)


async def test_fifty_mixed_commands_at_once_are_each_answered_once(
    harness: Harness, fake: ResilientDiscord
) -> None:
    b = await start_bot(harness, fake, max_pending_per_user=10)
    try:
        names = ["usage", "jobs", "models", "settings", "imagine"]
        inters = await asyncio.gather(
            *(
                fake.slash(
                    names[i % 5],
                    {"prompt": f"mixed {i}"} if names[i % 5] == "imagine" else {},
                    user=USERS[(i // 5) % 5],
                )
                for i in range(50)
            )
        )
        for inter in inters:
            assert await resolved(fake, inter, within=15)
            answered_once(fake, inter)
        await settled(harness, 10)
    finally:
        await close_bot(b)
