"""Lifecycle probes of the real process: `python -m bot run` starting, riding out, and stopping.

Each probe starts the real program (`tests.test_blackbox.drawbridge`) against the project's
loopback fakes, sometimes behind a TCP hop that can refuse connections (an outage) or a fake that
hangs or answers errors, and looks only at what an operator sees: the exit code, the lines on
stderr, the chats and the jobs table. What the operator may expect (README, DESIGN.md): start-up
stops with one clear line or serves; an outage of a platform is ridden out and nothing is lost or
sent twice; SIGTERM stops intake, gives running jobs `SHUTDOWN_GRACE` seconds and parks the rest
for the next start, which finishes each job once. A probe that fails names a defect.

Covered elsewhere, not repeated here: a busy HTTP port and a read-only or unusable data dir
(`test_outside_probes`, `test_cli_checks`), a second bot on one data dir, SIGTERM and Ctrl-C in
the console, kill -9 then restart on Discord (`test_reliability`), gateway closes 4000/4008/4009
and op 7 on the adapter (`test_discord_resilience`).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.fake_discord import USER, FakeDiscord, HTTPError
from tests.fake_telegram import FakeTelegram
from tests.test_blackbox import Process, drawbridge, free_port, rows
from tests.test_outside_probes import environ, one_line

TG_TOKEN = "7000002:AAH-lifecycle-probe-telegram-secret"
DC_TOKEN = "MTIzNDU2.lifecycle-probe-discord-secret"
# How long, past SHUTDOWN_GRACE, a stop may take (closing connections, a last poll).
STOP_MARGIN = 5.0


# ---- the rig ---------------------------------------------------------------------------------


class Outage:
    """A TCP hop in front of a fake server: `down()` refuses new connections and cuts the open
    ones (the host is unreachable); `up()` listens again on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def up(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> Outage:
        await self.up()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.down()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, RuntimeError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self._writers -= {writer, up_writer}


class HangingTelegram(FakeTelegram):
    """The fake Bot API, whose calls of the methods in `hang` are taken and never answered."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.hang: set[str] = set()
        self.hung: list[str] = []

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        if "*" in self.hang or method in self.hang:
            self.hung.append(method)
            await asyncio.Event().wait()  # until the server closes
        return await super()._api(request)


class SlowUploads(FakeTelegram):
    """The fake Bot API, which takes a photo at once but answers its upload `delay` s later
    (Telegram processing a large photo before it answers)."""

    delay = 3.0

    async def _api(self, request: web.Request) -> web.Response:
        response = await super()._api(request)
        if request.match_info["method"] == "sendPhoto":
            for value in (await request.post()).values():  # read already; the bot may go
                if isinstance(value, web.FileField):
                    value.file.close()
            await asyncio.sleep(self.delay)
        return response


class RefusingGateway(FakeDiscord):
    """Discord whose REST takes the token but whose gateway refuses it (close 4004)."""

    async def _identify(self, ws: web.WebSocketResponse, data: dict[str, Any]) -> None:
        self.identify = data
        await ws.close(code=4004, message=b"Authentication failed.")


class DownDiscord(FakeDiscord):
    """Discord whose API is down: 503 to every REST call."""

    async def _route(self, request: web.Request, path: str, call: Any) -> tuple[int, Any]:
        raise HTTPError(503, 0, "Service Unavailable")


class CuttableGateway(FakeDiscord):
    """Discord whose gateway connections can be cut without a close frame (the bot sees 1006)."""

    def __init__(self) -> None:
        super().__init__(token=DC_TOKEN)
        self.connections = 0
        self._transports: list[asyncio.BaseTransport] = []

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        self.connections += 1
        if request.transport is not None:
            self._transports.append(request.transport)
        return await super()._gateway(request)

    def cut(self) -> None:
        for transport in self._transports:
            transport.abort()
        self._transports.clear()


async def wait_until(what: str, check: Callable[[], bool], within: float, proc: Process) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"never {what} (within {within}s); log:\n{tail(proc)}")
        if proc.proc.returncode is not None:
            raise AssertionError(
                f"the bot exited ({proc.proc.returncode}) before {what}; log:\n{tail(proc)}"
            )
        await asyncio.sleep(0.05)


def tail(proc: Process, chars: int = 4000) -> str:
    return proc.stderr.decode("utf-8", "replace")[-chars:]


async def ends_within(proc: Process, within: float) -> int | None:
    """The exit code, or None if the process is still running after `within` seconds."""
    try:
        code = await asyncio.wait_for(proc.proc.wait(), within)
    except TimeoutError:
        return None
    await asyncio.wait_for(proc._reader, 5)
    return code


def errors_of(stderr: str) -> list[str]:
    """The program's own error lines (`drawbridge: …`), not its log lines."""
    return [line for line in stderr.splitlines() if line.startswith("drawbridge:")]


def tracebacks(stderr: str) -> int:
    return stderr.count("Traceback (most recent call last)")


def telegram_env(url: str, **extra: str) -> dict[str, str]:
    return dict(
        TELEGRAM_BOT_TOKEN=TG_TOKEN,
        TELEGRAM_API_URL=url,
        QUOTA_USER_DAILY_IMAGES="0",
        **extra,
    )


def photos_by_chat(tg: FakeTelegram) -> dict[int, int]:
    found: dict[int, int] = {}
    for call in tg.sent("sendPhoto"):
        chat = int(call.chat_id or 0)
        found[chat] = found.get(chat, 0) + 1
    return found


def fresh_dir(path: Path) -> Path:
    path.mkdir(exist_ok=True)
    return path


def closed_port() -> str:
    return f"http://127.0.0.1:{free_port()}"  # bound a moment ago, closed now: refused


# ---- start-up --------------------------------------------------------------------------------


async def start_and_end(data: Path, within: float, **env: str) -> tuple[int | None, str]:
    """Start the bot; its exit code once it ends (None: still running `within` s later), and
    its stderr."""
    async with drawbridge(fresh_dir(data), **env) as proc:
        code = await ends_within(proc, within)
        return code, proc.stderr.decode("utf-8", "replace")


async def test_start_up_against_a_bot_api_that_is_down_errs_or_hangs_is_one_line_and_exits(
    tmp_path: Path,
) -> None:
    """getMe refused (nothing listens), answered 500 or 502, answered 401 (a revoked token),
    or taken and never answered: each stops start-up within a bounded time, non-zero, with one
    `drawbridge:` line naming the Telegram setting, no traceback, no token."""
    fakes = [HangingTelegram(token=TG_TOKEN) for _ in range(4)]
    for fake in fakes:
        await fake.start()
    try:
        fakes[0].fail("getMe", 500, "Internal Server Error")
        fakes[1].fail("getMe", 502, "Bad Gateway")
        fakes[2].fail("getMe", 401, "Unauthorized")
        fakes[3].hang.add("getMe")
        cases = [
            ("refused", closed_port(), "TELEGRAM_API_URL"),
            ("500", fakes[0].url, "TELEGRAM_"),
            ("502", fakes[1].url, "TELEGRAM_"),
            ("401", fakes[2].url, "TELEGRAM_BOT_TOKEN"),
            ("hang", fakes[3].url, "TELEGRAM_API_URL"),
        ]
        ends = await asyncio.gather(
            *(start_and_end(tmp_path / name, 30, **telegram_env(url)) for name, url, _ in cases)
        )
    finally:
        for fake in fakes:
            await fake.close()
    failures = []
    for (name, _, setting), (code, err) in zip(cases, ends, strict=True):
        lines = errors_of(err)
        if code is None:
            failures.append(f"{name}: still running 30 s after start; log:\n{err[-1500:]}")
        elif code == 0 or len(lines) != 1 or tracebacks(err) or TG_TOKEN in err:
            failures.append(f"{name}: exit {code}, error lines {lines}; log:\n{err[-1500:]}")
        elif not lines[0].startswith(f"drawbridge: {setting}"):
            failures.append(f"{name}: the line does not name {setting}: {lines[0]!r}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("case", ["rest-401", "rest-503", "rest-unreachable", "gateway-4004"])
async def test_start_up_when_discord_refuses_or_is_unreachable_is_one_line_and_exits(
    tmp_path: Path, case: str
) -> None:
    """Discord-only bot. A token refused by REST (401), Discord's API down (503 to the login),
    a REST base nothing listens on, or a token the gateway refuses (close 4004 "Authentication
    failed", which discord.py never retries): the bot cannot serve anyone, so start-up must
    stop, non-zero, with one line naming Discord, no traceback, no token.

    Seen: 401 is right ("DISCORD_BOT_TOKEN: Discord rejected the token"). 503: a traceback
    ending in `discord.errors.DiscordServerError`, no `drawbridge:` line. Unreachable:
    "drawbridge: Cannot connect to host 127.0.0.1:…", which does not say it is Discord. 4004:
    not one line logged, and the process runs on ("drawbridge running") serving nobody.
    """
    fake = {
        "rest-401": FakeDiscord(token="another-token"),
        "rest-503": DownDiscord(token=DC_TOKEN),
        "rest-unreachable": FakeDiscord(token=DC_TOKEN),
        "gateway-4004": RefusingGateway(token=DC_TOKEN),
    }[case]
    await fake.start()
    try:
        api = closed_port() + "/api/v10" if case == "rest-unreachable" else fake.api_url
        env = dict(
            DISCORD_BOT_TOKEN=DC_TOKEN, DISCORD_API_URL=api, DISCORD_GATEWAY_URL=fake.gateway_url
        )
        async with drawbridge(tmp_path, **env) as proc:
            code = await ends_within(proc, 8)
            err = proc.stderr.decode("utf-8", "replace")
    finally:
        await fake.close()
    assert code is not None, (
        f"{case}: the bot still runs 8 s after start though Discord refused it, serving "
        f"nobody; its log:\n{err[-2000:]}"
    )
    lines = errors_of(err)
    assert code != 0 and len(lines) == 1, f"{case}: exit {code}, lines {lines}:\n{err[-2000:]}"
    assert "DISCORD" in lines[0], f"{case}: the line does not say it is Discord: {lines[0]!r}"
    assert tracebacks(err) == 0 and DC_TOKEN not in err, err[-2000:]


def test_a_default_model_whose_provider_has_no_key_stops_start_up(tmp_path: Path) -> None:
    """DEFAULT_MODEL=nano-banana with no GRSAI_API_KEY (nor GEMINI_API_KEY, its fallback).

    Seen: the bot starts ("model nano-banana") and every request without `--model` is answered
    "The model nano-banana is not available on this bot": a bot that serves nobody by default.
    Expected: start-up stops with one line naming DEFAULT_MODEL (and the key it needs)."""
    out = subprocess.run(
        [sys.executable, "-m", "bot", "run", "--console"],
        input=b"/imagine a fox\n",
        capture_output=True,
        cwd=tmp_path,
        env=environ(tmp_path, DEFAULT_MODEL="nano-banana"),
        timeout=30,
    )
    stdout, stderr = out.stdout.decode(), out.stderr.decode()
    assert out.returncode != 0, (
        f"started with a default model it cannot serve (exit {out.returncode}); it said:\n{stdout}"
    )
    assert one_line(stderr).startswith("drawbridge: DEFAULT_MODEL: "), stderr


# ---- running ---------------------------------------------------------------------------------


async def test_a_bot_api_outage_mid_run_is_ridden_out_and_nothing_is_lost_or_sent_twice(
    tmp_path: Path,
) -> None:
    """Three jobs are generating when the Bot API becomes unreachable for 10 s (connections
    refused and cut; the jobs finish meanwhile), and a fourth user writes during the outage.
    After it: every job's photo arrives exactly once, the fourth user is served, and the
    process never exited. (A result is the job's whole point: it waits for the platform to come
    back, as a queued job does, rather than being given up after a few seconds.)

    Seen: the three results are never posted: after 3 delivery attempts ~3 s apart each job
    is `succeeded` with `delivered_at` NULL and `delivery_attempts` 3, which a restart does not
    retry either; only the user who wrote during the outage gets a photo."""
    async with (
        FakeTelegram(token=TG_TOKEN, overall_limit=None, group_limit=None) as tg,
        Outage(int(tg.url.rsplit(":", 1)[1])) as hop,
    ):
        env = telegram_env(hop.url, DEMO_LATENCY="4", SHUTDOWN_GRACE="1")
        async with drawbridge(tmp_path, **env) as proc:
            await tg.wait_for("setMyCommands", within=20)
            for user in (801, 802, 803):
                tg.message(f"/imagine an outage fox {user}", user=tg.user(user))
            await tg.wait_for(lambda c: "Queued" in (c.text or ""), count=3, within=10)
            await hop.down()
            assert not photos_by_chat(tg), "the jobs ended before the outage: nothing probed"
            await asyncio.sleep(1)
            tg.message("/imagine a fox written during the outage", user=tg.user(804))
            await asyncio.sleep(9)
            await hop.up()
            try:
                await wait_until(
                    "every photo delivered after the outage",
                    lambda: set(photos_by_chat(tg)) >= {801, 802, 803, 804},
                    within=12,
                    proc=proc,
                )
            except AssertionError:
                state = rows(tmp_path, "SELECT status, delivered_at, delivery_attempts FROM jobs")
                raise AssertionError(
                    f"results lost to a 10 s outage: photos per chat {photos_by_chat(tg)}, "
                    f"jobs (status, delivered_at, delivery_attempts) {state}; log:\n{tail(proc)}"
                ) from None
            assert await proc.stop() == 0, tail(proc)
    assert all(n == 1 for n in photos_by_chat(tg).values()), photos_by_chat(tg)


async def test_a_409_conflict_on_getupdates_is_one_clear_line_and_serving_resumes(
    tmp_path: Path,
) -> None:
    """Another instance polls the same token: Telegram answers getUpdates 409 Conflict. The
    operator must read what is wrong in plain words (no traceback per poll); once the other
    instance is gone the bot serves again, on its own.

    Seen: it does serve again, but each 409 is PTB's "Exception happened while polling for
    updates." and a full traceback, and no line says another instance holds the token (an
    unreachable Bot API logs the same, a traceback per failed poll)."""
    conflict = "Conflict: terminated by other getUpdates request; make sure that only one bot instance is running"
    async with FakeTelegram(token=TG_TOKEN) as tg:
        tg.fail("getUpdates", 409, conflict, times=3)  # the other instance, from the start
        async with drawbridge(tmp_path, **telegram_env(tg.url, SHUTDOWN_GRACE="1")) as proc:
            tg.message("/imagine a fox during the conflict", user=tg.user(901))
            await wait_until("the conflict was over", lambda: not tg.failures, 30, proc)
            await wait_until(
                "the user was served after the conflict",
                lambda: 901 in photos_by_chat(tg),
                within=20,
                proc=proc,
            )
            assert await proc.stop() == 0
            log = proc.stderr.decode("utf-8", "replace")
    said = [
        line
        for line in log.splitlines()
        if re.search(r"conflict|409|another|other instance", line, re.I)
        and not line.startswith((" ", "telegram.error"))
    ]
    assert said and tracebacks(log) == 0, (
        f"3 conflicts gave {tracebacks(log)} tracebacks and these plain lines: {said}; "
        f"expected one clear warning (another instance polls this token). Log:\n{log[-3000:]}"
    )


async def test_a_gateway_cut_without_a_close_frame_reconnects_and_loses_no_job(
    tmp_path: Path,
) -> None:
    """The gateway's TCP connection dies mid-job (close code 1006, no close frame). The bot
    reconnects on its own; the job running through it and a command sent after it are each
    answered with one image."""
    fake = CuttableGateway()
    await fake.start()
    try:
        env = dict(
            DISCORD_BOT_TOKEN=DC_TOKEN,
            DISCORD_API_URL=fake.api_url,
            DISCORD_GATEWAY_URL=fake.gateway_url,
            DEMO_LATENCY="2",
            QUOTA_USER_DAILY_IMAGES="0",
        )
        async with drawbridge(tmp_path, **env) as proc:
            await fake.wait_identified(within=20)
            first = await fake.slash("imagine", {"prompt": "a fox through a cut"})
            await fake.wait_for(lambda: first.ack_delay is not None, within=10)
            fake.cut()
            await wait_until("reconnected", lambda: fake.connections >= 2, 20, proc)
            await fake.wait_for(lambda: fake._sockets and 6 in fake.gateway_ops, within=10)
            bob = {**USER, "id": "1400000000000000002", "username": "bob"}
            second = await fake.slash("imagine", {"prompt": "a fox after the cut"}, user=bob)
            for inter in (first, second):
                await fake.wait_for(lambda i=inter: fake.followups(i.token), within=20)
            assert await proc.stop() == 0, tail(proc)
    finally:
        await fake.close()
    assert [len(fake.followups(i.token)) for i in (first, second)] == [1, 1]
    assert rows(tmp_path, "SELECT status, count(*) FROM jobs GROUP BY status") == [("succeeded", 2)]


# ---- stopping --------------------------------------------------------------------------------


async def test_sigterm_in_a_burst_exits_0_and_a_restart_answers_every_message_once(
    tmp_path: Path,
) -> None:
    """Twenty users send a prompt at once; SIGTERM lands while the acks go out. The bot exits 0
    within SHUTDOWN_GRACE and a margin; a restart on the same data dir (the same Bot API) ends
    with one photo in each of the twenty chats and twenty succeeded jobs: no message lost (an
    update taken but not handled) and none served twice (an update Telegram sends again)."""
    users = list(range(1100, 1120))
    async with FakeTelegram(token=TG_TOKEN, overall_limit=None, group_limit=None) as tg:
        env = telegram_env(tg.url, DEMO_LATENCY="1", CONCURRENCY="4", SHUTDOWN_GRACE="3")
        async with drawbridge(tmp_path, **env) as first:
            await tg.wait_for("setMyCommands", within=20)
            for user in users:
                tg.message(f"/imagine burst fox {user}", user=tg.user(user))
            await tg.wait_for(lambda c: "Queued" in (c.text or ""), within=10)
            first.proc.send_signal(signal.SIGTERM)
            code = await ends_within(first, 3 + STOP_MARGIN)
            assert code == 0, f"exit {code} after SIGTERM; log:\n{tail(first)}"
            assert tracebacks(first.stderr.decode()) == 0, tail(first)
        ((left,),) = rows(tmp_path, "SELECT count(*) FROM jobs WHERE delivered_at IS NULL")
        assert left, "the first run finished everything: nothing left to probe the restart with"
        async with drawbridge(tmp_path, **env) as second:
            try:
                await wait_until(
                    "every chat had its photo",
                    lambda: set(photos_by_chat(tg)) >= set(users),
                    within=30,
                    proc=second,
                )
            except AssertionError:
                missing = sorted(set(users) - set(photos_by_chat(tg)))
                jobs = rows(tmp_path, "SELECT chat_id, status FROM jobs")
                raise AssertionError(
                    f"no photo in chats {missing} after the restart; jobs {jobs}"
                ) from None
            await asyncio.sleep(1)  # anything sent twice would be out by now
            assert await second.stop() == 0
    twice = {chat: n for chat, n in photos_by_chat(tg).items() if n != 1}
    assert not twice, f"chats with more than one photo: {twice}"
    assert rows(tmp_path, "SELECT status, count(*) FROM jobs GROUP BY status") == [
        ("succeeded", 20)
    ]


async def test_sigterm_while_a_result_upload_is_in_flight_never_posts_it_twice(
    tmp_path: Path,
) -> None:
    """SIGTERM while a result's photo is on its way: Telegram has taken it and answers 3 s
    later. SHUTDOWN_GRACE (1 s) ends before the answer. The photo is in the chat, so the
    restart must not post it again (DESIGN rule 1: "a restart never posts the same image
    twice"); a graceful stop is no crash.

    Seen: the grace cancels the delivery mid-call, `delivered_at` stays NULL, and the restart
    posts the same photo a second time."""
    async with SlowUploads(token=TG_TOKEN) as tg:
        env = telegram_env(tg.url, DEMO_LATENCY="0.5", SHUTDOWN_GRACE="1")
        async with drawbridge(tmp_path, **env) as first:
            await tg.wait_for("setMyCommands", within=20)
            tg.message("/imagine a fox on a slow upload", user=tg.user(1250))
            await tg.wait_for("sendPhoto", within=10)  # taken; its answer comes 3 s later
            first.proc.send_signal(signal.SIGTERM)
            code = await ends_within(first, 1 + STOP_MARGIN)
            assert code == 0, f"exit {code} after SIGTERM; log:\n{tail(first)}"
        ((job, delivered, ref),) = rows(tmp_path, "SELECT id, delivered_at, delivery_ref FROM jobs")
        async with drawbridge(tmp_path, **env) as second:
            await tg.wait_for("setMyCommands", count=2, within=20)
            await asyncio.sleep(2)  # a second post of the result would be out by now
            assert await second.stop() == 0
    photos = [c for c in tg.sent("sendPhoto") if job in (c.params.get("caption") or "")]
    assert len(photos) == 1, (
        f"job {job}'s photo was posted {len(photos)} times: the grace cancelled its upload "
        f"after Telegram had taken it (delivered_at={delivered}, delivery_ref={ref}), and the "
        f"restart posted it again"
    )


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM twice"])
async def test_sigint_or_a_second_sigterm_stops_cleanly_and_parks_the_job(
    tmp_path: Path, how: str
) -> None:
    """Ctrl-C on a foreground `drawbridge run`, or an impatient second SIGTERM: the bot stops
    within SHUTDOWN_GRACE and a margin, exit 0 (130 for SIGINT would do), no traceback; the
    running job is parked uncharged for the next start."""
    async with FakeTelegram(token=TG_TOKEN) as tg:
        env = telegram_env(tg.url, DEMO_LATENCY="30", SHUTDOWN_GRACE="1")
        async with drawbridge(tmp_path, **env) as proc:
            await tg.wait_for("setMyCommands", within=20)
            tg.message("/imagine a slow fox", user=tg.user(1201))
            await tg.wait_for(lambda c: "Queued" in (c.text or ""), within=10)
            await asyncio.sleep(0.3)
            if how == "SIGINT":
                proc.proc.send_signal(signal.SIGINT)
            else:
                proc.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                proc.proc.send_signal(signal.SIGTERM)
            code = await ends_within(proc, 1 + STOP_MARGIN)
            log = proc.stderr.decode("utf-8", "replace")
    assert code is not None, f"{how}: still running {1 + STOP_MARGIN}s later:\n{log[-2000:]}"
    assert code in ((0, 130) if how == "SIGINT" else (0,)), f"{how}: exit {code}:\n{log[-2000:]}"
    assert tracebacks(log) == 0 and "KeyboardInterrupt" not in log, log[-3000:]
    ((status, cost),) = rows(tmp_path, "SELECT status, cost_usd FROM jobs")
    assert status in ("queued", "running") and cost == 0


async def test_sigterm_while_the_bot_api_hangs_ends_within_the_grace(tmp_path: Path) -> None:
    """Jobs are running when the Bot API starts taking calls and never answering (a stuck
    proxy, a hung self-hosted server); then SIGTERM. The stop must end within SHUTDOWN_GRACE
    and a small margin, exit 0, and leave every job for the next start; not hang on the dead
    connection.

    Seen: ~9 s with SHUTDOWN_GRACE=2: PTB's last getUpdates (to confirm the offset) waits out
    its 5 s read timeout, with an ERROR and a traceback, before the engine's grace even starts.
    """
    grace = 2.0
    async with HangingTelegram(token=TG_TOKEN, overall_limit=None, group_limit=None) as tg:
        env = telegram_env(tg.url, DEMO_LATENCY="1.5", SHUTDOWN_GRACE=str(grace))
        async with drawbridge(tmp_path, **env) as proc:
            await tg.wait_for("setMyCommands", within=20)
            for user in (1301, 1302):
                tg.message(f"/imagine a fox before the hang {user}", user=tg.user(user))
            await tg.wait_for(lambda c: "Queued" in (c.text or ""), count=2, within=10)
            tg.hang.add("*")
            await wait_until("a result's upload hung", lambda: "sendPhoto" in tg.hung, 10, proc)
            started = time.monotonic()
            proc.proc.send_signal(signal.SIGTERM)
            code = await ends_within(proc, 30)
            took = time.monotonic() - started
            log = proc.stderr.decode("utf-8", "replace")
    assert code is not None, f"still running 30 s after SIGTERM:\n{log[-3000:]}"
    assert took <= grace + STOP_MARGIN, (
        f"the stop took {took:.1f}s with SHUTDOWN_GRACE={grace:g} while the Bot API hung; "
        f"log:\n{log[-3000:]}"
    )
    assert code == 0, f"exit {code}:\n{log[-3000:]}"
    jobs = rows(tmp_path, "SELECT status, delivered_at FROM jobs")
    assert len(jobs) == 2 and all(delivered is None for _, delivered in jobs), jobs
