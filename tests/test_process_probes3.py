"""Probes of the real process with both platforms at once: `python -m bot run` serving Telegram
and Discord from one engine, against the loopback fakes (and GrsAI's, where money is involved).

Each probe looks at what a user or the operator sees: the chats on both fakes, /healthz and
/metrics, the exit code, the `drawbridge:` line, the log, the jobs table. What they may expect
(README, DESIGN.md): one platform's trouble is ridden out and reported without costing the other
platform its users; a stop (SIGTERM, and the signals a terminal sends) finishes or parks every
job of both platforms, and the next start ends each job once, on the platform it came from; a
start-up that cannot go on says why in one line and ends; nothing is paid for that no one can be
given. A probe marked xfail names a defect; its reason says what is wrong.

Not repeated here (covered for one platform at a time in `test_lifecycle_probes`,
`test_outside_probes`, `test_reliability`, `test_crash_points`): start-up against an unreachable
or refusing platform, a busy HTTP port, a Bot API outage mid-run, SIGINT and a second SIGTERM,
kill -9 then restart.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

from tests.fake_discord import USER, FakeDiscord
from tests.fake_grsai import FakeGrsai
from tests.fake_telegram import FakeTelegram
from tests.test_blackbox import Process, drawbridge, free_port, rows
from tests.test_lifecycle_probes import (
    DC_TOKEN,
    TG_TOKEN,
    DownDiscord,
    HangingTelegram,
    Outage,
    ends_within,
    errors_of,
    photos_by_chat,
    tail,
    tracebacks,
    wait_until,
)
from tests.test_outside_probes import samples

T = TypeVar("T")
HOOK_SECRET = "process-probe-webhook-secret"
BOB = {**USER, "id": "1400000000000000002", "username": "bob"}
CAROL = {**USER, "id": "1400000000000000003", "username": "carol"}


# ---- the rig ---------------------------------------------------------------------------------


def both_env(tg_url: str, dc: FakeDiscord, gateway_url: str | None = None, **extra: str) -> dict:
    """Settings for a bot that serves Telegram and Discord at once."""
    return dict(
        TELEGRAM_BOT_TOKEN=TG_TOKEN,
        TELEGRAM_API_URL=tg_url,
        DISCORD_BOT_TOKEN=DC_TOKEN,
        DISCORD_API_URL=dc.api_url,
        DISCORD_GATEWAY_URL=gateway_url or dc.gateway_url,
        QUOTA_USER_DAILY_IMAGES="0",
        **extra,
    )


async def health(port: int) -> tuple[int | None, dict[str, Any]]:
    """One /healthz answer: its status and checks (None: the server did not answer)."""
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/healthz") as resp,
        ):
            return resp.status, (await resp.json()).get("checks", {})
    except (aiohttp.ClientError, ValueError):
        return None, {}


async def healthy_within(port: int, within: float, proc: Process) -> None:
    """Until /healthz says ok (Discord is `ready` a moment after READY)."""
    deadline = time.monotonic() + within
    while (await health(port))[0] != 200:
        if time.monotonic() > deadline or proc.proc.returncode is not None:
            raise AssertionError(f"/healthz never ok: {await health(port)}; log:\n{tail(proc)}")
        await asyncio.sleep(0.1)


async def metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as resp,
    ):
        return samples(await resp.text())


def metric(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str):
    """The sum of `name`'s samples whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in found.items() if n == name and want <= set(ls))


async def until(what: str, check: Callable[[], bool], within: float) -> None:
    """Wait for a condition of the fakes or the database (no process to watch)."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"never {what} (within {within}s)")
        await asyncio.sleep(0.05)


def discord_results(dc: FakeDiscord, token: str) -> int:
    """Images posted for one interaction: as its followup or in the channel."""
    followups = [c for c in dc.followups(token) if c.files]
    return len(followups) + sum(
        1 for c in dc.channel_posts() if c.files and token in str(c.payload or "")
    )


def discord_texts(dc: FakeDiscord, token: str) -> list[str]:
    """Every text the bot put into one interaction's messages (edits and followups)."""
    return [
        str((c.payload or {}).get("content", ""))
        for c in dc.calls
        if token in c.path and c.method in ("PATCH", "POST") and isinstance(c.payload, dict)
    ]


def hook_update(update_id: int, user: int, text: str) -> dict[str, Any]:
    """An update as Telegram POSTs it to a webhook: a private chat's command."""
    command = text.split()[0]
    return {
        "update_id": update_id,
        "message": {
            "message_id": 500 + update_id,
            "date": int(time.time()),
            "chat": {"id": user, "type": "private"},
            "from": {"id": user, "is_bot": False, "first_name": "Eve", "language_code": "en"},
            "text": text,
            "entities": [{"type": "bot_command", "offset": 0, "length": len(command)}],
        },
    }


def run_scenario(scenario: Callable[[], Awaitable[T]]) -> T:
    """Run a module fixture's scenario on its own loop, to the end; its record is plain data."""
    return asyncio.run(scenario())  # type: ignore[arg-type]


class HangingDiscord(FakeDiscord):
    """Discord whose REST takes every request and never answers (a stuck proxy)."""

    def __init__(self) -> None:
        super().__init__(token=DC_TOKEN)
        self.hung = 0

    async def _route(self, request: Any, path: str, call: Any) -> tuple[int, Any]:
        self.hung += 1
        await asyncio.Event().wait()  # until the server closes
        raise AssertionError("unreachable")


# ---- one platform in trouble at start-up -----------------------------------------------------


async def test_a_gateway_unreachable_at_start_neither_kills_telegram_nor_says_attributeerror(
    tmp_path: Path,
) -> None:
    """Discord's gateway refuses connections as the bot starts (its proxy is restarting; the
    network comes up late at boot); REST and Telegram are fine. Either the bot serves on
    (Telegram answered, /healthz names Discord as the one down, Discord served once its gateway
    is back), or it stops with one clear line naming DISCORD_GATEWAY_URL, no traceback.

    Seen: ~1 s after start the process exits 1 with "drawbridge: the Discord gateway
    connection ended (AttributeError)" after a traceback ending in discord.py's
    `sequence=self.ws.sequence` (adapters/discord_adapter.py:199-212 → bot/cli.py:230); the
    Telegram users lose the bot with it."""
    port = free_port()
    dc = FakeDiscord(token=DC_TOKEN)
    await dc.start()
    hop = Outage(dc.port)
    await hop.up()
    await hop.down()  # the gateway's address refuses from the start
    try:
        async with FakeTelegram(token=TG_TOKEN) as tg:
            gateway = f"ws://127.0.0.1:{hop.port}/gw/"
            env = both_env(tg.url, dc, gateway, HTTP_PORT=str(port))
            async with drawbridge(tmp_path, **env) as proc:
                await tg.wait_for("setMyCommands", within=20)
                tg.message("/imagine a fox while the gateway is down", user=tg.user(301))
                await until(
                    "served or stopped",
                    lambda: proc.proc.returncode is not None or 301 in photos_by_chat(tg),
                    within=15,
                )
                await asyncio.sleep(3)  # the gateway's first tries have failed by now
                code = proc.proc.returncode
                if code is not None:
                    await asyncio.wait_for(proc._reader, 5)
                    log = proc.stderr.decode("utf-8", "replace")
                    lines = errors_of(log)
                    assert code != 0 and len(lines) == 1 and tracebacks(log) == 0, (
                        f"stopped (exit {code}) with lines {lines} and {tracebacks(log)} "
                        f"tracebacks; log:\n{log[-2500:]}"
                    )
                    assert lines[0].startswith("drawbridge: DISCORD_GATEWAY_URL"), lines
                    return
                status, checks = await health(port)
                assert status == 503 and checks.get("TelegramAdapter") is True, checks
                assert checks.get("DiscordAdapter") is False, checks
                await hop.up()
                await dc.wait_identified(within=30)
                inter = await dc.slash("imagine", {"prompt": "a fox once the gateway is back"})
                await dc.wait_for(lambda: discord_results(dc, inter.token), within=20)
                assert await proc.stop() == 0, tail(proc)
    finally:
        await hop.down()
        await dc.close()


async def test_one_platform_refused_at_start_stops_before_the_other_is_half_started(
    tmp_path: Path,
) -> None:
    """Both platforms configured; the Bot API answers getMe 502, or (in a second bot) Discord's
    REST answers 503 to the login. Start-up stops (fail fast, as with one platform), non-zero,
    one line naming the platform refused, no traceback, no token; and the other platform was
    not left half-started: no Discord login after Telegram's refusal, no Telegram command menu
    or polling after Discord's."""
    dc_ok, dc_down = FakeDiscord(token=DC_TOKEN), DownDiscord(token=DC_TOKEN)
    for fake in (dc_ok, dc_down):
        await fake.start()
    try:
        async with FakeTelegram(token=TG_TOKEN) as tg_bad, FakeTelegram(token=TG_TOKEN) as tg_ok:
            tg_bad.fail("getMe", 502, "Bad Gateway")

            async def start(name: str, tg: FakeTelegram, dc: FakeDiscord) -> tuple[Any, str]:
                data = tmp_path / name
                data.mkdir()
                async with drawbridge(data, **both_env(tg.url, dc)) as proc:
                    code = await ends_within(proc, 20)
                    return code, proc.stderr.decode("utf-8", "replace")

            (tg_code, tg_log), (dc_code, dc_log) = await asyncio.gather(
                start("telegram-502", tg_bad, dc_ok), start("discord-503", tg_ok, dc_down)
            )
    finally:
        for fake in (dc_ok, dc_down):
            await fake.close()
    for code, log, setting in ((tg_code, tg_log, "TELEGRAM_"), (dc_code, dc_log, "DISCORD_")):
        lines = errors_of(log)
        assert code not in (None, 0), f"exit {code}; log:\n{log[-2000:]}"
        assert len(lines) == 1 and lines[0].startswith(f"drawbridge: {setting}"), lines
        assert tracebacks(log) == 0 and TG_TOKEN not in log and DC_TOKEN not in log, log[-2000:]
    assert not dc_ok.calls, f"Discord was logged in after Telegram refused: {dc_ok.calls[:3]}"
    assert "setMyCommands" not in tg_ok.methods(), tg_ok.methods()


# ---- a start-up that hangs, and a signal meanwhile -------------------------------------------


@dataclass
class HungStarts:
    """What three bots did whose start-up hung: Discord's REST never answering the login (left
    alone, and sent SIGTERM), and the Bot API never answering getMe (sent SIGTERM)."""

    alone: tuple[int | None, str] = (None, "")
    sigterm: dict[str, tuple[int | None, str]] = field(default_factory=dict)


ALONE_WAIT = 15.0  # seconds a start-up that hangs may take before it ends by itself
SIGTERM_WAIT = 8.0  # seconds a bot still starting may take to stop after SIGTERM


@pytest.fixture(scope="module")
def hung_starts(tmp_path_factory: pytest.TempPathFactory) -> HungStarts:
    async def discord_hangs(data: Path, send_sigterm: bool) -> tuple[int | None, str]:
        dc = HangingDiscord()
        await dc.start()
        try:
            async with (
                FakeTelegram(token=TG_TOKEN) as tg,
                drawbridge(data, **both_env(tg.url, dc)) as proc,
            ):
                await until("the login hung", lambda: dc.hung > 0, within=20)
                if send_sigterm:
                    await asyncio.sleep(0.5)
                    proc.proc.send_signal(signal.SIGTERM)
                code = await ends_within(proc, SIGTERM_WAIT if send_sigterm else ALONE_WAIT)
                if code is None:
                    proc.proc.kill()
                    await proc.proc.wait()
                return code, proc.stderr.decode("utf-8", "replace")
        finally:
            await dc.close()

    async def telegram_hangs(data: Path) -> tuple[int | None, str]:
        dc = FakeDiscord(token=DC_TOKEN)
        await dc.start()
        try:
            async with HangingTelegram(token=TG_TOKEN) as tg:
                tg.hang.add("getMe")
                async with drawbridge(data, **both_env(tg.url, dc)) as proc:
                    await until("getMe hung", lambda: bool(tg.hung), within=20)
                    await asyncio.sleep(0.5)
                    proc.proc.send_signal(signal.SIGTERM)
                    code = await ends_within(proc, SIGTERM_WAIT)
                    if code is None:
                        proc.proc.kill()
                        await proc.proc.wait()
                    return code, proc.stderr.decode("utf-8", "replace")
        finally:
            await dc.close()

    async def scenario() -> HungStarts:
        dirs = [tmp_path_factory.mktemp(name) for name in ("alone", "dc-term", "tg-term")]
        alone, dc_term, tg_term = await asyncio.gather(
            discord_hangs(dirs[0], False), discord_hangs(dirs[1], True), telegram_hangs(dirs[2])
        )
        return HungStarts(alone, {"discord-login-hangs": dc_term, "telegram-getme-hangs": tg_term})

    return run_scenario(scenario)


def test_a_discord_api_that_never_answers_the_login_ends_start_up_with_one_line(
    hung_starts: HungStarts,
) -> None:
    """Discord's REST takes the login and never answers (a stuck proxy). As with a Bot API
    that hangs on getMe (PTB gives up after 5 s, one line naming TELEGRAM_API_URL), start-up
    must end by itself with one line naming Discord's API, not hang.

    Seen: 15 s later the bot still sits after "logging in using static token", no line, Telegram
    (already past getMe) not started either: nobody on either platform is served."""
    code, log = hung_starts.alone
    assert code is not None, (
        f"still starting {ALONE_WAIT:g} s after Discord's API hung; log:\n{log[-1500:]}"
    )
    lines = errors_of(log)
    assert code != 0 and len(lines) == 1 and "DISCORD_API_URL" in lines[0], (code, lines)


@pytest.mark.parametrize("case", ["discord-login-hangs", "telegram-getme-hangs"])
def test_sigterm_while_start_up_hangs_stops_the_bot_at_once(
    hung_starts: HungStarts, case: str
) -> None:
    """`systemctl stop` (SIGTERM) while start-up waits on a platform that does not answer. The
    bot has nothing to finish yet: it must stop within a few seconds, cleanly (exit 0, or killed
    by the signal), without blaming the platform for the stop.

    Seen: Discord's login hanging, the bot ignores SIGTERM (still running 8 s later: only
    SIGKILL ends it). getMe hanging, it exits 1 some 4.5 s later with "drawbridge:
    TELEGRAM_API_URL: … did not answer getMe (TimedOut)", a failure the operator did not cause
    (systemd marks the unit failed)."""
    code, log = hung_starts.sigterm[case]
    assert code is not None, f"{case}: still running {SIGTERM_WAIT:g} s after SIGTERM"
    assert code in (0, -signal.SIGTERM, 128 + signal.SIGTERM), f"{case}: exit {code}"
    assert not errors_of(log), f"{case}: a stop asked for is reported as {errors_of(log)}"


# ---- Discord's gateway down mid-run ----------------------------------------------------------


@dataclass
class GatewayOutage:
    healthz: list[tuple[int | None, dict[str, Any]]] = field(default_factory=list)
    telegram_served: bool = False
    outage_log: str = ""
    exit_code: int | None = None
    log: str = ""


@pytest.fixture(scope="module")
def gateway_outage(tmp_path_factory: pytest.TempPathFactory) -> GatewayOutage:
    """Both platforms serve; then Discord's gateway becomes unreachable for 6 s (connections
    refused and the open one cut) while a Telegram user asks for an image; then SIGTERM."""
    record = GatewayOutage()

    async def scenario() -> GatewayOutage:
        data = tmp_path_factory.mktemp("gateway-outage")
        port = free_port()
        dc = FakeDiscord(token=DC_TOKEN)
        await dc.start()
        try:
            async with FakeTelegram(token=TG_TOKEN) as tg, Outage(dc.port) as hop:
                gateway = f"ws://127.0.0.1:{hop.port}/gw/"
                env = both_env(tg.url, dc, gateway, HTTP_PORT=str(port))
                async with drawbridge(data, **env) as proc:
                    await healthy_within(port, 20, proc)
                    mark = len(proc.stderr)
                    await hop.down()
                    tg.message("/imagine a fox while Discord is away", user=tg.user(401))
                    started = time.monotonic()
                    while time.monotonic() - started < 6:
                        record.healthz.append(await health(port))
                        await asyncio.sleep(0.5)
                    record.telegram_served = 401 in photos_by_chat(tg)
                    record.outage_log = proc.stderr[mark:].decode("utf-8", "replace")
                    record.exit_code = await proc.stop()
                    record.log = proc.stderr.decode("utf-8", "replace")
        finally:
            await dc.close()
        return record

    return run_scenario(scenario)


def test_a_gateway_outage_keeps_telegram_serving_and_healthz_names_discord(
    gateway_outage: GatewayOutage,
) -> None:
    """While Discord's gateway is unreachable the Telegram user is served, /healthz answers 503
    naming `DiscordAdapter` (and only it) as down, and SIGTERM still stops the bot with 0."""
    record = gateway_outage
    assert record.telegram_served, f"no photo on Telegram during the outage:\n{record.log[-2000:]}"
    late = record.healthz[2:]  # a second into the outage
    assert late and all(
        status == 503 and checks.get("DiscordAdapter") is False and checks.get("TelegramAdapter")
        for status, checks in late
    ), record.healthz
    assert record.exit_code == 0, record.log[-2000:]


def test_a_gateway_outage_is_told_in_plain_lines_not_a_traceback_per_retry(
    gateway_outage: GatewayOutage,
) -> None:
    """A gateway that is away for a few seconds is routine (Discord restarts them). The log
    should say it plainly, as Telegram's failed polls are said (one line a minute), not print a
    traceback for every reconnect attempt.

    Seen: in 6 s, each "ERROR discord.client: Attempting a reconnect in 0.9s" with a 40-line
    traceback (ConnectionResetError / ClientConnectorError); a longer outage fills the log."""
    log = gateway_outage.outage_log
    assert tracebacks(log) == 0, (
        f"{tracebacks(log)} tracebacks in a 6 s gateway outage:\n{log[-2500:]}"
    )


# ---- Telegram's Bot API down mid-run ---------------------------------------------------------


@dataclass
class BotApiOutage:
    healthz: list[tuple[int | None, dict[str, Any]]] = field(default_factory=list)
    discord_served: bool = False
    telegram_served_after: bool = False
    exit_code: int | None = None
    log: str = ""


OUTAGE_SECONDS = 12.0  # longer than a long poll (10 s): every poll in it fails


@pytest.fixture(scope="module")
def bot_api_outage(tmp_path_factory: pytest.TempPathFactory) -> BotApiOutage:
    """Both platforms serve; then the Bot API becomes unreachable for 12 s. A Discord user asks
    for an image during it, and a Telegram user writes during it; then the Bot API is back."""
    record = BotApiOutage()

    async def scenario() -> BotApiOutage:
        data = tmp_path_factory.mktemp("bot-api-outage")
        port = free_port()
        dc = FakeDiscord(token=DC_TOKEN)
        await dc.start()
        try:
            async with (
                FakeTelegram(token=TG_TOKEN) as tg,
                Outage(int(tg.url.rsplit(":", 1)[1])) as hop,
                drawbridge(data, **both_env(hop.url, dc, HTTP_PORT=str(port))) as proc,
            ):
                await tg.wait_for("setMyCommands", within=20)
                await healthy_within(port, 20, proc)
                await hop.down()
                tg.message("/imagine a fox written while Telegram is away", user=tg.user(501))
                inter = await dc.slash("imagine", {"prompt": "a fox while Telegram is away"})
                started = time.monotonic()
                while time.monotonic() - started < OUTAGE_SECONDS:
                    record.healthz.append(await health(port))
                    await asyncio.sleep(0.5)
                record.discord_served = discord_results(dc, inter.token) == 1
                await hop.up()
                try:
                    await wait_until(
                        "Telegram served after the outage",
                        lambda: 501 in photos_by_chat(tg),
                        within=30,
                        proc=proc,
                    )
                    record.telegram_served_after = True
                except AssertionError:
                    pass
                record.exit_code = await proc.stop()
                record.log = proc.stderr.decode("utf-8", "replace")
        finally:
            await dc.close()
        return record

    return run_scenario(scenario)


def test_a_bot_api_outage_keeps_discord_serving_and_telegram_catches_up(
    bot_api_outage: BotApiOutage,
) -> None:
    """During a 12 s Bot API outage a Discord user is served; the message a Telegram user sent
    meanwhile is answered once the Bot API is back; SIGTERM stops with 0."""
    record = bot_api_outage
    assert record.discord_served, record.log[-2000:]
    assert record.telegram_served_after, record.log[-2000:]
    assert record.exit_code == 0, record.log[-2000:]


def test_healthz_says_telegram_is_down_while_every_poll_fails(
    bot_api_outage: BotApiOutage,
) -> None:
    """The operator's monitor polls /healthz. Discord's check goes false within a second of
    its gateway dropping; Telegram's must too, or at least once every poll of a 12 s outage
    (longer than the 10 s long poll) has failed, so that a cut path to the Bot API (a firewall,
    a blocked api.telegram.org) pages someone.

    Seen: 200 `{"ok": true, "TelegramAdapter": true}` on every answer of the outage, while
    the log says "the Bot API did not answer a poll"."""
    checks = [c.get("TelegramAdapter") for _, c in bot_api_outage.healthz]
    assert False in checks, f"TelegramAdapter on each /healthz of the outage: {checks}"


# ---- webhook mode beside Discord, and its drain ----------------------------------------------


@dataclass
class WebhookDrain:
    healthz_before: tuple[int | None, dict[str, Any]] = (None, {})
    queued_before: bool = False
    discord_running_before: bool = False
    drain_hook_status: int | None = None
    drain_chat_calls: list[str] = field(default_factory=list)
    discord_drain_texts: list[str] = field(default_factory=list)
    set_webhook: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None
    jobs: list[tuple[Any, ...]] = field(default_factory=list)
    log: str = ""


@pytest.fixture(scope="module")
def webhook_drain(tmp_path_factory: pytest.TempPathFactory) -> WebhookDrain:
    """Telegram in webhook mode and Discord in one bot. A job from each runs (6 s); SIGTERM
    (SHUTDOWN_GRACE 3 s); half a second into the drain a Telegram user's /imagine is POSTed to
    the webhook and a Discord user sends /imagine."""
    record = WebhookDrain()

    async def scenario() -> WebhookDrain:
        data = tmp_path_factory.mktemp("webhook-drain")
        port = free_port()
        dc = FakeDiscord(token=DC_TOKEN)
        await dc.start()
        try:
            async with FakeTelegram(token=TG_TOKEN) as tg:
                env = both_env(
                    tg.url,
                    dc,
                    TELEGRAM_WEBHOOK_URL="https://bot.example/tg-hook",
                    TELEGRAM_WEBHOOK_SECRET=HOOK_SECRET,
                    HTTP_PORT=str(port),
                    DEMO_LATENCY="6",
                    SHUTDOWN_GRACE="3",
                )
                url = f"http://127.0.0.1:{port}/tg-hook"
                headers = {"X-Telegram-Bot-Api-Secret-Token": HOOK_SECRET}
                async with drawbridge(data, **env) as proc, aiohttp.ClientSession() as http:
                    (hook,) = await tg.wait_for("setWebhook", within=20)
                    record.set_webhook = dict(hook.params)
                    await healthy_within(port, 20, proc)
                    update = hook_update(1, 601, "/imagine a fox through the webhook")
                    async with http.post(url, json=update, headers=headers) as resp:
                        assert resp.status == 200
                    inter = await dc.slash("imagine", {"prompt": "a fox on Discord"})
                    await tg.wait_for(lambda c: "Queued" in (c.text or ""), within=10)
                    record.queued_before = True
                    await dc.wait_for(
                        lambda: any("Generating" in t for t in discord_texts(dc, inter.token)),
                        within=10,
                    )
                    record.discord_running_before = True
                    record.healthz_before = await health(port)
                    proc.proc.send_signal(signal.SIGTERM)
                    await asyncio.sleep(0.5)
                    update = hook_update(2, 602, "/imagine a fox sent during the drain")
                    async with http.post(url, json=update, headers=headers) as resp:
                        record.drain_hook_status = resp.status
                    late = await dc.slash("imagine", {"prompt": "a late Discord fox"}, user=BOB)
                    record.exit_code = await ends_within(proc, 20)
                    record.drain_chat_calls = [
                        c.text or c.method for c in tg.calls if c.chat_id == 602
                    ]
                    record.discord_drain_texts = discord_texts(dc, late.token)
                    record.log = proc.stderr.decode("utf-8", "replace")
                record.jobs = rows(data, "SELECT platform, status, cost_usd FROM jobs")
        finally:
            await dc.close()
        return record

    return run_scenario(scenario)


def test_webhook_mode_and_discord_together_serve_and_drain_cleanly(
    webhook_drain: WebhookDrain,
) -> None:
    """The webhook is set with the secret; a webhook /imagine and a Discord /imagine both run;
    /healthz names both adapters well. On SIGTERM the Discord command sent during the drain is
    answered "restarting", the two running jobs are parked uncharged, the exit is 0."""
    record = webhook_drain
    assert record.set_webhook.get("secret_token") == HOOK_SECRET, record.set_webhook
    assert record.queued_before and record.discord_running_before
    status, checks = record.healthz_before
    assert status == 200 and checks.get("TelegramAdapter") and checks.get("DiscordAdapter")
    assert any("restarting" in t for t in record.discord_drain_texts), record.discord_drain_texts
    assert record.exit_code == 0, record.log[-2000:]
    assert sorted(record.jobs) == [("discord", "running", 0.0), ("telegram", "running", 0.0)]


def test_a_webhook_update_during_the_drain_is_answered_or_left_for_telegram_to_resend(
    webhook_drain: WebhookDrain,
) -> None:
    """In polling mode a message sent while the bot stops stays with Telegram and the next start
    takes it; on Discord it is answered "The bot is restarting". In webhook mode the route must
    do one of those too: answer the user, or refuse the POST (a non-2xx, which Telegram sends
    again later, to the next start).

    Seen: 200 to Telegram, nothing in the user's chat, no job: the /imagine is lost for good."""
    record = webhook_drain
    answered = bool(record.drain_chat_calls)
    resent = record.drain_hook_status is not None and record.drain_hook_status >= 300
    assert answered or resent, (
        f"webhook answered {record.drain_hook_status}, the user's chat got "
        f"{record.drain_chat_calls}: the update is taken and dropped"
    )


# ---- stopping with work from both platforms --------------------------------------------------


@dataclass
class Stopped:
    code: int | None = None
    telegram_photos: int = 0
    discord_results: int = 0
    jobs: list[tuple[Any, ...]] = field(default_factory=list)
    log: str = ""


@pytest.fixture(scope="module")
def signal_stops(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Stopped]:
    """Two bots, each with a Telegram job and a Discord job 2 s from done (SHUTDOWN_GRACE 6 s):
    one is sent SIGTERM, the other SIGHUP (the terminal it runs in closes)."""

    async def stop_with(name: str, sig: signal.Signals) -> Stopped:
        data = tmp_path_factory.mktemp(name)
        dc = FakeDiscord(token=DC_TOKEN)
        await dc.start()
        try:
            async with FakeTelegram(token=TG_TOKEN) as tg:
                env = both_env(tg.url, dc, DEMO_LATENCY="2", SHUTDOWN_GRACE="6")
                async with drawbridge(data, **env) as proc:
                    await tg.wait_for("setMyCommands", within=20)
                    await dc.wait_identified(within=20)
                    tg.message("/imagine a fox near the end", user=tg.user(701))
                    inter = await dc.slash("imagine", {"prompt": "a Discord fox near the end"})
                    await tg.wait_for(lambda c: "Queued" in (c.text or ""), within=10)
                    await dc.wait_for(
                        lambda: any("Generating" in t for t in discord_texts(dc, inter.token)),
                        within=10,
                    )
                    proc.proc.send_signal(sig)
                    code = await ends_within(proc, 15)
                    stopped = Stopped(
                        code,
                        photos_by_chat(tg).get(701, 0),
                        discord_results(dc, inter.token),
                        log=proc.stderr.decode("utf-8", "replace"),
                    )
                stopped.jobs = rows(
                    data, "SELECT platform, status, delivered_at IS NOT NULL FROM jobs"
                )
                return stopped
        finally:
            await dc.close()

    async def scenario() -> dict[str, Stopped]:
        term, hup = await asyncio.gather(
            stop_with("sigterm", signal.SIGTERM), stop_with("sighup", signal.SIGHUP)
        )
        return {"SIGTERM": term, "SIGHUP": hup}

    return run_scenario(scenario)


def _finished_both_before_exit(stopped: Stopped, how: str) -> None:
    assert stopped.code == 0, f"{how}: exit {stopped.code}; log:\n{stopped.log[-2000:]}"
    assert (stopped.telegram_photos, stopped.discord_results) == (1, 1), (
        f"{how}: results before the exit: Telegram {stopped.telegram_photos}, Discord "
        f"{stopped.discord_results}; jobs {stopped.jobs}"
    )
    assert sorted(stopped.jobs) == [("discord", "succeeded", 1), ("telegram", "succeeded", 1)]


def test_sigterm_lets_both_platforms_jobs_finish_within_the_grace(
    signal_stops: dict[str, Stopped],
) -> None:
    """SIGTERM while a job of each platform is 2 s from done, with SHUTDOWN_GRACE 6 s: both
    results are posted (photo on Telegram, followup on Discord) before the process exits 0."""
    _finished_both_before_exit(signal_stops["SIGTERM"], "SIGTERM")


def test_sighup_stops_as_gracefully_as_sigterm(signal_stops: dict[str, Stopped]) -> None:
    """The operator runs `drawbridge run` in a terminal or an SSH session that closes (SIGHUP).
    The bot must stop as on SIGTERM: the two jobs 2 s from done are posted, exit 0.

    Seen: the process dies at once (killed by SIGHUP), both jobs left `running`, nothing
    posted; the users wait for a restart that may not come."""
    _finished_both_before_exit(signal_stops["SIGHUP"], "SIGHUP")


async def test_sigterm_parks_both_platforms_jobs_and_the_restart_ends_each_once(
    tmp_path: Path,
) -> None:
    """A job from each platform is generating (30 s) at SIGTERM (SHUTDOWN_GRACE 1 s): both are
    parked uncharged. The restart finishes both: one photo in the Telegram chat, one result for
    the Discord interaction, each user's status message edited to "Done" once (no second
    "Queued" message); /metrics of the new process counts one delivery on each platform."""
    port = free_port()
    dc = FakeDiscord(token=DC_TOKEN)
    await dc.start()
    try:
        async with FakeTelegram(token=TG_TOKEN) as tg:
            env = both_env(tg.url, dc, DEMO_LATENCY="30", SHUTDOWN_GRACE="1")
            async with drawbridge(tmp_path, **env) as first:
                await tg.wait_for("setMyCommands", within=20)
                await dc.wait_identified(within=20)
                tg.message("/imagine a parked fox", user=tg.user(801))
                inter = await dc.slash("imagine", {"prompt": "a parked Discord fox"})
                await tg.wait_for(lambda c: "Queued" in (c.text or ""), within=10)
                await dc.wait_for(
                    lambda: any("Generating" in t for t in discord_texts(dc, inter.token)),
                    within=10,
                )
                assert await first.stop() == 0, tail(first)
            parked = rows(tmp_path, "SELECT platform, status, cost_usd FROM jobs")
            assert sorted(parked) == [("discord", "running", 0.0), ("telegram", "running", 0.0)]
            env.update(DEMO_LATENCY="1", HTTP_PORT=str(port))
            async with drawbridge(tmp_path, **env) as second:
                await wait_until(
                    "both delivered after the restart",
                    lambda: (
                        rows(tmp_path, "SELECT count(*) FROM jobs WHERE delivered_at IS NOT NULL")
                        == [(2,)]
                    ),
                    within=20,
                    proc=second,
                )
                await asyncio.sleep(1)  # a second post, or a late edit, would be out by now
                found = await metrics(port)
                assert await second.stop() == 0, tail(second)
    finally:
        await dc.close()
    assert photos_by_chat(tg) == {801: 1}
    assert discord_results(dc, inter.token) == 1
    tg_texts = [c.text or "" for c in tg.sent() if c.chat_id == 801]
    assert sum("Queued" in t for t in tg_texts) == 1, tg_texts
    assert sum("Done" in t for t in tg_texts) == 1, tg_texts
    assert sum("Done" in t for t in discord_texts(dc, inter.token)) == 1
    for platform in ("telegram", "discord"):
        delivered = metric(found, "drawbridge_deliveries_total", platform=platform, outcome="ok")
        assert delivered == 1, (platform, delivered)
    assert metric(found, "drawbridge_jobs_total", status="succeeded") == 2


async def test_a_linked_user_killed_mid_flight_on_both_platforms_gets_each_result_once(
    tmp_path: Path,
) -> None:
    """A user links their Telegram and Discord accounts (/link), then has two jobs from
    Telegram and one from Discord generating (MAX_PENDING_PER_USER 3) when the bot is killed
    (-9). The restart: each result once, on the platform it came from; Telegram's replayed
    updates make no second job; and the linked account's three jobs still count against one
    bound, so a fourth request on Discord right after the restart is refused."""
    dc = FakeDiscord(token=DC_TOKEN)
    await dc.start()
    try:
        async with FakeTelegram(token=TG_TOKEN, overall_limit=None, group_limit=None) as tg:
            env = both_env(tg.url, dc, DEMO_LATENCY="30", MAX_PENDING_PER_USER="3")
            async with drawbridge(tmp_path, **env) as first:
                await tg.wait_for("setMyCommands", within=20)
                await dc.wait_identified(within=20)
                tg.message("/link", user=tg.user(901))
                said = await tg.wait_text("link code", within=10)
                match = re.search(r"code: (\w+)", said.text or "")
                assert match, said.text
                link = await dc.slash("link", {"code": match[1]})
                await dc.wait_for(
                    lambda: any("Linked" in t for t in discord_texts(dc, link.token)), within=10
                )
                tg.message("/imagine linked fox one", user=tg.user(901))
                tg.message("/imagine linked fox two", user=tg.user(901))
                inter = await dc.slash("imagine", {"prompt": "linked fox three"})
                await wait_until(
                    "three jobs running",
                    lambda: (
                        rows(tmp_path, "SELECT count(*) FROM jobs WHERE status = 'running'")
                        == [(3,)]
                    ),
                    within=10,
                    proc=first,
                )
                first.proc.kill()
                await first.proc.wait()
            dc.identify = None
            env["DEMO_LATENCY"] = "3"
            async with drawbridge(tmp_path, **env) as second:
                await dc.wait_identified(within=20)
                fourth = await dc.slash("imagine", {"prompt": "linked fox four"})
                await dc.wait_for(
                    lambda: any("already have 3" in t for t in discord_texts(dc, fourth.token)),
                    within=10,
                )
                await wait_until(
                    "the three delivered",
                    lambda: (
                        rows(tmp_path, "SELECT count(*) FROM jobs WHERE delivered_at IS NOT NULL")
                        == [(3,)]
                    ),
                    within=20,
                    proc=second,
                )
                await asyncio.sleep(1)
                assert await second.stop() == 0, tail(second)
    finally:
        await dc.close()
    assert photos_by_chat(tg).get(901) == 2, photos_by_chat(tg)
    assert discord_results(dc, inter.token) == 1
    jobs = rows(tmp_path, "SELECT platform, account, status FROM jobs ORDER BY platform")
    assert [(p, s) for p, _, s in jobs] == [
        ("discord", "succeeded"),
        ("telegram", "succeeded"),
        ("telegram", "succeeded"),
    ], jobs


async def test_a_restart_without_discord_does_not_pay_for_discord_jobs_it_cannot_deliver(
    tmp_path: Path,
) -> None:
    """A Telegram job generates on GrsAI while a Discord user's job waits behind it
    (CONCURRENCY 1); SIGTERM parks both. The operator restarts with DISCORD_BOT_TOKEN unset
    (the token was revoked; Discord is switched off for now). The Telegram job is finished. The
    Discord job has no one to be given to: it must not be paid for (no GrsAI task, no charge);
    it may wait for Discord to come back, or end uncharged.

    Seen: a new GrsAI task is created for it, the job is `succeeded` with cost 0.04, and
    "no discord adapter to deliver to; kept": the operator pays for an image nobody sees."""
    dc = FakeDiscord(token=DC_TOKEN)
    await dc.start()
    try:
        async with (
            FakeTelegram(token=TG_TOKEN) as tg,
            FakeGrsai(line_delay=1.0, steps=[0, 50, 90]) as grsai,
        ):
            env = both_env(
                tg.url,
                dc,
                GRSAI_API_KEY=grsai.api_key,
                GRSAI_BASE_URL=grsai.base_url,
                DEFAULT_MODEL="nano-banana",
                CONCURRENCY="1",
                SHUTDOWN_GRACE="0.5",
            )
            async with drawbridge(tmp_path, **env) as first:
                await tg.wait_for("setMyCommands", within=20)
                await dc.wait_identified(within=20)
                tg.message("/imagine a Telegram fox on GrsAI", user=tg.user(1001))
                await tg.wait_for(lambda c: "Queued" in (c.text or ""), within=10)
                inter = await dc.slash("imagine", {"prompt": "a Discord fox on GrsAI"})
                await dc.wait_for(lambda: inter.ack_delay is not None, within=10)
                await until("the Telegram job submitted", lambda: grsai.submits == 1, within=10)
                assert await first.stop() == 0, tail(first)
            prompts = [b.get("prompt") for b in grsai.submitted_bodies()]
            assert prompts == ["a Telegram fox on GrsAI"], prompts
            del env["DISCORD_BOT_TOKEN"]
            async with drawbridge(tmp_path, **env) as second:
                await wait_until(
                    "the Telegram job delivered",
                    lambda: 1001 in photos_by_chat(tg),
                    within=20,
                    proc=second,
                )
                await asyncio.sleep(4)  # the slot is free: a Discord job run now would be out
                assert await second.stop() == 0, tail(second)
            prompts = [b.get("prompt") for b in grsai.submitted_bodies()]
    finally:
        await dc.close()
    ((status, cost),) = rows(
        tmp_path, "SELECT status, cost_usd FROM jobs WHERE platform = 'discord'"
    )
    assert "a Discord fox on GrsAI" not in prompts and cost == 0, (
        f"GrsAI was asked for {prompts}; the Discord job is {status} at ${cost}"
    )
    assert status != "succeeded", status
