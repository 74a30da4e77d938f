"""The group writer: concurrent units share a transaction, a bad unit fails alone, order holds."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from bot.dbwriter import GroupWriter


@pytest.fixture
async def writer(tmp_path: Path):  # type: ignore[no-untyped-def]
    w = await GroupWriter.open(tmp_path / "t.db", ("PRAGMA journal_mode=WAL",))
    await w.call(lambda db: db.execute("CREATE TABLE t (k TEXT PRIMARY KEY, v INTEGER)"))
    w.start()
    yield w
    await w.close()


def rows(tmp_path: Path) -> list[tuple[str, int]]:
    with sqlite3.connect(tmp_path / "t.db") as db:
        return db.execute("SELECT k, v FROM t ORDER BY k").fetchall()


async def test_concurrent_units_commit_together_and_a_bad_one_fails_alone(
    writer: GroupWriter, tmp_path: Path
) -> None:
    transactions: list[int] = []
    await writer.call(lambda db: db.set_trace_callback(
        lambda sql: transactions.append(1) if sql.startswith("BEGIN") else None
    ))  # fmt: skip
    await asyncio.gather(
        *(writer.run(("INSERT INTO t VALUES (?, ?)", (f"k{i}", i))) for i in range(50))
    )
    assert len(rows(tmp_path)) == 50
    assert len(transactions) <= 3  # group-committed: one transaction for many units
    good = [writer.run(("UPDATE t SET v = v + 100 WHERE k = ?", (f"k{i}",))) for i in range(5)]
    bad = writer.run(("INSERT INTO t VALUES (?, ?)", ("k7", 99)))  # a duplicate key
    results = await asyncio.gather(*good, bad, return_exceptions=True)
    assert results[:5] == [None] * 5  # its neighbours in the batch still commit
    assert isinstance(results[5], sqlite3.IntegrityError)
    assert ("k0", 100) in rows(tmp_path) and ("k7", 7) in rows(tmp_path)


async def test_a_unit_is_all_or_nothing(writer: GroupWriter, tmp_path: Path) -> None:
    await writer.run(("INSERT INTO t VALUES (?, ?)", ("a", 1)))
    with pytest.raises(sqlite3.IntegrityError):
        await writer.run(
            ("INSERT INTO t VALUES (?, ?)", ("b", 2)),
            ("INSERT INTO t VALUES (?, ?)", ("a", 3)),  # fails: so "b" must not stay
        )
    assert rows(tmp_path) == [("a", 1)]


async def test_posted_units_commit_in_order_before_later_ones(
    writer: GroupWriter, tmp_path: Path
) -> None:
    writer.post(("INSERT INTO t VALUES (?, ?)", ("x", 1)))
    writer.post(("UPDATE t SET v = 2 WHERE k = ?", ("x",)))
    await writer.run(("UPDATE t SET v = v * 10 WHERE k = ?", ("x",)))
    assert rows(tmp_path) == [("x", 20)]
