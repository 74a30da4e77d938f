"""`drawbridge generate` as a user runs it: hostile lines, flags as defaults, comments and blanks."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from tests.test_cli import db_rows, run


def jobs(tmp_path: Path) -> list[tuple[object, ...]]:
    return db_rows(
        tmp_path,
        "SELECT chat_id, prompt, model, n_images, aspect_ratio, size, seed, status FROM jobs"
        " ORDER BY created_at, CAST(chat_id AS INTEGER)",
    )


def test_generate_echoes_markup_in_lines_and_errors_literally(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "cat --ar [/x]\n"
        "a [bold]fox :smile:\n"
        "a [link=x]dog[/link] --model [link=x]\n"
        "a fox --size [/bold]\n"
        "a fox [/x] [demo:refuse]\n"
    )
    out = run(tmp_path, "generate", "--file", str(prompts), "--out", "out[/x]")
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == 1, out.stderr
    assert "1 image(s), 4 failure(s)" in out.stdout
    assert "images in out[/x]/" in out.stdout
    assert "✗ line 1: --ar takes a ratio like 16:9, not [/x]." in out.stderr
    assert "✗ line 3: There is no model called [link=x]. See /models." in out.stderr
    assert "✗ line 4: demo does not do size [/bold]." in out.stderr
    assert "✗ line 5: 🚫 The provider refused this prompt" in out.stderr
    assert "5/5" in out.stderr  # every line, good or bad, moved the bar
    (path,) = (tmp_path / "out[/x]").glob("*.png")
    assert path.name == "002-a-bold-fox-smile.png"
    assert [(r[1], r[7]) for r in jobs(tmp_path)] == [
        ("a [bold]fox :smile:", "succeeded"),
        ("a fox [/x] [demo:refuse]", "refused"),
    ]


def test_generate_ar_flag_takes_the_chat_forms(tmp_path: Path) -> None:
    out = run(tmp_path, "generate", "a lighthouse", "--ar", "16x9", "--out", "out")
    assert out.returncode == 0, out.stderr + out.stdout
    (path,) = (tmp_path / "out").glob("*.png")
    with Image.open(path) as img:
        assert img.size[0] * 9 == img.size[1] * 16
    assert [r[4] for r in jobs(tmp_path)] == ["16:9"]
    out = run(tmp_path, "generate", "a lighthouse", "--ar", "99", "--out", "out")
    assert out.returncode == 2
    assert out.stderr.strip() == "drawbridge generate: --ar takes a ratio like 16:9, not 99."
    assert len(jobs(tmp_path)) == 1  # a bad flag is refused before any line becomes a job


def test_generate_a_lines_own_options_win_over_the_flags(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "a fox\n"
        "a fox --n 1 --ar 1:1 --size 256 --seed 8 --model demo\n"
        "a fox --count 2 --aspect 4:3\n"
    )
    flags = ("--n", "3", "--ar", "16x9", "--size", "512", "--seed", "7", "--model", "nope")
    out = run(tmp_path, "generate", "--file", str(prompts), *flags, "--out", "out")
    assert "✗ line 1: There is no model called nope. See /models." in out.stderr
    assert "✗ line 3: There is no model called nope. See /models." in out.stderr
    assert "1 image(s), 2 failure(s)" in out.stdout
    (path,) = (tmp_path / "out").glob("*.png")
    with Image.open(path) as img:
        assert img.size == (256, 256)
    out = run(tmp_path, "generate", "--file", str(prompts), *flags[:-2], "--out", "out2")
    assert out.returncode == 0, out.stderr + out.stdout
    assert "6 image(s), 0 failure(s)" in out.stdout
    assert [r[2:7] for r in jobs(tmp_path)] == [
        ("demo", 1, "1:1", "256", 8),  # the first run's one job
        ("demo", 3, "16:9", "512", 7),
        ("demo", 1, "1:1", "256", 8),
        ("demo", 2, "4:3", "512", 7),
    ]


def test_generate_skips_blank_lines_and_indented_comments(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(
        "\ufeff# saved with a byte order mark\n"
        "   # an indented comment\n"
        "\t# a tabbed comment --n 9\n"
        "   \n"
        "\t\n"
        "\n"
        "a fox # not a comment\n".encode()
    )
    out = run(tmp_path, "generate", "--file", str(prompts), "--out", "out")
    assert out.returncode == 0, out.stderr + out.stdout
    assert "1 image(s), 0 failure(s)" in out.stdout
    assert "1/1" in out.stderr
    assert [r[1] for r in jobs(tmp_path)] == ["a fox # not a comment"]
    # Skipped lines still count: a failure and a file name carry the file's own line number.
    prompts.write_text(
        "# two lines\n\na fox --model nope\na lighthouse\n# end\na cat [demo:refuse]\n"
    )
    out = run(tmp_path, "generate", "--file", str(prompts), "--out", "numbered")
    assert "✗ line 3: There is no model called nope. See /models." in out.stderr
    assert "✗ line 6: 🚫 The provider refused this prompt" in out.stderr
    assert [p.name for p in (tmp_path / "numbered").glob("*.png")] == ["004-a-lighthouse.png"]
