"""The loopback fakes themselves: a burst of connections reaches them as it would a real API."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fake_discord import FakeDiscord
from tests.fake_gemini import FakeGemini
from tests.fake_grsai import FakeGrsai
from tests.fake_openai import FakeOpenAI
from tests.fake_telegram import FakeTelegram

NETSTAT = Path("/proc/net/netstat")


def listen_overflows() -> int:
    """Connections this machine's listening sockets had no room for (Linux's TcpExt counter)."""
    lines = NETSTAT.read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=True):
        row = dict(zip(names.split(), values.split(), strict=True))
        if "ListenOverflows" in row:
            return int(row["ListenOverflows"])
    raise LookupError("no ListenOverflows in /proc/net/netstat")


@contextlib.asynccontextmanager
async def started(make: Callable[[], Any]) -> AsyncIterator[int]:
    """A fake, running; its port."""
    fake = make()
    if isinstance(fake, FakeDiscord):
        await fake.start()
        try:
            yield fake.port
        finally:
            await fake.close()
        return
    async with fake:
        yield fake._runner.addresses[0][1]


@pytest.mark.skipif(not NETSTAT.exists(), reason="counts the kernel's listen overflows (Linux)")
@pytest.mark.parametrize("make", [FakeGrsai, FakeTelegram, FakeOpenAI, FakeGemini, FakeDiscord])
async def test_three_hundred_connections_at_once_wait_for_the_server_not_a_retry(
    make: Callable[[], Any],
) -> None:
    # aiohttp's default backlog (128) lets the kernel drop the rest of such a burst, and each
    # dropped connection comes back only after TCP's one-second retransmission timeout.
    async with started(make) as port:
        before = listen_overflows()
        clients = [socket.socket() for _ in range(300)]
        try:
            for client in clients:  # the loop is blocked here: nothing is accepted meanwhile
                client.setblocking(False)
                client.connect_ex(("127.0.0.1", port))
            time.sleep(0.2)  # noqa: ASYNC251 - the loop must not accept: the handshakes, in the kernel
            dropped = listen_overflows() - before
        finally:
            for client in clients:
                client.close()
    assert dropped == 0
