"""The group writer: concurrent units share a transaction, a bad unit fails alone, order holds."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

import bot.dbwriter
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


async def test_a_run_of_inserts_goes_as_few_statements_in_order(
    writer: GroupWriter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bot.dbwriter, "ROWS_PER_INSERT", 8)
    inserts: list[str] = []
    await writer.call(lambda db: db.set_trace_callback(
        lambda sql: inserts.append(sql) if sql.startswith("INSERT") else None
    ))  # fmt: skip
    sql = "INSERT OR REPLACE INTO t (k, v) VALUES (?, ?)"
    await asyncio.gather(*(writer.run((sql, (f"k{i:02}", i))) for i in range(20)))
    await writer.run((sql, ("k03", 300)), (sql, ("k03", 301)))  # in order: the last one stays
    assert rows(tmp_path) == [(f"k{i:02}", 301 if i == 3 else i) for i in range(20)]
    assert len(inserts) <= 4  # 20 rows, 8 a statement: three (or so) statements, not 20
    # A bad row still fails its own unit only (the batch is retried unit by unit).
    outcomes = await asyncio.gather(
        writer.run(("INSERT INTO t (k, v) VALUES (?, ?)", ("new", 1))),
        writer.run(("INSERT INTO t (k, v) VALUES (?, ?)", ("k00", 2))),  # a duplicate key
        return_exceptions=True,
    )
    assert outcomes[0] is None and isinstance(outcomes[1], sqlite3.IntegrityError)
    assert ("new", 1) in rows(tmp_path)
