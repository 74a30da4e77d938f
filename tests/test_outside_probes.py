"""Adversarial probes from the outside: the real program as a user and an operator run it.

Every probe starts `python -m bot …` (or the `drawbridge` script) in a temp working directory,
with a temp `DRAWBRIDGE_DATA_DIR`, no tokens and no network but loopback, and looks only at what a
person would see: the terminal, the exit code, the HTTP answers, the files and the SQLite ledger.
A probe that fails here is a defect a user or operator would meet; its docstring says what they
see. ("Seen:" in a docstring is what a user saw before the fix that made the probe pass.)
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import pty
import re
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from bot.settings import ENV_NAMES
from tests.conftest import new_database

ROOT = Path(__file__).resolve().parent.parent
VENV_PY = ROOT / ".venv" / "bin" / "python"
PYTHON = str(VENV_PY if VENV_PY.exists() else Path(sys.executable))
DRAWBRIDGE = ROOT / ".venv" / "bin" / "drawbridge"

# Secrets an operator might have configured; none of them may ever be printed.
SECRETS = {
    "TELEGRAM_BOT_TOKEN": "7000001:AAH-probe-telegram-secret-value",
    "TELEGRAM_WEBHOOK_SECRET": "probe-webhook-secret-value",
    "DISCORD_BOT_TOKEN": "MTIzNDU2.probe-discord-secret-value",
    "GRSAI_API_KEY": "sk-probe-grsai-secret-value",
    "OPENAI_API_KEY": "sk-probe-openai-secret-value",
    "GEMINI_API_KEY": "AIza-probe-gemini-secret-value",
}


# ---- the rig ---------------------------------------------------------------------------------


def environ(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The process environment: none of the operator's own drawbridge settings leak in."""
    names = set(ENV_NAMES.values())
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in names
        and k not in ("PYTHONIOENCODING", "PYTHONUTF8")
        and not k.endswith(("_TOKEN", "_API_KEY"))
    }
    env.update(
        DRAWBRIDGE_DATA_DIR=str(tmp_path / "data"),
        HTTP_PORT="0",
        LANG="en_US.UTF-8",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    env.update(extra)
    return env


def run(
    tmp_path: Path,
    *args: str,
    stdin: bytes | str = b"",
    timeout: float = 40,
    **extra: str,
) -> subprocess.CompletedProcess[str]:
    """`python -m bot ARGS` to the end; stdout and stderr decoded (undecodable bytes replaced)."""
    data = stdin.encode() if isinstance(stdin, str) else stdin
    done = subprocess.run(
        [PYTHON, "-m", "bot", *args],
        input=data,
        capture_output=True,
        cwd=tmp_path,
        env=environ(tmp_path, **extra),
        timeout=timeout,
    )
    return subprocess.CompletedProcess(
        done.args,
        done.returncode,
        done.stdout.decode("utf-8", "replace"),
        done.stderr.decode("utf-8", "replace"),
    )


def one_line(stderr: str) -> str:
    """stderr must be exactly one line, and no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def rows(tmp_path: Path, sql: str) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(tmp_path / "data" / "drawbridge.db")) as db:
        return db.execute(sql).fetchall()


def queued_jobs(text: str) -> set[str]:
    """The job ids the chat acknowledged as queued."""
    return set(re.findall(r"Queued #\d+ · .* · job (\w+)", text))


def saved_paths(text: str) -> list[Path]:
    return [Path(line.strip()) for line in text.splitlines() if line.strip().endswith(".png")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Session:
    """A long-running `python -m bot …` on pipes; stdout lines are collected as they come."""

    def __init__(self, tmp_path: Path, *args: str, **extra: str) -> None:
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "bot", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=tmp_path,
            env=environ(tmp_path, **extra),
        )
        self.lines: list[str] = []
        self.stderr = b""
        self._cond = threading.Condition()
        self._threads = [
            threading.Thread(target=self._read_out, daemon=True),
            threading.Thread(target=self._read_err, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()

    @property
    def out(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def send(self, text: str | bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() if isinstance(text, str) else text)
        self.proc.stdin.flush()

    def wait_for(self, needle: str, count: int = 1, within: float = 20) -> None:
        deadline = time.monotonic() + within
        with self._cond:
            while sum(needle in line for line in self.lines) < count:
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._threads[0].is_alive()):
                    raise AssertionError(f"no {count}× {needle!r} in:\n" + "\n".join(self.lines))
                self._cond.wait(min(left, 0.2))

    def wait_until(self, what: str, check: Callable[[str], bool], within: float = 20) -> None:
        deadline = time.monotonic() + within
        while not check(self.out):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"never {what}:\n{self.out}")
            time.sleep(0.05)

    def close_stdin(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()

    def finish(self, within: float = 30) -> int:
        self.close_stdin()
        code = self.proc.wait(within)
        for thread in self._threads:
            thread.join(5)
        return code

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.finish(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@contextlib.contextmanager
def session(tmp_path: Path, *args: str, **extra: str) -> Iterator[Session]:
    s = Session(tmp_path, *args, **extra)
    try:
        yield s
    finally:
        s.kill()


class Pty:
    """The program on a real terminal (a pty): what a person at a keyboard sees and types."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # the child: become the program
            try:
                os.chdir(cwd)
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        self.out = b""
        self.code: int | None = None

    def _pump(self, wait: float) -> bool:
        """Read what is there; False once the terminal is closed (the program has exited)."""
        ready, _, _ = select.select([self.fd], [], [], wait)
        if not ready:
            return True
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:
            return False
        self.out += chunk
        return bool(chunk)

    def read_until(self, needle: bytes, within: float = 20) -> None:
        deadline = time.monotonic() + within
        while needle not in self.out:
            if time.monotonic() > deadline or not self._pump(0.2):
                raise AssertionError(f"no {needle!r} on the terminal:\n{self.text}")

    def type(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait(self, within: float = 30) -> int:
        deadline = time.monotonic() + within
        while self.code is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.code = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"still running after {within}s:\n{self.text}")
            self._pump(0.1)
        while self._pump(0.05):  # what it printed last
            pass
        return self.code

    @property
    def text(self) -> str:
        return self.out.decode("utf-8", "replace").replace("\r\n", "\n")

    def close(self) -> None:
        if self.code is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            self.code = -9
        os.close(self.fd)


@contextlib.contextmanager
def terminal(argv: list[str], env: dict[str, str], cwd: Path) -> Iterator[Pty]:
    term = Pty(argv, env, cwd)
    try:
        yield term
    finally:
        term.close()


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, str, bytes]:
    """(status, content type, body) of one request to the bot's HTTP server."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=body, method=method, headers=headers or {}
    )
    try:
        with _OPENER.open(request, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# ---- the console chat over a pipe ------------------------------------------------------------


def test_console_answers_every_chat_command_briefly_and_saves_the_images(tmp_path: Path) -> None:
    lines = [
        "/imagine a lighthouse at dusk --ar 16:9 --n 2 --seed 42",
        "/img a cat on a roof",
        "/draw a dog in the rain --model demo",
        "a plain text prompt, as in a private chat",
        "/usage",
        "/jobs",
        "/models",
        "/settings",
        "/help",
        "/start",
        "/bogus",
        "",
        "   ",
        "/imagine stuck forever [demo:hang]",
        "/cancel",
        "/cancel nosuchjob",
    ]
    out = run(
        tmp_path,
        "run",
        "--console",
        stdin="\n".join(lines) + "\n",
        MAX_PENDING_PER_USER="20",
    )
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert out.stderr.strip() == ""  # the console's log goes to the data dir, not the chat
    text = out.stdout
    assert len(queued_jobs(text)) == 5
    for expected in (
        "Today: ",
        "Your recent jobs:",
        "demo · $0.00",
        "Default model: demo",
        "Hi! I turn your words into images",
        "I don't know /bogus. See /help.",
        "cancelled, not charged",
        "No job nosuchjob of yours was found",
    ):
        assert expected in text, (expected, text)
    assert text.count("/imagine <prompt> — make an image") == 2  # /help and /start
    paths = saved_paths(text)
    assert len(paths) == 5
    for path in paths:
        assert path.is_file() and path.is_relative_to(tmp_path / "data" / "images")
        with Image.open(path) as img:
            assert img.format == "PNG"
    statuses = sorted(r[0] for r in rows(tmp_path, "SELECT status FROM jobs"))
    assert statuses == ["cancelled"] + ["succeeded"] * 4
    assert rows(tmp_path, "SELECT sum(cost_usd) FROM jobs") == [(0.0,)]
    (lighthouse,) = rows(
        tmp_path, "SELECT id, aspect_ratio, seed, n_images FROM jobs WHERE prompt LIKE 'a light%'"
    )
    assert lighthouse[1:] == ("16:9", 42, 2)
    for path in paths:
        if path.name.startswith(lighthouse[0]):
            with Image.open(path) as img:
                assert img.size[0] * 9 == img.size[1] * 16


def test_console_answers_hostile_prompts_with_one_short_line_each(tmp_path: Path) -> None:
    lines = [
        "/imagine " + "x" * 10_000,
        "y" * 10_000,
        "/imagine \u200b\u200b\u2800\u3164",
        "/imagine",
        "/imagine a fox --style oil",
        "/imagine a fox --n 0",
        "/imagine a fox --n 99",
        "/imagine a fox --ar 0:1",
        "/imagine a fox --seed -1",
        "/imagine a fox --model nosuch",
        "/imagine a fox --n",
        "/cancel " + "z" * 5000,
        "/imagine <b>bold</b> & [red]rich[/red] {job} %s",
        "/jobs",
    ]
    out = run(tmp_path, "run", "--console", stdin="\n".join(lines) + "\n")
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    answers = out.stdout.splitlines()
    expected = [
        "That prompt has 10000 characters; the limit is 2000.",
        "Please describe the image",
        "I don't know the option --style.",
        "--n takes a number from 1 to 10, not 0.",
        "--n takes a number from 1 to 10, not 99.",
        "--ar takes a ratio like 16:9, not 0:1.",
        "The seed must be a whole number from 0 to 4294967295, not -1.",
        "There is no model called nosuch.",
        "The option --n needs a value",
        "of yours was found",
    ]
    for needle in expected:
        hits = [a for a in answers if needle in a]
        assert hits, (needle, out.stdout)
        assert all(len(a) < 200 for a in hits), hits  # short: the 10,000 characters not echoed
    assert out.stdout.count("That prompt has 10000 characters") == 2
    assert out.stdout.count("Please describe the image") == 2
    assert len(queued_jobs(out.stdout)) == 1  # only the markup prompt became a job
    assert "<b>bold</b> & [red]rich[/red]" in out.stdout  # echoed literally, not rendered
    (prompt,) = rows(tmp_path, "SELECT prompt FROM jobs")
    assert prompt == ("<b>bold</b> & [red]rich[/red] {job} %s",)


@pytest.mark.parametrize(
    "decoding",
    ["utf-8:strict", "utf-8:surrogateescape"],
    ids=["strict-stdin-as-in-a-utf8-locale", "surrogateescape-stdin-as-in-the-c-locale"],
)
def test_console_line_with_undecodable_bytes_does_not_end_the_chat(
    tmp_path: Path, decoding: str
) -> None:
    """A user pastes text from a Latin-1 terminal (`café` as the byte 0xE9) into the console.

    Seen, with stdin decoded strictly (Python's default under a real UTF-8 locale): the
    `console-stdin` reader thread dies with a UnicodeDecodeError traceback, the end-of-input
    marker never comes, and the console hangs for good, answering nothing (not even the
    `/usage` typed before the bad line, read in the same buffer).
    Seen, with surrogate escapes (the C locale): the chat ends silently with exit code 0; the
    bad line and every line after it (`/usage`) get no answer. The prompt passes the prompt
    checks (bot/commands.py parse_prompt), the job row's insert raises UnicodeEncodeError in
    the database writer (bot/dbwriter.py:176), and ConsoleAdapter._converse
    (adapters/console_adapter.py:77-88) lets it end the conversation; the reader
    (adapters/console_adapter.py:60-63) has no guard either.
    """
    stdin = b"/usage\n/imagine caf\xe9 au lait \xff\n/usage\n"
    try:
        out = run(tmp_path, "run", "--console", stdin=stdin, timeout=6, PYTHONIOENCODING=decoding)
    except subprocess.TimeoutExpired:
        pytest.fail("the console hung after a line with undecodable bytes")
    assert "Traceback" not in out.stdout + out.stderr, out.stderr
    assert out.stdout.count("Today: ") == 2, out.stdout  # the line after the bad one, too


def test_console_speaks_chinese_when_lang_is_chinese(tmp_path: Path) -> None:
    out = run(tmp_path, "run", "--console", stdin="/usage\n/bogus\n/imagine\n", LANG="zh_CN.UTF-8")
    assert out.returncode == 0, out.stderr
    assert "今天" in out.stdout and "我不认识 /bogus" in out.stdout
    assert "Today:" not in out.stdout


def test_sigterm_mid_jobs_exits_0_and_a_restart_finishes_each_job_once(tmp_path: Path) -> None:
    slow = {"DEMO_LATENCY": "30", "SHUTDOWN_GRACE": "0.5", "CONCURRENCY": "1"}
    with session(tmp_path, "run", "--console", **slow) as bot:
        bot.wait_for("drawbridge console")
        bot.send("/imagine a fox\n/imagine a cat --n 2\n/imagine a dog\n")
        bot.wait_until("3 jobs queued", lambda out: len(queued_jobs(out)) == 3)
        bot.wait_for("Generating with demo")
        bot.signal(signal.SIGTERM)
        code = bot.proc.wait(20)
        assert code == 0, bot.out
        assert b"Traceback" not in bot.stderr
    parked = rows(tmp_path, "SELECT status, cost_usd FROM jobs")
    assert len(parked) == 3  # nothing lost, nothing charged, all left for the next start
    assert all(status in ("queued", "running") and cost == 0 for status, cost in parked)
    out = run(tmp_path, "run", "--console", stdin="")
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    done = re.findall(r"Job (\w+) done", out.stdout)
    assert len(done) == 3 and len(set(done)) == 3, out.stdout
    assert len(saved_paths(out.stdout)) == 4
    assert rows(tmp_path, "SELECT status, count(*) FROM jobs GROUP BY status") == [("succeeded", 3)]
    # a third start delivers nothing again
    again = run(tmp_path, "run", "--console", stdin="")
    assert again.returncode == 0 and not re.search(r"Job \w+ done", again.stdout)


def test_a_second_bot_on_the_same_data_dir_refuses_with_one_line(tmp_path: Path) -> None:
    with session(tmp_path, "run", "--console") as first:
        first.wait_for("drawbridge console")
        out = run(tmp_path, "run", "--console", stdin="/usage\n")
        assert out.returncode != 0 and "Today" not in out.stdout
        assert "another drawbridge is already running" in one_line(out.stderr)
        first.send("/usage\n")
        first.wait_for("Today: ")  # the first one is unharmed
        assert first.finish() == 0


# ---- the console chat on a terminal ----------------------------------------------------------


def _tty_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return environ(tmp_path, TERM="dumb", **extra)


def test_run_on_a_terminal_opens_the_console_and_ctrl_d_waits_for_the_last_job(
    tmp_path: Path,
) -> None:
    argv = [str(DRAWBRIDGE)] if DRAWBRIDGE.exists() else [PYTHON, "-m", "bot"]
    with terminal([*argv, "run"], _tty_env(tmp_path), tmp_path) as term:
        term.read_until(b"/quit to leave")
        term.type(b"/imagine a fox on a terminal --n 2\r")
        term.read_until(b"Queued")
        term.type(b"\x04")  # Ctrl-D: end of input, the job still finishes
        assert term.wait() == 0, term.text
    assert "Traceback" not in term.text
    paths = saved_paths(term.text)
    assert len(paths) == 2 and all(p.is_file() for p in paths), term.text


def test_ctrl_c_mid_job_exits_cleanly_and_the_job_survives(tmp_path: Path) -> None:
    env = _tty_env(tmp_path, DEMO_LATENCY="30", SHUTDOWN_GRACE="0.5")
    with terminal([PYTHON, "-m", "bot", "run", "--console"], env, tmp_path) as term:
        term.read_until(b"/quit to leave")
        term.type(b"/imagine a slow fox\r")
        term.read_until(b"Generating with demo")
        term.type(b"\x03")  # Ctrl-C
        assert term.wait() == 0, term.text
    assert "Traceback" not in term.text and "KeyboardInterrupt" not in term.text
    ((status, cost),) = rows(tmp_path, "SELECT status, cost_usd FROM jobs")
    assert status in ("queued", "running") and cost == 0  # parked for the next start
    out = run(tmp_path, "run", "--console", stdin="")
    assert out.returncode == 0 and len(saved_paths(out.stdout)) == 1, out.stdout + out.stderr
    assert rows(tmp_path, "SELECT status FROM jobs") == [("succeeded",)]


# ---- the HTTP server -------------------------------------------------------------------------


def test_http_health_metrics_and_bad_requests(tmp_path: Path) -> None:
    port = free_port()
    with session(tmp_path, "run", "--console", HTTP_PORT=str(port)) as bot:
        bot.wait_for("drawbridge console")
        status, ctype, body = http(port, "GET", "/healthz")
        health = json.loads(body)
        assert status == 200 and ctype.startswith("application/json")
        assert health["ok"] is True and health["checks"]["database"] is True

        status, ctype, body = http(port, "GET", "/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        before = samples(body.decode())
        helps = re.findall(r"^# HELP (\S+)", body.decode(), re.M)
        assert len(helps) == len(set(helps))  # each family once, though two registries render
        ok = (("model", "demo"), ("provider", "demo"), ("status", "succeeded"))
        assert before.get(("drawbridge_jobs_total", ok), 0) == 0

        bot.send("/imagine a fox for the metrics --n 2\n")
        bot.wait_for("done. Saved")
        after = samples(http(port, "GET", "/metrics")[2].decode())
        assert after[("drawbridge_jobs_total", ok)] == 1
        assert after[("drawbridge_images_total", (("model", "demo"), ("provider", "demo")))] == 2
        assert after[("drawbridge_queue_depth", ())] == 0

        for method, path, expected in [
            ("GET", "/no/such/path", 404),
            ("POST", "/healthz", 405),
            ("DELETE", "/metrics", 405),
            ("GET", "/hooks/grsai/job/secret", 405),
            ("POST", "/hooks/grsai/job/forged", 404),
        ]:
            assert http(port, method, path, b"" if method == "POST" else None)[0] == expected
        # a huge body to a webhook route is turned away, never a 500
        status, _, _ = http(port, "POST", "/hooks/grsai/job/forged", b"x" * 3_000_000)
        assert status in (404, 413)
        assert http(port, "GET", "/healthz")[0] == 200  # still well after all that
        assert bot.finish() == 0
    assert b"Traceback" not in bot.stderr


def test_healthz_stops_saying_ok_while_the_bot_drains_after_sigterm(tmp_path: Path) -> None:
    """An orchestrator or load balancer polls /healthz while `drawbridge run` shuts down.

    Seen: for the whole SHUTDOWN_GRACE after SIGTERM (intake stopped, new requests refused,
    running jobs being parked) /healthz keeps answering 200 `{"ok": true}`, indistinguishable
    from a serving bot, until the port simply closes; traffic keeps being routed to a bot that
    takes no new work. bot/http.py `_healthz` has no stopping state and
    `HttpServer.stop_intake` (bot/http.py:84) does nothing.
    """
    port = free_port()
    env = {"HTTP_PORT": str(port), "DEMO_LATENCY": "30", "SHUTDOWN_GRACE": "2"}
    with session(tmp_path, "run", "--console", **env) as bot:
        bot.wait_for("drawbridge console")
        bot.send("/imagine a slow fox\n")
        bot.wait_for("Generating with demo")
        bot.signal(signal.SIGTERM)
        answers: list[tuple[int, dict[str, Any]]] = []
        while bot.proc.poll() is None:
            try:
                status, _, body = http(port, "GET", "/healthz")
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                break  # the server has closed
            try:
                answers.append((status, json.loads(body)))
            except ValueError:
                answers.append((status, {"body": body.decode("utf-8", "replace")}))
            time.sleep(0.1)
        assert bot.proc.wait(20) == 0
    assert answers, "no /healthz answer after SIGTERM"
    last_status, last_body = answers[-1]  # seconds into the grace: the signal was handled
    assert last_status == 503 or last_body.get("ok") is False, answers[-1]


def _telegram_env(
    tmp_path: Path, tg_url: str, token: str, port: int, **extra: str
) -> dict[str, str]:
    return environ(
        tmp_path,
        TELEGRAM_BOT_TOKEN=token,
        TELEGRAM_API_URL=tg_url,
        TELEGRAM_WEBHOOK_URL="https://bot.example/tg-hook",
        TELEGRAM_WEBHOOK_SECRET="probe-webhook-secret-value",
        HTTP_PORT=str(port),
        SHUTDOWN_GRACE="1",
        **extra,
    )


async def _start_bot(env: dict[str, str], cwd: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        PYTHON, "-m", "bot", "run",
        cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def _stop_bot(proc: asyncio.subprocess.Process) -> tuple[int, str]:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    except TimeoutError:
        proc.kill()
        _, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, err.decode("utf-8", "replace")


HOOK_SECRET = {"X-Telegram-Bot-Api-Secret-Token": "probe-webhook-secret-value"}


async def test_telegram_webhook_route_wants_the_secret_and_serves_real_updates(
    tmp_path: Path,
) -> None:
    from tests.fake_telegram import FakeTelegram

    token = "7654321:AAH-probe-webhook-token-value"
    port = free_port()
    async with FakeTelegram(token=token) as tg:
        proc = await _start_bot(_telegram_env(tmp_path, tg.url, token, port), tmp_path)
        try:
            await tg.wait_for("setWebhook", within=20)
            url = f"http://127.0.0.1:{port}/tg-hook"
            update = {
                "update_id": 7,
                "message": {
                    "message_id": 5,
                    "date": 0,
                    "chat": {"id": 42, "type": "private"},
                    "from": {"id": 42, "is_bot": False, "first_name": "A"},
                    "text": "/help",
                },
            }
            async with aiohttp.ClientSession() as http_session:
                for headers, data in [
                    ({}, json.dumps(update).encode()),
                    ({"X-Telegram-Bot-Api-Secret-Token": "guess"}, json.dumps(update).encode()),
                    ({}, io.BytesIO(b"x" * 3_000_000)),  # unauthenticated and huge: unread
                ]:
                    async with http_session.post(url, data=data, headers=headers) as resp:
                        assert resp.status == 403
                async with http_session.get(url) as resp:
                    assert resp.status == 405
                async with http_session.post(url, data=b"{not json", headers=HOOK_SECRET) as resp:
                    assert resp.status == 400
                async with http_session.post(
                    url, data=io.BytesIO(b"x" * 3_000_000), headers=HOOK_SECRET
                ) as r:
                    assert r.status == 413
                assert not tg.sent("sendMessage")  # nothing above reached the chat
                async with http_session.post(url, json=update, headers=HOOK_SECRET) as resp:
                    assert resp.status == 200
                (reply,) = await tg.wait_for("sendMessage", within=10)
                assert "/imagine" in (reply.text or "")
                async with http_session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    body = await resp.json()
                    assert resp.status == 200 and body["checks"].get("TelegramAdapter") is True
        finally:
            code, logs = await _stop_bot(proc)
    assert code == 0
    assert token not in logs and "probe-webhook-secret-value" not in logs


async def test_telegram_webhook_with_a_malformed_update_is_not_a_500(tmp_path: Path) -> None:
    """Telegram (or anyone holding the secret) posts JSON that is not an Update: `{}`, `[]`.

    Seen: HTTP 500 "Server got itself in trouble" and a full traceback in the log for each
    (TypeError / AttributeError from PTB's `Update.de_json`): bot/cli.py:213 passes any JSON
    straight to `TelegramAdapter.process_webhook_update` (adapters/telegram_adapter.py:236),
    which does not catch a payload it cannot parse. Telegram retries non-2xx deliveries, so one
    bad update is retried again and again. Expected: a 4xx (or 200, dropped) and no traceback.
    """
    from tests.fake_telegram import FakeTelegram

    token = "7654321:AAH-probe-webhook-token-value"
    port = free_port()
    statuses = []
    async with FakeTelegram(token=token) as tg:
        proc = await _start_bot(_telegram_env(tmp_path, tg.url, token, port), tmp_path)
        try:
            await tg.wait_for("setWebhook", within=20)
            url = f"http://127.0.0.1:{port}/tg-hook"
            async with aiohttp.ClientSession() as http_session:
                for payload in ({}, [], "text", {"update_id": "x", "message": 5}):
                    async with http_session.post(url, json=payload, headers=HOOK_SECRET) as resp:
                        statuses.append(resp.status)
        finally:
            code, logs = await _stop_bot(proc)
    assert code == 0
    assert all(s < 500 for s in statuses), statuses
    assert "Traceback" not in logs, logs[-3000:]


def test_run_with_a_token_and_a_busy_http_port_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = run(
            tmp_path,
            "run",
            HTTP_PORT=str(port),
            TELEGRAM_BOT_TOKEN=SECRETS["TELEGRAM_BOT_TOKEN"],
            TELEGRAM_API_URL="http://127.0.0.1:9",  # never reached: the port check comes first
        )
        # the console, by contrast, still chats (the busy port is a warning in its log)
        chat = run(tmp_path, "run", "--console", stdin="/usage\n", HTTP_PORT=str(port))
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("drawbridge:")]
    assert len(errors) == 1 and "HTTP_PORT" in errors[0] and str(port) in errors[0]
    assert "Traceback" not in out.stderr
    assert SECRETS["TELEGRAM_BOT_TOKEN"] not in out.stdout + out.stderr
    assert chat.returncode == 0 and "Today: " in chat.stdout


# ---- settings --------------------------------------------------------------------------------

BAD_SETTINGS = [
    ("DRAWBRIDGE_DATA_DIR", "/proc/drawbridge-probe/data"),
    ("TELEGRAM_API_URL", "api.telegram.org"),
    ("TELEGRAM_WEBHOOK_URL", "bot.example/hook"),
    ("DISCORD_API_URL", "discord.com/api/v10"),
    ("DISCORD_GATEWAY_URL", "gateway.discord.gg"),
    ("GRSAI_BASE_URL", "grsaiapi.com"),
    ("OPENAI_BASE_URL", "localhost:9/v1"),
    ("GEMINI_BASE_URL", "ftp://example.com"),
    ("DEFAULT_MODEL", "no-such-model"),
    ("CONCURRENCY", "-1"),
    ("CONCURRENCY", "0"),
    ("CONCURRENCY", "lots"),
    ("QUEUE_MAX", "0"),
    ("QUEUE_MAX", "1.5"),
    ("MAX_PENDING_PER_USER", "-3"),
    ("QUOTA_USER_DAILY_IMAGES", "-1"),
    ("QUOTA_USER_DAILY_IMAGES", "ten"),
    ("QUOTA_USER_DAILY_USD", "-0.5"),
    ("QUOTA_USER_DAILY_USD", "$5"),
    ("BUDGET_DAILY_USD", "-1"),
    ("BUDGET_DAILY_USD", "nan"),
    ("ADMIN_IDS", "123"),
    ("ADMIN_IDS", "telegram:"),
    ("ALLOWED_IDS", "discord"),
    ("ALLOWED_IDS", ":5"),
    ("HTTP_PORT", "-1"),
    ("HTTP_PORT", "65536"),
    ("HTTP_PORT", "http"),
    ("PUBLIC_URL", "bot.example.com"),
    ("QUOTA_TZ", "Mars/Olympus_Mons"),
    ("QUOTA_TZ", "../../etc/passwd"),
]


@pytest.mark.parametrize(("name", "value"), BAD_SETTINGS, ids=[f"{n}={v}" for n, v in BAD_SETTINGS])
def test_a_bad_setting_stops_start_up_with_one_line_naming_it(
    tmp_path: Path, name: str, value: str
) -> None:
    env = {**SECRETS, "OPENAI_BASE_URL": "http://127.0.0.1:9", name: value}
    out = run(tmp_path, "generate", "a fox", "--model", "demo", "--out", "out", **env)
    assert out.returncode != 0
    line = one_line(out.stderr)
    assert line.startswith(f"drawbridge: {name}: "), line
    for secret in SECRETS.values():
        assert secret not in out.stdout + out.stderr
    assert not (tmp_path / "out").exists()  # nothing was generated


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ADMIN_IDS", "telegram:111 discord:222"),
        ("ADMIN_IDS", "telegram:111;discord:222"),
        ("ALLOWED_IDS", "telegram:111 telegram:222"),
    ],
    ids=["admin-space", "admin-semicolon", "allowed-space"],
)
def test_an_id_list_with_the_wrong_separator_stops_start_up(
    tmp_path: Path, name: str, value: str
) -> None:
    """The operator writes `ADMIN_IDS=telegram:111 discord:222` (a space, or `;`, not a comma).

    Seen: the bot starts without a word; the whole string is taken as ONE id,
    `telegram:111 discord:222`, which no user can ever have, so neither person is an admin
    (or, for ALLOWED_IDS, nobody is served) and nothing says why. `_check_ids`
    (bot/settings.py:158-164) only checks that there is a `:` with text on both sides.
    Expected: start-up stops with one line naming the setting.
    """
    out = run(tmp_path, "usage", "--json", **{name: value})
    assert out.returncode == 2, out.stdout
    assert one_line(out.stderr).startswith(f"drawbridge: {name}: ")


def test_dotenv_in_the_working_directory_is_read_and_the_environment_wins(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "# the operator's file\nQUOTA_USER_DAILY_IMAGES=7\nexport MAX_PENDING_PER_USER=5\n"
    )
    out = run(tmp_path, "run", "--console", stdin="/usage\n")
    assert "Today: 0 of 7 images" in out.stdout, out.stdout + out.stderr
    out = run(tmp_path, "run", "--console", stdin="/usage\n", QUOTA_USER_DAILY_IMAGES="9")
    assert "Today: 0 of 9 images" in out.stdout, out.stdout + out.stderr
    # a .env elsewhere (here: the parent of the working directory) is not read
    sub = tmp_path / "elsewhere"
    sub.mkdir()
    out = run(sub, "run", "--console", stdin="/usage\n", DRAWBRIDGE_DATA_DIR=str(tmp_path / "d2"))
    assert "Today: 0 of 20 images" in out.stdout, out.stdout + out.stderr


def test_a_bad_value_in_dotenv_is_one_line_and_its_secrets_stay_hidden(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "".join(f"{k}={v}\n" for k, v in SECRETS.items()) + "QUOTA_TZ=Atlantis/Capital\n"
    )
    out = run(tmp_path, "usage")
    assert out.returncode == 2
    assert one_line(out.stderr) == "drawbridge: QUOTA_TZ: unknown time zone 'Atlantis/Capital'"
    for secret in SECRETS.values():
        assert secret not in out.stdout + out.stderr
    (tmp_path / ".env").write_bytes(b"QUOTA_TZ=\xff\xfe\n")  # not UTF-8
    out = run(tmp_path, "usage")
    assert out.returncode == 2 and ".env" in one_line(out.stderr)


# ---- drawbridge generate ---------------------------------------------------------------------


def test_generate_without_prompts_says_how_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "comments.txt").write_text("# nothing\n\n   \n# here\n")
    for args in ([], ["--file", "empty.txt"], ["--file", "comments.txt"], [""]):
        out = run(tmp_path, "generate", *args)
        assert out.returncode == 2, (args, out.stderr)
        assert "give a prompt or --file" in one_line(out.stderr)
    assert not (tmp_path / "out").exists()


def test_generate_with_a_missing_file_is_one_line_naming_it(tmp_path: Path) -> None:
    out = run(tmp_path, "generate", "--file", "no-such-prompts.txt")
    assert out.returncode != 0
    assert "no-such-prompts.txt" in one_line(out.stderr)


def test_generate_unknown_model_and_bad_counts(tmp_path: Path) -> None:
    out = run(tmp_path, "generate", "a fox", "--model", "nosuch", "--out", "out")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "There is no model called nosuch" in out.stderr
    assert "0 image(s), 1 failure(s)" in out.stdout
    for n in ("0", "99"):
        out = run(tmp_path, "generate", "a fox", "--n", n, "--out", "out")
        assert out.returncode == 2
        assert "--n takes a number from 1 to 10" in one_line(out.stderr)
    out = run(tmp_path, "generate", "a fox", "--n", "two")
    assert out.returncode == 2 and "--n" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists()


def test_generate_then_usage_json_csv_and_table_agree(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("a cat --n 2\n# skip\n\na dog --ar 16:9\n")
    out = run(tmp_path, "generate", "--file", "p.txt", "--out", "out")
    assert out.returncode == 0, out.stderr
    assert "3 image(s), 0 failure(s)" in out.stdout
    names = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert names == ["001-a-cat-1.png", "001-a-cat-2.png", "004-a-dog.png"]
    usage = json.loads(run(tmp_path, "usage", "--json").stdout)
    assert [(r["model"], r["jobs"], r["images"]) for r in usage] == [("demo", 2, 3)]
    csv = run(tmp_path, "usage", "--csv").stdout.splitlines()
    assert csv[0].startswith("day,") and len(csv) == 2
    table = run(tmp_path, "usage")
    assert table.returncode == 0 and "total" in table.stdout


def test_generate_a_prompt_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    """An operator's prompts.txt saved as Latin-1 (`café` as the byte 0xE9).

    Seen: a 30-line Python traceback ending in UnicodeDecodeError, not one line naming the
    file. `read_prompts` (bot/batch.py:37) reads it with `read_text(encoding="utf-8-sig")`,
    and `main` (bot/cli.py:98-110) catches only DrawbridgeError, OSError and sqlite3.Error.
    """
    (tmp_path / "prompts.txt").write_bytes(b"a caf\xe9 at dawn\na fox\n")
    out = run(tmp_path, "generate", "--file", "prompts.txt", "--out", "out")
    assert out.returncode != 0
    assert "prompts.txt" in one_line(out.stderr)


def test_generate_a_prompt_argument_with_undecodable_bytes_is_answered(tmp_path: Path) -> None:
    """`drawbridge generate "café"` typed in a Latin-1 terminal: the argument has byte 0xE9.

    Seen: a Python traceback ending in "UnicodeEncodeError: 'utf-8' codec can't encode
    character '\\udce9' … surrogates not allowed", raised by the database writer
    (bot/dbwriter.py:176) inserting the job row: the prompt checks (bot/commands.py
    parse_prompt / clean_prompt) let lone surrogates through into `engine.submit`.
    Expected: the line is answered like any other bad prompt, no traceback.
    """
    out = run(tmp_path, "generate", "a caf\udce9 at dawn", "--out", "out")
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.returncode in (0, 1)
    assert "image(s)" in out.stdout  # the summary still comes


def test_generate_into_an_out_path_that_is_a_file_gives_a_cli_answer(tmp_path: Path) -> None:
    """`drawbridge generate "a fox" --out results` where `results` is an existing file.

    Seen: the image is generated first, three "delivery attempt failed" warnings follow, and
    the user is told "Job … is done, but I could not post the picture here. Send /show … to
    get it." — a chat command the CLI has no way to send (and the job belongs to the `cli`
    user, not the console's). BatchAdapter.deliver (adapters/batch_adapter.py:38) creates the
    folder only when a result arrives; bot/batch.py never checks --out before it starts.
    """
    (tmp_path / "results").write_text("I am a file")
    out = run(tmp_path, "generate", "a fox", "--out", "results")
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert "/show" not in out.stderr, out.stderr
    assert "results" in out.stderr


async def test_generate_to_an_out_that_cannot_take_files_pays_for_nothing(
    tmp_path: Path,
) -> None:
    """A paid model, and an --out that cannot be written (an existing file of that name).

    Seen: GrsAI was paid and the job row `succeeded` at $0.04, while the summary said
    "0 image(s), 1 failure(s), cost $0.0000" (BatchAdapter only added a job's cost once its
    copy to --out succeeded). --out is now checked before any job: one line, nothing paid;
    the summary's cost is what the ledger charged (for a copy that fails mid-run).
    """
    from tests.fake_grsai import FakeGrsai

    (tmp_path / "results").write_text("I am a file")
    async with FakeGrsai(api_key="sk-probe-grsai") as fake:
        env = environ(tmp_path, GRSAI_API_KEY="sk-probe-grsai", GRSAI_BASE_URL=fake.base_url)
        proc = await asyncio.create_subprocess_exec(
            PYTHON, "-m", "bot", "generate", "a fox", "--model", "nano-banana",
            "--out", "results",
            cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), 50)
        assert proc.returncode == 2
        assert one_line(err.decode()) == "drawbridge generate: --out results: not a directory"
        assert fake.requests == []
    if (tmp_path / "data" / "drawbridge.db").exists():  # no job was even made
        assert rows(tmp_path, "SELECT count(*) FROM jobs") == [(0,)]


# ---- drawbridge usage ------------------------------------------------------------------------


def test_usage_on_a_missing_or_empty_database(tmp_path: Path) -> None:
    out = run(tmp_path, "usage", "--json")
    assert out.returncode == 0 and json.loads(out.stdout) == []
    fresh = tmp_path / "fresh"
    (fresh / "data").mkdir(parents=True)
    (fresh / "data" / "drawbridge.db").write_bytes(b"")  # a zero-byte file
    out = run(fresh, "usage", "--json")
    assert out.returncode == 0 and json.loads(out.stdout) == []
    out = run(fresh, "usage")
    assert out.returncode == 0 and "total" in out.stdout and "$0.0000" in out.stdout
    out = run(fresh, "usage", "--csv")
    assert out.stdout.splitlines() == ["day,platform,user_id,model,jobs,succeeded,images,cost_usd"]


def test_usage_on_a_file_that_is_not_a_database_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "drawbridge.db").write_bytes(b"definitely not sqlite " * 100)
    out = run(tmp_path, "usage", "--json")
    assert out.returncode != 0 and out.stdout == ""
    assert "DRAWBRIDGE_DATA_DIR" in one_line(out.stderr)


def test_usage_on_a_database_from_a_newer_release_is_one_line(tmp_path: Path) -> None:
    """An operator rolls back to an older release after a newer one migrated the database.

    Seen: a Python traceback ending in "RuntimeError: database schema version 99 is newer than
    this release (6)". The message is right, but it is raised as a bare RuntimeError
    (bot/migrations.py:180) that `main` (bot/cli.py:98-110) does not catch, so every command
    (`usage`, `generate`, `run`) dies with a traceback instead of one line.
    """
    asyncio.run(new_database(tmp_path / "data"))  # a current database
    with contextlib.closing(sqlite3.connect(tmp_path / "data" / "drawbridge.db")) as db:
        db.execute("PRAGMA user_version = 99")
        db.commit()
    out = run(tmp_path, "usage", "--json")
    assert out.returncode != 0
    assert "newer than this release" in one_line(out.stderr)


def test_usage_days_far_in_the_past_is_not_a_traceback(tmp_path: Path) -> None:
    """`drawbridge usage --days 1000000` ("everything, I don't care how far back").

    Seen: a traceback ending in "OverflowError: date value out of range". `--days` accepts any
    positive integer (`_positive_int`, bot/cli.py:70) and `days_before` (bot/quota.py:40)
    subtracts it from today without bounds. Expected: every day, or one line saying the limit.
    """
    out = run(tmp_path, "usage", "--json", "--days", "1000000")
    assert "Traceback" not in out.stderr, out.stderr[-1500:]
    if out.returncode == 0:
        assert json.loads(out.stdout) == []
    else:
        assert "--days" in one_line(out.stderr)


# ---- the program itself ----------------------------------------------------------------------


def test_python_m_bot_and_the_drawbridge_script_are_the_same_program(tmp_path: Path) -> None:
    via_module = run(tmp_path, "--version")
    assert via_module.returncode == 0 and via_module.stdout.startswith("drawbridge ")
    if DRAWBRIDGE.exists():
        via_script = subprocess.run(
            [str(DRAWBRIDGE), "--version"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=environ(tmp_path),
            timeout=20,
        )
        assert via_script.stdout == via_module.stdout
    out = run(tmp_path, "frobnicate")
    assert out.returncode == 2 and "invalid choice" in out.stderr and "Traceback" not in out.stderr
    out = run(tmp_path, "run")  # no token, not a terminal: says what to do
    assert out.returncode == 2 and "TELEGRAM_BOT_TOKEN" in one_line(out.stderr)
