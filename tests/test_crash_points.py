"""Durability at exact crash points: the process dies there, a new one starts on the same data.

Two ways in:

- the real `drawbridge run`, killed with SIGKILL while a loopback fake holds one request open
  (GrsAI's submit, its result download, Telegram's sendPhoto, Telegram's update confirmation);
- the engine in-process, stopped at a hook inside the job's life by `Crash`: a synchronous
  SQLite backup taken at that instant is what survives (`Harness.abandon` closes the store, which
  commits every posted-but-uncommitted write, so it cannot play a crash between post and commit).

After every restart: each job ends exactly once (one delivery, or one final message), a provider
task already named is resumed by its id (not paid again), the engine's quota and budget tallies
equal the jobs table, no row stays queued or running, and nobody was told "queued" for a job with
no row. A crash point that cannot be closed is asserted as what it is (marked WINDOW).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import sqlite3
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any, NoReturn

import pytest
from aiohttp import web

from bot.adapter import StatusKind
from bot.dbwriter import Op
from bot.engine import Engine
from bot.errors import Refused
from bot.jobs import Job, StoredImage
from bot.texts import money
from tests.conftest import Harness, request
from tests.fake_grsai import JSON_BODY, FakeGrsai
from tests.fake_telegram import ApiError, FakeTelegram, Upload
from tests.test_accounting import PRICE, balanced, job_rows
from tests.test_blackbox import drawbridge, rows

# ---- waiting on state, never on the clock ----------------------------------------------------


async def until(check: Callable[[], bool], within: float, what: str | Callable[[], str]) -> None:
    """Poll `check` (a fake's counter or another process's database) until it holds."""
    try:
        async with asyncio.timeout(within):
            while not check():  # noqa: ASYNC110 - the conditions are counters and rows
                await asyncio.sleep(0.01)
    except TimeoutError:
        said = what() if callable(what) else what
        raise AssertionError(f"waited {within}s for: {said}") from None


# ---- in-process: a crash at an exact instant ------------------------------------------------


class Crash:
    """Stops an engine at one instant: only what SQLite had committed by then survives.

    `now()` is synchronous, so nothing else runs between the hook that calls it and the backup:
    a unit the writer has not taken yet (it needs the event loop for that) is not in it. What the
    dead engine does afterwards is undone by `bury()`: its database is put back from the backup,
    image files written later are removed, and the adapter's and provider's records are cut back
    to the instant (the platform and the provider never saw those calls).
    """

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.at = asyncio.Event()
        self.engine: Engine | None = None
        self._backup = h.data_dir.parent / "crash-backup.db"
        self._files: set[Path] = set()
        self._marks: tuple[int, int, int, int] = (0, 0, 0, 0)

    def now(self, engine: Engine) -> None:
        if self.at.is_set():
            return
        src = sqlite3.connect(self.h.data_dir / "drawbridge.db")
        dst = sqlite3.connect(self._backup)
        try:
            src.backup(dst)  # a reader: it sees committed transactions only
        finally:
            src.close()
            dst.close()
        self._files = set(self._image_files())
        a, p = self.h.adapter, self.h.provider
        self._marks = (len(a.deliveries), len(a.statuses), len(a.notices), len(p.calls))
        self.engine = engine
        self.at.set()

    async def die(self, engine: Engine) -> NoReturn:
        """For async hooks: the crash happens here and this coroutine never goes on."""
        self.now(engine)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    def _image_files(self) -> list[Path]:
        d = self.h.data_dir
        return [p for sub in ("images", "refs") for p in (d / sub).rglob("*") if p.is_file()]

    async def bury(self, *also: asyncio.Task[Any]) -> None:
        """Wait for the crash, stop everything the dead engine left running, restore the disk."""
        await until(self.at.is_set, 5, "the crash point")
        engine = self.engine
        assert engine is not None
        engine._closing = True  # the dead process starts nothing more
        tasks = [
            t
            for t in (engine._scheduler, engine._sweeper, *engine._running.values())
            if t is not None
        ]
        tasks += [*engine._background, *also]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.h.opened.remove((engine, engine.store))
        await engine.store.close()
        db = self.h.data_dir / "drawbridge.db"
        for suffix in ("", "-wal", "-shm"):
            db.with_name(db.name + suffix).unlink(missing_ok=True)
        shutil.copyfile(self._backup, db)
        for path in self._image_files():
            if path not in self._files:
                path.unlink()
        a, p = self.h.adapter, self.h.provider
        deliveries, statuses, notices, calls = self._marks
        del a.deliveries[deliveries:], a.statuses[statuses:], a.notices[notices:]
        del p.calls[calls:]


def finals(h: Harness, job_id: str) -> list[StatusKind]:
    return [u.kind for j, u in h.adapter.statuses if j == job_id and u.kind.final]


async def settled(engine: Engine, h: Harness) -> list[dict[str, Any]]:
    """Run the restarted engine dry; check nothing is left in flight and the books balance."""
    await engine.run_until_idle()
    table = await job_rows(h)
    stuck = [(r["id"], r["status"]) for r in table if r["status"] in ("queued", "running")]
    assert stuck == [], f"rows left in flight once idle: {stuck}"
    assert engine._jobs == {} and engine._active_by_user == {}
    await balanced(engine, h)
    return table


def ends_once(h: Harness, job_id: str) -> None:
    delivered = h.adapter.delivered(job_id)
    ended = finals(h, job_id)
    assert (delivered, len(ended)) in ((1, 0), (0, 1)), (
        f"job {job_id}: {delivered} deliveries and final messages {ended}"
    )


def is_insert(op: Op) -> bool:
    return op[0].startswith("INSERT INTO jobs ")


def hook_write(engine: Engine, match: Callable[[Op], bool], hook: Callable[..., Any]) -> None:
    """Route the store's awaited writes of matching units through `hook(original, ops)`."""
    original = engine.store.write

    async def write(*ops: Op) -> None:
        if any(match(op) for op in ops):
            await hook(original, ops)
        else:
            await original(*ops)

    engine.store.write = write  # type: ignore[method-assign]


def hook_post(engine: Engine, match: Callable[[Op], bool], committed: bool, crash: Crash) -> None:
    """Crash right after a matching unit is posted: before its commit, or once it committed."""
    original = engine.store.post

    def post(*ops: Op) -> asyncio.Future[None]:
        done = original(*ops)
        if any(match(op) for op in ops):
            if committed:
                done.add_done_callback(lambda _: crash.now(engine))
            else:
                crash.now(engine)
        return done

    engine.store.post = post  # type: ignore[method-assign]


@pytest.mark.parametrize("committed", [False, True], ids=["insert-posted", "insert-committed"])
async def test_crash_while_a_new_job_is_stored(harness: Harness, committed: bool) -> None:
    """Before the row commits the user hears nothing; after it, the job runs on restart."""
    first = await harness.engine()
    crash = Crash(harness)

    async def insert(original: Callable[..., Any], ops: Sequence[Op]) -> None:
        if committed:
            await original(*ops)
        await crash.die(first)  # between the commit and the ticket: no "queued" sent

    hook_write(first, is_insert, insert)
    told: list[str] = []

    async def ask() -> None:
        told.append((await first.submit(request(model="paid"))).job_id)

    asking = asyncio.create_task(ask())
    await crash.bury(asking)
    second = await harness.engine()
    table = await settled(second, harness)
    assert told == []  # nobody was told "queued" …
    if not committed:  # … and without a row nothing happens, nothing is charged
        assert table == [] and harness.provider.calls == [] and harness.adapter.deliveries == []
        return
    (row,) = table
    assert (row["status"], row["cost_usd"]) == ("succeeded", PRICE)
    assert harness.provider.submits() == 1
    ends_once(harness, row["id"])


@pytest.mark.parametrize("committed", [False, True], ids=["id-posted", "id-committed"])
async def test_crash_once_the_provider_named_its_task(harness: Harness, committed: bool) -> None:
    p = harness.provider
    p.task_ids, p.gate = True, asyncio.Event()
    first = await harness.engine()
    crash = Crash(harness)
    hook_post(first, lambda op: "SET task_id = ?" in op[0] and op[1][0], committed, crash)
    ticket = await first.submit(request(model="paid"))
    await crash.bury()
    second = await harness.engine()
    p.gate.set()
    table = await settled(second, harness)
    assert [(r["status"], r["cost_usd"]) for r in table] == [("succeeded", PRICE)]
    ends_once(harness, ticket.job_id)
    if committed:
        assert p.submits() == 1  # resumed by its id, not paid again
        assert p.calls[-1].task_id == f"task-{ticket.job_id}"
    else:
        # WINDOW: the provider accepted (and bills) the task, the id was only posted
        # (bot/job_runner.py:393 `_Hooks.task_submitted`, not awaited on purpose); a crash before
        # that commit loses the id, so the restart submits again. Awaiting the commit would not
        # shorten it: the provider charged before the bot could write anything. The user is
        # charged once; the operator pays twice. bot/providers/grsai.py (`_submit_for_id`) names it.
        assert p.submits() == 2


async def test_crash_while_the_made_images_download(harness: Harness) -> None:
    """The provider made the images (its slot is free again), the download is cut off."""
    p = harness.provider
    p.task_ids = True
    first = await harness.engine()
    crash = Crash(harness)

    class DownloadCut(asyncio.Event):
        async def wait(self) -> bool:  # type: ignore[override]
            if not crash.at.is_set():
                await first.store.flush()  # the task id is saved long before a download ends
                crash.now(first)
            return await super().wait()

    downloading = DownloadCut()
    p.fetch_gates["a fox in the snow"] = downloading
    ticket = await first.submit(request(model="paid"))
    await crash.bury()
    downloading.set()
    second = await harness.engine()
    table = await settled(second, harness)
    assert [(r["status"], r["cost_usd"]) for r in table] == [("succeeded", PRICE)]
    assert p.submits() == 1 and p.calls[-1].task_id == f"task-{ticket.job_id}"
    ends_once(harness, ticket.job_id)


async def test_crash_after_the_files_are_written_before_the_charge_commits(
    harness: Harness,
) -> None:
    p = harness.provider
    p.task_ids = True
    first = await harness.engine()
    crash = Crash(harness)
    writer = first.store._writer
    original = writer.run

    async def run(*ops: Op) -> None:
        if any(op[0].startswith("UPDATE jobs SET status = 'succeeded'") for op in ops):
            await original()  # what was posted before (the task id) has had its commit
            await crash.die(first)  # the image files are on disk, their rows and charge are not
        await original(*ops)

    writer.run = run  # type: ignore[method-assign]
    ticket = await first.submit(request(model="paid"))
    await crash.bury()
    assert crash._files, "the files were written before the commit"
    second = await harness.engine()
    table = await settled(second, harness)
    assert [(r["status"], r["cost_usd"], r["n_images"]) for r in table] == [("succeeded", PRICE, 1)]
    assert p.submits() == 1  # the task is fetched again by its id
    images = await second.store.images_for(ticket.job_id)
    assert len(images) == 1 and images[0].path.exists()
    ends_once(harness, ticket.job_id)


async def test_crash_after_the_charge_before_the_platform_got_anything(harness: Harness) -> None:
    first = await harness.engine()
    crash = Crash(harness)
    adapter = harness.adapter
    deliver = adapter.deliver

    async def dies(job: Job, images: Sequence[StoredImage]) -> str:
        await crash.die(first)

    adapter.deliver = dies  # type: ignore[method-assign]
    ticket = await first.submit(request(model="paid"))
    await crash.bury()
    adapter.deliver = deliver  # type: ignore[method-assign]
    second = await harness.engine()
    table = await settled(second, harness)
    assert [(r["status"], r["cost_usd"]) for r in table] == [("succeeded", PRICE)]
    assert len(harness.provider.calls) == 1  # delivered from disk, not generated again
    assert table[0]["delivered_at"] is not None
    ends_once(harness, ticket.job_id)


@pytest.mark.parametrize("committed", [False, True], ids=["ref-posted", "ref-committed"])
async def test_crash_once_the_platform_took_the_result(harness: Harness, committed: bool) -> None:
    first = await harness.engine()
    crash = Crash(harness)
    hook_post(first, lambda op: op[0].startswith("UPDATE jobs SET delivered_at"), committed, crash)
    ticket = await first.submit(request(model="paid"))
    await crash.bury()
    assert harness.adapter.delivered(ticket.job_id) == 1  # the platform has it
    second = await harness.engine()
    table = await settled(second, harness)
    assert [(r["status"], r["cost_usd"]) for r in table] == [("succeeded", PRICE)]
    assert table[0]["delivered_at"] is not None
    assert len(harness.provider.calls) == 1
    if committed:
        ends_once(harness, ticket.job_id)
    else:
        # WINDOW: the platform has the message but its id was only posted (bot/job_runner.py:288,
        # `_deliver`; the comment at :286 says a crash here posts twice). No await closes it: the
        # platform acts before the bot learns the id, and Telegram has no idempotency key. At
        # least once, and at most one re-post; DESIGN rule 1's "never twice" cannot hold here.
        assert harness.adapter.delivered(ticket.job_id) == 2


def is_failure(op: Op) -> bool:
    return op[0].startswith("UPDATE jobs SET status = ?, cost_usd = 0")


@pytest.mark.parametrize("committed", [False, True], ids=["end-posted", "end-committed"])
async def test_crash_while_a_refusal_is_recorded(harness: Harness, committed: bool) -> None:
    p = harness.provider
    p.task_ids = True
    p.errors["a fox in the snow"] = [Refused("no"), Refused("no")]  # the task says so each time
    first = await harness.engine()
    crash = Crash(harness)

    async def end(original: Callable[..., Any], ops: Sequence[Op]) -> None:
        if committed:
            await original(*ops)
        await crash.die(first)  # the row may say refused, but the user has not been told

    hook_write(first, is_failure, end)
    p.gates["a fox in the snow"] = refusing = asyncio.Event()
    ticket = await first.submit(request(model="paid"))
    await until(lambda: len(p.calls) == 1, 3, "the task submitted")
    await first.store.flush()  # its id is saved: the refusal comes later
    refusing.set()
    await crash.bury()
    assert finals(harness, ticket.job_id) == []
    second = await harness.engine()
    table = await settled(second, harness)
    assert [(r["status"], r["cost_usd"]) for r in table] == [("refused", 0)]
    assert p.submits() == 1  # a resumed task is asked again by its id
    assert harness.adapter.delivered(ticket.job_id) == 0
    # end-committed: `_finish` commits the refusal before it tells the user; a crash in between
    # once left a final row whose user never heard the outcome. The row's `told_at` stays NULL
    # until it is told, and a restart tells such recent ends again.
    assert finals(harness, ticket.job_id) == [StatusKind.REFUSED]


# ---- the real process, killed while a fake holds a request open ------------------------------

QUEUED = re.compile(r"Queued #\d+ .* job ([a-z2-7]{10})")


class HoldingTelegram(FakeTelegram):
    """The fake Bot API, able to hold sendPhoto and the update confirmation open.

    It also checks every "Queued" ack against the database at the instant it arrives.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self.db: Path | None = None
        self.last_update_id = 0
        self.confirmed = 0  # the highest getUpdates offset Telegram has acted on
        self.hold_confirms = False
        self.polls_held = 0
        self.hold_photo_chats: set[int] = set()
        self.photos_held = 0
        self.photo_gate = asyncio.Event()
        self.acks: list[tuple[str, bool]] = []  # (job id, whether its row existed then)
        self._release = asyncio.Event()

    def push(self, update: dict[str, Any]) -> dict[str, Any]:
        pushed = super().push(update)
        self.last_update_id = pushed["update_id"]
        return pushed

    def release(self) -> None:
        self._release.set()
        self.photo_gate.set()

    async def _m_getUpdates(self, p: dict[str, Any], f: dict[str, Upload]) -> Any:
        offset = int(p.get("offset") or 0)
        if offset and self.hold_confirms:
            self.polls_held += 1
            await self._release.wait()  # the bot dies before Telegram reads this offset
            return []
        self.confirmed = max(self.confirmed, offset)
        return await super()._m_getUpdates(p, f)

    async def _m_sendPhoto(self, p: dict[str, Any], f: dict[str, Upload]) -> Any:
        if p.get("chat_id") in self.hold_photo_chats:
            self.hold_photo_chats.discard(p["chat_id"])
            self.photos_held += 1
            await self.photo_gate.wait()  # then posted: only the answer is lost with the bot
        return await super()._m_sendPhoto(p, f)

    async def _m_sendMessage(self, p: dict[str, Any], f: dict[str, Upload]) -> Any:
        self._check_ack(p)
        return await super()._m_sendMessage(p, f)

    async def _m_editMessageText(self, p: dict[str, Any], f: dict[str, Upload]) -> Any:
        self._check_ack(p)
        return await super()._m_editMessageText(p, f)

    def _check_ack(self, p: dict[str, Any]) -> None:
        try:
            text = self._visible(p, "text")
        except ApiError:
            return
        match = QUEUED.search(text)
        if match is not None and self.db is not None:
            with closing(sqlite3.connect(self.db)) as db:
                found = db.execute("SELECT 1 FROM jobs WHERE id = ?", (match[1],)).fetchall()
            self.acks.append((match[1], bool(found)))

    def photos_to(self, chat: int) -> list[Any]:
        """sendPhoto calls the fake carried out (posted), answered or not."""
        return [c for c in self.calls if c.method == "sendPhoto" and c.chat_id == chat and c.result]


class HoldingGrsai(FakeGrsai):
    """The fake GrsAI, holding requests for prompts that ask for it while `holding` is on."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.holding = True
        self.held: dict[str, int] = {"submit": 0, "stream": 0, "file": 0}

    async def _draw(self, request: web.Request) -> web.StreamResponse:
        body = request[JSON_BODY]
        prompt = str(body.get("prompt", "")) if isinstance(body, dict) else ""
        if self.holding and "hold-submit" in prompt:
            self.create_task(str(body["model"]), prompt)  # accepted, so charged …
            self.held["submit"] += 1
            await self._closing.wait()  # … and never answered
            return web.Response(status=503)
        return await super()._draw(request)

    async def _stream(
        self, request: web.Request, task: Any, shut: bool, flat_violation: bool = False
    ) -> web.StreamResponse:
        if not (self.holding and "hold-stream" in task.prompt):
            return await super()._stream(request, task, shut, flat_violation)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        line = json.dumps(task.view(self.base_url))
        await resp.write(f"data: {line}\n\n".encode())  # the task id, and it is running
        self.held["stream"] += 1
        await self._closing.wait()
        return resp

    async def _file(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        task = next((t for t in self.tasks.values() if name in t.files), None)
        if self.holding and task is not None and "hold-file" in task.prompt:
            self.file_gets += 1
            self.held["file"] += 1
            await self._closing.wait()  # finished, but its image never arrives
            return web.Response(status=503)
        return await super()._file(request)

    def tasks_for(self, prompt: str) -> list[Any]:
        return [t for t in self.tasks.values() if t.prompt == prompt]


def job_of(tmp_path: Path, chat: int) -> dict[str, Any]:
    with closing(sqlite3.connect(tmp_path / "data" / "drawbridge.db")) as db:
        db.row_factory = sqlite3.Row
        found = db.execute("SELECT * FROM jobs WHERE chat_id = ?", (str(chat),)).fetchall()
    assert len(found) == 1, f"chat {chat} has {len(found)} job rows"
    return dict(found[0])


def count(tmp_path: Path, sql: str) -> int:
    try:
        return int(rows(tmp_path, sql)[0][0])
    except sqlite3.OperationalError:  # the first process is still creating the schema
        return 0


async def test_kill_9_at_four_crash_points_then_restart(tmp_path: Path) -> None:
    """One SIGKILL with four jobs each stopped at another point of their life.

    submit: GrsAI accepted (and billed) the task but never answered; stream: GrsAI streamed the
    task id, the bot saved it, the task runs on; file: the task finished, its image download is
    cut off; photo: the image is stored and charged, Telegram took sendPhoto, the answer is lost.
    """
    prompts = {
        "submit": "hold-submit a lighthouse",
        "stream": "hold-stream a harbour",
        "file": "hold-file a mountain",
        "photo": "a meadow at noon",
    }
    chats = {point: 7001 + i for i, point in enumerate(prompts)}
    async with HoldingTelegram() as tg, HoldingGrsai() as grsai:
        tg.db = tmp_path / "data" / "drawbridge.db"
        tg.hold_photo_chats = {chats["photo"]}
        env = dict(
            TELEGRAM_BOT_TOKEN=tg.token,
            TELEGRAM_API_URL=tg.url,
            GRSAI_API_KEY=grsai.api_key,
            GRSAI_BASE_URL=grsai.base_url,
            DEFAULT_MODEL="nano-banana",
        )
        async with drawbridge(tmp_path, **env) as first:
            await tg.wait_for("setMyCommands", within=20)
            for point, prompt in prompts.items():
                user = tg.user(chats[point], name=point)
                tg.message(f"/imagine {prompt}", user=user, chat=tg.chat(chats[point]))
            await until(lambda: tg.confirmed > tg.last_update_id, 10, "updates confirmed")

            def saved_ids() -> int:
                return count(
                    tmp_path,
                    "SELECT count(*) FROM jobs WHERE task_id IS NOT NULL AND "
                    "(prompt LIKE 'hold-stream%' OR prompt LIKE 'hold-file%')",
                )

            await until(
                lambda: min(grsai.held.values()) >= 1 and tg.photos_held == 1,
                15,
                lambda: f"every hold reached: {grsai.held}, photo {tg.photos_held}",
            )
            await until(lambda: saved_ids() == 2, 5, "the task ids saved")
            first.proc.kill()  # SIGKILL: no shutdown, nothing flushed
            await first.proc.wait()
        grsai.holding = False
        (streaming,) = grsai.tasks_for(prompts["stream"])
        streaming.finish()  # GrsAI went on while the bot was down
        tg.photo_gate.set()  # Telegram posts the held photo; its answer goes nowhere
        await until(lambda: len(tg.photos_to(chats["photo"])) == 1, 5, "the held photo posted")
        before = {point: job_of(tmp_path, chat) for point, chat in chats.items()}
        assert before["photo"]["status"] == "succeeded" and before["photo"]["delivered_at"] is None
        assert all(
            before[p]["status"] in ("queued", "running") for p in ("submit", "stream", "file")
        )

        async with drawbridge(tmp_path, **env) as second:
            await until(
                lambda: (
                    count(tmp_path, "SELECT count(*) FROM jobs WHERE delivered_at IS NULL") == 0
                ),
                30,
                "every job delivered after the restart",
            )
            for point, chat in chats.items():  # the engine's tallies, as the users see them
                tg.message("/usage", user=tg.user(chat, name=point), chat=tg.chat(chat))
            usage = {
                point: await tg.wait_for(
                    lambda c, chat=chat: c.chat_id == chat and "Today:" in (c.text or ""),
                    within=10,
                )
                for point, chat in chats.items()
            }
            assert await second.stop() == 0
        tg.release()

    after = {point: job_of(tmp_path, chat) for point, chat in chats.items()}
    problems = []
    for point, chat in chats.items():
        job = after[point]
        if (job["status"], job["cost_usd"], job["n_images"]) != ("succeeded", 0.04, 1):
            problems.append(f"{point}: row {job['status']} {job['cost_usd']} {job['n_images']}")
        posted = len(tg.photos_to(chat))
        # WINDOW (photo): Telegram acted on sendPhoto, the bot died before the answer; it cannot
        # know, so the restart posts again (at least once; job_runner.py _deliver's comment).
        if posted != (2 if point == "photo" else 1):
            problems.append(f"{point}: {posted} photos posted")
        tasks = len(grsai.tasks_for(prompts[point]))
        # WINDOW (submit): GrsAI billed a task whose id never reached the bot; the restart must
        # submit again (grsai.py `_submit_for_id` docstring: "the price of these modes").
        if tasks != (2 if point == "submit" else 1):
            problems.append(f"{point}: {tasks} GrsAI tasks paid for")
        text = usage[point][0].text or ""
        want = f"Today: 1 of 20 images · spent {money(job['cost_usd'])} of unlimited · 0 job(s)"
        if not text.startswith(want):
            problems.append(f"{point}: /usage says {text!r}, the table {want!r}")
    last_photo = tg.photos_to(chats["photo"])[-1]
    if after["photo"]["delivery_ref"] != str(last_photo.result["message_id"]):
        problems.append(f"photo: delivery_ref {after['photo']['delivery_ref']} is not the post")
    assert problems == [], problems
    assert tg.acks and all(found for _, found in tg.acks), f"told queued without a row: {tg.acks}"
    assert count(tmp_path, "SELECT count(*) FROM jobs") == 4


async def test_kill_9_before_telegram_hears_the_update_was_taken(tmp_path: Path) -> None:
    """The job row is committed, the ack sent, but Telegram never got the next offset."""
    async with HoldingTelegram() as tg:
        tg.db = tmp_path / "data" / "drawbridge.db"
        env = dict(TELEGRAM_BOT_TOKEN=tg.token, TELEGRAM_API_URL=tg.url, DEFAULT_MODEL="demo")
        async with drawbridge(tmp_path, **env) as first:
            await tg.wait_for("setMyCommands", within=20)
            tg.hold_confirms = True
            tg.message("/imagine a fox in the snow", user=tg.user(8001), chat=tg.chat(8001))
            await until(
                lambda: tg.polls_held >= 1 and count(tmp_path, "SELECT count(*) FROM jobs") == 1,
                10,
                "the row committed and the next poll on its way",
            )
            first.proc.kill()
            await first.proc.wait()
        tg.hold_confirms = False
        tg.release()  # the held poll ends without Telegram having read its offset
        async with drawbridge(tmp_path, **env) as second:
            await until(lambda: tg.confirmed > tg.last_update_id, 20, "the update confirmed")
            await until(
                lambda: (
                    count(
                        tmp_path,
                        "SELECT count(*) FROM jobs WHERE status IN ('queued', 'running') "
                        "OR (status = 'succeeded' AND delivered_at IS NULL)",
                    )
                    == 0
                ),
                20,
                "the restarted bot idle",
            )
            assert await second.stop() == 0  # PTB finishes the handlers it started
    assert tg.acks and all(found for _, found in tg.acks), f"told queued without a row: {tg.acks}"
    assert count(tmp_path, "SELECT count(*) FROM jobs WHERE status IN ('queued','running')") == 0
    jobs = rows(tmp_path, "SELECT id, status, reply_to, cost_usd FROM jobs")
    photos = tg.photos_to(8001)
    # Telegram re-sends an update until a getUpdates offset confirms it (PTB keeps the offset in
    # memory only); the restarted bot once took the same message again and made a second job (a
    # second bill, a second image). A message sent before the process started is checked
    # against the messages the last day's jobs came from now (`Store.handled_messages`).
    assert (len(jobs), len(photos)) == (1, 1), f"jobs {jobs}, photos posted {len(photos)}"
