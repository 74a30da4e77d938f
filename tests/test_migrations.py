"""Versioned migrations: a database of any earlier release opens in this one, its rows kept."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from bot.errors import SettingsError
from bot.jobs import UserRef
from bot.migrations import MIGRATIONS, SCHEMA_VERSION, migrate
from bot.store import Store

ROW = (
    "INSERT INTO jobs (id, platform, user_id, chat_id, prompt, model, provider, n_images, status, "
    "day, cost_usd, error_kind, created_at, finished_at) "
    "VALUES (?, 'telegram', '7', '7', 'a fox', 'demo', 'demo', 1, ?, '2026-01-01', ?, ?, 10, 20)"
)


def old_database(path: Path, version: int) -> None:
    """A database as the release with schema `version` left it, with a job of each ending."""
    with sqlite3.connect(path, isolation_level=None) as db:
        for statements in MIGRATIONS[:version]:
            for sql in statements:
                db.execute(sql)
        db.execute(f"PRAGMA user_version = {version}")
        db.execute(ROW, ("ok", "succeeded", 0.04, None))
        db.execute(ROW, ("bad", "failed", 0.0, "transient"))
        db.execute(ROW, ("no", "refused", 0.0, "refused"))


@pytest.mark.parametrize("version", range(1, SCHEMA_VERSION))
async def test_a_database_of_every_earlier_release_opens_with_its_rows(
    tmp_path: Path, version: int
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    old_database(data / "drawbridge.db", version)
    store = await Store.open(data)
    try:
        jobs = await store.recent_jobs(UserRef("telegram", "7"))
        assert sorted(j.id for j in jobs) == ["bad", "no", "ok"]
        # Ends from before `told_at` existed (v5) were told then: a restart does not tell
        # them again. (From v5 on, a row written without `told_at` is an untold end.)
        if version < 5:
            assert await store.untold_ends(0.0) == []
    finally:
        await store.close()
    with sqlite3.connect(data / "drawbridge.db") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_database_of_a_newer_release_is_refused_not_damaged(tmp_path: Path) -> None:
    path = tmp_path / "drawbridge.db"
    with sqlite3.connect(path, isolation_level=None) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        with pytest.raises(SettingsError, match="newer than this"):
            migrate(db)
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
