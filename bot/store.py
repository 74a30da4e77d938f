"""The durable store: SQLite for jobs and images (one writer, one reader), image files on disk."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import aiosqlite

from bot.dbwriter import GroupWriter, Op
from bot.image_files import list_files, make_dirs, older_than, unlink_all, write_files
from bot.images import extension_for
from bot.job_rows import JOB_COLUMNS, insert_job_op, row_to_job
from bot.jobs import BATCH_PLATFORM, GeneratedImage, Job, StoredImage, Target, UserRef
from bot.migrations import migrate
from bot.offload import Offloader
from bot.operator import Blocklist, Operator, scope_of

log = logging.getLogger(__name__)

# Threads writing image files. Creating a file is kernel work, and on a small machine more
# threads than cores only fight the event loop for it: on the 2-core bench VM, 6 threads did
# 1,281 jobs/s and 3 did 1,460 (`bench/engine.py`). A few more than the cores, up to 6, for disks
# where a create waits on I/O rather than on the CPU.
FILE_WORKERS = min(6, (os.cpu_count() or 2) + 1)


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Images and spend of one user, model and day, as `drawbridge usage` reports them."""

    day: str
    platform: str
    user_id: str
    model: str
    jobs: int
    succeeded: int
    images: int
    cost_usd: float


@dataclass(frozen=True, slots=True)
class DayTotals:
    """What one account has used or holds reserved on one day: the base quotas are checked on."""

    key: str  # the quota account: platform:user_id, or the account it is linked into
    images: int
    usd: float  # held and charged
    charged_usd: float = 0.0  # charged only


# What a day's tallies count, in every query that rebuilds one (quotas, chat limits, the budget
# beside another process): jobs queued, running or succeeded, not a cache hit (free); and what
# each holds or has spent.
COUNTED = "j.status IN ('queued','running','succeeded') AND j.cached_from IS NULL"
HELD_OR_SPENT = "CASE WHEN j.status = 'succeeded' THEN j.cost_usd ELSE j.reserved_usd END"


EXPIRE_CHUNK = 5000  # image rows deleted in one transaction


class Spend(NamedTuple):
    """What jobs have taken of a day's budget: held or spent, and of that, spent."""

    taken: float
    charged: float


class Store:
    """Jobs, images and usage, persisted. Open with `async with Store.open(dir)` or `await open`."""

    def __init__(
        self, data_dir: Path, writer: GroupWriter, reader_db: aiosqlite.Connection
    ) -> None:
        self.data_dir = data_dir
        self.images_dir = data_dir / "images"
        self.refs_dir = data_dir / "refs"
        self._rdb = reader_db
        self._writer = writer
        self._files = Offloader(FILE_WORKERS, "image-files")
        self._paid: dict[tuple[str, str], int] = {}  # paid messages not yet posted

    @classmethod
    async def open(cls, data_dir: Path) -> Store:
        await asyncio.to_thread(make_dirs, data_dir)
        path = data_dir / "drawbridge.db"
        writer = await GroupWriter.open(
            path,
            (
                "PRAGMA journal_mode=WAL",
                "PRAGMA synchronous=NORMAL",
                "PRAGMA busy_timeout=5000",
                "PRAGMA foreign_keys=ON",
            ),
        )
        try:
            await writer.call(migrate)
            rdb = await aiosqlite.connect(path, isolation_level=None, timeout=5.0)
        except BaseException:
            await writer.close()
            raise
        rdb.row_factory = aiosqlite.Row
        await rdb.execute("PRAGMA busy_timeout=5000")
        store = cls(data_dir, writer, rdb)
        store._writer.start()
        return store

    async def close(self) -> None:
        """Flush pending writes and close both connections; always reached, even after errors."""
        try:
            if self._paid:
                self._post_paid()
            await self._writer.stop()
            await self._writer.call(lambda db: db.execute("PRAGMA optimize"))
        finally:
            try:
                await self._rdb.close()
            finally:
                await self._writer.close()
                self._files.shutdown()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # ---- writes -------------------------------------------------------------------------

    async def write(self, *ops: Op) -> None:
        """Commit statements as one atomic unit (group-committed with concurrent callers)."""
        await self._writer.run(*ops)

    async def flush(self) -> None:
        """Return once everything written or posted before this call is committed."""
        await self._writer.run()

    def post(self, *ops: Op) -> asyncio.Future[None]:
        """Queue a unit without waiting for its commit (see `GroupWriter.post`)."""
        return self._writer.post(*ops)

    def add_paid_messages(self, platform: str, day: str, messages: int) -> None:
        """Count paid messages (negative: given back) against `day`; queued, not waited for.

        The counts of one loop turn go as one statement: at a peak a thousand paid messages a
        second each adding a row of their own would crowd the writer's transactions.
        """
        if not self._paid:
            asyncio.get_running_loop().call_soon(self._post_paid)
        key = (platform, day)
        self._paid[key] = self._paid.get(key, 0) + messages

    def _post_paid(self) -> None:
        counts, self._paid = self._paid, {}
        for (platform, day), messages in counts.items():
            if messages and self._writer.running:
                self.post(
                    (
                        "INSERT INTO paid_messages (platform, day, messages) VALUES (?, ?, ?) "
                        "ON CONFLICT (platform, day) DO UPDATE SET "
                        "messages = messages + excluded.messages",
                        (platform, day, messages),
                    )
                )
            elif messages:
                log.warning(
                    "%d paid messages not recorded: the database writer has stopped", messages
                )

    async def paid_messages(self, platform: str, day: str) -> int:
        """The paid messages counted on `day`."""
        rows = list(
            await self._rdb.execute_fetchall(
                "SELECT messages FROM paid_messages WHERE platform = ? AND day = ?",
                (platform, day),
            )
        )
        return max(0, int(rows[0][0])) if rows else 0

    async def insert_job(self, job: Job) -> None:
        await self.write(insert_job_op(job))

    async def save_reference_images(self, job_id: str, images: Sequence[bytes]) -> tuple[str, ...]:
        """Keep a job's reference images on disk, so a restart can still send them."""
        paths = self._ref_paths(job_id, len(images))
        await self._files.run(partial(write_files, list(zip(paths, images, strict=True))))
        return tuple(str(p.relative_to(self.data_dir)) for p in paths)

    async def drop_reference_images(self, job_id: str, count: int) -> None:
        """Remove what `save_reference_images` wrote (or began to) for a job never stored."""
        if count:
            with contextlib.suppress(OSError):
                await self._files.run(partial(unlink_all, self._ref_paths(job_id, count)))

    def _ref_paths(self, job_id: str, count: int) -> list[Path]:
        return [self.refs_dir / f"{job_id}-{i}" for i in range(count)]

    async def load_reference_images(self, paths: Sequence[str]) -> tuple[bytes, ...]:
        if not paths:
            return ()
        return tuple(
            await self._files.run(lambda: [(self.data_dir / p).read_bytes() for p in paths])
        )

    async def save_images(
        self, job_id: str, images: Sequence[GeneratedImage], *ops: Op
    ) -> list[StoredImage]:
        """Write the image files, then commit their rows together with `ops`.

        Files first, so a row never points at a file that is not whole. They are written on a
        small pool of their own: creating files is disk-bound (slow on some file systems), and
        side by side it neither waits behind nor holds up the database writer's commits.
        """
        # 32 folders: enough to keep each small, few enough that creating files stays cheap
        # (a new file in one of a thousand cold folders costs the disk far more).
        folder = self.images_dir / job_id[:1]
        stored = [
            StoredImage(
                job_id=job_id,
                index=i,
                path=folder / f"{job_id}-{i}{extension_for(img.mime)}",
                mime=img.mime,
                width=img.width,
                height=img.height,
                size_bytes=len(img.data),
            )
            for i, img in enumerate(images)
        ]
        files = [(s.path, img.data) for s, img in zip(stored, images, strict=True)]
        await self._files.run(partial(write_files, files))
        try:
            await self._writer.run(*self.image_ops(stored), *ops)
        except (sqlite3.Error, OSError):
            # Not committed (a full disk): no row will name these files, so no retention pass
            # would find them; the job ends without them.
            await self._files.run(partial(unlink_all, [s.path for s in stored]))
            raise
        return stored

    async def read_images(self, images: Sequence[StoredImage]) -> list[bytes]:
        """The bytes of stored images, read on the image-file pool (sharing its thread hops)."""
        return await self._files.run(lambda: [image.path.read_bytes() for image in images])

    def image_ops(self, images: Iterable[StoredImage]) -> list[Op]:
        return [
            (
                "INSERT OR REPLACE INTO images (job_id, idx, path, mime, width, height, size_bytes)"
                " VALUES (?,?,?,?,?,?,?)",
                (
                    s.job_id,
                    s.index,
                    str(s.path.relative_to(self.data_dir)),
                    s.mime,
                    s.width,
                    s.height,
                    s.size_bytes,
                ),
            )
            for s in images
        ]

    # ---- reads --------------------------------------------------------------------------

    async def _select_jobs(self, where: str, params: Sequence[Any] = ()) -> list[Job]:
        rows = await self._rdb.execute_fetchall(f"SELECT {JOB_COLUMNS} FROM jobs {where}", params)
        return [row_to_job(r) for r in rows]

    async def get_job(self, job_id: str) -> Job | None:
        jobs = await self._select_jobs("WHERE id = ?", (job_id,))
        return jobs[0] if jobs else None

    async def unfinished_jobs(self) -> list[Job]:
        """Queued and running jobs, oldest first: what a restart must resume."""
        return await self._select_jobs(
            "WHERE status IN ('queued','running') ORDER BY created_at, rowid"
        )

    async def undelivered_jobs(self, max_attempts: int) -> list[Job]:
        """Succeeded jobs whose images never reached the chat."""
        return await self._select_jobs(
            "WHERE status = 'succeeded' AND delivered_at IS NULL AND delivery_attempts < ? "
            "ORDER BY finished_at",
            (max_attempts,),
        )

    async def untold_ends(self, since: float) -> list[Job]:
        """Jobs that ended without a result since `since` and whose user was not yet told."""
        return await self._select_jobs(
            "WHERE told_at IS NULL AND status IN ('failed','refused','cancelled') "
            "AND finished_at >= ? ORDER BY finished_at",
            (since,),
        )

    async def untold_successes(self, since: float) -> list[Job]:
        """Jobs delivered since `since` whose status message was not yet seen to say "done"."""
        return await self._select_jobs(
            "WHERE told_at IS NULL AND status = 'succeeded' AND delivered_at IS NOT NULL "
            "AND delivered_at >= ? ORDER BY delivered_at",
            (since,),
        )

    async def recent_jobs(self, user: UserRef, limit: int = 10) -> list[Job]:
        return await self._select_jobs(
            "WHERE platform = ? AND user_id = ? ORDER BY created_at DESC, rowid DESC LIMIT ?",
            (user.platform, user.user_id, limit),
        )

    async def images_for(self, job_id: str) -> list[StoredImage]:
        rows = await self._rdb.execute_fetchall(
            "SELECT idx, path, mime, width, height, size_bytes FROM images WHERE job_id = ? "
            "ORDER BY idx",
            (job_id,),
        )
        return [
            StoredImage(job_id, r[0], self.data_dir / r[1], r[2], r[3], r[4], r[5]) for r in rows
        ]

    async def day_totals(self, day: str) -> list[DayTotals]:
        """Per account: images and dollars held (queued, running) or spent (succeeded) on `day`."""
        rows = await self._rdb.execute_fetchall(
            "SELECT COALESCE(a.account, j.platform || ':' || j.user_id) AS k, SUM(j.n_images), "
            f"SUM({HELD_OR_SPENT}), "
            "SUM(CASE WHEN j.status = 'succeeded' THEN j.cost_usd ELSE 0 END) "
            "FROM jobs j LEFT JOIN accounts a ON a.member = j.platform || ':' || j.user_id "
            f"WHERE j.day = ? AND {COUNTED} "
            "GROUP BY k",
            (day,),
        )
        return [
            DayTotals(str(r[0]), int(r[1] or 0), float(r[2] or 0.0), float(r[3] or 0.0))
            for r in rows
        ]

    async def spend_of_batches(self, day: str, *, batches: bool) -> Spend:
        """Dollars held or spent, and spent, on `day` by `drawbridge generate`'s jobs
        (`batches`), or by everyone else's: what the process on the other side of the data dir
        has taken."""
        rows = list(
            await self._rdb.execute_fetchall(
                f"SELECT SUM({HELD_OR_SPENT}), "
                "SUM(CASE WHEN j.status = 'succeeded' THEN j.cost_usd ELSE 0 END) "
                f"FROM jobs j WHERE j.day = ? AND {COUNTED} "
                f"AND j.platform {'=' if batches else '!='} ?",
                (day, BATCH_PLATFORM),
            )
        )
        if not rows:
            return Spend(0.0, 0.0)
        return Spend(float(rows[0][0] or 0.0), float(rows[0][1] or 0.0))

    async def scope_totals(self, day: str) -> dict[str, int]:
        """Images held or made per chat (and Discord guild) on `day`, for per-chat limits."""
        rows = await self._rdb.execute_fetchall(
            "SELECT j.platform, j.chat_id, j.guild_id, SUM(j.n_images) FROM jobs j "
            f"WHERE j.day = ? AND {COUNTED} "
            "GROUP BY j.platform, j.chat_id, j.guild_id",
            (day,),
        )
        totals: dict[str, int] = {}
        for platform, chat_id, guild_id, images in rows:
            scope = scope_of(Target(platform, chat_id=chat_id, guild_id=guild_id))
            totals[scope] = totals.get(scope, 0) + int(images or 0)
        return totals

    async def handled_messages(self, platform: str, since: float) -> set[tuple[str, str, str]]:
        """(user, chat, message id) of the platform messages that made a job, or whose command
        changed something (`operator.command_ops`), since `since`."""
        rows = await self._rdb.execute_fetchall(
            "SELECT user_id, chat_id, reply_to FROM jobs "
            "WHERE created_at >= ? AND platform = ? AND reply_to IS NOT NULL "
            "UNION ALL SELECT user_id, chat_id, message_id FROM commands "
            "WHERE at >= ? AND platform = ?",
            (since, platform, since, platform),
        )
        return {(f"{platform}:{r[0]}", str(r[1]), str(r[2])) for r in rows}

    async def alerts_sent(self, day: str) -> list[str]:
        """The keys of the admin alerts sent on `day` (`EngineBase.alert` records each)."""
        rows = await self._rdb.execute_fetchall(
            "SELECT subject FROM audit WHERE action = 'alert' AND detail = ?", (day,)
        )
        return [str(r[0]) for r in rows]

    async def load_operator(self, blocklist: Blocklist | None = None) -> Operator:
        """The operator tables, for the checks submit makes in memory."""
        return Operator.from_rows(
            await self._rdb.execute_fetchall("SELECT member, account FROM accounts"),
            await self._rdb.execute_fetchall("SELECT member FROM bans"),
            await self._rdb.execute_fetchall("SELECT account, day, images FROM grants"),
            await self._rdb.execute_fetchall(
                "SELECT scope, models, max_images, daily_images, blocklist FROM policies"
            ),
            blocklist,
            await self._rdb.execute_fetchall("SELECT scope, moved_from FROM chat_moves"),
        )

    async def link_code_owner(self, code: str, now: float) -> str | None:
        rows = list(
            await self._rdb.execute_fetchall(
                "SELECT member FROM link_codes WHERE code = ? AND expires_at >= ?", (code, now)
            )
        )
        return str(rows[0][0]) if rows else None

    async def cached_result(self, key: str, since: float) -> tuple[Job, list[StoredImage]] | None:
        """The latest succeeded job with this cache key since `since`, if its files still exist."""
        jobs = await self._select_jobs(
            "WHERE cache_key = ? AND status = 'succeeded' AND finished_at >= ? "
            "ORDER BY finished_at DESC LIMIT 1",
            (key, since),
        )
        if not jobs:
            return None
        images = await self.images_for(jobs[0].id)
        exists = await self._files.run(lambda: all(i.path.exists() for i in images))
        return (jobs[0], images) if images and exists else None

    async def expire_images(self, before: float) -> int:
        """Delete the image files (and rows) of jobs finished before `before`, and the reference
        photos users sent for them; the job rows stay. Returns the images deleted.

        All of them, in chunks (one pass an hour: a bot making more than a chunk an hour
        would otherwise fall behind its retention, and fill the disk)."""
        refs = await self._expire_references(before)
        if refs:
            log.info("deleted %d reference images of jobs that ended long ago", refs)
        total = 0
        while (deleted := await self._expire_chunk(before)) > 0:
            total += deleted
            if deleted < EXPIRE_CHUNK:
                break
        return total

    async def _expire_chunk(self, before: float) -> int:
        rows = await self.fetch(
            "SELECT i.job_id, i.idx, i.path FROM images i JOIN jobs j ON j.id = i.job_id "
            f"WHERE j.finished_at < ? LIMIT {EXPIRE_CHUNK}",
            (before,),
        )
        if not rows:
            return 0
        # A cached copy points at the same file: keep files another, newer row still uses.
        paths = {str(r[2]) for r in rows}
        placeholders = ",".join("?" * len(paths))
        kept = {
            str(r[0])
            for r in await self.fetch(
                f"SELECT i.path FROM images i JOIN jobs j ON j.id = i.job_id "
                f"WHERE i.path IN ({placeholders}) AND j.finished_at >= ?",
                (*paths, before),
            )
        }
        doomed = [self.data_dir / p for p in paths - kept]
        await self._files.run(partial(unlink_all, doomed))
        await self.write(
            *[("DELETE FROM images WHERE job_id = ? AND idx = ?", (r[0], r[1])) for r in rows]
        )
        return len(rows)

    async def _expire_references(self, before: float) -> int:
        """Delete the reference photos of jobs finished before `before`, and those no job row
        names that are older than that (a crash between saving them and the job's row).

        Found from the files there are, not from the rows: a row keeps its paths (a reroll
        then says the photos are gone, rather than run without them), and the work is the
        files left, not every job that ever had one.
        """
        names = await self._files.run(partial(list_files, self.refs_dir))
        by_job: dict[str, list[str]] = {}
        for name in names:
            by_job.setdefault(name.rpartition("-")[0], []).append(name)
        ids = list(by_job)
        doomed: list[Path] = []
        orphans: list[Path] = []
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            rows = await self.fetch(
                f"SELECT id, finished_at FROM jobs WHERE id IN ({','.join('?' * len(chunk))})",
                chunk,
            )
            ended = {str(row[0]): row[1] for row in rows}
            for job_id in chunk:
                paths = [self.refs_dir / name for name in by_job[job_id]]
                if job_id not in ended:
                    orphans += paths  # (or a submit writing its row now: judged by age)
                elif ended[job_id] is not None and ended[job_id] < before:
                    doomed += paths
        if orphans:
            doomed += await self._files.run(partial(older_than, orphans, before))
        if doomed:
            await self._files.run(partial(unlink_all, doomed))
        return len(doomed)

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """A read query on the reader connection (rows support index and name access)."""
        return list(await self._rdb.execute_fetchall(sql, params))

    async def usage(self, since_day: str | None = None) -> list[UsageRow]:
        where, params = ("WHERE day >= ?", (since_day,)) if since_day else ("", ())
        rows = await self._rdb.execute_fetchall(
            "SELECT day, platform, user_id, model, COUNT(*), "
            "SUM(status = 'succeeded'), SUM(CASE WHEN status = 'succeeded' THEN n_images ELSE 0 END), "
            f"SUM(cost_usd) FROM jobs {where} GROUP BY day, platform, user_id, model "
            "ORDER BY day, platform, user_id, model",
            params,
        )
        return [
            # SUM of floats: 0.033 + 0.011 + 0.011 is 0.05499999999999999; the prices are exact
            # to the micro-dollar, so the sums are too.
            UsageRow(r[0], r[1], r[2], r[3], int(r[4]), int(r[5]), int(r[6]), round(r[7] or 0.0, 6))
            for r in rows
        ]
