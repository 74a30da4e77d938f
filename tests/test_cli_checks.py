"""The real `drawbridge` program stops on a bad setting or data dir with one line; `usage` options."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from bot.cli import main
from tests.conftest import new_database

README = Path(__file__).parent.parent / "README.md"


def run(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.endswith(("_TOKEN", "_API_KEY"))}
    environ.update({"DRAWBRIDGE_DATA_DIR": str(tmp_path / "data"), "LANG": "en_US.UTF-8"})
    environ.update(env or {})
    return subprocess.run(
        [*prefix, sys.executable, "-m", "bot", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=environ,
        timeout=20,
    )


def one_line(out: subprocess.CompletedProcess[str]) -> str:
    """The whole of stderr, which must be a single line and no traceback."""
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


COMMANDS = [("usage",), ("generate", "a fox"), ("run", "--console")]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_a_bad_guild_id_stops_start_up_with_one_line(tmp_path: Path, command: tuple[str]) -> None:
    out = run(tmp_path, *command, env={"DISCORD_GUILD_IDS": "1200000000000000001, ,general"})
    assert out.returncode == 2
    assert one_line(out).startswith("drawbridge: DISCORD_GUILD_IDS: 'general' is not a guild id")
    assert not (tmp_path / "data").exists()  # stopped before anything was opened


def test_a_webhook_with_the_http_server_off_stops_start_up(tmp_path: Path) -> None:
    token = "123456:AAE-webhook-secret-token"
    env = {
        "TELEGRAM_BOT_TOKEN": token,
        "TELEGRAM_API_URL": "http://127.0.0.1:9",  # nothing listens: the bot must not get there
        "TELEGRAM_WEBHOOK_URL": "https://bot.example/tg",
        "HTTP_PORT": "0",
    }
    out = run(tmp_path, "run", env=env)
    assert out.returncode == 2
    line = one_line(out)
    assert line.startswith("drawbridge: TELEGRAM_WEBHOOK_URL: ") and "HTTP_PORT=0" in line
    assert token not in out.stderr + out.stdout


def _a_file(tmp_path: Path) -> Path:
    (tmp_path / "taken").write_text("not a folder")
    return tmp_path / "taken"


def _below_a_file(tmp_path: Path) -> Path:
    return _a_file(tmp_path) / "data"


@pytest.mark.parametrize("where", [_a_file, _below_a_file], ids=["file", "below-a-file"])
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_an_unusable_data_dir_is_one_line_naming_it(
    tmp_path: Path, command: tuple[str], where: object
) -> None:
    assert callable(where)
    data_dir = where(tmp_path)
    out = run(tmp_path, *command, env={"DRAWBRIDGE_DATA_DIR": str(data_dir), "HTTP_PORT": "0"})
    assert out.returncode == 2
    assert (
        one_line(out) == f"drawbridge: DRAWBRIDGE_DATA_DIR: cannot use {data_dir} (Not a directory)"
    )


def _without_write_rights() -> tuple[str, ...]:
    """How to run a process that read-only folders stop; root needs its override dropped."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("root ignores folder modes and setpriv is not here to drop that")
    return ("setpriv", "--bounding-set=-dac_override,-dac_read_search")


# (`usage` only reads: on a read-only data dir with no database yet it gives an empty report)
@pytest.mark.parametrize("command", COMMANDS[1:], ids=lambda c: c[0])
def test_a_read_only_data_dir_is_one_line_naming_it(tmp_path: Path, command: tuple[str]) -> None:
    prefix = _without_write_rights()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data_dir.chmod(0o555)
    try:
        probe = subprocess.run(
            [*prefix, sys.executable, "-c", f"open({str(data_dir / 'x')!r}, 'w')"],
            capture_output=True,
        )
        if probe.returncode == 0:
            pytest.skip("this process can write into a read-only folder")
        out = run(tmp_path, *command, env={"HTTP_PORT": "0"}, prefix=prefix)
    finally:
        data_dir.chmod(0o755)
    assert out.returncode == 2
    assert (
        one_line(out)
        == f"drawbridge: DRAWBRIDGE_DATA_DIR: cannot use {data_dir} (Permission denied)"
    )


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_a_database_that_cannot_be_opened_is_one_line(tmp_path: Path, command: tuple[str]) -> None:
    (tmp_path / "data" / "drawbridge.db").mkdir(parents=True)  # a folder where the file goes
    out = run(tmp_path, *command, env={"HTTP_PORT": "0"})
    assert out.returncode == 1
    line = one_line(out)
    assert line.startswith(
        f"drawbridge: DRAWBRIDGE_DATA_DIR: {tmp_path / 'data' / 'drawbridge.db'}:"
    )


def test_the_readme_error_example_is_what_the_program_prints(tmp_path: Path) -> None:
    match = re.search(r"naming the setting \(`([^`]+)`\)", README.read_text())
    assert match is not None
    example = match[1]
    name, value = "CONCURRENCY", "lots"
    assert f": {name}: " in example
    out = run(tmp_path, "usage", env={name: value})
    assert out.returncode == 2
    assert one_line(out) == example


def test_usage_json_and_csv_exclude_each_other(tmp_path: Path) -> None:
    out = run(tmp_path, "usage", "--json", "--csv")
    assert out.returncode == 2
    assert "argument --csv: not allowed with argument --json" in out.stderr
    assert out.stdout == ""
    for days in ("0", "-1", "two"):
        out = run(tmp_path, "usage", "--days", days)
        assert out.returncode == 2 and "--days" in out.stderr and out.stdout == ""


# ---- usage --days: the last N quota days, today (in QUOTA_TZ) included ------------------------

DAYS = ["2026-03-06", "2026-03-07", "2026-03-08", "2026-03-09", "2026-03-10", "2026-03-11"]


@pytest.fixture
def usage_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data dir with one succeeded job a day on each of DAYS, for `main(["usage", …])`."""
    for name in list(os.environ):
        if name.endswith(("_TOKEN", "_API_KEY")) or name in ("QUOTA_TZ", "HTTP_PORT"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no .env of the checkout's
    monkeypatch.setenv("DRAWBRIDGE_DATA_DIR", str(tmp_path / "data"))
    asyncio.run(new_database(tmp_path / "data"))  # (`usage` makes none: it only reads)
    with sqlite3.connect(tmp_path / "data" / "drawbridge.db") as db:
        db.executemany(
            "INSERT INTO jobs (id, platform, user_id, chat_id, prompt, model, provider, n_images, "
            "status, day, cost_usd, created_at) VALUES (?, 'telegram', '1', '1', 'a fox', 'demo', "
            "'demo', 1, 'succeeded', ?, 0.01, 0)",
            [(f"job{i}", day) for i, day in enumerate(DAYS)],
        )
    return tmp_path


@pytest.mark.parametrize(
    ("now", "tz", "days", "expected"),
    [
        # UTC: one day is today only, not today and yesterday.
        ("2026-03-11T20:00", "UTC", 1, ["2026-03-11"]),
        ("2026-03-11T20:00", "UTC", 3, ["2026-03-09", "2026-03-10", "2026-03-11"]),
        # Kiritimati is UTC+14: at 20:00 UTC it is already the 11th there.
        ("2026-03-10T20:00", "Pacific/Kiritimati", 2, ["2026-03-10", "2026-03-11"]),
        # New York, just after midnight, the week clocks sprang forward (a 23-hour day).
        ("2026-03-11T04:30", "America/New_York", 4, DAYS[2:]),
    ],
)
def test_usage_days_counts_n_quota_days_ending_today(
    usage_db: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    now: str,
    tz: str,
    days: int,
    expected: list[str],
) -> None:
    monkeypatch.setenv("QUOTA_TZ", tz)
    instant = datetime.fromisoformat(now).replace(tzinfo=ZoneInfo("UTC")).timestamp()
    monkeypatch.setattr(time, "time", lambda: instant)
    capsys.readouterr()
    assert main(["usage", "--json", "--days", str(days)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["day"] for r in rows] == expected
    assert main(["usage", "--json"]) == 0  # no --days: every day
    assert [r["day"] for r in json.loads(capsys.readouterr().out)] == DAYS
