"""The image-file writer: one thread hop for the writes of a loop turn, each unit on its own."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import bot.image_files
from bot.image_files import FileWriter, make_dirs


async def test_writes_of_one_turn_share_a_thread_hop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[int] = []
    write_batch = bot.image_files._write_batch

    def counted(units: list[bot.image_files.Files]) -> list[OSError | None]:
        batches.append(len(units))
        return write_batch(units)

    monkeypatch.setattr(bot.image_files, "_write_batch", counted)
    make_dirs(tmp_path)
    writer = FileWriter(2)
    try:
        paths = [tmp_path / "images" / "a" / f"job{i}-0.png" for i in range(50)]
        await asyncio.gather(
            *(writer.write([(p, f"image {i}".encode())]) for i, p in enumerate(paths))
        )
    finally:
        writer.shutdown()
    assert [p.read_bytes() for p in paths] == [f"image {i}".encode() for i in range(50)]
    assert batches == [50]  # fifty jobs' files, one hop to a thread and one back


async def test_a_failing_unit_fails_alone(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"")
    writer = FileWriter(1)
    try:
        good = tmp_path / "good.png"
        results = await asyncio.gather(
            writer.write([(blocker / "x.png", b"bad")]),
            writer.write([(good, b"good")]),
            return_exceptions=True,
        )
    finally:
        writer.shutdown()
    assert isinstance(results[0], NotADirectoryError)
    assert results[1] is None and good.read_bytes() == b"good"


async def test_writes_gather_while_the_workers_are_busy(tmp_path: Path) -> None:
    writer = FileWriter(1)
    try:
        first = asyncio.ensure_future(writer.write([(tmp_path / "first", b"1")]))
        await asyncio.sleep(0)  # the first batch is on its way to the worker
        later = [writer.write([(tmp_path / f"later{i}", b"2")]) for i in range(5)]
        cancelled = asyncio.ensure_future(writer.write([(tmp_path / "cancelled", b"3")]))
        await asyncio.sleep(0)
        cancelled.cancel()  # its caller went away: the others are not disturbed
        await asyncio.gather(first, *later)
    finally:
        writer.shutdown()
    assert {"first", *(f"later{i}" for i in range(5))} <= _names(tmp_path)


def _names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}
