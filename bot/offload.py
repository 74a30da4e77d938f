"""Blocking calls off the event loop in batches: one thread hop for the calls of a loop turn.

Handing one call to a thread and hearing back costs the loop a pool submit (a lock, a wakeup)
and a self-pipe write and read, system calls that are slow on a small VM: py-spy on
`bench.engine` put those hops at a third of the loop when every job's image file went alone.
An `Offloader` gathers the calls asked for in one turn of the loop, and while all its workers
are busy the calls that arrive meanwhile, and runs each gathering on a thread in one go; a call
that comes alone still goes at once. Each call succeeds or fails on its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from functools import partial
from typing import Any, TypeVar, cast

T = TypeVar("T")

OFF_LOOP_BYTES = 256 * 1024  # an input this big is parsed, decoded or checked on a thread

_Call = tuple[Callable[[], Any], "asyncio.Future[Any]"]
_Outcome = tuple[bool, Any]  # (True, result) or (False, the exception)


def run_all(calls: Sequence[Callable[[], Any]]) -> list[_Outcome]:
    """Run `calls` in order on this thread, each one's outcome kept apart."""
    outcomes: list[_Outcome] = []
    for call in calls:
        try:
            outcomes.append((True, call()))
        except Exception as exc:
            outcomes.append((False, exc))
    return outcomes


class Offloader:
    """A small thread pool whose callers share thread hops (see the module docstring)."""

    def __init__(self, workers: int, name: str) -> None:
        self._workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._pending: list[_Call] = []
        self._busy = 0
        self._flush_soon = False

    async def run(self, call: Callable[[], T]) -> T:
        """`call()` on a worker thread; its result, or the exception it raised."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        self._pending.append((call, done))
        if not self._flush_soon:
            self._flush_soon = True
            loop.call_soon(self._flush)
        return cast(T, await done)

    def shutdown(self) -> None:
        """Wait for the calls on their way, then stop the threads; calls not yet sent fail."""
        pending, self._pending = self._pending, []
        for _, done in pending:
            if not done.done():
                done.set_exception(RuntimeError("the thread pool was shut down"))
        self._pool.shutdown(wait=True)

    def _flush(self) -> None:
        self._flush_soon = False
        if not self._pending or self._busy >= self._workers:
            return  # the next worker to finish takes what waits
        batch, self._pending = self._pending, []
        try:
            job = self._pool.submit(run_all, [call for call, _ in batch])
        except RuntimeError as exc:  # shut down: nothing more will run
            for _, done in batch:
                if not done.done():
                    done.set_exception(exc)
            return
        self._busy += 1
        job.add_done_callback(partial(self._wake, asyncio.get_running_loop(), batch))

    def _wake(
        self, loop: asyncio.AbstractEventLoop, batch: list[_Call], job: Future[list[_Outcome]]
    ) -> None:
        with suppress(RuntimeError):  # the loop closed meanwhile: nobody is waiting
            loop.call_soon_threadsafe(self._finished, batch, job)

    def _finished(self, batch: list[_Call], job: Future[list[_Outcome]]) -> None:
        self._busy -= 1
        try:
            outcomes = job.result()
        except BaseException as exc:  # the pool was shut down under it: every call hears so
            outcomes = [(False, RuntimeError(f"offloaded call not run: {exc!r}"))] * len(batch)
        for (_, done), (ok, value) in zip(batch, outcomes, strict=True):
            if done.done():
                continue  # its caller was cancelled; the call ran all the same
            if ok:
                done.set_result(value)
            else:
                done.set_exception(value)
        self._flush()


async def off_loop(size: int, call: Callable[[], T]) -> T:
    """`call()` at once for a small input; on a thread once `size` bytes would hold up the loop.

    Checking a real 2.6 MB PNG (its chunk CRCs) takes ~1.2 ms, decoding its base64 and parsing
    the JSON around it as much again: at 200 results a second, a quarter of the loop or more.
    zlib and the base64 and JSON decoders run in C, so on a thread most of it goes beside the
    loop; for small inputs the hop would cost more than the work.
    """
    if size < OFF_LOOP_BYTES:
        return call()
    return await asyncio.to_thread(call)
