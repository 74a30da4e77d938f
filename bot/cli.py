"""The `drawbridge` command: `run` (the bot or the console chat), `generate` (batch), `usage`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from bot import __version__, runtime
from bot.errors import DrawbridgeError, SettingsError, UserError
from bot.settings import Settings, load_settings

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from aiohttp import web

    from adapters.console_adapter import ConsoleAdapter
    from adapters.telegram_adapter import TelegramAdapter
    from bot.app import Core, Service
    from bot.http import HttpServer

log = logging.getLogger("drawbridge")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="drawbridge", description=__doc__)
    p.add_argument("--version", action="version", version=f"drawbridge {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="start the bot (or the console chat when no token is set)")
    run.add_argument("--console", action="store_true", help="chat in this terminal")

    gen = sub.add_parser("generate", help="generate images for one prompt or a file of prompts")
    gen.add_argument("prompt", nargs="?", help="the prompt (options like --ar may follow inside)")
    gen.add_argument("--file", type=Path, help="a text file with one prompt a line")
    gen.add_argument("--model", help="model name (see `drawbridge run --console`, /models)")
    gen.add_argument("--ar", dest="aspect_ratio", help="aspect ratio, e.g. 16:9")
    gen.add_argument("--n", type=int, default=None, help="images per prompt")
    gen.add_argument("--size", help="size, e.g. 1K or 2K, as the model allows")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--out", type=Path, default=Path("out"), help="folder for the images")

    usage = sub.add_parser("usage", help="spend and counts per user, model and day")
    fmt = usage.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON rows")
    fmt.add_argument("--csv", action="store_true", help="print CSV (what /export sends)")
    usage.add_argument(
        "--days",
        type=_days,
        default=None,
        metavar="N",
        help="only the last N days in QUOTA_TZ, today included",
    )
    return p


MAX_DAYS = 36_500  # a hundred years: further back than any quota day, and a date still


def _days(text: str) -> int:
    """A count of days, 1 or more; a huge one ("all of it") is every day there is."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not 1 or more")
    return min(value, MAX_DAYS)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = load_settings()
        if args.command == "usage":  # a report reads: it makes no data dir it did not find
            _check_report_dir(settings.data_dir)
        else:
            _check_data_dir(settings.data_dir)
    except SettingsError as exc:
        print(f"drawbridge: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "run":
            return _run_command(settings, args.console)
        if args.command == "generate":
            from bot.batch import run_batch

            return runtime.run(run_batch(settings, args))
        return runtime.run(
            _usage(settings, "csv" if args.csv else "json" if args.json else "table", args.days)
        )
    except (DrawbridgeError, OSError) as exc:
        if isinstance(exc, UserError):
            from bot.texts import render_error

            print(f"drawbridge: {render_error('en', exc)}", file=sys.stderr)
        else:
            print(f"drawbridge: {exc}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:  # e.g. a database file that cannot be opened or written
        print(f"drawbridge: DRAWBRIDGE_DATA_DIR: {settings.db_path}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _check_report_dir(data_dir: Path) -> None:
    """A data dir not made yet is an empty report; one that can never be a folder is an error."""
    there = next((path for path in (data_dir, *data_dir.parents) if path.exists()), None)
    if there is not None and not there.is_dir():
        raise SettingsError(f"DRAWBRIDGE_DATA_DIR: cannot use {data_dir} (Not a directory)")


def _check_data_dir(data_dir: Path) -> None:
    """Create the data dir and prove it writable now, with the database and the image folders
    already there: one line naming what is not, before any paid call (a read-only
    `drawbridge.db` or `images/`, restored as root, otherwise fails every job after its
    generation, or every submit)."""
    from bot.image_files import image_folders

    where = data_dir
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        for where in (data_dir, *image_folders(data_dir)):
            if where.is_dir():  # (the missing ones are made by the store, or it says why)
                with tempfile.TemporaryFile(dir=where):  # gone on close; fails as sqlite would
                    pass
        where = data_dir / "drawbridge.db"
        if where.is_file():  # (anything else there, sqlite names)
            with where.open("r+b"):  # opened for writing, nothing written
                pass
    except FileExistsError:  # a file (or a link to one) where the folder should be
        reason = "Not a directory"
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
    else:
        return
    raise SettingsError(f"DRAWBRIDGE_DATA_DIR: cannot use {where} ({reason})")


def _run_command(settings: Settings, console: bool) -> int:
    from bot.logs import setup_logging

    platforms = [
        name
        for name, token in (
            ("telegram", settings.telegram_bot_token),
            ("discord", settings.discord_bot_token),
        )
        if token is not None
    ]
    if not platforms and not console:
        if not sys.stdin.isatty():
            print(
                "drawbridge: nothing to serve: set TELEGRAM_BOT_TOKEN or DISCORD_BOT_TOKEN, "
                "or run `drawbridge run --console`",
                file=sys.stderr,
            )
            return 2
        console = True
    runtime.tune_malloc()
    log_file = settings.data_dir / "drawbridge.log" if console else None
    setup_logging(settings.log_level, settings.log_format, settings.secret_values(), log_file)
    return runtime.run(_run(settings, console, platforms))


async def _run(settings: Settings, console: bool, platforms: list[str]) -> int:
    from adapters.console_adapter import ConsoleAdapter
    from bot.app import open_core, serve
    from bot.locks import exclusive
    from bot.texts import pick_lang

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(settings.data_dir):
        async with open_core(settings) as core:
            services: list[Service] = []
            http = None
            if settings.http_port:
                from bot.http import HttpServer

                http = HttpServer(core, settings.http_host, settings.http_port)
            adapters = _platform_adapters(core, settings, http)  # may add webhook routes
            if http is not None:
                for adapter in adapters:
                    check = getattr(adapter, "healthy", None)
                    if callable(check):
                        http.health_checks[type(adapter).__name__] = check
            if http is not None and await _listen(http, settings, required=bool(platforms)):
                services.append(_Opened(http))  # first in, last out: webhooks work to the end
            console_adapter = None
            if console:
                lang = pick_lang(os.environ.get("LANG", "").split(".")[0].replace("_", "-"))
                console_adapter = ConsoleAdapter(core.engine, lang=lang)
                services.append(console_adapter)
            services.extend(adapters)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            # SIGHUP too: a closed terminal or SSH session stops it as gracefully as SIGTERM.
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.add_signal_handler(sig, stop.set)
            started = asyncio.Event()

            async def serving() -> None:
                async with serve(core, services):
                    started.set()
                    await _until_stopped(core, settings, stop, console_adapter, adapters)

            task = asyncio.create_task(serving(), name="serve")
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if stop.is_set() and not started.is_set():
                # A signal while a platform still hangs at start-up (a login, a getMe that
                # never answers): stop now, as asked, not when it gives up (or never).
                log.info("stopping during start-up, as asked")
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return 0
            await task
    return 0


async def _until_stopped(
    core: Core,
    settings: Settings,
    stop: asyncio.Event,
    console_adapter: ConsoleAdapter | None,
    adapters: list[Service],
) -> None:
    """Serve until a signal, the console's /quit, or a platform that will not have the bot."""
    from bot.app import CanFail

    with runtime.settled_gc():
        log.info(
            "drawbridge running: model %s, data %s", core.engine.default_model, settings.data_dir
        )
        waits = [asyncio.create_task(stop.wait())]
        if console_adapter is not None:
            waits.append(asyncio.create_task(console_adapter.finished.wait()))
        # A platform that will not have the bot any more (`failed`, `failure`) stops it, with
        # the reason, rather than leave it serving nobody there.
        failing = [a for a in adapters if isinstance(a, CanFail)]
        waits += [asyncio.create_task(a.failed.wait()) for a in failing]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        failed = [a.failure for a in failing if a.failed.is_set()]
        if failed and not stop.is_set():
            raise SettingsError(failed[0])


def telegram_webhook(adapter: TelegramAdapter) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The route Telegram POSTs updates to, checking the secret header it was given."""
    from aiohttp import web  # at run time too, not only for the type checker

    async def handle(request: web.Request) -> web.Response:
        if not adapter.webhook_secret_ok(request.headers.get("X-Telegram-Bot-Api-Secret-Token")):
            return web.Response(status=403)
        if not adapter.taking_updates:
            # Stopping: an update taken now would never be handled, and Telegram does not send
            # a 200'd update again. A 503 leaves it with Telegram for the next start.
            return web.Response(status=503)
        try:
            payload = await request.json()
        except (ValueError, RecursionError):  # (nested past the parser's depth)
            return web.Response(status=400)
        if not await adapter.process_webhook_update(payload):
            return web.Response(status=400)
        return web.Response(status=200)

    return handle


def _platform_adapters(core: Core, settings: Settings, http: HttpServer | None) -> list[Service]:
    """Every platform whose token is set; the libraries are imported only when used."""
    adapters: list[Service] = []
    if settings.telegram_bot_token is not None:
        from adapters.telegram_adapter import TelegramAdapter

        secret = settings.telegram_webhook_secret
        telegram = TelegramAdapter(
            core.engine,
            settings.telegram_bot_token.get_secret_value(),
            settings.telegram_api_url,
            webhook_url=settings.telegram_webhook_url,
            webhook_secret=secret.get_secret_value() if secret else None,
            paid_broadcast_stars=settings.telegram_paid_broadcast_stars,
        )
        if http is not None and settings.telegram_webhook_url:
            http.add_post(
                urlsplit(settings.telegram_webhook_url).path or "/", telegram_webhook(telegram)
            )
        adapters.append(telegram)
    if settings.discord_bot_token is not None:
        from adapters.discord_adapter import DiscordAdapter

        adapters.append(
            DiscordAdapter(
                core.engine,
                settings.discord_bot_token.get_secret_value(),
                settings.discord_api_url,
                settings.discord_gateway_url,
                settings.discord_guild_ids,
            )
        )
    return adapters


async def _listen(server: HttpServer, settings: Settings, *, required: bool) -> bool:
    """Open the health/metrics/webhook server now, to fail fast; in the console a busy port warns."""
    try:
        await server.open()
    except OSError as exc:
        await server.close()
        if required:
            raise SettingsError(
                f"HTTP_PORT: cannot listen on {settings.http_host}:{settings.http_port} "
                f"({exc.strerror}); set another port, or 0 for none"
            ) from None
        log.warning("no HTTP server: %s:%d is busy", settings.http_host, settings.http_port)
        return False
    return True


class _Opened:
    """A service that was opened early (to fail fast on a busy port); `serve` must not reopen it."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server

    async def open(self) -> None:
        return None

    async def start(self) -> None:
        await self.server.start()

    async def stop_intake(self) -> None:
        await self.server.stop_intake()

    async def close(self) -> None:
        await self.server.close()


async def _usage(settings: Settings, fmt: str, days: int | None) -> int:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from bot.quota import days_before, quota_day
    from bot.store import Store

    since = None
    if days is not None:
        # `jobs.day` is the quota day in QUOTA_TZ; N days are today and the N - 1 before it.
        since = days_before(quota_day(time.time(), settings.tz), days - 1)
    rows = []
    if settings.db_path.exists():  # (none yet, or the wrong folder: an empty report)
        async with await Store.open(settings.data_dir) as store:
            rows = await store.usage(since)
    if fmt == "json":
        print(json.dumps([asdict(r) for r in rows], indent=2))
        return 0
    if fmt == "csv":
        from bot.stats import usage_csv

        sys.stdout.write(usage_csv(rows).decode())
        return 0
    table = Table(title="drawbridge usage")
    for col in ("day", "user", "model", "jobs", "succeeded", "images", "cost"):
        table.add_column(
            col, justify="right" if col in ("jobs", "succeeded", "images", "cost") else "left"
        )
    for r in rows:
        table.add_row(
            r.day,
            Text(f"{r.platform}:{r.user_id}"),  # names from the database: never read as markup
            Text(r.model),
            str(r.jobs),
            str(r.succeeded),
            str(r.images),
            f"${r.cost_usd:.4f}",
        )
    total = sum(r.cost_usd for r in rows)
    images = sum(r.images for r in rows)
    table.add_section()
    table.add_row(
        "total",
        "",
        "",
        str(sum(r.jobs for r in rows)),
        str(sum(r.succeeded for r in rows)),
        str(images),
        f"${total:.4f}",
    )
    Console().print(table)
    return 0
