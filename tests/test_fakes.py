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


DISPOSITIONS = [
    'form-data; name="chat_id"',
    'form-data; name="photo"; filename="a1b2-0.png"',
    'form-data; name="photo"; filename="a \\"quoted\\" name.png"',
    "form-data; name=photo; filename*=utf-8''%E2%9C%A8.png",
    'form-data; name="caption"; name="twice"',
    "attachment",
    "",
    None,
]
CONTENT_TYPES = [
    "multipart/form-data; boundary=8f1e2d3c4b5a69788796a5b4c3d2e1f0",
    "multipart/form-data;boundary=----WebKitFormBoundary7MA4YWxkTrZu0gW",
    'multipart/form-data; boundary="quoted boundary"',
    "Multipart/Form-Data; boundary=abc",
    "multipart/form-data; boundary=abc; charset=utf-8",
    "application/json",
    "text/plain; charset=UTF-8",
    "nonsense",
]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # aiohttp warns of the malformed ones
def test_quick_form_headers_answer_as_aiohttp_does() -> None:
    from aiohttp import helpers, multipart

    from tests.fakes import quick_form_headers

    quick_form_headers()
    disposition = multipart.parse_content_disposition
    content_type = helpers.parse_content_type
    for header in DISPOSITIONS * 2:  # the second round comes from the cache
        assert disposition(header) == disposition.original(header), header  # type: ignore[attr-defined]
    first = disposition(DISPOSITIONS[1])[1]
    first["name"] = "changed"  # a caller's copy: the next caller is not affected
    assert disposition(DISPOSITIONS[1])[1]["name"] == "photo"
    for raw in CONTENT_TYPES:
        assert content_type(raw) == content_type.original(raw), raw  # type: ignore[attr-defined]
