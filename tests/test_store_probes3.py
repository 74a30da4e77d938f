"""Probes of the store, its migrations and the data dir, as an operator meets them.

Old databases built by hand from `bot.migrations.MIGRATIONS` (each release's schema), the real
`Store` and engine on a temp data dir, the real `drawbridge` program for what an operator types.
A probe marked xfail(strict) asserts what should hold and fails today for the reason it names.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bot.errors import NotAllowed, SettingsError
from bot.jobs import UserRef
from bot.locks import exclusive
from bot.migrations import MIGRATIONS, SCHEMA_VERSION, migrate
from bot.store import Store
from tests.conftest import Harness, new_database, request
from tests.fakes import png_bytes
from tests.test_accounting import PRICE, balanced, job_rows
from tests.test_cli_checks import _without_write_rights
from tests.test_cli_checks import one_line as cli_one_line
from tests.test_cli_checks import run as cli_run
from tests.test_migrations import old_database
from tests.test_outside_probes import ROOT, environ, one_line, run, session

DAY = 86_400.0
README = ROOT / "README.md"


def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "drawbridge.db"


def user_version(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])


def query(path: Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute(sql, params).fetchall()


def execute(path: Path, *statements: str) -> None:
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        for sql in statements:
            db.execute(sql)


# ---- migrations: every older schema, with work left in it ------------------------------------

# Rows every schema since v1 can hold: a queued job (the bot was stopped with it waiting) and a
# succeeded one whose image was stored but never posted.
OLD_JOB = (
    "INSERT INTO jobs (id, platform, user_id, chat_id, prompt, model, provider, n_images, "
    "status, day, reserved_usd, cost_usd, created_at, finished_at) "
    "VALUES (?, 'test', 'alice', 'chat-alice', ?, 'paid', 'demo', 1, ?, '2026-01-01', ?, ?, ?, ?)"
)
QUEUED, UNDELIVERED = "qqqqqqqqq1", "uuuuuuuuu1"


@pytest.mark.parametrize("version", range(1, SCHEMA_VERSION))
async def test_work_left_in_an_older_schema_is_finished_once_after_the_upgrade(
    harness: Harness, version: int
) -> None:
    """An operator upgrades with jobs still waiting: they run, post and charge exactly once."""
    data = harness.data_dir
    (data / "images" / "u").mkdir(parents=True)
    path = data / "drawbridge.db"
    now = harness.clock()
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        for statements in MIGRATIONS[:version]:
            for sql in statements:
                db.execute(sql)
        db.execute(f"PRAGMA user_version = {version}")
        db.execute(OLD_JOB, (QUEUED, "waiting fox", "queued", PRICE, 0.0, now - 60, None))
        db.execute(
            OLD_JOB, (UNDELIVERED, "made fox", "succeeded", PRICE, PRICE, now - 50, now - 40)
        )
        image = f"images/u/{UNDELIVERED}-0.png"
        db.execute(
            "INSERT INTO images (job_id, idx, path, mime, width, height, size_bytes) "
            "VALUES (?, 0, ?, 'image/png', 8, 8, ?)",
            (UNDELIVERED, image, len(png_bytes())),
        )
        if version >= 2:  # the operator's tables came in v2: a ban made then still holds
            db.execute("INSERT INTO bans (member, by, at) VALUES ('test:mallory', 'test:boss', 1)")
    (data / image).write_bytes(png_bytes())

    engine = await harness.engine(max_pending_per_user=5)
    await engine.run_until_idle()
    assert user_version(path) == SCHEMA_VERSION
    rows = {r["id"]: r for r in await job_rows(harness)}
    assert (rows[QUEUED]["status"], rows[QUEUED]["cost_usd"]) == ("succeeded", PRICE)
    assert (rows[UNDELIVERED]["status"], rows[UNDELIVERED]["cost_usd"]) == ("succeeded", PRICE)
    assert harness.adapter.delivered(QUEUED) == 1 and harness.adapter.delivered(UNDELIVERED) == 1
    assert harness.provider.submits() == 1  # the made one is not generated (nor paid) again
    await balanced(engine, harness)
    if version >= 2:
        with pytest.raises(NotAllowed):
            await engine.submit(request("mallory"))


def test_a_migration_killed_midway_is_rolled_back_and_finished_by_the_next_start(
    tmp_path: Path,
) -> None:
    """`kill -9` (or a power cut) while a new release migrates: no half-applied step survives."""
    data = tmp_path / "data"
    data.mkdir()
    path = data / "drawbridge.db"
    old_database(path, 3)
    # The real migration, killed inside step 5: its ALTER TABLE has run, its UPDATE not yet.
    script = (
        "import os, signal, sqlite3, sys\n"
        "from bot.migrations import migrate\n"
        "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "db.execute('PRAGMA journal_mode=WAL')\n"
        "seen = []\n"
        "def trace(sql):\n"
        "    if seen and seen[-1].startswith('ALTER TABLE jobs ADD COLUMN told_at'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    seen.append(sql)\n"
        "db.set_trace_callback(trace)\n"
        "migrate(db)\n"
    )
    killed = subprocess.run(
        [sys.executable, "-c", script, str(path)], cwd=ROOT, capture_output=True, timeout=30
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert user_version(path) == 4  # step 4 committed, step 5 did not
    columns = [r[1] for r in query(path, "PRAGMA table_info(jobs)")]
    assert "told_at" not in columns
    assert query(path, "PRAGMA integrity_check") == [("ok",)]

    async def reopen() -> None:
        store = await Store.open(data)
        try:
            jobs = await store.recent_jobs(UserRef("telegram", "7"))
            assert sorted(j.id for j in jobs) == ["bad", "no", "ok"]
            assert await store.untold_ends(0.0) == []  # step 5's UPDATE ran this time
        finally:
            await store.close()

    asyncio.run(reopen())
    assert user_version(path) == SCHEMA_VERSION


@pytest.mark.parametrize("version", [0, SCHEMA_VERSION - 1], ids=["fresh", "one-behind"])
def test_two_processes_migrating_one_database_at_once_both_open_it(
    tmp_path: Path, version: int
) -> None:
    """After an upgrade the bot starts while the operator runs `drawbridge usage` (or a batch).

    Both read the schema version, then wait for the write lock; the first applies the step,
    the second applies it again. Seen: `drawbridge: DRAWBRIDGE_DATA_DIR: …/drawbridge.db:
    duplicate column name: n_requested` (or `table jobs already exists` on a fresh data dir),
    and that process does not start.
    """
    path = tmp_path / "drawbridge.db"
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("PRAGMA journal_mode=WAL")
        for statements in MIGRATIONS[:version]:
            for sql in statements:
                db.execute(sql)
        db.execute(f"PRAGMA user_version = {version}")
    # A third connection holds the write lock for a moment (a commit of the running bot, a
    # slow step of the other process), so both migrations are in line before either runs.
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    waiting: set[str] = set()
    results: dict[str, str] = {}

    def open_and_migrate(name: str) -> None:
        db = sqlite3.connect(path, isolation_level=None, timeout=10.0, check_same_thread=False)

        def trace(sql: str) -> None:
            if sql.startswith("BEGIN IMMEDIATE"):
                waiting.add(name)

        db.set_trace_callback(trace)
        try:
            migrate(db)
            results[name] = "ok"
        except sqlite3.Error as exc:
            results[name] = f"{type(exc).__name__}: {exc}"
        finally:
            db.close()

    threads = [threading.Thread(target=open_and_migrate, args=(n,)) for n in ("bot", "usage")]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while len(waiting) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    blocker.execute("COMMIT")
    blocker.close()
    for thread in threads:
        thread.join(20)
    assert len(waiting) == 2, "both reached the write lock"
    assert results == {"bot": "ok", "usage": "ok"}
    assert user_version(path) == SCHEMA_VERSION


@pytest.mark.parametrize("command", [("run", "--console"), ("generate", "a fox")], ids=str)
def test_a_database_of_a_newer_release_stops_run_and_generate_and_is_not_touched(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    """A rollback to an older release: one line, no job, the newer schema left as it was."""
    asyncio.run(new_database(tmp_path / "data"))
    path = db_path(tmp_path)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute(OLD_JOB, ("kept00000a", "x", "failed", 0.0, 0.0, 1, 2))
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 3}")
    tables = query(path, "SELECT name FROM sqlite_master ORDER BY name")
    out = run(tmp_path, *command, stdin="/imagine a fox\n")
    assert out.returncode == 1
    assert "newer than this release" in one_line(out.stderr)
    assert "Queued" not in out.stdout
    assert user_version(path) == SCHEMA_VERSION + 3  # not downgraded
    assert query(path, "SELECT name FROM sqlite_master ORDER BY name") == tables
    assert query(path, "SELECT id, status FROM jobs") == [("kept00000a", "failed")]
    assert not (tmp_path / "out").exists()


# ---- the database file and the data dir ------------------------------------------------------


@pytest.mark.parametrize("command", [("usage", "--json"), ("run", "--console")], ids=str)
def test_a_truncated_database_is_one_line_not_an_empty_report(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    """A backup copied while half written, a disk that lost its tail."""
    asyncio.run(new_database(tmp_path / "data"))
    path = db_path(tmp_path)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("PRAGMA journal_mode=DELETE")  # one file, as a copy of it would be
        db.executemany(
            OLD_JOB,
            [(f"j{i:09d}", "x" * 300, "succeeded", 0.04, 0.04, 10, 20) for i in range(1500)],
        )
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.truncate(size // 2)
    out = run(tmp_path, *command, stdin="/usage\n")
    assert out.returncode == 1
    line = one_line(out.stderr)
    assert line.startswith(f"drawbridge: DRAWBRIDGE_DATA_DIR: {path}:") and "malformed" in line
    assert "Today" not in out.stdout and not out.stdout.lstrip().startswith("[")


def test_usage_on_a_data_dir_that_does_not_exist_leaves_nothing_behind(tmp_path: Path) -> None:
    """The operator types `drawbridge usage` in their home folder, not the bot's.

    They get an empty report (as tests/test_outside_probes.py expects) and, today, a fresh
    `./data` with `drawbridge.db`, `images/` (32 folders) and `refs/`: a second, empty data
    dir that the next `drawbridge run` from there would happily serve from. A report only
    reads: it should not create the data dir it did not find.
    """
    out = run(tmp_path, "usage", "--json")
    assert out.returncode == 0 and json.loads(out.stdout) == []
    assert not (tmp_path / "data").exists(), sorted(
        str(p.relative_to(tmp_path)) for p in (tmp_path / "data").rglob("*")
    )[:5]


def test_usage_while_the_bot_runs_reads_its_jobs_and_the_bot_goes_on(tmp_path: Path) -> None:
    """WAL: a report beside the running bot sees every committed job and disturbs nothing."""
    with session(tmp_path, "run", "--console") as bot:
        bot.wait_for("drawbridge console")
        bot.send("/imagine a fox on the roof\n")
        bot.wait_until("one job done", lambda out: len(re.findall(r"Job \w+ done", out)) == 1)
        first = run(tmp_path, "usage", "--json")
        assert first.returncode == 0, first.stderr
        ((row,),) = [json.loads(first.stdout)]
        assert (row["platform"], row["jobs"], row["succeeded"], row["images"]) == (
            "console",
            1,
            1,
            1,
        )
        bot.send("/imagine a cat in the rain --n 2\n")
        bot.wait_until("two jobs done", lambda out: len(re.findall(r"Job \w+ done", out)) == 2)
        second = run(tmp_path, "usage", "--json")
        assert second.returncode == 0, second.stderr
        ((row,),) = [json.loads(second.stdout)]
        assert (row["jobs"], row["succeeded"], row["images"]) == (2, 2, 3)
        bot.send("/usage\n")
        bot.wait_for("Today: ")
        assert bot.finish() == 0
        assert b"Traceback" not in bot.stderr
    assert query(db_path(tmp_path), "PRAGMA integrity_check") == [("ok",)]


def _as_a_user_without_write_rights(tmp_path: Path) -> tuple[str, ...]:
    """The prefix that runs the program as a user the file modes bind (root drops its override)."""
    prefix = _without_write_rights()
    folder = tmp_path / "probe"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        probe = subprocess.run(
            [*prefix, sys.executable, "-c", f"open({str(folder / 'x')!r}, 'w')"],
            capture_output=True,
        )
    finally:
        folder.chmod(0o755)
    if probe.returncode == 0:
        pytest.skip("this process can write into a read-only folder")
    return prefix


def test_usage_reads_a_database_file_it_may_not_write(tmp_path: Path) -> None:
    """An accountant's login, or a backup restored read-only: the report still works."""
    prefix = _as_a_user_without_write_rights(tmp_path)
    asyncio.run(new_database(tmp_path / "data"))
    path = db_path(tmp_path)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute(OLD_JOB, ("seen00000a", "x", "succeeded", PRICE, PRICE, 1, 2))
    path.chmod(0o444)
    try:
        out = cli_run(tmp_path, "usage", "--json", env={"HTTP_PORT": "0"}, prefix=prefix)
    finally:
        path.chmod(0o644)
    assert out.returncode == 0, out.stderr
    ((row,),) = [json.loads(out.stdout)]
    assert (row["user_id"], row["succeeded"], row["cost_usd"]) == ("alice", 1, PRICE)


def test_a_database_file_the_bot_may_not_write_stops_start_up_with_one_line(
    tmp_path: Path,
) -> None:
    """The operator restores `drawbridge.db` with `sudo cp`: root's file, the bot's folder.

    Seen: "drawbridge running", then every /imagine answers "The bot cannot save new requests
    right now", for as long as nobody reads the log. `PRAGMA journal_mode=WAL` and the
    migrations (bot/store.py `Store.open`) write nothing to a current WAL database, and
    `_check_data_dir` (bot/cli.py) tries the folder only.
    """
    prefix = _as_a_user_without_write_rights(tmp_path)
    asyncio.run(new_database(tmp_path / "data"))
    path = db_path(tmp_path)
    path.chmod(0o444)
    try:
        out = subprocess.run(
            [*prefix, sys.executable, "-m", "bot", "run", "--console"],
            input="/imagine a fox\n",
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=environ(tmp_path),
            timeout=30,
        )
    finally:
        path.chmod(0o644)
    assert "cannot save new requests" not in out.stdout, out.stdout
    assert out.returncode != 0, out.stdout
    line = cli_one_line(out)
    assert line.startswith("drawbridge: DRAWBRIDGE_DATA_DIR: ") and str(path) in line


def test_an_images_folder_the_bot_may_not_write_stops_start_up_before_any_paid_call(
    tmp_path: Path,
) -> None:
    """`images/` restored from a backup as root: what the bot would make it cannot keep.

    Seen: "Queued", "Generating with demo…", "Failed: something went wrong on our side · not
    charged": the provider ran (and bills the operator) for every job, the user got nothing,
    and the bot keeps taking more. The same data dir made writable works.
    """
    prefix = _as_a_user_without_write_rights(tmp_path)
    data = tmp_path / "data"
    asyncio.run(new_database(data))
    folders = [data / "images", *(data / "images").iterdir()]
    for folder in folders:
        folder.chmod(0o555)
    try:
        out = subprocess.run(
            [*prefix, sys.executable, "-m", "bot", "run", "--console"],
            input="/imagine a fox\n",
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=environ(tmp_path),
            timeout=30,
        )
    finally:
        for folder in folders:
            folder.chmod(0o755)
    started = query(db_path(tmp_path), "SELECT count(*) FROM jobs WHERE started_at IS NOT NULL")
    assert started == [(0,)], out.stdout  # no provider call for a result it cannot keep
    assert out.returncode != 0
    line = cli_one_line(out)
    assert line.startswith("drawbridge: DRAWBRIDGE_DATA_DIR: ") and "images" in line


def test_a_data_dir_under_home_written_with_a_tilde_in_dotenv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing expanded `~` in a `.env` file: the data went to `./~/botdata/drawbridge.db`, and
    an operator who tidies up with `rm -rf ~` deletes their home folder."""
    from bot.settings import load_settings

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (work / ".env").write_text("DRAWBRIDGE_DATA_DIR=~/botdata\nMODELS_FILE=~/models.toml\n")
    (home / "models.toml").write_text("")  # (no models of its own: read, and found)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("DRAWBRIDGE_DATA_DIR", raising=False)
    monkeypatch.delenv("MODELS_FILE", raising=False)
    settings = load_settings(env_file=work / ".env")
    assert (settings.data_dir, settings.models_file) == (home / "botdata", home / "models.toml")
    env = {k: v for k, v in os.environ.items() if k != "DRAWBRIDGE_DATA_DIR"}
    env.update(HOME=str(home), HTTP_PORT="0")
    out = subprocess.run(
        [sys.executable, "-m", "bot", "generate", "a fox", "--out", str(work / "out")],
        capture_output=True,
        text=True,
        cwd=work,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert not (work / "~").exists()
    assert (home / "botdata" / "drawbridge.db").exists()


# ---- one bot per data dir ----------------------------------------------------------------------


def test_a_second_bot_is_refused_before_it_migrates_the_first_ones_database(
    tmp_path: Path,
) -> None:
    """A new release started by mistake beside the old one must not change its schema."""
    data = tmp_path / "data"
    data.mkdir()
    old_database(data / "drawbridge.db", SCHEMA_VERSION - 1)
    with exclusive(data):  # the first bot
        out = run(tmp_path, "run", "--console", stdin="/usage\n")
        assert out.returncode != 0 and "Today" not in out.stdout
        assert "another drawbridge is already running" in one_line(out.stderr)
        assert user_version(data / "drawbridge.db") == SCHEMA_VERSION - 1


def test_the_lock_of_a_bot_killed_with_sigkill_does_not_outlive_it(tmp_path: Path) -> None:
    """OOM killer, power cut: the next start must not be refused by a stale lock."""
    data = tmp_path / "data"
    data.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom pathlib import Path\nfrom bot.locks import exclusive\n"
            "with exclusive(Path(sys.argv[1])):\n    print('held', flush=True)\n"
            "    time.sleep(60)\n",
            str(data),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        with (
            pytest.raises(SettingsError, match="another drawbridge is already running"),
            exclusive(data),
        ):
            pass
        holder.kill()
        assert holder.wait(10) == -signal.SIGKILL
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
        if holder.stdout is not None:
            holder.stdout.close()
    assert (data / "drawbridge.lock").exists()  # the file stays; the lock went with the process
    with exclusive(data):
        pass


# ---- image files and their rows ----------------------------------------------------------------


def image_files(data_dir: Path, job_id: str) -> list[Path]:
    return sorted((data_dir / "images").rglob(f"{job_id}-*"))


async def test_image_files_of_a_result_the_database_refused_do_not_outlive_the_retention(
    harness: Harness,
) -> None:
    """The disk fills, or the database refuses the result's commit: the job ends uncharged.

    Its image files were written first (bot/store.py `save_images`), and `expire_images`
    finds files through their rows only: these stay in `images/` for ever, a month later too.
    """
    engine = await harness.engine()
    execute(
        harness.data_dir / "drawbridge.db",
        "CREATE TRIGGER refuse_images BEFORE INSERT ON images "
        "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END",
    )
    ticket = await engine.submit(request(model="paid", n=2))
    await engine.run_until_idle()
    ((r,),) = [[r for r in await job_rows(harness) if r["id"] == ticket.job_id]]
    assert (r["status"], r["error_kind"], r["cost_usd"]) == ("failed", "internal", 0.0)
    assert query(harness.data_dir / "drawbridge.db", "SELECT count(*) FROM images") == [(0,)]
    # A month and more goes by (the files age with it); the retention pass runs.
    harness.clock.now += 40 * DAY
    aged = harness.clock() - 35 * DAY
    for leftover in image_files(harness.data_dir, ticket.job_id):
        os.utime(leftover, (aged, aged))
    await engine.store.expire_images(harness.clock() - 30 * DAY)
    assert image_files(harness.data_dir, ticket.job_id) == []


async def test_reference_photos_no_job_row_names_are_deleted_after_the_retention(
    tmp_path: Path,
) -> None:
    """A crash between saving a user's photos and committing their job's row (bot/engine.py
    submit: `save_reference_images`, then `insert_job`) leaves them in `refs/`; the README
    promises the photos users sent are deleted IMAGE_RETENTION_DAYS after their job."""
    data = tmp_path / "data"
    store = await Store.open(data)
    try:
        now = time.time()
        stale = data / "refs" / "zzzzzzzzz1-0"  # no row: its job was never stored
        fresh = data / "refs" / "zzzzzzzzz2-0"  # no row yet: its submit may be writing it
        for photo in (stale, fresh):
            photo.write_bytes(b"a user's photo")
        os.utime(stale, (now - 40 * DAY, now - 40 * DAY))
        await store.expire_images(now - 30 * DAY)
        assert fresh.exists()
        assert not stale.exists()
    finally:
        await store.close()


async def test_one_cleanup_pass_deletes_every_image_past_the_retention(harness: Harness) -> None:
    """A busy bot (or retention switched on for an old data dir) has 6,000 expired images.

    The sweeper's hourly pass deletes 5,000 and leaves the rest for the next hour, which
    brings its own: at more than 5,000 images an hour the disk fills despite the setting.
    """
    await new_database(harness.data_dir)
    path = harness.data_dir / "drawbridge.db"
    long_ago = harness.clock() - 10 * DAY
    jobs = [f"o{i:09d}" for i in range(1500)]
    per_job = 4
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("BEGIN")
        db.executemany(OLD_JOB, [(j, "old", "succeeded", PRICE, PRICE, 1, long_ago) for j in jobs])
        # posted and told long ago: nothing for a start to deliver or say again
        db.execute("UPDATE jobs SET delivered_at = finished_at, told_at = finished_at")
        db.executemany(
            "INSERT INTO images (job_id, idx, path, mime, width, height, size_bytes) "
            "VALUES (?, ?, ?, 'image/png', 8, 8, 1)",
            [(j, i, f"images/o/{j}-{i}.png") for j in jobs for i in range(per_job)],
        )
        db.execute("COMMIT")
    for j in jobs:
        for i in range(per_job):
            (harness.data_dir / "images" / "o" / f"{j}-{i}.png").write_bytes(b"x")
    total = len(jobs) * per_job

    engine = await harness.engine(image_retention_days=1, sweep_interval=0.01)

    async def images_left() -> int:
        return int((await engine.store.fetch("SELECT count(*) FROM images"))[0][0])

    async with asyncio.timeout(20):
        while await images_left() == total:  # noqa: ASYNC110 - rows of the database
            await asyncio.sleep(0.01)
    with contextlib.suppress(TimeoutError):  # a pass that takes its time in several commits
        async with asyncio.timeout(3):
            while await images_left():  # noqa: ASYNC110 - rows of the database
                await asyncio.sleep(0.01)
    assert await images_left() == 0
    assert list((harness.data_dir / "images" / "o").iterdir()) == []


# ---- the README's Data section -----------------------------------------------------------------


def test_the_readme_data_section_names_every_table_column_and_status(tmp_path: Path) -> None:
    path = tmp_path / "drawbridge.db"
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        migrate(db)
        tables = {
            r[0]: [c[1] for c in db.execute(f"PRAGMA table_info({r[0]})")]
            for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        (jobs_sql,) = db.execute("SELECT sql FROM sqlite_master WHERE name = 'jobs'").fetchone()
    section = README.read_text().split("\n## Data\n", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([a-z_]+)`", section))
    assert set(tables) <= named, set(tables) - named
    assert set(tables["jobs"]) <= named, set(tables["jobs"]) - named
    assert set(tables["images"]) <= named, set(tables["images"]) - named
    checked = re.search(r"CHECK \(status IN\s*\(([^)]*)\)\)", jobs_sql)
    assert checked is not None
    statuses = re.findall(r"'(\w+)'", checked[1])
    (line,) = [x for x in section.splitlines() if x.startswith("| `status` |")]
    assert re.findall(r"`(\w+)`", line)[1:] == statuses


# ---- the group writer ---------------------------------------------------------------------------


async def test_a_write_that_arrives_while_the_writer_stops_is_committed_or_refused(
    tmp_path: Path,
) -> None:
    """A late write at shutdown (a status confirmation, a paid-message count) must end.

    `running` was still true while `stop()` waited for the batch in progress, so `run` queued
    the unit; the loop stopped at the None before it, and the unit's future was never set.
    """
    from bot.dbwriter import GroupWriter

    writer = await GroupWriter.open(tmp_path / "w.db", ("PRAGMA journal_mode=WAL",))
    await writer.call(lambda db: db.execute("CREATE TABLE t (k TEXT)"))
    writer.start()
    entered, gate = threading.Event(), threading.Event()

    def hold(db: sqlite3.Connection) -> None:  # the writer's one thread, busy for a moment
        entered.set()
        gate.wait(10)

    busy = asyncio.ensure_future(writer.call(hold))
    try:
        async with asyncio.timeout(5):
            while not entered.is_set():  # noqa: ASYNC110 - a thread's event
                await asyncio.sleep(0.001)
        first = writer.post(("INSERT INTO t VALUES ('first')", ()))
        async with asyncio.timeout(5):
            # until the loop has taken `first` and waits for the thread
            while not writer._queue.empty():  # noqa: ASYNC110 - the writer's own queue
                await asyncio.sleep(0.001)
        stopping = asyncio.create_task(writer.stop())
        await asyncio.sleep(0)
        # (still writing `first`: `running` once stayed true here, and `run` queued the unit
        # behind stop's end mark, where nothing ever wrote it)
        late = asyncio.create_task(writer.run(("INSERT INTO t VALUES ('late')", ())))
        await asyncio.sleep(0)
    finally:
        gate.set()
    await busy
    await stopping
    await first
    done, _ = await asyncio.wait([late], timeout=2)
    try:
        assert late in done, "the late write neither committed nor raised"
        if late.exception() is None:
            assert query(tmp_path / "w.db", "SELECT k FROM t ORDER BY k") == [("first",), ("late",)]
        else:
            assert isinstance(late.exception(), RuntimeError)
    finally:
        late.cancel()
        await writer.close()
