"""Durability at exact crash points on Discord: the real `drawbridge run`, killed with SIGKILL.

The process talks to a loopback Discord (`HoldingDiscord`: the project's `FakeDiscord`, able
to hold one REST request, or a CDN download, open) and a loopback GrsAI (`HoldingGrsai`, as in
tests/test_crash_points.py). A test holds a request at a chosen point of a job's life, kills the
process while it is held, decides whether Discord had acted on the request ("taken") or never
saw it ("dropped"), then starts a new process on the same data dir and lets it run dry.

After every restart: each interaction made at most one row, and that row ended (no `queued` or
`running` left); it is charged once if it succeeded and never otherwise; GrsAI was paid once per
job; the result was posted at most once; the user can see a message that ends the job; the
engine's tallies (`/usage`) equal the table; no message named a job before its row existed. A
crash point that cannot be closed is asserted as what it is (marked WINDOW): the ack in flight,
the ack → row gap (a reference image being fetched), GrsAI's unanswered submit (paid twice, the
user charged once) and a followup Discord took whose answer died with the bot (posted twice). A
test whose docstring says DEFECT shows a closable gap and fails until the product closes it.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.fake_discord import (
    GUILD_ID,
    USER,
    Call,
    FakeDiscord,
    FakeInteraction,
    HTTPError,
)
from tests.fakes import png_bytes
from tests.test_blackbox import Process, drawbridge
from tests.test_crash_points import HoldingGrsai, count, until

PRICE = 0.04  # nano-banana, one image
JOB = re.compile(r"job ([a-z2-7]{10})")
Match = Callable[[str, str, Call], bool]


# ---- the rig: a Discord that can hold one request open ----------------------------------------


def content_of(call: Call) -> str:
    return str(call.json.get("content") or "") if isinstance(call.json, dict) else ""


class Hold:
    """One request the fake keeps open until `release`: then Discord acts on it, or never saw it."""

    def __init__(self, what: str, match: Match, every: bool = False) -> None:
        self.what = what
        self.match = match
        self.every = every  # hold every matching request, not only the first
        self.armed = True
        self.reached = asyncio.Event()
        self.call: Call | None = None
        self._gate = asyncio.Event()
        self._taken = False

    def release(self, *, taken: bool) -> None:
        """`taken`: Discord had the whole request and acts on it (its answer goes nowhere)."""
        self.armed = False
        if not self._gate.is_set():
            self._taken = taken
            self._gate.set()

    async def wait(self) -> bool:
        await self._gate.wait()
        return self._taken


class HoldingDiscord(FakeDiscord):
    """The fake Discord, holding chosen requests.

    Each message or edit that names a job ("Queued … job X", "Generating … job X") is checked
    against the database at the instant it arrives: the row must exist by then.
    """

    def __init__(self, db: Path, **kw: Any) -> None:
        super().__init__(**kw)
        self.db = db
        self.holds: list[Hold] = []
        self.acks: list[tuple[str, bool]] = []  # (job id shown, whether its row existed then)

    def hold(self, what: str, match: Match, *, every: bool = False) -> Hold:
        hold = Hold(what, match, every)
        self.holds.append(hold)
        return hold

    def release_all(self) -> None:
        for hold in self.holds:
            hold.release(taken=False)

    async def _held(self, method: str, path: str, call: Call) -> None:
        for hold in self.holds:
            if hold.armed and hold.match(method, path, call):
                hold.armed = hold.every
                hold.call = call
                hold.reached.set()
                if not await hold.wait():
                    # The connection died with the bot before Discord read the request.
                    raise HTTPError(503, 0, "the client went away")
                return

    async def _route(self, request: web.Request, path: str, call: Call) -> tuple[int, Any]:
        self._check_ack(call)
        await self._held(request.method, path, call)
        return await super()._route(request, path, call)

    async def _attachment(self, request: web.Request) -> web.Response:
        call = Call("GET", request.path, {}, "")
        try:
            await self._held("GET", request.path, call)
        except HTTPError:
            return web.Response(status=503)
        return await super()._attachment(request)

    def _check_ack(self, call: Call) -> None:
        match = JOB.search(content_of(call))
        if match is not None:
            with closing(sqlite3.connect(self.db)) as db:
                found = db.execute("SELECT 1 FROM jobs WHERE id = ?", (match[1],)).fetchall()
            self.acks.append((match[1], bool(found)))

    # -- what the user sees ----------------------------------------------------------------

    def results(self, job_id: str) -> list[Call]:
        """Every message with the job's images Discord created (followup, channel, DM)."""
        return [
            c
            for c in self.calls
            if c.method == "POST"
            and c.status == 200
            and c.files
            and f"job {job_id}" in content_of(c)
        ]

    def shown(self, job_id: str) -> list[dict[str, Any]]:
        """The messages on screen now that speak of the job."""
        return [m for m in self.messages.values() if f"job {job_id}" in str(m.get("content"))]

    def webhook_calls(self, inter: FakeInteraction) -> list[Call]:
        return [c for c in self.calls if f"/{inter.token}" in c.path]


def original_edit(marker: str) -> Match:
    """An edit of an interaction's response (the job's status message) whose text has `marker`."""

    def match(method: str, path: str, call: Call) -> bool:
        return (
            method == "PATCH"
            and re.fullmatch(r"/webhooks/\d+/[^/]+/messages/(@original|\d+)", path) is not None
            and marker in content_of(call)
        )

    return match


def followup_with_files(method: str, path: str, call: Call) -> bool:
    return (
        method == "POST"
        and re.fullmatch(r"/webhooks/\d+/[^/]+", path) is not None
        and bool(call.files)
    )


def callback(method: str, path: str, call: Call) -> bool:
    return method == "POST" and path.endswith("/callback")


def cdn(method: str, path: str, call: Call) -> bool:
    return path.startswith("/attachments/")


@asynccontextmanager
async def rig(tmp_path: Path) -> AsyncIterator[tuple[HoldingDiscord, HoldingGrsai, dict[str, str]]]:
    (tmp_path / "data").mkdir(exist_ok=True)
    fake = HoldingDiscord(tmp_path / "data" / "drawbridge.db")
    await fake.start()
    try:
        async with HoldingGrsai() as grsai:
            env = dict(
                DISCORD_BOT_TOKEN=fake.token,
                DISCORD_API_URL=fake.api_url,
                DISCORD_GATEWAY_URL=fake.gateway_url,
                DISCORD_GUILD_IDS=GUILD_ID,
                GRSAI_API_KEY=grsai.api_key,
                GRSAI_BASE_URL=grsai.base_url,
                DEFAULT_MODEL="nano-banana",
            )
            try:
                yield fake, grsai, env
            finally:
                fake.release_all()
    finally:
        fake.release_all()
        await fake.close()


async def connected(fake: FakeDiscord, nth: int) -> None:
    """The `nth` process (1, 2, …) identified on the gateway, and its socket is the only one."""
    await fake.wait_for(
        lambda: fake.gateway_ops.count(2) >= nth and len(fake._sockets) == 1, within=30
    )


async def kill(proc: Process) -> None:
    proc.proc.kill()  # SIGKILL: no shutdown, nothing flushed
    await proc.proc.wait()


def job_rows(tmp_path: Path) -> list[dict[str, Any]]:
    with closing(sqlite3.connect(tmp_path / "data" / "drawbridge.db")) as db:
        db.row_factory = sqlite3.Row
        try:
            found = db.execute("SELECT * FROM jobs ORDER BY created_at").fetchall()
        except sqlite3.OperationalError:  # the schema is not there yet
            return []
    return [dict(r) for r in found]


def busy(tmp_path: Path) -> int:
    return count(
        tmp_path,
        "SELECT count(*) FROM jobs WHERE status IN ('queued', 'running') "
        "OR (status = 'succeeded' AND delivered_at IS NULL) "
        "OR (status IN ('failed', 'refused', 'cancelled') AND told_at IS NULL)",
    )


async def usage_text(fake: FakeDiscord, user: dict[str, Any]) -> str:
    inter = await fake.slash("usage", user=user)

    def answered() -> str | None:
        if inter.original_id is None or inter.original_id not in fake.messages:
            return None
        text = str(fake.messages[inter.original_id].get("content", ""))
        return text if "Today:" in text else None

    return str(await fake.wait_for(answered, within=10))


async def settle(
    tmp_path: Path, fake: HoldingDiscord, proc: Process, users: list[dict[str, Any]]
) -> dict[str, str]:
    """Let the restarted process run dry, ask each user's /usage, then stop it gracefully (its
    pending status edits go out on SIGTERM), so what the fake holds is all the bot will do."""
    await until(lambda: busy(tmp_path) == 0, 30, lambda: f"the bot idle: {job_rows(tmp_path)}")
    usage = {u["id"]: await usage_text(fake, u) for u in users}
    assert await proc.stop() == 0, proc.stderr.decode()[-3000:]
    return usage


def ended_once(
    tmp_path: Path, fake: HoldingDiscord, usage: dict[str, str], *, status: str = "succeeded"
) -> dict[str, Any]:
    """The one row ended once, charged as it ended, and /usage agrees with it."""
    rows = job_rows(tmp_path)
    assert len(rows) == 1, f"one interaction, {len(rows)} job rows: {rows}"
    (job,) = rows
    cost = PRICE if status == "succeeded" else 0
    assert (job["status"], job["cost_usd"]) == (status, cost), job
    images = 1 if status == "succeeded" else 0
    want = f"Today: {images} of 20 images · spent ${cost:.2f} of unlimited · 0 job(s)"
    said = usage[str(job["user_id"])]
    assert said.startswith(want), f"/usage says {said!r}, the table {want!r}"
    assert fake.acks and all(found for _, found in fake.acks), f"shown without a row {fake.acks}"
    return job


def no_job(tmp_path: Path, fake: HoldingDiscord, grsai: HoldingGrsai) -> None:
    """Nothing was stored, paid, charged or posted."""
    assert job_rows(tmp_path) == []
    assert grsai.submits == 0
    assert [c for c in fake.calls if c.files] == []
    assert all(found for _, found in fake.acks), fake.acks


async def generating(fake: FakeDiscord, inter: FakeInteraction) -> str:
    """Wait until the job's status (the deferred response) says it is generating; its job id."""

    def said() -> str | None:
        if inter.original_id is None or inter.original_id not in fake.messages:
            return None
        text = str(fake.messages[inter.original_id].get("content", ""))
        found = JOB.search(text)
        return found[1] if found and "Generating" in text else None

    return str(await fake.wait_for(said, within=15))


# ---- the interaction's acknowledgement ----------------------------------------------------------


@pytest.mark.parametrize("taken", [False, True], ids=["ack-dropped", "ack-taken"])
async def test_kill_while_the_ack_is_held(tmp_path: Path, taken: bool) -> None:
    """The deferred response is on its way when the bot dies; nothing was stored yet."""
    async with rig(tmp_path) as (fake, grsai, env):
        ack = fake.hold("ack", callback)
        async with drawbridge(tmp_path, **env) as first:
            await connected(fake, 1)
            inter = await fake.slash("imagine", {"prompt": "a fox at dawn"}, deadline=60)
            await asyncio.wait_for(ack.reached.wait(), 15)
            await kill(first)
        ack.release(taken=taken)
        await fake.wait_for(lambda: ack.call is not None and ack.call.status, within=5)
        async with drawbridge(tmp_path, **env) as second:
            await connected(fake, 2)
            usage = await usage_text(fake, USER)
            assert await second.stop() == 0
    no_job(tmp_path, fake, grsai)
    assert usage.startswith("Today: 0 of 20 images · spent $0.00")
    # WINDOW: the bot acknowledges before any other I/O (Discord's 3 s), so a death here leaves
    # no trace to resume from, and Discord does not send an interaction to a new session.
    # Dropped, the user sees Discord's own "The application did not respond"; taken, the reply
    # says "drawbridge is thinking…" until Discord gives up on it (15 minutes). Not charged.
    if taken:
        assert inter.ack_type == 5 and int(fake.original(inter)["flags"]) & 128
    else:
        assert inter.acked_at is None
    assert fake.webhook_calls(inter) == [ack.call]


async def test_kill_after_the_ack_before_the_row_is_committed(tmp_path: Path) -> None:
    """Reachable through a reference image: acked, then its bytes are fetched before the submit."""
    async with rig(tmp_path) as (fake, grsai, env):
        fetch = fake.hold("reference image", cdn)
        ref = fake.add_attachment(png_bytes(16, 16))
        async with drawbridge(tmp_path, **env) as first:
            await connected(fake, 1)
            inter = await fake.slash("imagine", {"prompt": "like this one", "image": ref})
            await asyncio.wait_for(fetch.reached.wait(), 15)
            assert inter.ack_type == 5  # acknowledged: the user sees "thinking…"
            assert job_rows(tmp_path) == []
            await kill(first)
        fetch.release(taken=True)
        async with drawbridge(tmp_path, **env) as second:
            await connected(fake, 2)
            usage = await usage_text(fake, USER)
            assert await second.stop() == 0
    no_job(tmp_path, fake, grsai)
    assert usage.startswith("Today: 0 of 20 images · spent $0.00")
    # WINDOW: acked (it must be, within 3 s, before a fetch that may take 30 s) but no row yet:
    # the restarted bot has nothing to resume, and the reply stays "thinking…" until Discord
    # drops it after 15 minutes. Nobody was told "queued", nothing was paid or charged. The
    # window is the ack → commit gap (adapters/discord_adapter.py `imagine`: `_defer`, then
    # `_reference`, then `engine.submit`); only recording the interaction before the ack closes it.
    assert int(fake.original(inter)["flags"]) & 128  # still loading
    assert [c.path.rsplit("/", 1)[-1] for c in fake.webhook_calls(inter)] == ["callback"]


# ---- GrsAI: the paid part ---------------------------------------------------------------------


def task_saved(tmp_path: Path) -> bool:
    return count(tmp_path, "SELECT count(*) FROM jobs WHERE task_id IS NOT NULL") == 1


def delivered(tmp_path: Path) -> bool:
    return count(tmp_path, "SELECT count(*) FROM jobs WHERE delivered_at IS NOT NULL") == 1


def buttons(message: dict[str, Any]) -> list[str]:
    return [c["custom_id"] for row in message["components"] for c in row["components"]]


def result_ok(fake: HoldingDiscord, job: dict[str, Any]) -> dict[str, Any]:
    """The message the row names as the delivery carries the images, the caption and 🔄."""
    posted = fake.messages.get(str(job["delivery_ref"]))
    assert posted is not None, f"delivery_ref {job['delivery_ref']} is no message Discord has"
    assert posted["attachments"], posted
    assert job["prompt"] in posted["content"] and f"job {job['id']}" in posted["content"], posted
    assert f"drawbridge:reroll:{job['id']}" in buttons(posted), posted["components"]
    return posted


def status_done(fake: HoldingDiscord, inter: FakeInteraction, job_id: str) -> None:
    """The job's status message (the deferred response) ends as done, with no ✖ Cancel left."""
    status = fake.original(inter)
    seen = (
        bool(int(status["flags"]) & 128),  # still "drawbridge is thinking…"
        f"✅ Done · job {job_id}" in status["content"],
        f"drawbridge:cancel:{job_id}" in buttons(status),
    )
    assert seen == (False, True, False), f"status shows {status['content']!r} {buttons(status)}"


@pytest.mark.parametrize("point", ["submit", "stream", "file"])
async def test_kill_while_grsai_holds_the_job(tmp_path: Path, point: str) -> None:
    """submit: GrsAI accepted (and bills) the task, never answered; stream: it streamed the task
    id (saved) and runs on while the bot is down; file: the task finished, the image download
    is cut off. The restart resumes the same task by its id, and posts the result once."""
    prompt = f"hold-{point} a harbour"
    async with rig(tmp_path) as (fake, grsai, env):
        async with drawbridge(tmp_path, **env) as first:
            await connected(fake, 1)
            inter = await fake.slash("imagine", {"prompt": prompt})
            await until(lambda: grsai.held[point] == 1, 15, f"GrsAI holding the {point}")
            await generating(fake, inter)
            if point != "submit":
                await until(lambda: task_saved(tmp_path), 5, "the task id saved")
            await kill(first)
        grsai.holding = False
        if point == "stream":
            (streaming,) = grsai.tasks_for(prompt)
            streaming.finish()  # GrsAI went on while the bot was down
        async with drawbridge(tmp_path, **env) as second:
            await connected(fake, 2)
            usage = await settle(tmp_path, fake, second, [USER])
    job = ended_once(tmp_path, fake, usage)
    # WINDOW (submit): GrsAI billed a task whose id never reached the bot; the restart must
    # submit again (bot/providers/grsai.py `_submit_for_id`); the user is charged once.
    assert len(grsai.tasks_for(prompt)) == (2 if point == "submit" else 1)
    (posted,) = fake.results(job["id"])
    assert posted.path.endswith(f"/{inter.token}")  # the token lives: as the followup
    result_ok(fake, job)
    status_done(fake, inter, job["id"])


# ---- the result and the status message ----------------------------------------------------------


@pytest.mark.parametrize("taken", [False, True], ids=["followup-dropped", "followup-taken"])
async def test_kill_while_the_result_followup_is_held(tmp_path: Path, taken: bool) -> None:
    """The images are stored and charged; the followup with the files is on its way."""
    async with rig(tmp_path) as (fake, grsai, env):
        upload = fake.hold("result followup", followup_with_files)
        async with drawbridge(tmp_path, **env) as first:
            await connected(fake, 1)
            inter = await fake.slash("imagine", {"prompt": "a meadow at noon"})
            await asyncio.wait_for(upload.reached.wait(), 15)
            await until(
                lambda: count(tmp_path, "SELECT count(*) FROM jobs WHERE status = 'succeeded'"),
                5,
                "the charge committed",
            )
            await kill(first)
        upload.release(taken=taken)
        await fake.wait_for(lambda: upload.call is not None and upload.call.status, within=5)
        async with drawbridge(tmp_path, **env) as second:
            await connected(fake, 2)
            usage = await settle(tmp_path, fake, second, [USER])
    job = ended_once(tmp_path, fake, usage)
    assert len(grsai.tasks_for("a meadow at noon")) == 1  # delivered from disk, not made again
    posts = fake.results(job["id"])
    # WINDOW (taken): Discord created the message, the bot died before its answer, so the row
    # has no delivery_ref and the restart posts again (bot/job_runner.py `_deliver`: "a crash
    # could make us post it twice"). An interaction followup takes no idempotency key (a channel
    # message would: `nonce` + `enforce_nonce`), so this is at least once, at most one re-post.
    assert len(posts) == (2 if taken else 1), [c.path for c in posts]
    assert all(c.path.endswith(f"/{inter.token}") for c in posts)
    result_ok(fake, job)
    status_done(fake, inter, job["id"])


async def test_kill_while_the_done_edit_is_held_the_status_message_still_ends(
    tmp_path: Path,
) -> None:
    """The result is posted and its message id committed; the "✅ Done" edit is in flight.

    It was left: the user had the picture, but above it the job's status message said
    "🎨 Generating with nano-banana… · job …" for good: the restart sees a delivered job and
    never edited its status again: nothing recorded whether a success's final edit reached
    Discord. `told_at` now waits for that edit too (migration v7), and a restart shows "done"
    again (`Store.untold_successes`, the adapter's `show_delivered`)."""
    async with rig(tmp_path) as (fake, _grsai, env):
        done = fake.hold("done edit", original_edit("✅"))
        async with drawbridge(tmp_path, **env) as first:
            await connected(fake, 1)
            inter = await fake.slash("imagine", {"prompt": "a quiet lake"})
            await asyncio.wait_for(done.reached.wait(), 15)
            await until(lambda: delivered(tmp_path), 5, "the delivery recorded")
            await kill(first)
        done.release(taken=False)
        async with drawbridge(tmp_path, **env) as second:
            await connected(fake, 2)
            usage = await settle(tmp_path, fake, second, [USER])
    job = ended_once(tmp_path, fake, usage)
    assert len(fake.results(job["id"])) == 1
    result_ok(fake, job)
    status_done(fake, inter, job["id"])


async def test_kill_while_a_refusal_is_being_shown_the_user_still_hears_it(
    tmp_path: Path,
) -> None:
    """GrsAI refused the prompt; the row says refused (not charged); the edit that tells the user
    is in flight when the bot dies. The restart must tell them.

    The user never heard the outcome: `_tell_end` (bot/job_runner.py) posted `told_at` as soon
    as `_emit` returned, while the Discord adapter's `status` only queues the edit, so `told_at`
    committed before Discord had the message and the restart skipped the job. The adapter now
    confirms the outcome sent (`confirms_told`, `Engine.job_told`)."""
    async with rig(tmp_path) as (fake, grsai, env):
        grsai.outcome = "input_moderation"
        told = fake.hold("refusal edit", original_edit("not charged"))
        async with drawbridge(tmp_path, **env) as first:
            await connected(fake, 1)
            inter = await fake.slash("imagine", {"prompt": "something forbidden"})
            await asyncio.wait_for(told.reached.wait(), 15)
            await until(
                lambda: count(tmp_path, "SELECT count(*) FROM jobs WHERE status = 'refused'"),
                5,
                "the refusal committed",
            )
            # not told while Discord has not taken the edit
            assert count(tmp_path, "SELECT count(*) FROM jobs WHERE told_at IS NOT NULL") == 0
            await kill(first)
        told.release(taken=False)
        async with drawbridge(tmp_path, **env) as second:
            await connected(fake, 2)
            usage = await settle(tmp_path, fake, second, [USER])
    job = ended_once(tmp_path, fake, usage, status="refused")
    assert fake.results(job["id"]) == []
    shown = [m["content"] for m in fake.shown(job["id"])]
    response = fake.original(inter)
    assert any("not charged" in text for text in shown), (
        f"the user sees only {shown}; the response says {response['content']!r}"
        f"{' (thinking…)' if int(response['flags']) & 128 else ''}"
    )


async def test_kill_while_the_response_still_says_thinking_the_result_keeps_its_caption(
    tmp_path: Path,
) -> None:
    """The job is stored and charged, but every edit of its deferred response was still in
    flight when the bot died: Discord shows "drawbridge is thinking…". The restarted bot
    delivers from disk; Discord turns that first followup into the response itself, so the
    "✅ Done" edit that follows must not overwrite the result's caption and its 🔄 button.

    It did: the user saw their picture captioned only "✅ Done · job …", with no prompt and no
    🔄 button, since `_settle_response` (adapters/discord_outbox.py), which edits a
    still-deferred response before the first followup, only knew interactions of this process.
    After a restart it now edits the response through the interaction's webhook."""
    async with rig(tmp_path) as (fake, grsai, env):
        edits = fake.hold("every edit of the response", original_edit("job "), every=True)
        async with drawbridge(tmp_path, **env) as first:
            await connected(fake, 1)
            inter = await fake.slash("imagine", {"prompt": "a lantern in the fog"})
            await asyncio.wait_for(edits.reached.wait(), 15)
            await until(
                lambda: count(tmp_path, "SELECT count(*) FROM jobs WHERE status = 'succeeded'"),
                15,
                "the charge committed",
            )
            await kill(first)
        edits.release(taken=False)
        assert int(fake.original(inter)["flags"]) & 128  # "drawbridge is thinking…"
        assert fake.followups(inter.token) == []
        async with drawbridge(tmp_path, **env) as second:
            await connected(fake, 2)
            usage = await settle(tmp_path, fake, second, [USER])
    job = ended_once(tmp_path, fake, usage)
    assert len(grsai.tasks_for("a lantern in the fog")) == 1
    (posted,) = fake.results(job["id"])
    assert not posted.resolved_original  # the response was edited first: a message of its own
    result_ok(fake, job)
    status_done(fake, inter, job["id"])


# ---- the interaction token expires while the bot is down ------------------------------------------


@pytest.mark.parametrize("who", ["clock", "discord"], ids=["bot-clock-says", "discord-says"])
async def test_a_token_that_expired_while_the_bot_was_down(tmp_path: Path, who: str) -> None:
    """Killed while GrsAI works; sixteen minutes pass before the restart. The result goes to the
    channel with a mention of its user, never to the dead followup webhook.

    bot-clock-says: the bot's own record says the token is past its 15 minutes (the time that
    passed is played by moving the interaction's `created_at` in `jobs.target_meta` back 16
    minutes, and Discord refuses the token too); discord-says: only Discord knows (401 50027),
    as when the bot's clock lags."""
    prompt = "hold-stream a long night"
    async with rig(tmp_path) as (fake, grsai, env):
        async with drawbridge(tmp_path, **env) as first:
            await connected(fake, 1)
            inter = await fake.slash("imagine", {"prompt": prompt})
            await until(lambda: grsai.held["stream"] == 1, 15, "GrsAI streaming")
            await generating(fake, inter)
            await until(lambda: task_saved(tmp_path), 5, "the task id saved")
            await kill(first)
        killed_at = len(fake.calls)
        fake.expire(inter.token)
        if who == "clock":
            with closing(sqlite3.connect(tmp_path / "data" / "drawbridge.db")) as db:
                (meta,) = db.execute("SELECT target_meta FROM jobs").fetchone()
                record = json.loads(meta)
                record["created_at"] -= 16 * 60
                db.execute("UPDATE jobs SET target_meta = ?", (json.dumps(record),))
                db.commit()
        grsai.holding = False
        (streaming,) = grsai.tasks_for(prompt)
        streaming.finish()
        async with drawbridge(tmp_path, **env) as second:
            await connected(fake, 2)
            usage = await settle(tmp_path, fake, second, [USER])
    job = ended_once(tmp_path, fake, usage)
    assert len(grsai.tasks_for(prompt)) == 1
    (posted,) = fake.results(job["id"])
    assert posted.path == f"/channels/{inter.payload['channel_id']}/messages", posted.path
    assert content_of(posted).startswith(f"<@{USER['id']}> "), content_of(posted)
    mentions = posted.json["allowed_mentions"]
    assert [str(u) for u in mentions["users"]] == [USER["id"]] and mentions["parse"] == []
    assert fake.followups(inter.token) == []
    late = [c for c in fake.calls[killed_at:] if f"/{inter.token}" in c.path]
    if who == "clock":
        assert late == [], [(c.method, c.path, c.status) for c in late]  # not even tried
    else:
        assert {c.status for c in late} <= {401}, [(c.method, c.path, c.status) for c in late]
    result_ok(fake, job)
    status_done(fake, inter, job["id"])  # edited with the bot token, as its author
