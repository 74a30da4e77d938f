"""`drawbridge run` as a black box: the real process, configured only by its environment."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from tests.fake_discord import GUILD_ID, FakeDiscord


class Process:
    """The running program; its stderr is drained as it comes, so a chatty log never blocks it."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.stderr = bytearray()
        assert proc.stderr is not None
        self._reader = asyncio.create_task(self._drain(proc.stderr))

    async def _drain(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(65536):
            self.stderr += chunk

    async def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.proc.wait(), 20)
        await self._reader
        return code


@asynccontextmanager
async def drawbridge(tmp_path: Path, **env: str) -> AsyncIterator[Process]:
    environ = {k: v for k, v in os.environ.items() if not k.endswith(("_TOKEN", "_API_KEY"))}
    environ.update(DRAWBRIDGE_DATA_DIR=str(tmp_path / "data"), HTTP_PORT="0", SHUTDOWN_GRACE="1")
    environ.update(env)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "run",
        cwd=tmp_path, env=environ, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        yield Process(proc)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def healthz(port: int) -> dict[str, Any]:
    body: dict[str, Any] = {}
    async with aiohttp.ClientSession() as session:
        for _ in range(100):  # the server may still be starting
            try:
                async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    body = await resp.json()
                    if body.get("ok"):
                        return body
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    return body


def rows(tmp_path: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(tmp_path / "data" / "drawbridge.db") as db:
        return db.execute(sql).fetchall()


async def test_discord_imagine_end_to_end(tmp_path: Path) -> None:
    token = "MTIzNDU2Nzg5.Gh7x_Q.secret-discord-token-value"
    fake = FakeDiscord(token=token)
    await fake.start()
    try:
        async with drawbridge(
            tmp_path,
            DISCORD_BOT_TOKEN=fake.token,
            DISCORD_API_URL=fake.api_url,
            DISCORD_GATEWAY_URL=fake.gateway_url,
            DISCORD_GUILD_IDS=GUILD_ID,
            GEMINI_API_KEY="AIza-secret-gemini-key-0000",
            LOG_LEVEL="DEBUG",
        ) as proc:
            await fake.wait_identified(within=20)
            await fake.wait_for(lambda: GUILD_ID in fake.commands, within=10)
            inter = await fake.slash(
                "imagine", {"prompt": "a lighthouse, black box", "model": "demo"}
            )
            (followup,) = await fake.wait_for(lambda: fake.followups(inter.token), within=20)
            assert inter.ack_delay is not None and inter.ack_delay < 3
            assert followup.files[0].data.startswith(b"\x89PNG")
            assert await proc.stop() == 0
            logs = proc.stderr.decode()
        assert "job=" in logs  # the job's transitions are logged…
        assert token not in logs and "AIza-secret" not in logs  # …and no secret ever is
        assert rows(tmp_path, "SELECT platform, status, cost_usd FROM jobs") == [
            ("discord", "succeeded", 0.0)
        ]
    finally:
        await fake.close()


async def test_telegram_imagine_end_to_end_in_a_forum_topic(tmp_path: Path) -> None:
    from tests.fake_grsai import FakeGrsai
    from tests.fake_telegram import FakeTelegram

    async with (
        FakeTelegram(token="7654321:AAH-real-looking-telegram-token") as tg,
        FakeGrsai() as grsai,
    ):
        async with drawbridge(
            tmp_path,
            TELEGRAM_BOT_TOKEN=tg.token,
            TELEGRAM_API_URL=tg.url,
            GRSAI_API_KEY=grsai.api_key,
            GRSAI_BASE_URL=grsai.base_url,
            LOG_LEVEL="DEBUG",
        ) as proc:
            await tg.wait_for("setMyCommands", within=20)
            group = tg.chat(-100123, kind="supergroup", forum=True)
            tg.message("/imagine a lighthouse at dusk --ar 16:9", chat=group, thread_id=7)
            (photo,) = await tg.wait_for("sendPhoto", within=20)
            assert photo.chat_id == -100123
            assert str(photo.params.get("message_thread_id")) == "7"
            assert await proc.stop() == 0
            logs = proc.stderr.decode()
        assert tg.token not in logs and grsai.api_key not in logs
        assert grsai.submits == 1
        assert rows(
            tmp_path, "SELECT platform, chat_id, thread_id, status, model, cost_usd FROM jobs"
        ) == [("telegram", "-100123", "7", "succeeded", "nano-banana", 0.04)]


async def test_one_process_serves_telegram_and_discord_with_one_queue_and_ledger(
    tmp_path: Path,
) -> None:
    from tests.fake_discord import FakeDiscord
    from tests.fake_telegram import FakeTelegram

    discord = FakeDiscord()
    await discord.start()
    try:
        async with (
            FakeTelegram() as tg,
            drawbridge(
                tmp_path,
                TELEGRAM_BOT_TOKEN=tg.token,
                TELEGRAM_API_URL=tg.url,
                DISCORD_BOT_TOKEN=discord.token,
                DISCORD_API_URL=discord.api_url,
                DISCORD_GATEWAY_URL=discord.gateway_url,
                QUOTA_USER_DAILY_IMAGES="5",
            ) as proc,
        ):
            await tg.wait_for("setMyCommands", within=20)
            await discord.wait_identified(within=20)
            tg.message("/imagine a fox in the snow")
            inter = await discord.slash("imagine", {"prompt": "a fox in the rain"})
            await tg.wait_for("sendPhoto", within=20)
            await discord.wait_for(lambda: discord.followups(inter.token), within=20)
            assert await proc.stop() == 0
        ledger = rows(tmp_path, "SELECT platform, status FROM jobs ORDER BY platform")
        assert ledger == [("discord", "succeeded"), ("telegram", "succeeded")]
        usage = rows(tmp_path, "SELECT count(DISTINCT day) FROM jobs")
        assert usage == [(1,)]
    finally:
        await discord.close()
