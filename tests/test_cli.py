"""The real `drawbridge` program, as a new user runs it: console chat, batch generate, usage."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from PIL import Image


def run(
    tmp_path: Path, *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.endswith(("_TOKEN", "_API_KEY"))}
    environ.update({"DRAWBRIDGE_DATA_DIR": str(tmp_path / "data"), "LANG": "en_US.UTF-8"})
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=environ,
        timeout=50,
    )


def db_rows(tmp_path: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(tmp_path / "data" / "drawbridge.db") as db:
        return db.execute(sql).fetchall()


def test_console_chat_makes_two_16_9_pngs_and_shows_usage(tmp_path: Path) -> None:
    out = run(tmp_path, "run", "--console", stdin="/imagine a lighthouse --n 2 --ar 16:9\n")
    assert out.returncode == 0, out.stderr
    assert "Queued" in out.stdout and "done" in out.stdout
    paths = [
        Path(line.strip()) for line in out.stdout.splitlines() if line.strip().endswith(".png")
    ]
    assert len(paths) == 2
    for path in paths:
        with Image.open(tmp_path / path) as img:
            assert img.format == "PNG" and img.size[0] * 9 == img.size[1] * 16
    out = run(
        tmp_path, "run", "--console", stdin="/usage\n/jobs\n/models\n/help\n/imagine\n/bogus\n"
    )
    assert "Today: 2 of 20 images" in out.stdout
    assert "succeeded" in out.stdout and "demo" in out.stdout
    assert "Please describe the image" in out.stdout and "I don't know /bogus" in out.stdout


def test_generate_file_writes_images_rows_and_usage(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "".join(f"prompt {i}: a cat on a roof --ar 3:2\n" for i in range(20)) + "# a comment\n\n"
    )
    out = run(tmp_path, "generate", "--file", str(prompts), "--out", "out")
    assert out.returncode == 0, out.stderr + out.stdout
    assert "20/20" in out.stderr  # the progress bar
    assert "20 image(s), 0 failure(s)" in out.stdout
    assert len(list((tmp_path / "out").glob("*.png"))) == 20
    assert db_rows(tmp_path, "SELECT status, count(*) FROM jobs GROUP BY status") == [
        ("succeeded", 20)
    ]
    out = run(tmp_path, "usage", "--json")
    (row,) = json.loads(out.stdout)
    assert (row["jobs"], row["succeeded"], row["images"]) == (20, 20, 20)
    out = run(tmp_path, "usage", "--csv")
    header, line = out.stdout.splitlines()
    assert header == "day,platform,user_id,model,jobs,succeeded,images,cost_usd"
    assert line.split(",")[3:7] == ["demo", "20", "20", "20"]


def test_generate_reports_bad_lines_and_keeps_going(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox --n 2\na fox --ar 99:1\na fox [demo:refuse]\na fox --style x\n")
    out = run(tmp_path, "generate", "--file", str(prompts), "--out", "out")
    assert out.returncode == 1
    assert "2 image(s), 3 failure(s)" in out.stdout
    statuses = sorted(r[0] for r in db_rows(tmp_path, "SELECT status FROM jobs"))
    assert statuses == ["refused", "succeeded"]  # invalid lines never became jobs


def test_bad_setting_is_one_line_and_no_token_without_a_terminal_is_explained(
    tmp_path: Path,
) -> None:
    out = run(tmp_path, "usage", env={"CONCURRENCY": "lots"})
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert "CONCURRENCY" in out.stderr
    out = run(tmp_path, "run")
    assert out.returncode == 2 and "TELEGRAM_BOT_TOKEN" in out.stderr


async def test_generate_against_a_grsai_started_apart(tmp_path: Path) -> None:
    """As a new user runs it against the real API: only the base URL differs."""
    import asyncio

    from tests.fake_grsai import FakeGrsai

    async with FakeGrsai(api_key="sk-by-hand") as fake:
        env = {k: v for k, v in os.environ.items() if not k.endswith(("_TOKEN", "_API_KEY"))}
        env.update(
            DRAWBRIDGE_DATA_DIR=str(tmp_path / "data"),
            GRSAI_API_KEY="sk-by-hand",
            GRSAI_BASE_URL=fake.base_url,
            HTTP_PORT="0",
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "generate", "--model", "nano-banana", "a fox in the snow",
            "--ar", "16:9", "--out", "out",
            cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 50)
    assert proc.returncode == 0, err.decode()
    assert "1 image(s), 0 failure(s), cost $0.0400" in out.decode()
    assert fake.submits == 1
    (path,) = (tmp_path / "out").glob("*.png")
    assert path.read_bytes() in {data for data, _ in fake._files.values()}
    assert db_rows(tmp_path, "SELECT status, provider, cost_usd FROM jobs") == [
        ("succeeded", "grsai", 0.04)
    ]
