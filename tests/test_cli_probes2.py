"""Adversarial probes of `drawbridge generate` and `drawbridge run --console`, from the outside.

Each probe runs the real program (`python -m bot …`) in a temp working directory with a temp
data dir and the offline `demo` model (a priced copy of it, through MODELS_FILE, where money
matters), and looks at what a user or operator sees: the terminal, the exit code, the files in
--out and the SQLite ledger. The defects they found are fixed: a U+2028 or a form feed split a
prompt into two paid jobs; an option without a value was told to give a ratio; a second run into
the same --out replaced the first's images; Ctrl-C left no summary, left the batch's jobs queued
or running for good and their holds on the budget; /quit mid-job said nothing of the job.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.test_outside_probes import PYTHON, environ, rows, run, session

PRICEY = """
[models.pricey]
provider = "demo"
price_usd = 0.25
aspect_ratios = ["1:1", "16:9"]
sizes = ["256"]
default_size = "256"
max_images = 4
timeout_s = 60
"""


def pricey(tmp_path: Path) -> dict[str, str]:
    """Settings for a $0.25-an-image demo model under a $1.00 daily budget."""
    models = tmp_path / "models.toml"
    models.write_text(PRICEY)
    return {"MODELS_FILE": str(models), "BUDGET_DAILY_USD": "1"}


def jobs(tmp_path: Path) -> list[tuple[Any, ...]]:
    return rows(
        tmp_path,
        "SELECT CAST(chat_id AS INTEGER), prompt, status, cost_usd FROM jobs"
        " ORDER BY created_at, CAST(chat_id AS INTEGER)",
    )


def pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png"))


# ---- the prompts file ------------------------------------------------------------------------


def test_crlf_prompts_file_keeps_line_numbers_and_prompts_clean(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_bytes(
        b"\xef\xbb\xbfa fox\r\n# comment\r\n\r\na cat --ar 16:9\r\na dog [demo:refuse]\r\n"
    )
    out = run(tmp_path, "generate", "--file", "p.txt", "--out", "out")
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == 1
    assert "2 image(s), 1 failure(s)" in out.stdout
    assert "✗ line 5: 🚫 The provider refused" in out.stderr
    assert pngs(tmp_path / "out") == ["001-a-fox.png", "004-a-cat.png"]
    assert [(n, p) for n, p, _, _ in jobs(tmp_path)] == [
        (1, "a fox"),
        (4, "a cat"),
        (5, "a dog [demo:refuse]"),
    ]  # no stray "\r" or BOM left in a prompt


def test_a_unicode_line_separator_inside_a_line_does_not_split_it(tmp_path: Path) -> None:
    """A prompt pasted from a web page or a JSON string carries U+2028; a form feed, from a
    printout. Editors, `wc -l` and `sed -n 3p` count neither as a line break, and the chat
    reads both as a space (tests/test_text_probes.py)."""
    (tmp_path / "p.txt").write_text(
        "a fox\u2028in the snow\na owl\x0cat night\na cat [demo:refuse]\n", encoding="utf-8"
    )
    out = run(tmp_path, "generate", "--file", "p.txt", "--out", "out")
    assert "Traceback" not in out.stderr, out.stderr
    assert "2 image(s), 1 failure(s)" in out.stdout
    assert "✗ line 3: 🚫 The provider refused" in out.stderr  # the file's own line 3
    assert [(n, s) for n, _, s, _ in jobs(tmp_path)] == [
        (1, "succeeded"),
        (2, "succeeded"),
        (3, "refused"),
    ]


def test_a_10_mb_line_is_refused_by_its_number_and_the_others_run(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("a fox\n" + "x" * 10_000_000 + "\na cat\n")
    started = time.monotonic()
    out = run(tmp_path, "generate", "--file", "p.txt", "--out", "out")
    assert time.monotonic() - started < 20
    assert out.returncode == 1, out.stderr[-2000:]
    assert "2 image(s), 1 failure(s)" in out.stdout
    assert "✗ line 2: That prompt has 10000000 characters; the limit is 2000." in out.stderr
    assert len(out.stderr) < 10_000  # the line itself is never echoed back
    assert pngs(tmp_path / "out") == ["001-a-fox.png", "003-a-cat.png"]
    assert [s for _, _, s, _ in jobs(tmp_path)] == ["succeeded", "succeeded"]


def test_ten_thousand_lines_each_bad_one_named_and_the_good_one_runs(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("a fox --ar 99:1\n" * 9_999 + "a cat\n")
    out = run(tmp_path, "generate", "--file", "p.txt", "--out", "out")
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.returncode == 1
    assert "1 image(s), 9999 failure(s)" in out.stdout
    assert out.stderr.count("✗ line ") == 9_999
    assert (
        "✗ line 9999: demo does not do aspect ratio 99:1" in out.stderr
        and "✗ line 10000" not in out.stderr
    )
    assert pngs(tmp_path / "out") == ["10000-a-cat.png"]
    assert jobs(tmp_path) == [(10000, "a cat", "succeeded", 0.0)]


def test_an_option_without_a_value_is_named_with_a_hint_for_that_option(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("a fox --ar\na fox --n\na cat\n")
    out = run(tmp_path, "generate", "--file", "p.txt", "--out", "out")
    assert out.returncode == 1 and "1 image(s), 2 failure(s)" in out.stdout
    lines = {line.split(":", 1)[0]: line for line in out.stderr.splitlines() if "✗" in line}
    assert "The option --ar needs a value" in lines["✗ line 1"]
    assert "The option --n needs a value" in lines["✗ line 2"]
    assert "--ar" not in lines["✗ line 2"], lines["✗ line 2"]


# ---- --out -------------------------------------------------------------------------------------


def test_past_line_999_the_file_names_still_sort_in_line_order(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("#\n" * 998 + "a cat\na dog\n")
    out = run(tmp_path, "generate", "--file", "p.txt", "--out", "out")
    assert out.returncode == 0, out.stderr
    assert pngs(tmp_path / "out") == ["0999-a-cat.png", "1000-a-dog.png"]


def test_a_line_copied_from_a_chat_pays_for_the_prompt_not_the_command(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("/imagine a cat --ar 16:9\n/img@drawbot a dog\n")
    out = run(tmp_path, "generate", "--file", "p.txt", "--out", "out")
    assert out.returncode == 0, out.stderr
    assert sorted(prompt for _, prompt, _, _ in jobs(tmp_path)) == ["a cat", "a dog"]
    assert pngs(tmp_path / "out") == ["001-a-cat.png", "002-a-dog.png"]


def test_out_with_dot_dot_writes_where_the_path_leads(tmp_path: Path) -> None:
    out = run(tmp_path, "generate", "a fox", "--out", "a/../b")
    assert out.returncode == 0, out.stderr
    assert pngs(tmp_path / "b") == ["001-a-fox.png"]
    assert "images in a/../b/" in out.stdout


def test_a_read_only_out_is_refused_before_any_job(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root ignores folder modes and setpriv is not here to drop that")
        prefix = ("setpriv", "--bounding-set=-dac_override,-dac_read_search")
    try:
        done = subprocess.run(
            [*prefix, PYTHON, "-m", "bot", "generate", "a fox", "--out", "locked/sub"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=environ(tmp_path),
            timeout=30,
        )
    finally:
        locked.chmod(0o755)
    assert done.returncode == 2
    assert done.stderr.strip() == "drawbridge generate: --out locked/sub: locked is not writable"
    assert not (tmp_path / "locked" / "sub").exists()
    assert not (tmp_path / "data" / "drawbridge.db").exists() or jobs(tmp_path) == []


def test_a_second_run_into_the_same_out_keeps_the_first_runs_images(tmp_path: Path) -> None:
    first = run(tmp_path, "generate", "a fox", "--seed", "1", "--out", "out")
    assert first.returncode == 0, first.stderr
    (path,) = (tmp_path / "out").glob("*.png")
    kept = path.read_bytes()
    second = run(tmp_path, "generate", "a fox", "--seed", "2", "--out", "out")
    assert second.returncode == 0, second.stderr
    contents = [p.read_bytes() for p in (tmp_path / "out").glob("*.png")]
    assert len(contents) == 2
    assert kept in contents  # the first picture is still there


# ---- money -------------------------------------------------------------------------------------


def test_budget_reached_mid_batch_refuses_the_rest_by_line_and_the_cost_matches(
    tmp_path: Path,
) -> None:
    (tmp_path / "p.txt").write_text("".join(f"a fox {i}\n" for i in range(1, 7)))
    out = run(
        tmp_path, "generate", "--file", "p.txt", "--model", "pricey", "--out", "out",
        **pricey(tmp_path),
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert "4 image(s), 2 failure(s), cost $1.0000" in out.stdout
    for line in (5, 6):
        assert f"✗ line {line}: The bot has reached its spending limit for today" in out.stderr
    ledger = jobs(tmp_path)
    assert [s for _, _, s, _ in ledger] == ["succeeded"] * 4
    assert sum(c for _, _, _, c in ledger) == pytest.approx(1.0)
    assert len(pngs(tmp_path / "out")) == 4


# ---- Ctrl-C in the middle of a batch ------------------------------------------------------------


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # even when pytest runs with SIGINT ignored


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Four $0.25 lines, one at a time; Ctrl-C once the first image is in --out; then the same
    batch again, to the end."""
    tmp_path = tmp_path_factory.mktemp("interrupted")
    (tmp_path / "p.txt").write_text("a fox\na cat\na dog\na owl\n")
    money = pricey(tmp_path)
    argv = [PYTHON, "-m", "bot", "generate", "--file", "p.txt", "--model", "pricey"]
    env = environ(tmp_path, DEMO_LATENCY="1.5", CONCURRENCY="1", SHUTDOWN_GRACE="0.5", **money)
    proc = subprocess.Popen(
        [*argv, "--out", "out"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_default_sigint,
    )
    try:
        deadline = time.monotonic() + 20
        while not list((tmp_path / "out").glob("*.png")):
            assert proc.poll() is None and time.monotonic() < deadline, "no first image"
            time.sleep(0.05)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    result: dict[str, Any] = {
        "tmp": tmp_path,
        "code": proc.returncode,
        "stdout": out.decode("utf-8", "replace"),
        "stderr": err.decode("utf-8", "replace"),
        "rows": jobs(tmp_path),
    }
    again = run(tmp_path, "generate", "--file", "p.txt", "--model", "pricey", "--out", "out2",
                **money)  # fmt: skip
    result["again"] = again
    result["rows_after"] = jobs(tmp_path)
    return result


def test_ctrl_c_mid_batch_exits_130_and_leaves_only_whole_images(
    interrupted: dict[str, Any],
) -> None:
    assert interrupted["code"] == 130
    assert "Traceback" not in interrupted["stderr"], interrupted["stderr"]
    out = interrupted["tmp"] / "out"
    names = pngs(out)
    assert names and all(name[:3] in ("001", "002", "003", "004") for name in names)
    for name in names:
        with Image.open(out / name) as img:
            img.load()  # a half-written file fails here
    assert [p for p in out.iterdir() if p.suffix != ".png"] == []  # no temp files
    succeeded = {n for n, _, s, _ in interrupted["rows"] if s == "succeeded"}
    assert {int(name[:3]) for name in names} == succeeded  # a file for each charged row only
    assert all(c == 0 for _, _, s, c in interrupted["rows"] if s != "succeeded")


def test_ctrl_c_mid_batch_still_prints_a_summary(interrupted: dict[str, Any]) -> None:
    succeeded = sum(1 for _, _, s, _ in interrupted["rows"] if s == "succeeded")
    assert f"{succeeded} image(s)" in interrupted["stdout"], interrupted["stdout"]


def test_ctrl_c_mid_batch_leaves_no_job_queued_or_running(interrupted: dict[str, Any]) -> None:
    left = [r for r in interrupted["rows_after"] if r[2] in ("queued", "running")]
    assert left == []


def test_after_ctrl_c_the_next_batch_can_spend_the_rest_of_the_budget(
    interrupted: dict[str, Any],
) -> None:
    again = interrupted["again"]
    assert "Traceback" not in again.stderr, again.stderr
    charged = sum(c for _, _, s, c in interrupted["rows_after"] if s == "succeeded")
    assert charged == pytest.approx(1.0), (again.stdout, again.stderr)
    assert "3 image(s)" in again.stdout or "4 image(s)" in again.stdout, again.stdout


# ---- the console chat ---------------------------------------------------------------------------


def test_console_blank_lines_and_a_100_kb_line_are_answered_briefly(tmp_path: Path) -> None:
    stdin = "\n   \n\t\n/imagine " + "x" * 100_000 + "\n" + "y" * 100_000 + "\n/usage\n"
    out = run(tmp_path, "run", "--console", stdin=stdin)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert out.stdout.count("the limit is 2000") == 2
    assert "Queued" not in out.stdout
    assert "Today: 0 of 20 images" in out.stdout
    assert len(out.stdout) < 5_000  # neither line is echoed back
    assert rows(tmp_path, "SELECT count(*) FROM jobs") == [(0,)]


def test_console_cancel_mid_job_is_not_charged(tmp_path: Path) -> None:
    with session(tmp_path, "run", "--console", DEMO_LATENCY="5", SHUTDOWN_GRACE="0.5") as bot:
        bot.wait_for("drawbridge console")
        bot.send("/imagine a slow fox\n")
        bot.wait_for("Generating with demo")
        bot.send("/cancel\n")
        bot.wait_for("not charged")
        bot.send("/usage\n")
        bot.wait_for("Today: 0 of 20 images")
        assert bot.finish() == 0
        assert b"Traceback" not in bot.stderr
    assert rows(tmp_path, "SELECT status, cost_usd FROM jobs") == [("cancelled", 0.0)]
    assert list((tmp_path / "data").rglob("*.png")) == []


def test_console_eof_on_a_pipe_while_a_job_runs_waits_for_it(tmp_path: Path) -> None:
    with session(tmp_path, "run", "--console", DEMO_LATENCY="1.5") as bot:
        bot.wait_for("drawbridge console")
        bot.send("/imagine a fox at the end --n 2\n")
        bot.wait_for("Generating with demo")
        assert bot.finish() == 0  # closes stdin: end of input
        assert "done" in bot.out, bot.out
    paths = [line.strip() for line in bot.out.splitlines() if line.strip().endswith(".png")]
    assert len(paths) == 2 and all(Path(p).is_file() for p in paths)
    assert rows(tmp_path, "SELECT status FROM jobs") == [("succeeded",)]


def test_console_quit_mid_job_parks_it_and_the_next_start_finishes_it(tmp_path: Path) -> None:
    with session(tmp_path, "run", "--console", DEMO_LATENCY="5", SHUTDOWN_GRACE="0.5") as bot:
        bot.wait_for("drawbridge console")
        bot.send("/imagine a parked fox\n")
        bot.wait_for("Generating with demo")
        bot.send("/quit\n")
        assert bot.proc.wait(20) == 0
    ((status, cost),) = rows(tmp_path, "SELECT status, cost_usd FROM jobs")
    assert status in ("queued", "running") and cost == 0
    out = run(tmp_path, "run", "--console", stdin="", DEMO_LATENCY="0")
    assert out.returncode == 0 and "done" in out.stdout, out.stdout + out.stderr
    assert rows(tmp_path, "SELECT status FROM jobs") == [("succeeded",)]


def test_console_quit_mid_job_tells_the_user_what_becomes_of_it(tmp_path: Path) -> None:
    with session(tmp_path, "run", "--console", DEMO_LATENCY="5", SHUTDOWN_GRACE="0.5") as bot:
        bot.wait_for("drawbridge console")
        bot.send("/imagine a parked fox\n")
        bot.wait_for("Generating with demo")
        before = len(bot.lines)
        bot.send("/quit\n")
        assert bot.proc.wait(20) == 0
        for thread in bot._threads:
            thread.join(5)
        ((job_id,),) = rows(tmp_path, "SELECT id FROM jobs")
        after = "\n".join(bot.lines[before:])
    assert job_id in after, after
