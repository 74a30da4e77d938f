"""Process-wide settings for a bot that runs for days: the event loop, the allocator and the
cyclic collector."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

# The collector's generation thresholds while the bot serves (CPython's default: 700, 10, 10).
GC_THRESHOLDS = (50_000, 20, 20)


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)`, on uvloop's event loop where uvloop is installed (not on Windows).

    The bot is one event loop doing many small things (a Bot API call, a stream's line, a row
    handed to the writer); uvloop does the loop's own share of each in C. Measured with
    `bench.e2e` at 2,000 jobs (C=200, 1 s, the paid lane), four runs each, interleaved: makespan
    11.08–11.46 s on uvloop against 11.35–11.94 s on asyncio's loop.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def tune_malloc() -> None:
    """Have glibc map image-sized buffers on their own, so they go back to the system when freed.

    Otherwise a burst of 8 MB images leaves hundreds of MB in the heap afterwards (measured
    with bench/memory.py). Elsewhere than glibc this does nothing.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB


@contextlib.contextmanager
def settled_gc() -> Iterator[None]:
    """While serving: what start-up built is frozen, and the young generation is larger.

    Measured at 2,000 jobs in `bench.e2e`, from the burst to the last photo (~12 s): with
    CPython's defaults the cyclic collector ran ~930 times, 2.2 s of the loop's CPU, and each of
    its 7 full collections walked every object the process holds (PTB's, aiohttp's, the
    settings, the catalog) for 100–180 ms, a stall of every job's hand-off to the next.
    Frozen, start-up's objects are left out of every later collection; with a young generation
    of 50,000 a request's short-lived objects die of their reference counts before a collection
    sees them: 3 collections, 0.12 s. Refcounting still frees everything without cycles at
    once, so memory does not wait for a collection.
    On exit the thresholds are restored and the frozen objects returned to the collector.
    A frozen object that later ends up in a reference cycle waits for that exit: entered once
    the bot has started, what it freezes is the bot's long-lived state (and the jobs resumed
    at start, a bounded, one-time set).
    """
    before = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()
