"""The offloader: one thread hop for the calls of a loop turn, each call on its own."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest

import bot.offload
from bot.image_files import make_dirs, write_files
from bot.offload import Offloader


async def test_calls_of_one_turn_share_a_thread_hop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[int] = []
    run_all = bot.offload.run_all

    def counted(calls: Sequence[Callable[[], Any]]) -> list[tuple[bool, Any]]:
        batches.append(len(calls))
        return run_all(calls)

    monkeypatch.setattr(bot.offload, "run_all", counted)
    make_dirs(tmp_path)
    offloader = Offloader(2, "test-files")
    try:
        paths = [tmp_path / "images" / "a" / f"job{i}-0.png" for i in range(50)]
        await asyncio.gather(
            *(
                offloader.run(partial(write_files, [(p, f"image {i}".encode())]))
                for i, p in enumerate(paths)
            )
        )
    finally:
        offloader.shutdown()
    assert [p.read_bytes() for p in paths] == [f"image {i}".encode() for i in range(50)]
    assert batches == [50]  # fifty jobs' files: one hop to a thread and one back


async def test_results_and_failures_go_to_their_own_callers() -> None:
    offloader = Offloader(1, "test")

    def fail() -> int:
        raise NotADirectoryError("not a folder")

    try:
        results = await asyncio.gather(
            offloader.run(lambda: 1),
            offloader.run(fail),
            offloader.run(threading.current_thread),
            return_exceptions=True,
        )
    finally:
        offloader.shutdown()
    assert results[0] == 1
    assert isinstance(results[1], NotADirectoryError)
    assert isinstance(results[2], threading.Thread)
    assert results[2] is not threading.main_thread()  # off the loop's thread


async def test_calls_gather_while_the_workers_are_busy() -> None:
    offloader = Offloader(1, "test")
    gate = threading.Event()
    batches: list[list[int]] = []
    ran: list[int] = []

    def call(i: int) -> int:
        if i == 0:
            gate.wait(5)
        ran.append(i)
        return i

    try:
        first = asyncio.ensure_future(offloader.run(partial(call, 0)))
        await asyncio.sleep(0.05)  # the first call holds the only worker
        later = [asyncio.ensure_future(offloader.run(partial(call, i))) for i in range(1, 6)]
        await asyncio.sleep(0)
        cancelled = asyncio.ensure_future(offloader.run(partial(call, 6)))
        await asyncio.sleep(0)
        cancelled.cancel()  # its caller went away: the others are not disturbed
        await asyncio.sleep(0.05)
        assert ran == []  # nothing overtook the busy worker
        gate.set()
        batches.append(await asyncio.gather(first, *later))
    finally:
        offloader.shutdown()
    assert batches == [[0, 1, 2, 3, 4, 5]]
    assert ran == [0, 1, 2, 3, 4, 5, 6]  # the rest went in one batch, in order


async def test_calls_still_waiting_at_shutdown_fail_rather_than_hang() -> None:
    offloader = Offloader(1, "test")
    gate = threading.Event()
    busy = asyncio.ensure_future(offloader.run(partial(gate.wait, 5)))
    await asyncio.sleep(0.05)  # the only worker is busy
    waiting = asyncio.ensure_future(offloader.run(lambda: 1))
    await asyncio.sleep(0)
    gate.set()
    offloader.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        await waiting
    assert await busy is True
    with pytest.raises(RuntimeError):  # and a call after it fails at once
        await offloader.run(lambda: 2)
