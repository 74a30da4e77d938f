"""Group commit for the one SQLite writer connection: many callers, one transaction per batch."""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

Op = tuple[str, Sequence[Any]]
T = TypeVar("T")

# A batch bigger than this waits for the next transaction; it bounds one commit's latency.
MAX_BATCH_UNITS = 512


@dataclass(slots=True, eq=False)
class _Unit:
    ops: Sequence[Op]
    done: asyncio.Future[None]


class GroupWriter:
    """Runs units of work (lists of statements) atomically, batching concurrent units.

    Each unit is all-or-nothing. Units that arrive while a transaction is being written wait
    for the next one, so under load hundreds of jobs share one `BEGIN IMMEDIATE … COMMIT`
    instead of paying a commit each; a caller's `await run(...)` returns only once its unit
    is committed, which is what "the row exists before the user hears queued" needs.

    The writer owns a plain `sqlite3` connection on its own thread and hands that thread a
    whole transaction at once: one hop per batch, where a statement-by-statement async driver
    would pay a hop (and a GIL hand-off) per statement.
    """

    def __init__(self, db: sqlite3.Connection, pool: ThreadPoolExecutor) -> None:
        self._db = db
        self._pool = pool
        self._queue: asyncio.Queue[_Unit | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False  # `stop` has queued its end mark

    @classmethod
    async def open(cls, path: Path, pragmas: Sequence[str] = ()) -> GroupWriter:
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="db-writer")

        def connect() -> sqlite3.Connection:
            # isolation_level=None: we issue BEGIN IMMEDIATE ourselves (reference/platforms.md §C).
            db = sqlite3.connect(path, isolation_level=None, timeout=5.0, check_same_thread=False)
            try:
                for pragma in pragmas:
                    db.execute(pragma)
            except BaseException:
                db.close()
                raise
            return db

        try:
            db = await asyncio.get_running_loop().run_in_executor(pool, connect)
        except BaseException:
            pool.shutdown(wait=False)
            raise
        return cls(db, pool)

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` with the connection on the writer thread (migrations, maintenance)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, self._db)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="db-writer")

    @property
    def running(self) -> bool:
        """Whether units can be run or posted (not once `stop` began: a unit queued behind its
        end mark would never be written, and its caller would wait for ever)."""
        return self._task is not None and not self._task.done() and not self._stopping

    async def run(self, *ops: Op) -> None:
        """Commit `ops` as one atomic unit, or raise the database's error."""
        if not self.running:
            raise RuntimeError("database writer is not running")
        unit = _Unit(ops, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(unit)
        await unit.done

    def post(self, *ops: Op) -> asyncio.Future[None]:
        """Queue `ops` as a unit without waiting; the future says how it went.

        For bookkeeping whose loss a restart tolerates (a job marked running, a delivery
        recorded): the caller goes on at once, and the unit still commits in order before
        anything queued after it.
        """
        if not self.running:
            raise RuntimeError("database writer is not running")
        unit = _Unit(ops, asyncio.get_running_loop().create_future())
        unit.done.add_done_callback(_log_failure)
        self._queue.put_nowait(unit)
        return unit.done

    async def stop(self) -> None:
        """Write everything already queued, then stop."""
        if self._task is None:
            return
        self._stopping = True
        self._queue.put_nowait(None)
        try:
            await self._task
        finally:
            self._task = None
            self._stopping = False

    async def close(self) -> None:
        """Stop, then close the connection and its thread."""
        try:
            await self.stop()
        finally:
            try:
                await self.call(lambda db: db.close())
            finally:
                self._pool.shutdown(wait=True)

    async def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < MAX_BATCH_UNITS and not self._queue.empty():
                unit = self._queue.get_nowait()
                if unit is None:
                    stopping = True
                    break
                batch.append(unit)
            await self._write(batch)

    async def _write(self, batch: list[_Unit]) -> None:
        try:
            await self.call(partial(_transaction, ops=[op for unit in batch for op in unit.ops]))
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0], exc)
                return
            # One bad unit must not fail its neighbours: retry each alone to find it.
            for unit in batch:
                try:
                    await self.call(partial(_transaction, ops=unit.ops))
                except Exception as one:
                    _settle(unit, one)
                else:
                    _settle(unit, None)
        else:
            for unit in batch:
                _settle(unit, None)


# `INSERT … VALUES (?, …)` with nothing after the row: rows of it can go as one statement.
_ONE_ROW = re.compile(r"^(INSERT\s.*\sVALUES\s*)(\([?,\s]*\))\s*$", re.IGNORECASE | re.DOTALL)
ROWS_PER_INSERT = 500


def _transaction(db: sqlite3.Connection, ops: Sequence[Op]) -> None:
    """All of `ops` or none of them, on the writer thread."""
    db.execute("BEGIN IMMEDIATE")
    try:
        # Consecutive runs of one statement go as one executemany; inserts as multi-row ones.
        i = 0
        while i < len(ops):
            sql = ops[i][0]
            j = i + 1
            while j < len(ops) and ops[j][0] == sql:
                j += 1
            if j - i == 1:
                db.execute(sql, ops[i][1])
            elif (insert := _ONE_ROW.match(sql)) is not None:
                _insert_rows(db, insert[1], insert[2], ops[i:j])
            else:
                db.executemany(sql, [params for _, params in ops[i:j]])
            i = j
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                log.debug("rollback after failed batch", exc_info=True)
        raise


def _insert_rows(db: sqlite3.Connection, head: str, row: str, ops: Sequence[Op]) -> None:
    """Many rows of one insert as a few multi-row statements.

    sqlite3 lets go of the GIL around each step of a statement, and getting it back waits up
    to the switch interval (5 ms) while the event loop is busy: row by row, the hundred inserts
    of a burst of commands took 30-60 ms to commit. One statement is one step.
    """
    width = max(1, row.count("?"))
    per = max(1, min(ROWS_PER_INSERT, db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // width))
    for k in range(0, len(ops), per):
        chunk = ops[k : k + per]
        db.execute(head + ", ".join([row] * len(chunk)), [p for _, params in chunk for p in params])


def _log_failure(done: asyncio.Future[None]) -> None:
    if not done.cancelled() and done.exception() is not None:
        log.error("a posted database write failed", exc_info=done.exception())


def _settle(unit: _Unit, exc: BaseException | None) -> None:
    if unit.done.done():
        return
    if exc is None:
        unit.done.set_result(None)
    else:
        unit.done.set_exception(exc)
