"""The process-wide settings a serving bot runs with."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from bot import runtime
from bot.runtime import GC_THRESHOLDS, settled_gc


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_serving_freezes_what_exists_and_restores_the_collector_after() -> None:
    before = gc.get_threshold()
    with settled_gc():
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 0  # start-up's objects: out of every collection
        # A cycle made while serving is still found and freed by the collector.
        a, b = _Node(), _Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        del a, b
        gc.collect()
        assert gone() is None
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_the_collector_is_restored_when_serving_fails() -> None:
    before = gc.get_threshold()
    with pytest.raises(RuntimeError), settled_gc():
        raise RuntimeError("the bot stopped")
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_run_serves_on_uvloop_and_returns_the_coroutines_value() -> None:
    pytest.importorskip("uvloop")  # a dependency everywhere but Windows

    async def which() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert runtime.run(which()).startswith("uvloop")


def test_run_raises_what_the_coroutine_raised() -> None:
    async def fail() -> None:
        raise LookupError("no such job")

    with pytest.raises(LookupError, match="no such job"):
        runtime.run(fail())
