"""The process-wide settings a serving bot runs with."""

from __future__ import annotations

import gc
import weakref

import pytest

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
