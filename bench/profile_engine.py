"""Where the engine's time goes (issue 7): the zero-latency throughput case of `bench.engine`
under cProfile, and how busy each thread is.

    .venv/bin/python -m bench.profile_engine                  # 10,000 jobs, 100 users
    .venv/bin/python -m bench.profile_engine --jobs 10000 --users 3334 --top 12

It runs `bench.engine.run` (real engine, durable SQLite store, the prerendered demo model, a
null adapter) three times: plain (the jobs/s figure), timing the threads, and under cProfile. cProfile sees only
the main thread (the event loop); the database writer's thread and the image-file pool are timed
by wrapping the functions they run (`bot.dbwriter._transaction`, `bot.store.write_files`).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import resource
import sqlite3
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import bot.dbwriter
import bot.store
from bench.datadir import bench_root, create_cost
from bench.engine import NullAdapter, run
from bot import runtime
from bot.engine import Engine
from bot.jobs import Job, StoredImage
from bot.store import FILE_WORKERS

ROOT = Path(__file__).resolve().parent.parent
BOT = str(ROOT / "bot") + "/"


class Clocks:
    """Busy time of the threads the profiler cannot see, and the main thread's CPU time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.writer_wall = 0.0
        self.writer_cpu = 0.0
        self.batches = 0
        self.ops = 0
        self.files_wall = 0.0
        self.files_cpu = 0.0
        self.files_calls = 0
        # per kind of statement on the writer: [wall, cpu, calls]
        self.phases: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
        self.window_start = (0.0, 0.0)  # (perf_counter, main thread CPU) when the engine started
        self.window_end = (0.0, 0.0)  # … at the last delivery

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


CLOCKS = Clocks()
# `bot.store` calls the file writer by its module-level name (`write_files` since the store
# split, `_write_files` before it).
FILES_NAME = "write_files" if hasattr(bot.store, "write_files") else "_write_files"


def thread_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_utime + usage.ru_stime


@functools.cache
def statement_kind(sql: str) -> str:
    words = sql.split()
    if words[0] in ("BEGIN", "COMMIT", "ROLLBACK"):
        return words[0]
    if words[0] == "UPDATE":
        return " ".join(words[:6])[:44]
    return " ".join(words[:3])[:44]


class TimedConnection:
    """The writer's connection, timing each statement by kind (on the writer thread)."""

    def __init__(self, db: Any) -> None:
        self._db = db

    @property
    def in_transaction(self) -> bool:
        return bool(self._db.in_transaction)

    def _timed(self, method: str, sql: str, params: Any) -> Any:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return getattr(self._db, method)(sql, params)
        finally:
            phase = CLOCKS.phases[statement_kind(sql)]
            phase[0] += time.perf_counter() - t0
            phase[1] += time.thread_time() - c0
            phase[2] += 1

    def execute(self, sql: str, params: Any = ()) -> Any:
        return self._timed("execute", sql, params)

    def executemany(self, sql: str, params: Any) -> Any:
        return self._timed("executemany", sql, params)


def instrument() -> None:
    """Wrap the writer's transaction, the file writes, engine start and the last delivery."""
    transaction = bot.dbwriter._transaction

    def timed_transaction(db: Any, ops: Sequence[Any]) -> None:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            transaction(cast(sqlite3.Connection, TimedConnection(db)), ops)
        finally:
            wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
            with CLOCKS.lock:
                CLOCKS.writer_wall += wall
                CLOCKS.writer_cpu += cpu
                CLOCKS.batches += 1
                CLOCKS.ops += len(ops)

    bot.dbwriter._transaction = timed_transaction

    write_files = getattr(bot.store, FILES_NAME)

    def timed_write_files(items: Sequence[Any]) -> None:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            write_files(items)
        finally:
            with CLOCKS.lock:
                CLOCKS.files_wall += time.perf_counter() - t0
                CLOCKS.files_cpu += time.thread_time() - c0
                CLOCKS.files_calls += 1

    setattr(bot.store, FILES_NAME, timed_write_files)

    start = Engine.start

    @functools.wraps(start)
    async def timed_start(self: Engine, *, resume: bool = True) -> None:
        await start(self, resume=resume)
        CLOCKS.window_start = (time.perf_counter(), thread_cpu())

    setattr(Engine, "start", timed_start)  # noqa: B010

    deliver = NullAdapter.deliver

    async def timed_deliver(self: NullAdapter, job: Job, images: Sequence[StoredImage]) -> str:
        ref = await deliver(self, job, images)
        if self.delivered >= self.expected:
            CLOCKS.window_end = (time.perf_counter(), thread_cpu())
        return ref

    NullAdapter.deliver = timed_deliver  # type: ignore[method-assign]


def one_run(jobs: int, users: int, concurrency: int, profile: cProfile.Profile | None) -> float:
    CLOCKS.reset()
    statement_kind.cache_clear()
    coro = run(jobs, users, 0.0, concurrency, "256", prerendered=True)
    result = runtime.run(coro) if profile is None else profile.runcall(runtime.run, coro)
    return jobs / result["total_s"]


# C calls that release the GIL: their time includes waiting to get it back from the writer and
# file threads, not only the call itself.
_BLOCKING = ("epoll", "recv", "send", "acquire", "_thread.lock", "os.write", "posix.write")


def group_of(key: tuple[str, int, str]) -> str:
    filename, _, name = key
    if filename.startswith(BOT):
        return "bot/" + filename[len(BOT) :]
    if filename == "~":
        if "epoll" in name:
            return "(C) epoll wait: idle, or waiting for the GIL"
        if any(b in name for b in _BLOCKING):
            return "(C) self-pipe recv, locks: incl. GIL waits"
        return "(C) other builtins (str, dict, hashing, …)"
    for part, group in (
        ("/asyncio/", "asyncio"),
        ("aiosqlite", "aiosqlite"),
        ("prometheus_client", "prometheus_client"),
        ("/logging/", "logging"),
        ("/concurrent/", "concurrent.futures"),
        ("/bench/", "bench (null adapter, submitter)"),
    ):
        if part in filename:
            return group
    return f"stdlib {Path(filename).name}"


def label(key: tuple[str, int, str]) -> str:
    filename, line, name = key
    if filename.startswith(BOT):
        return f"{filename[len(BOT) :]}:{line} {name}"
    if filename == "~":
        return name
    return f"{Path(filename).name}:{line} {name}"


def report(stats: pstats.Stats, jobs: int, top: int) -> None:
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values())
    groups: dict[str, float] = defaultdict(float)
    for key, (_, _, tt, _, _) in raw.items():
        groups[group_of(key)] += tt
    print(f"\n  main thread under cProfile: {total:.2f} s of own time in all, by where it is spent")
    print(f"    {'where':<44} {'own s':>7} {'share':>6} {'µs/job':>7}")
    for name, tt in sorted(groups.items(), key=lambda kv: -kv[1]):
        if tt / total < 0.01:
            continue
        print(f"    {name:<44} {tt:>7.2f} {tt / total:>6.1%} {tt / jobs * 1e6:>7.1f}")

    def table(title: str, index: int, pool: dict[Any, Any]) -> None:
        print(f"\n  {title}")
        print(f"    {'function':<52} {'calls':>8} {'own s':>7} {'cum s':>7} {'µs/job':>7}")
        for key, (_, nc, tt, ct, _) in sorted(pool.items(), key=lambda kv: -kv[1][index])[:top]:
            per = (tt if index == 2 else ct) / jobs * 1e6
            print(f"    {label(key)[:52]:<52} {nc:>8,} {tt:>7.3f} {ct:>7.3f} {per:>7.1f}")

    in_bot = {k: v for k, v in raw.items() if k[0].startswith(BOT)}
    outside = {k: v for k, v in raw.items() if not k[0].startswith(BOT)}
    table("top functions in bot/ by own time", 2, in_bot)
    table("top functions in bot/ by cumulative time", 3, in_bot)
    table("top functions outside bot/ by own time", 2, outside)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--jobs", type=int, default=10_000)
    p.add_argument("--users", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--dump", help="also write the raw profile here (for snakeviz, pstats)")
    p.add_argument(
        "--switch-interval",
        type=float,
        help="experiment: sys.setswitchinterval(S) (CPython's default is 0.005 s)",
    )
    p.add_argument(
        "--no-files", action="store_true", help="experiment: image files are not written at all"
    )
    p.add_argument("--skip-profile", action="store_true", help="the plain, timed run only")
    args = p.parse_args()
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    if args.no_files:
        setattr(bot.store, FILES_NAME, lambda items: None)
    print(
        f"drawbridge engine profile: {args.jobs:,} jobs from {args.users:,} users, zero latency, "
        f"CONCURRENCY={args.concurrency}, prerendered demo, null adapter"
    )
    if args.switch_interval or args.no_files:
        print(
            f"  experiment: switch interval {sys.getswitchinterval() * 1000:g} ms"
            + (", image files not written" if args.no_files else "")
        )
    probe_wall, probe_cpu = create_cost()
    print(
        f"\n  file system: creating a 3 KB file in a fresh folder under {bench_root()} costs "
        f"{probe_wall:,.0f} µs ({probe_cpu:,.0f} µs CPU)"
    )
    plain = one_run(args.jobs, args.users, args.concurrency, None)
    print(f"\n  plain run: {plain:,.0f} jobs/s end to end (nothing timed but the run)")
    instrument()
    timed = one_run(args.jobs, args.users, args.concurrency, None)
    (w0, c0), (w1, c1) = CLOCKS.window_start, CLOCKS.window_end
    wall = w1 - w0
    print(f"\n  timed run: {timed:,.0f} jobs/s; {wall:.2f} s from engine start to last delivery")
    print(f"    {'thread':<44} {'busy s':>7} {'share':>6} {'µs/job':>7}")
    rows: list[tuple[str, float]] = [
        ("main (event loop), CPU time", c1 - c0),
        ("db-writer, in transactions (wall)", CLOCKS.writer_wall),
        ("db-writer, in transactions (CPU)", CLOCKS.writer_cpu),
        (f"image-files pool ({FILE_WORKERS} threads), writing (wall)", CLOCKS.files_wall),
        (f"image-files pool ({FILE_WORKERS} threads), writing (CPU)", CLOCKS.files_cpu),
    ]
    for name, busy in rows:
        print(f"    {name:<44} {busy:>7.2f} {busy / wall:>6.1%} {busy / args.jobs * 1e6:>7.1f}")
    if CLOCKS.batches:
        print(
            f"    writer: {CLOCKS.batches:,} transactions, {CLOCKS.ops / CLOCKS.batches:,.1f} "
            f"statements each, {CLOCKS.ops / args.jobs:.2f} statements per job"
        )
        print(
            f"\n    {'db-writer, by statement':<44} {'wall s':>7} {'CPU s':>6} {'µs/job':>7} {'calls':>7}"
        )
        for kind, (w, c, n) in sorted(CLOCKS.phases.items(), key=lambda kv: -kv[1][0]):
            if kind.startswith("PRAGMA"):
                continue
            print(f"    {kind:<44} {w:>7.2f} {c:>6.2f} {w / args.jobs * 1e6:>7.1f} {int(n):>7,}")
    if args.skip_profile:
        return
    profile = cProfile.Profile()
    profiled = one_run(args.jobs, args.users, args.concurrency, profile)
    print(f"\n  profiled run: {profiled:,.0f} jobs/s (cProfile slows the main thread)")
    if args.dump:
        profile.dump_stats(args.dump)
    report(pstats.Stats(profile, stream=sys.stdout), args.jobs, args.top)


if __name__ == "__main__":
    main()
