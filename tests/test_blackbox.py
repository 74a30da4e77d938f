"""`drawbridge run` as a black box: the real process, configured only by its environment."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from tests.fake_discord import GUILD_ID, FakeDiscord


@asynccontextmanager
async def drawbridge(tmp_path: Path, **env: str) -> AsyncIterator[asyncio.subprocess.Process]:
    environ = {k: v for k, v in os.environ.items() if not k.endswith(("_TOKEN", "_API_KEY"))}
    environ.update(DRAWBRIDGE_DATA_DIR=str(tmp_path / "data"), HTTP_PORT="0", SHUTDOWN_GRACE="1")
    environ.update(env)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "run",
        cwd=tmp_path, env=environ, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def rows(tmp_path: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(tmp_path / "data" / "drawbridge.db") as db:
        return db.execute(sql).fetchall()


async def test_discord_imagine_end_to_end(tmp_path: Path) -> None:
    fake = FakeDiscord()
    await fake.start()
    try:
        async with drawbridge(
            tmp_path,
            DISCORD_BOT_TOKEN=fake.token,
            DISCORD_API_URL=fake.api_url,
            DISCORD_GATEWAY_URL=fake.gateway_url,
            DISCORD_GUILD_IDS=GUILD_ID,
        ) as proc:
            await fake.wait_identified(within=20)
            await fake.wait_for(lambda: GUILD_ID in fake.commands, within=10)
            inter = await fake.slash("imagine", {"prompt": "a lighthouse, black box"})
            (followup,) = await fake.wait_for(lambda: fake.followups(inter.token), within=20)
            assert inter.ack_delay is not None and inter.ack_delay < 3
            assert followup.files[0].data.startswith(b"\x89PNG")
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 20) == 0
        assert rows(tmp_path, "SELECT platform, status, cost_usd FROM jobs") == [
            ("discord", "succeeded", 0.0)
        ]
    finally:
        await fake.close()
