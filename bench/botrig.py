"""The real bot, built the way `drawbridge run` builds it, pointed at the benches' fakes.

`running_bot` loads settings with `bot.settings.load_settings` (no `.env`), opens the core with
`bot.app.open_core` on a fresh data dir (`bench.datadir`: under the working directory unless
`DRAWBRIDGE_BENCH_DIR` says otherwise), and serves it with `bot.app.serve` and a `TelegramAdapter` on the fake Bot
API, with the adapter's defaults unless a bench overrides them, and the collector settled as
`drawbridge run` settles it (`bot.runtime.settled_gc`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from bench.datadir import scratch_dir
from bench.fakehost import FakeHost


@asynccontextmanager
async def running_bot(
    host: FakeHost, env: Mapping[str, str], **adapter_options: Any
) -> AsyncIterator[Any]:
    """Yield the serving `TelegramAdapter`; `env` adds to the bench's settings."""
    from adapters.telegram_adapter import TelegramAdapter
    from bot.app import open_core, serve
    from bot.runtime import settled_gc
    from bot.settings import load_settings

    with scratch_dir() as tmp:
        settings = load_settings(
            {
                "DRAWBRIDGE_DATA_DIR": tmp,
                "TELEGRAM_BOT_TOKEN": host.token,
                "TELEGRAM_API_URL": host.tg_url,
                "QUOTA_USER_DAILY_IMAGES": "0",
                "HTTP_PORT": "0",
                **env,
            },
            env_file=None,
        )
        async with open_core(settings) as core:
            assert settings.telegram_bot_token is not None
            adapter = TelegramAdapter(
                core.engine,
                settings.telegram_bot_token.get_secret_value(),
                settings.telegram_api_url,
                **{"paid_broadcast_stars": settings.telegram_paid_broadcast_stars}
                | adapter_options,
            )
            async with serve(core, [adapter]):
                with settled_gc():  # as `drawbridge run` serves
                    await host.reset_calls()  # getMe, setMyCommands: not part of the run
                    yield adapter
