"""Hostile and unusual provider behaviour against the real provider clients.

Each probe plays a provider (or a proxy in front of one) misbehaving on loopback: the shared fakes
where they already can, else a small scriptable aiohttp server defined here. For every probe the
client must map the failure to the right `ErrorKind` (retryable or not as the taxonomy says),
never run past its timeout, never return a non-image as an image and never put the API key in an
error's text. A few probes go through the engine too: the job must end, with a message, uncharged.

A note on a probe says what it once found wrong.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from aiohttp import web
from PIL import Image

from bot.catalog import Catalog
from bot.engine import Engine, EngineConfig
from bot.errors import (
    AuthFailed,
    BadRequest,
    Expired,
    ModelUnavailable,
    ProviderError,
    RateLimited,
    Refused,
    Transient,
)
from bot.jobs import GeneratedImage, Options, Request, Target, UserRef
from bot.providers.base import GenerationRequest
from bot.providers.gemini import GeminiProvider
from bot.providers.grsai import NANO_BANANA, GrsaiProvider
from bot.providers.http import parse_retry_after
from bot.providers.openai_images import OpenAIImagesProvider
from bot.providers.retry import hinted_wait
from bot.store import Store
from tests.fake_gemini import FakeGemini
from tests.fake_grsai import FakeGrsai, Fault
from tests.fakes import RecordingAdapter

GRSAI_KEY = "sk-" + "0123456789abcdef" * 2
OPENAI_KEY = "sk-hostile-" + "Q7" * 12
GEMINI_KEY = "AIzaSyHOSTILE" + "k9" * 13
KEYS = (GRSAI_KEY, OPENAI_KEY, GEMINI_KEY)
GEMINI_MODEL = "gemini-2.5-flash-image"
GEMINI_PATH = f"/v1beta/models/{GEMINI_MODEL}:generateContent"
OPENAI_PATH = "/v1/images/generations"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- images, good and bad ------------------------------------------------------------------------


def png(width: int = 8, height: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 140, 90)).save(buf, "PNG")
    return buf.getvalue()


def gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, "GIF")
    return buf.getvalue()


PNG = png()
PNG_1X1 = png(1, 1)
NOT_IMAGES = {
    "html": b"<html><body><h1>502 Bad Gateway</h1></body></html>",
    "text": b"this is not a picture",
    "gif": gif(),
    "png magic then junk": b"\x89PNG\r\n\x1a\n" + b"junk" * 40,
    "truncated png": PNG[: len(PNG) // 2],
    "empty": b"",
}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- a scriptable loopback server ------------------------------------------------------------------


class Hostile:
    """An aiohttp server whose routes each test scripts: `server.routes[path] = handler`."""

    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        self.hits: list[str] = []
        self.closing = asyncio.Event()
        self.root = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> Hostile:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, shutdown_timeout=0.2, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.root = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.closing.set()  # releases hung handlers
        if self._runner is not None:
            await self._runner.cleanup()

    def url(self, path: str) -> str:
        return self.root + path

    def count(self, path: str) -> int:
        return self.hits.count(path)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(request.path)
        if request.can_read_body:
            await request.read()
        handler = self.routes.get(request.path)
        if handler is None:
            return web.Response(status=404, text="no such route")
        return await handler(request)

    # -- handler factories ---------------------------------------------------------------------

    def reply(
        self,
        body: Any,
        status: int = 200,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
        delay: float = 0.0,
    ) -> Handler:
        """A whole answer; a dict or list body is sent as JSON (with Infinity/NaN if asked)."""
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        if isinstance(body, str):
            raw = body.encode()

        async def handler(request: web.Request) -> web.StreamResponse:
            if delay:
                await asyncio.sleep(delay)
            return web.Response(body=raw, status=status, content_type=content_type, headers=headers)

        return handler

    def sequence(self, *handlers: Handler) -> Handler:
        """Each call answered by the next handler; the last one repeats."""
        calls = 0

        async def handler(request: web.Request) -> web.StreamResponse:
            nonlocal calls
            chosen = handlers[min(calls, len(handlers) - 1)]
            calls += 1
            return await chosen(request)

        return handler

    def hang(self) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            await self.closing.wait()
            return web.Response(status=503)

        return handler

    def partial(
        self,
        head: bytes,
        *,
        content_length: int | None,
        then: str,
        content_type: str = "application/json",
        delay: float = 0.0,
    ) -> Handler:
        """Headers and the first bytes of a body, then `hang` or `reset` (the socket closes)."""

        async def handler(request: web.Request) -> web.StreamResponse:
            if delay:
                await asyncio.sleep(delay)
            resp = web.StreamResponse(headers={"Content-Type": content_type})
            if content_length is not None:
                resp.content_length = content_length
            await resp.prepare(request)
            await resp.write(head)
            if then == "hang":
                await self.closing.wait()
            elif request.transport is not None:
                request.transport.close()
            return resp

        return handler

    def endless(self, chunk: bytes = b"\x89PNG\r\n\x1a\n" + b"\0" * 65528) -> Handler:
        """A chunked body (no Content-Length) that goes on until the client hangs up."""

        async def handler(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse(headers={"Content-Type": "image/png"})
            await resp.prepare(request)
            try:
                for _ in range(2000):  # 128 MB at most, should the client never stop
                    await resp.write(chunk)
            except (ConnectionError, RuntimeError):
                pass
            return resp

        return handler

    def sse(
        self,
        *items: Any,
        then: str = "eof",
        content_type: str = "text/event-stream",
        delay: float = 0.0,
    ) -> Handler:
        """A stream: a dict is one `data: {json}` line, a str a raw line; then eof/hang/reset."""

        async def handler(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse(headers={"Content-Type": content_type})
            await resp.prepare(request)
            for item in items:
                if isinstance(item, dict):
                    chunk = f"data: {json.dumps(item)}\n\n".encode()
                elif isinstance(item, str):
                    chunk = (item + "\n").encode()
                else:
                    chunk = item
                await resp.write(chunk)
                if delay:
                    await asyncio.sleep(delay)
            if then == "hang":
                await self.closing.wait()
            elif then == "reset":
                if request.transport is not None:
                    request.transport.close()
                return resp
            await resp.write_eof()
            return resp

        return handler

    def redirect(self, location: str, status: int = 302) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            return web.Response(status=status, headers={"Location": location})

        return handler


@pytest.fixture
async def server() -> AsyncIterator[Hostile]:
    async with Hostile() as s:
        yield s


# -- running a probe -----------------------------------------------------------------------------


class Hung(Exception):
    """The call was still running when the probe's guard fired."""


async def outcome(call: Awaitable[Any], guard: float = 5.0) -> tuple[Any, float]:
    """The call's result or exception, and how long it took; `Hung` if it outlived `guard`."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    value: Any
    try:
        async with asyncio.timeout(guard) as scope:
            value = await call
    except TimeoutError as exc:
        value = Hung(f"still running after {guard:g} s") if scope.expired() else exc
    except Exception as exc:
        value = exc
    return value, loop.time() - began


def assert_failed(value: Any, kind: type[ProviderError]) -> ProviderError:
    """`value` is a `kind` error whose text holds no API key; no image came back."""
    assert not isinstance(value, list), f"returned {value!r} where {kind.__name__} was expected"
    assert isinstance(value, kind), f"{type(value).__name__}: {value} (expected {kind.__name__})"
    for key in KEYS:
        assert key not in str(value) and key not in repr(value.args)
    return value


def assert_images(value: Any, n: int = 1, size: tuple[int, int] | None = None) -> None:
    assert isinstance(value, list), f"expected images, got {type(value).__name__}: {value}"
    assert len(value) == n
    for image in value:
        assert isinstance(image, GeneratedImage)
        assert image.data.startswith(b"\x89PNG") and image.mime == "image/png"
        if size is not None:
            assert (image.width, image.height) == size


class Hooks:
    def __init__(self) -> None:
        self.percents: list[int] = []
        self.tasks: list[str | None] = []
        self.made = 0

    async def progress(self, percent: int) -> None:
        self.percents.append(percent)

    async def task_submitted(self, task_id: str | None) -> None:
        self.tasks.append(task_id)

    def generated(self) -> None:
        self.made += 1


def engine_wait(value: ProviderError) -> float:
    """What the engine would sleep before its next try after this error."""
    return hinted_wait(value, 0.5, 120.0)


# -- GrsAI -------------------------------------------------------------------------------------


def task(status: str = "running", progress: Any = 0, urls: tuple[str, ...] = (), **extra: Any):
    return {
        "id": "t1",
        "results": [{"url": u, "content": "a picture"} for u in urls],
        "progress": progress,
        "status": status,
        "failure_reason": "",
        "error": "",
        **extra,
    }


def grsai_request(timeout_s: float = 5.0, **changes: Any) -> GenerationRequest:
    fields: dict[str, Any] = {
        "job_id": "job-h",
        "model": "nano-banana",
        "remote_model": "nano-banana",
        "endpoint": NANO_BANANA,
        "prompt": "a fox in the snow",
        "n": 1,
        "aspect_ratio": "1:1",
        "size": None,
        "seed": None,
        "timeout_s": timeout_s,
    }
    fields.update(changes)
    return GenerationRequest(**fields)


@asynccontextmanager
async def grsai_client(base_url: str, **kwargs: Any) -> AsyncIterator[GrsaiProvider]:
    kwargs.setdefault("poll_interval", 0.02)
    provider = GrsaiProvider(kwargs.pop("api_key", GRSAI_KEY), base_url, **kwargs)
    try:
        yield provider
    finally:
        await provider.aclose()


async def grsai_run(
    server: Hostile, hooks: Hooks | None = None, guard: float = 5.0, **request: Any
) -> tuple[Any, float]:
    async with grsai_client(server.root) as provider:
        return await outcome(provider.generate(grsai_request(**request), hooks or Hooks()), guard)


async def test_grsai_stream_that_never_ends_is_bounded_and_keeps_the_task(
    server: Hostile,
) -> None:
    server.routes[NANO_BANANA] = server.sse(task(progress=10), then="hang")
    server.routes["/v1/draw/result"] = server.reply({"code": 0, "data": task(progress=50)})
    hooks = Hooks()
    value, took = await grsai_run(server, hooks, timeout_s=0.8)
    assert_failed(value, Transient)
    assert took < 0.8 + 0.7
    assert hooks.tasks == ["t1"]  # the id stays: a retry resumes the paid task


async def test_grsai_stream_closed_without_a_final_event_is_followed_by_polling(
    server: Hostile,
) -> None:
    server.routes[NANO_BANANA] = server.sse(task(progress=10), task(progress=40))
    done = task("succeeded", 100, (server.url("/files/a.png"),))
    server.routes["/v1/draw/result"] = server.reply({"code": 0, "data": done})
    server.routes["/files/a.png"] = server.reply(PNG, content_type="image/png")
    value, _ = await grsai_run(server)
    assert_images(value)
    assert server.count(NANO_BANANA) == 1  # never paid twice


@pytest.mark.parametrize("when", ["before the id", "after the id"])
async def test_grsai_connection_reset_mid_stream(server: Hostile, when: str) -> None:
    lines = [] if when == "before the id" else [task(progress=10)]
    server.routes[NANO_BANANA] = server.sse(*lines, then="reset")
    done = task("succeeded", 100, (server.url("/files/a.png"),))
    server.routes["/v1/draw/result"] = server.reply({"code": 0, "data": done})
    server.routes["/files/a.png"] = server.reply(PNG, content_type="image/png")
    value, _ = await grsai_run(server)
    if when == "before the id":
        assert_failed(value, Transient)
        assert server.count("/v1/draw/result") == 0
    else:
        assert_images(value)


@pytest.mark.parametrize(
    "lines, expect",
    [
        (["data: <html>502</html>"], Transient),
        (['data: {"id": "t1", "progr'], Transient),
        ([task(progress=10), "data: {not json"], "polled"),
        ([task(progress=10), "<html><body>gateway</body></html>", ""], "polled"),
        ([": keep-alive", "event: ping", "retry: 50", "id: 7", "", task(progress=10)], "polled"),
    ],
    ids=["html line first", "truncated first", "garbled after id", "html after id", "sse noise"],
)
async def test_grsai_malformed_stream_lines(server: Hostile, lines: list[Any], expect: Any) -> None:
    server.routes[NANO_BANANA] = server.sse(*lines)
    done = task("succeeded", 100, (server.url("/files/a.png"),))
    server.routes["/v1/draw/result"] = server.reply({"code": 0, "data": done})
    server.routes["/files/a.png"] = server.reply(PNG, content_type="image/png")
    value, _ = await grsai_run(server)
    if expect == "polled":
        assert_images(value)
        assert server.count(NANO_BANANA) == 1
    else:
        assert_failed(value, expect)


async def test_grsai_progress_out_of_range_is_clamped(server: Hostile) -> None:
    url = server.url("/files/a.png")
    progress = [250, -20, "55", "abc", None, True, 99.9, [1], {"p": 2}]
    server.routes[NANO_BANANA] = server.sse(
        *(task(progress=p) for p in progress), task("succeeded", 100, (url,))
    )
    server.routes["/files/a.png"] = server.reply(PNG, content_type="image/png")
    hooks = Hooks()
    value, _ = await grsai_run(server, hooks)
    assert_images(value)
    assert hooks.percents and all(0 <= p <= 100 for p in hooks.percents)


@pytest.mark.parametrize(
    "progress", [math.inf, -math.inf, math.nan, 10**400], ids=["inf", "-inf", "nan", "10**400"]
)
async def test_grsai_non_finite_progress_is_ignored(server: Hostile, progress: Any) -> None:
    # `"progress": Infinity` (or 1e999) once escaped the client as a bare OverflowError; it is
    # skipped as any unreadable progress is.
    url = server.url("/files/a.png")
    server.routes[NANO_BANANA] = server.sse(task(progress=progress), task("succeeded", 100, (url,)))
    server.routes["/files/a.png"] = server.reply(PNG, content_type="image/png")
    value, _ = await grsai_run(server)
    assert isinstance(value, list | ProviderError), f"{type(value).__name__}: {value}"
    assert_images(value)


async def test_grsai_succeeded_twice_downloads_once(server: Hostile) -> None:
    url = server.url("/files/a.png")
    done = task("succeeded", 100, (url,))
    server.routes[NANO_BANANA] = server.sse(task(progress=10), done, done, "data: [DONE]")
    server.routes["/files/a.png"] = server.reply(PNG, content_type="image/png")
    hooks = Hooks()
    value, _ = await grsai_run(server, hooks)
    assert_images(value)
    assert server.count("/files/a.png") == 1 and hooks.made == 1


async def test_grsai_stream_with_a_lying_content_type_still_works(server: Hostile) -> None:
    url = server.url("/files/a.png")
    server.routes[NANO_BANANA] = server.sse(
        task(progress=10), task("succeeded", 100, (url,)), content_type="text/html"
    )
    server.routes["/files/a.png"] = server.reply(PNG, content_type="application/octet-stream")
    value, _ = await grsai_run(server)
    assert_images(value)


def _file_route(server: Hostile, kind: str) -> tuple[str, type[ProviderError] | None]:
    """Script `/files/…` for one kind of result URL; returns the URL and the expected error."""
    if kind == "relative":
        server.routes["/files/a.png"] = server.reply(PNG, content_type="image/png")
        return "/files/a.png", Transient
    if kind == "ftp":
        return "ftp://127.0.0.1/a.png", Transient
    if kind == "javascript":
        return "javascript:alert(1)", Transient
    if kind in ("403", "404", "410"):
        server.routes["/files/a.png"] = server.reply(b"gone", int(kind), "text/plain")
        return server.url("/files/a.png"), Expired
    if kind == "500":
        server.routes["/files/a.png"] = server.reply(b"oops", 500, "text/plain")
        return server.url("/files/a.png"), Transient
    if kind == "redirect":
        server.routes["/files/a.png"] = server.redirect(server.url("/cdn/a.png"))
        server.routes["/cdn/a.png"] = server.reply(PNG, content_type="image/png")
        return server.url("/files/a.png"), None
    if kind == "redirect to 404":
        server.routes["/files/a.png"] = server.redirect(server.url("/cdn/gone.png"))
        return server.url("/files/a.png"), Expired
    if kind == "redirect loop":
        server.routes["/files/a.png"] = server.redirect(server.url("/files/a.png"))
        return server.url("/files/a.png"), Transient
    if kind == "1x1":
        server.routes["/files/a.png"] = server.reply(PNG_1X1, content_type="image/png")
        return server.url("/files/a.png"), None
    # a non-image served as an image
    server.routes["/files/a.png"] = server.reply(NOT_IMAGES[kind], content_type="image/png")
    return server.url("/files/a.png"), Transient


URL_KINDS = [
    "relative",
    "ftp",
    "javascript",
    "403",
    "404",
    "410",
    "500",
    "redirect",
    "redirect to 404",
    "redirect loop",
    "1x1",
    *NOT_IMAGES,
]


@pytest.mark.parametrize("kind", URL_KINDS)
async def test_grsai_hostile_result_urls(server: Hostile, kind: str) -> None:
    url, expected = _file_route(server, kind)
    server.routes[NANO_BANANA] = server.sse(task("succeeded", 100, (url,)))
    value, _ = await grsai_run(server)
    if expected is None:
        assert_images(value, size=(1, 1) if kind == "1x1" else (8, 8))
    else:
        assert_failed(value, expected)


async def test_grsai_result_download_that_hangs_mid_body_is_bounded(server: Hostile) -> None:
    # The result download once had a fixed 120 s whatever was left of the job's time; it gets
    # what is left now.
    url = server.url("/files/a.png")
    server.routes[NANO_BANANA] = server.sse(task("succeeded", 100, (url,)))
    server.routes["/files/a.png"] = server.partial(
        PNG[:20], content_length=len(PNG), then="hang", content_type="image/png"
    )
    value, took = await grsai_run(server, timeout_s=0.8, guard=3.0)
    assert_failed(value, Transient)
    assert took < 0.8 + 1.0


@pytest.mark.parametrize("how", ["declared 200 MB", "endless chunked"])
async def test_grsai_oversized_result_is_refused_early(server: Hostile, how: str) -> None:
    url = server.url("/files/a.png")
    server.routes[NANO_BANANA] = server.sse(task("succeeded", 100, (url,)))
    if how == "declared 200 MB":
        server.routes["/files/a.png"] = server.partial(
            PNG[:16], content_length=200_000_000, then="hang", content_type="image/png"
        )
        max_bytes = 50_000_000
    else:
        server.routes["/files/a.png"] = server.endless()
        max_bytes = 300_000
    async with grsai_client(server.root, max_image_bytes=max_bytes) as provider:
        value, took = await outcome(provider.generate(grsai_request(), Hooks()), 5.0)
    assert_failed(value, Transient)
    assert took < 2.0


@pytest.mark.parametrize(
    "body, expected",
    [
        ({"code": -1, "msg": "apikey error"}, AuthFailed),
        ({"code": -1, "msg": "apikey expired"}, AuthFailed),
        ({"code": -1, "msg": "余额不足"}, AuthFailed),
        ({"code": 429, "msg": "too many requests"}, RateLimited),
        ({"code": -1, "msg": "model not register"}, ModelUnavailable),
        ({"code": -1, "msg": "model_not_found: gpt-image-9"}, ModelUnavailable),
        ({"code": 503, "msg": "server error"}, Transient),
        ({"code": 500, "msg": "internal error, please retry"}, Transient),
    ],
    ids=[
        "apikey",
        "expired key",
        "balance",
        "429",
        "bad model",
        "model_not_found",
        "code 503",
        "code 500",
    ],
)
async def test_grsai_http_200_with_an_error_body(
    server: Hostile, body: dict[str, Any], expected: type[ProviderError]
) -> None:
    # A `{code: 5xx}` envelope under HTTP 200 was once BadRequest (not retried, blamed on the
    # request); it is Transient, as the same body under HTTP 503 is.
    server.routes[NANO_BANANA] = server.reply(body)
    value, _ = await grsai_run(server)
    assert_failed(value, expected)


@pytest.mark.parametrize(
    "retry_after, expected",
    [
        ("http-date+30", 30.0),
        ("http-date-past", 0.0),
        ("soon", None),
        ("-5", 0.0),
        ("99999999", 99999999.0),
        ("1e999", math.inf),
    ],
)
async def test_grsai_retry_after_forms(retry_after: str, expected: float | None) -> None:
    if retry_after == "http-date+30":
        retry_after = email.utils.formatdate(time.time() + 30, usegmt=True)
    elif retry_after == "http-date-past":
        retry_after = "Wed, 21 Oct 2015 07:28:00 GMT"
    async with FakeGrsai(api_key=GRSAI_KEY) as fake, grsai_client(fake.base_url) as provider:
        fake.submit_faults.append(Fault.http(429, retry_after=retry_after))
        value, _ = await outcome(provider.generate(grsai_request(), Hooks()))
    error = assert_failed(value, RateLimited)
    if expected is None:
        assert error.retry_after is None
    else:
        assert error.retry_after == pytest.approx(expected, abs=2.0)
    assert 0.0 <= engine_wait(error) <= 120.0


async def test_grsai_429_without_retry_after(server: Hostile) -> None:
    server.routes[NANO_BANANA] = server.reply({"code": 429, "msg": "too frequent"}, status=429)
    value, _ = await grsai_run(server)
    assert assert_failed(value, RateLimited).retry_after is None


async def test_grsai_proxy_html_error_page(server: Hostile) -> None:
    page = "<html><body><h1>502 Bad Gateway</h1></body></html>"
    server.routes[NANO_BANANA] = server.reply(
        page, status=502, content_type="text/html", headers={"Retry-After": "3"}
    )
    value, _ = await grsai_run(server)
    assert assert_failed(value, Transient).retry_after == pytest.approx(3.0)


@pytest.mark.parametrize("where", ["task error", "error msg", "401 msg"])
async def test_grsai_never_echoes_the_key(server: Hostile, where: str) -> None:
    echo = f"upstream rejected Bearer {GRSAI_KEY} for this call"
    if where == "task error":
        failed = task("failed", 100, failure_reason="error", error=echo)
        server.routes[NANO_BANANA] = server.sse(failed)
        expected: type[ProviderError] = Transient
    elif where == "error msg":
        server.routes[NANO_BANANA] = server.reply({"code": -1, "msg": f"apikey error: {echo}"})
        expected = AuthFailed
    else:
        server.routes[NANO_BANANA] = server.reply({"code": 401, "msg": echo}, status=401)
        expected = AuthFailed
    value, _ = await grsai_run(server)
    assert_failed(value, expected)


async def test_grsai_task_running_forever_on_poll_is_bounded() -> None:
    hooks = Hooks()
    async with (
        FakeGrsai(api_key=GRSAI_KEY, steps=[5] * 10_000) as fake,
        grsai_client(fake.base_url, mode="poll") as provider,
    ):
        value, took = await outcome(provider.generate(grsai_request(0.6), hooks))
    assert_failed(value, Transient)
    assert took < 0.6 + 0.7
    assert hooks.tasks == ["task-0001"]  # kept: a retry resumes instead of paying again
    assert fake.submits == 1


@pytest.mark.parametrize(
    "answer",
    [
        {"code": 0, "msg": "success", "data": None},
        "<html><body>gateway timeout</body></html>",
        b"",
    ],
    ids=["data null", "html", "empty"],
)
async def test_grsai_poll_garbage_is_bounded(server: Hostile, answer: Any) -> None:
    server.routes[NANO_BANANA] = server.sse(task(progress=10))  # then EOF: polling takes over
    server.routes["/v1/draw/result"] = server.reply(answer)
    value, took = await grsai_run(server, timeout_s=3.0)
    assert_failed(value, Transient)
    assert took < 3.0


# -- OpenAI Images ----------------------------------------------------------------------------


def openai_request(
    timeout_s: float = 5.0, model: str = "gpt-image-1", n: int = 1
) -> GenerationRequest:
    return GenerationRequest(
        job_id="job-o",
        model=model,
        remote_model=model,
        endpoint="/images/generations",
        prompt="a fox in the snow",
        n=n,
        aspect_ratio="1:1",
        size=None,
        seed=None,
        timeout_s=timeout_s,
    )


async def openai_run(
    server: Hostile, timeout_s: float = 5.0, guard: float = 5.0, **kwargs: Any
) -> tuple[Any, float]:
    provider = OpenAIImagesProvider(OPENAI_KEY, server.url("/v1"), **kwargs)
    try:
        return await outcome(provider.generate(openai_request(timeout_s), Hooks()), guard)
    finally:
        await provider.aclose()


def wrapped_b64(data: bytes) -> str:
    """Base64 wrapped at 76 columns, as MIME encoders write it."""
    text = b64(data)
    return "\n".join(text[i : i + 76] for i in range(0, len(text), 76))


OPENAI_200_BODIES: dict[str, tuple[Any, str, type[ProviderError] | None]] = {
    "html page": (b"<html><body>502 Bad Gateway</body></html>", "text/html", Transient),
    "empty": (b"", "application/json", Transient),
    "truncated": (b'{"created": 1, "data": [{"b64_json": "iVBOR', "application/json", Transient),
    "a list": ([], "application/json", Transient),
    "no items": ({"data": []}, "application/json", Transient),
    "null item": ({"data": [None]}, "application/json", Transient),
    "data not a list": ({"data": {"b64_json": b64(PNG)}}, "application/json", Transient),
    "invalid base64": ({"data": [{"b64_json": "%%%not-base64%%%"}]}, "application/json", Transient),
    "relative url": ({"data": [{"url": "/files/a.png"}]}, "application/json", Transient),
    "empty fields": ({"data": [{"b64_json": "", "url": ""}]}, "application/json", Transient),
    "data uri of text": (
        {"data": [{"url": "data:image/png;base64," + b64(b"hello")}]},
        "application/json",
        Transient,
    ),
    **{
        f"base64 of {name}": ({"data": [{"b64_json": b64(data)}]}, "application/json", Transient)
        for name, data in NOT_IMAGES.items()
    },
    "png behind a text/plain lie": ({"data": [{"b64_json": b64(PNG)}]}, "text/plain", None),
    "1x1 png": ({"data": [{"b64_json": b64(PNG_1X1)}]}, "application/json", None),
    "mime-wrapped base64": ({"data": [{"b64_json": wrapped_b64(png(64, 64))}]}, "", None),
    "error content_policy_violation": (
        {"error": {"message": "rejected by our safety system", "code": "content_policy_violation"}},
        "application/json",
        Refused,
    ),
    "error moderation_blocked": (
        {"error": {"message": "safety system", "code": "moderation_blocked"}},
        "application/json",
        Refused,
    ),
    "error code 429": (
        {"error": {"message": "upstream rate limited", "code": 429}},
        "application/json",
        RateLimited,
    ),
    "error as a string": ({"error": "upstream timeout"}, "application/json", Transient),
}


@pytest.mark.parametrize("case", OPENAI_200_BODIES)
async def test_openai_http_200_bodies(server: Hostile, case: str) -> None:
    body, content_type, expected = OPENAI_200_BODIES[case]
    server.routes["/files/a.png"] = server.reply(PNG, content_type="image/png")
    server.routes[OPENAI_PATH] = server.reply(body, content_type=content_type or "application/json")
    value, _ = await openai_run(server)
    if expected is None:
        size = (1, 1) if case == "1x1 png" else None
        assert_images(value, size=size)
    else:
        assert_failed(value, expected)


def _api_error(message: str, code: Any = None, type_: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


OPENAI_ERRORS: dict[str, tuple[int, Any, dict[str, str], type[ProviderError], bool]] = {
    # name: (status, body, headers, kind, retryable)
    "401 invalid_api_key": (
        401,
        _api_error("Incorrect API key provided: sk-hos***Q7Q7.", "invalid_api_key"),
        {},
        AuthFailed,
        False,
    ),
    "403 org not verified": (
        403,
        _api_error("Your organization must be verified to use the model `gpt-image-1`."),
        {},
        AuthFailed,
        False,
    ),
    "400 moderation_blocked": (
        400,
        _api_error(
            "Your request was rejected by the safety system.",
            "moderation_blocked",
            "image_generation_user_error",
        ),
        {},
        Refused,
        False,
    ),
    "400 content_policy_violation": (
        400,
        _api_error(
            "Your request was rejected as a result of our safety system.",
            "content_policy_violation",
        ),
        {},
        Refused,
        False,
    ),
    "400 unknown code": (
        400,
        _api_error("Something new went wrong.", "brand_new_error_code_2027"),
        {},
        BadRequest,
        False,
    ),
    "400 integer code": (400, _api_error("bad", 12345), {}, BadRequest, False),
    "400 no body": (400, b"", {}, BadRequest, False),
    "400 html": (400, b"<html>400 Bad Request</html>", {}, BadRequest, False),
    "404": (404, _api_error("Unknown route"), {}, BadRequest, False),
    # A relay's own wording for a model it does not serve: the family's next provider may.
    "400 relay: model gone (zh)": (400, _api_error("模型不存在"), {}, ModelUnavailable, False),
    "404 relay: no such model": (
        404,
        _api_error("No such model: flux-9", "MODEL_NOT_FOUND"),
        {},
        ModelUnavailable,
        False,
    ),
    "418": (418, b"I'm a teapot", {}, BadRequest, False),
    "429 without retry-after": (
        429,
        _api_error("Rate limit exceeded", "rate_limit_exceeded", "requests"),
        {},
        RateLimited,
        True,
    ),
    "429 insufficient_quota": (
        429,
        _api_error("You exceeded your current quota", "insufficient_quota", "insufficient_quota"),
        {"retry-after": "1"},
        AuthFailed,
        False,
    ),
    "402 credits": (402, _api_error("Insufficient credits"), {}, AuthFailed, False),
    "502 html": (502, b"<html>502 Bad Gateway</html>", {}, Transient, True),
    "503 should-retry false": (
        503,
        _api_error("overloaded", None, "server_error"),
        {"x-should-retry": "false"},
        Transient,
        False,
    ),
}


@pytest.mark.parametrize("case", OPENAI_ERRORS)
async def test_openai_error_statuses(server: Hostile, case: str) -> None:
    status, body, headers, kind, retryable = OPENAI_ERRORS[case]
    content_type = "text/html" if isinstance(body, bytes) and body.startswith(b"<") else None
    server.routes[OPENAI_PATH] = server.reply(
        body, status=status, content_type=content_type or "application/json", headers=headers
    )
    value, _ = await openai_run(server)
    error = assert_failed(value, kind)
    assert error.retryable is retryable
    if case == "429 without retry-after":
        assert error.retry_after is None


def _http_date(offset: float) -> str:
    return email.utils.formatdate(time.time() + offset, usegmt=True)


@pytest.mark.parametrize(
    "headers, expected",
    [
        ({"retry-after": "date+30"}, 30.0),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),
        ({"retry-after": "soon"}, None),
        ({"retry-after": "-5"}, 0.0),
        ({"retry-after": "1e12"}, 1e12),
        ({"retry-after": "inf"}, math.inf),
        ({"retry-after": "nan"}, 0.0),
        ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5),
        ({"retry-after-ms": "abc", "retry-after": "2"}, 2.0),
    ],
    ids=[
        "date+30",
        "date in the past",
        "garbage",
        "negative",
        "huge",
        "inf",
        "nan",
        "ms wins",
        "bad ms",
    ],
)
async def test_openai_retry_after_forms(
    server: Hostile, headers: dict[str, str], expected: float | None
) -> None:
    headers = {k: _http_date(30) if v == "date+30" else v for k, v in headers.items()}
    server.routes[OPENAI_PATH] = server.reply(
        _api_error("Rate limit exceeded", "rate_limit_exceeded"), status=429, headers=headers
    )
    value, _ = await openai_run(server)
    error = assert_failed(value, RateLimited)
    if expected is None:
        assert error.retry_after is None
    else:
        assert error.retry_after == pytest.approx(expected, abs=2.0)
    wait = engine_wait(error)
    assert math.isfinite(wait) and 0.0 <= wait <= 120.0


@pytest.mark.parametrize("kind", URL_KINDS)
async def test_openai_hostile_result_urls(server: Hostile, kind: str) -> None:
    url, expected = _file_route(server, kind)
    server.routes[OPENAI_PATH] = server.reply({"created": 1, "data": [{"url": url}]})
    value, _ = await openai_run(server)
    if expected is None:
        assert_images(value, size=(1, 1) if kind == "1x1" else (8, 8))
    else:
        assert_failed(value, expected)


async def test_openai_result_download_that_hangs_is_bounded(server: Hostile) -> None:
    server.routes[OPENAI_PATH] = server.reply({"data": [{"url": server.url("/files/a.png")}]})
    server.routes["/files/a.png"] = server.partial(
        PNG[:20], content_length=len(PNG), then="hang", content_type="image/png"
    )
    value, took = await openai_run(server, timeout_s=0.8)
    assert_failed(value, Transient)
    assert took < 0.8 + 0.7


async def test_openai_slow_answer_then_a_hanging_download_stays_within_the_timeout(
    server: Hostile,
) -> None:
    # The URL download once got a fresh `min(120, timeout)` of its own; it gets what is left of
    # the request's time now.
    server.routes[OPENAI_PATH] = server.reply(
        {"data": [{"url": server.url("/files/a.png")}]}, delay=0.8
    )
    server.routes["/files/a.png"] = server.partial(
        PNG[:20], content_length=len(PNG), then="hang", content_type="image/png"
    )
    value, took = await openai_run(server, timeout_s=1.0)
    assert_failed(value, Transient)
    assert took < 1.0 + 0.5, f"took {took:.2f} s with a 1 s timeout"


@pytest.mark.parametrize("how", ["declared 200 MB", "endless chunked"])
async def test_openai_oversized_results_are_refused_early(server: Hostile, how: str) -> None:
    if how == "declared 200 MB":
        server.routes[OPENAI_PATH] = server.partial(
            b'{"data": [{"b64_json": "iVBOR', content_length=200_000_000, then="hang"
        )
        value, took = await openai_run(server)
    else:
        server.routes[OPENAI_PATH] = server.reply({"data": [{"url": server.url("/files/a.png")}]})
        server.routes["/files/a.png"] = server.endless()
        value, took = await openai_run(server, max_image_bytes=300_000)
    assert_failed(value, Transient)
    assert took < 2.0


async def test_openai_connection_reset_mid_response(server: Hostile) -> None:
    server.routes[OPENAI_PATH] = server.partial(
        b'{"created": 1, "data": [{"b64_json": "iVBORw0KGgo', content_length=50_000, then="reset"
    )
    value, _ = await openai_run(server)
    assert_failed(value, Transient)


async def test_openai_answer_after_the_timeout(server: Hostile) -> None:
    server.routes[OPENAI_PATH] = server.reply({"data": [{"b64_json": b64(PNG)}]}, delay=1.2)
    value, took = await openai_run(server, timeout_s=0.6)
    assert_failed(value, Transient)
    assert took < 0.6 + 0.4


@pytest.mark.parametrize("where", ["message", "code", "type"])
async def test_openai_never_echoes_the_key(server: Hostile, where: str) -> None:
    # Only `error.message` was once redacted; `error.code` is too now.
    echo = f"invalid_key:{OPENAI_KEY}"
    error = {"message": "bad request", "type": "invalid_request_error", "code": "bad_thing"}
    error[where] = echo if where != "message" else f"Incorrect API key provided: {OPENAI_KEY}"
    server.routes[OPENAI_PATH] = server.reply({"error": error}, status=400)
    value, _ = await openai_run(server)
    assert_failed(value, BadRequest)


def _sse_block(event: dict[str, Any]) -> str:
    return f"event: {event.get('type', 'message')}\ndata: {json.dumps(event)}\n"


@pytest.mark.parametrize(
    "index", [None, "abc", {"i": 1}], ids=["null index", "text index", "object index"]
)
async def test_openai_stream_with_a_bad_partial_index(server: Hostile, index: Any) -> None:
    # A null or non-numeric `partial_image_index` once raised a bare TypeError; such an event
    # is no progress now.
    partial = {"type": "image_generation.partial_image", "b64_json": b64(PNG)}
    partial["partial_image_index"] = index
    done = {"type": "image_generation.completed", "b64_json": b64(PNG)}
    server.routes[OPENAI_PATH] = server.sse(_sse_block(partial), _sse_block(done))
    value, _ = await openai_run(server, partial_images=2)
    assert isinstance(value, list | ProviderError), f"{type(value).__name__}: {value}"
    assert_images(value)


@pytest.mark.parametrize(
    "events, then, expected",
    [
        ([{"type": "image_generation.partial_image", "partial_image_index": 0}], "hang", Transient),
        ([{"type": "image_generation.partial_image", "partial_image_index": 0}], "eof", Transient),
        ([{"type": "image_generation.completed", "b64_json": "%%%"}], "eof", Transient),
        ([{"type": "image_generation.completed", "b64_json": b64(b"text")}], "eof", Transient),
        ([{"type": "image_generation.completed"}], "eof", Transient),
        (
            [{"type": "error", "error": {"code": "moderation_blocked", "message": "safety"}}],
            "eof",
            Refused,
        ),
        ([{"type": "error", "error": "upstream broke"}], "eof", Transient),
        (
            [{"type": "image_generation.partial_image", "partial_image_index": 0}],
            "reset",
            Transient,
        ),
    ],
    ids=[
        "never ends",
        "ends without completed",
        "completed bad b64",
        "completed not an image",
        "completed without image",
        "moderation event",
        "error event",
        "reset",
    ],
)
async def test_openai_hostile_streams(
    server: Hostile, events: list[dict[str, Any]], then: str, expected: type[ProviderError]
) -> None:
    server.routes[OPENAI_PATH] = server.sse(*(_sse_block(e) for e in events), then=then)
    value, took = await openai_run(server, timeout_s=0.8, partial_images=1)
    assert_failed(value, expected)
    assert took < 0.8 + 0.7


# -- Gemini ------------------------------------------------------------------------------------


def gemini_request(timeout_s: float = 5.0, n: int = 1) -> GenerationRequest:
    return GenerationRequest(
        job_id="job-g",
        model=GEMINI_MODEL,
        remote_model=GEMINI_MODEL,
        endpoint="",
        prompt="a fox in the snow",
        n=n,
        aspect_ratio="1:1",
        size=None,
        seed=None,
        timeout_s=timeout_s,
    )


async def gemini_run(
    base_url: str, timeout_s: float = 5.0, n: int = 1, key: str = GEMINI_KEY
) -> tuple[Any, float]:
    provider = GeminiProvider(key, base_url)
    try:
        return await outcome(provider.generate(gemini_request(timeout_s, n), Hooks()))
    finally:
        await provider.aclose()


def gem(parts: list[Any] | None = None, finish: Any = "STOP", **extra: Any) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts or []}, "index": 0}
    if finish is not None:
        candidate["finishReason"] = finish
    return {"candidates": [candidate], **extra}


def inline(data: Any, mime: str = "image/png", **extra: Any) -> dict[str, Any]:
    return {"inlineData": {"mimeType": mime, "data": data}, **extra}


@pytest.mark.parametrize(
    "finish",
    [
        "SAFETY",
        "PROHIBITED_CONTENT",
        "RECITATION",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_RECITATION",
        "BLOCKLIST",
        "SPII",
        "NO_IMAGE",
    ],
)
async def test_gemini_blocking_finish_reasons_are_refused(server: Hostile, finish: str) -> None:
    server.routes[GEMINI_PATH] = server.reply(gem([], finish, usageMetadata={}))
    value, _ = await gemini_run(server.url("/v1beta"))
    error = assert_failed(value, Refused)
    assert finish in str(error) and error.retryable is False


@pytest.mark.parametrize(
    "reason", ["SAFETY", "OTHER", "BLOCKLIST", "PROHIBITED_CONTENT", "IMAGE_SAFETY"]
)
async def test_gemini_prompt_block_reasons_are_refused(reason: str) -> None:
    async with FakeGemini(api_key=GEMINI_KEY, block_reason=reason, fault="blocked") as fake:
        value, _ = await gemini_run(fake.base_url)
    assert reason in str(assert_failed(value, Refused))


GEMINI_BODIES: dict[str, tuple[Any, str, type[ProviderError] | None]] = {
    "no image part, no text": (gem([]), "application/json", Transient),
    "only a thought image": (gem([inline(b64(PNG), thought=True)]), "application/json", Transient),
    "text only": (gem([{"text": "I can't draw that."}]), "application/json", Refused),
    "max tokens, no content": (gem([], "MAX_TOKENS"), "application/json", Transient),
    "unknown finish reason": (gem([], "SOMETHING_NEW"), "application/json", Transient),
    "block unspecified": (
        {"promptFeedback": {"blockReason": "BLOCKED_REASON_UNSPECIFIED"}},
        "application/json",
        Transient,
    ),
    "candidates null": ({"candidates": None}, "application/json", Transient),
    "candidate null": ({"candidates": [None]}, "application/json", Transient),
    "data not a string": (gem([inline(12345)]), "application/json", Transient),
    "invalid base64": (gem([inline("%%%not base64%%%")]), "application/json", Transient),
    **{
        f"base64 of {name}": (gem([inline(b64(data))]), "application/json", Transient)
        for name, data in NOT_IMAGES.items()
    },
    "a list body": ([gem([inline(b64(PNG))])], "application/json", Transient),
    "error body at 200": (
        {"error": {"code": 503, "status": "UNAVAILABLE", "message": "overloaded"}},
        "application/json",
        Transient,
    ),
    "html at 200": (b"<html><body>captive portal</body></html>", "text/html", Transient),
    "empty": (b"", "application/json", Transient),
    "truncated": (
        b'{"candidates": [{"content": {"parts": [{"inlineDa',
        "application/json",
        Transient,
    ),
    "1x1 png": (gem([inline(b64(PNG_1X1))]), "application/json", None),
    "png labelled text/plain": (gem([inline(b64(PNG), "text/plain")]), "application/json", None),
    "png behind a text/html lie": (gem([inline(b64(PNG))]), "text/html", None),
}


@pytest.mark.parametrize("case", GEMINI_BODIES)
async def test_gemini_http_200_bodies(server: Hostile, case: str) -> None:
    body, content_type, expected = GEMINI_BODIES[case]
    server.routes[GEMINI_PATH] = server.reply(body, content_type=content_type)
    value, _ = await gemini_run(server.url("/v1beta"))
    if expected is None:
        assert_images(value, size=(1, 1) if case == "1x1 png" else None)
    else:
        assert_failed(value, expected)


@pytest.mark.parametrize(
    "finish", [["SAFETY"], {"reason": "SAFETY"}], ids=["finishReason list", "finishReason object"]
)
async def test_gemini_odd_finish_reason_types(server: Hostile, finish: Any) -> None:
    # A list or object `finishReason` once raised a bare TypeError (unhashable); only a string
    # is looked up now.
    server.routes[GEMINI_PATH] = server.reply(gem([], finish))
    value, _ = await gemini_run(server.url("/v1beta"))
    assert isinstance(value, ProviderError), f"{type(value).__name__}: {value}"


@pytest.mark.parametrize(
    "delay, expected",
    [("1e999s", 3.0), ("99999999999s", 99999999999.0), ("-3s", 3.0), ("soon", 3.0)],
    ids=["1e999s", "huge", "negative", "garbage"],
)
async def test_gemini_hostile_retry_delays(delay: str, expected: float) -> None:
    async with FakeGemini(api_key=GEMINI_KEY, retry_delay=delay, fault="rate_limit") as fake:
        fake.retry_after_header = "3"
        value, _ = await gemini_run(fake.base_url)
    error = assert_failed(value, RateLimited)
    # unparseable delays fall back to nothing (the fake sends Retry-After only on rate_limit_bare)
    assert error.retry_after is None or error.retry_after == pytest.approx(expected)
    wait = engine_wait(error)
    assert math.isfinite(wait) and 0.0 <= wait <= 120.0


@pytest.mark.parametrize(
    "header, expected",
    [("date+30", 30.0), ("garbage", None), ("-1", 0.0)],
    ids=["http-date", "garbage", "negative"],
)
async def test_gemini_bare_429_retry_after_forms(header: str, expected: float | None) -> None:
    async with FakeGemini(api_key=GEMINI_KEY, fault="rate_limit_bare") as fake:
        fake.retry_after_header = _http_date(30) if header == "date+30" else header
        value, _ = await gemini_run(fake.base_url)
    error = assert_failed(value, RateLimited)
    if expected is None:
        assert error.retry_after is None
    else:
        assert error.retry_after == pytest.approx(expected, abs=2.0)


@pytest.mark.parametrize(
    "status, body, kind",
    [
        (400, {"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": "bad"}}, BadRequest),
        (401, {"error": {"code": 401, "status": "UNAUTHENTICATED", "message": "no"}}, AuthFailed),
        (403, {"error": {"code": 403, "status": "PERMISSION_DENIED", "message": "no"}}, AuthFailed),
        (404, {"error": {"code": 404, "status": "NOT_FOUND", "message": "gone"}}, BadRequest),
        (429, b"", RateLimited),
        (500, b"<html>500</html>", Transient),
        (503, [{"error": {"code": 503, "status": "UNAVAILABLE", "message": "x"}}], Transient),
        (504, {"error": "deadline"}, Transient),
    ],
    ids=["400", "401", "403", "404", "429 empty", "500 html", "503 list", "504 string"],
)
async def test_gemini_error_statuses(
    server: Hostile, status: int, body: Any, kind: type[ProviderError]
) -> None:
    server.routes[GEMINI_PATH] = server.reply(body, status=status)
    value, _ = await gemini_run(server.url("/v1beta"))
    assert_failed(value, kind)


async def test_gemini_error_message_echoing_the_key_is_redacted(server: Hostile) -> None:
    body = {
        "error": {
            "code": 400,
            "status": "INVALID_ARGUMENT",
            "message": f"API key not valid: {GEMINI_KEY}. Please pass a valid API key.",
            "details": [
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}
            ],
        }
    }
    server.routes[GEMINI_PATH] = server.reply(body, status=400)
    value, _ = await gemini_run(server.url("/v1beta"))
    assert_failed(value, AuthFailed)


async def test_gemini_key_goes_in_a_header_not_the_url(server: Hostile) -> None:
    seen: list[web.Request] = []

    async def record(request: web.Request) -> web.StreamResponse:
        seen.append(request)
        return web.json_response(gem([inline(b64(PNG))]))

    server.routes[GEMINI_PATH] = record
    value, _ = await gemini_run(server.url("/v1beta"))
    assert_images(value)
    (request,) = seen
    assert GEMINI_KEY not in str(request.url)
    assert request.headers["x-goog-api-key"] == GEMINI_KEY


async def test_gemini_connection_reset_mid_body(server: Hostile) -> None:
    server.routes[GEMINI_PATH] = server.partial(
        b'{"candidates": [{"content": {"parts": [{"inlineData": {"data": "iVBOR',
        content_length=80_000,
        then="reset",
    )
    value, _ = await gemini_run(server.url("/v1beta"))
    assert_failed(value, Transient)


@pytest.mark.parametrize("how", ["answer after the timeout", "hang mid-body"])
async def test_gemini_late_answers_are_bounded(server: Hostile, how: str) -> None:
    if how == "answer after the timeout":
        server.routes[GEMINI_PATH] = server.reply(gem([inline(b64(PNG))]), delay=1.2)
    else:
        server.routes[GEMINI_PATH] = server.partial(
            b'{"candidates": [', content_length=5_000, then="hang"
        )
    value, took = await gemini_run(server.url("/v1beta"), timeout_s=0.6)
    assert_failed(value, Transient)
    assert took < 0.6 + 0.4


async def test_gemini_n2_never_pads_with_a_non_image(server: Hostile) -> None:
    server.routes[GEMINI_PATH] = server.sequence(
        server.reply(gem([inline(b64(PNG))])),
        server.reply(gem([inline(b64(b"not an image"))])),
    )
    value, _ = await gemini_run(server.url("/v1beta"), n=2)
    assert_images(value, n=1)


# -- through the engine: every job ends, with a message, uncharged --------------------------------


@asynccontextmanager
async def engine_with(
    name: str, provider: Any, model: str, data_dir: Path
) -> AsyncIterator[tuple[Engine, RecordingAdapter]]:
    store = await Store.open(data_dir)
    config = EngineConfig(retry_attempts=2, retry_initial=0.01, generate_timeout=1.5)
    engine = Engine(store, Catalog.load(), {name: provider}, config, default_model=model)
    adapter = RecordingAdapter()
    engine.register(adapter)
    await engine.start()
    try:
        yield engine, adapter
    finally:
        await engine.close()
        await store.close()


Case = Callable[[Hostile], tuple[str, Any, str, set[str]]]


def _grsai_case(server: Hostile, route: Handler, file: Handler | None = None) -> Any:
    server.routes[NANO_BANANA] = route
    # A retry resumes the paid task: the result endpoint tells the same story as the stream.
    done = task("succeeded", 100, (server.url("/files/a.png"),))
    server.routes.setdefault("/v1/draw/result", server.reply({"code": 0, "data": done}))
    if file is not None:
        server.routes["/files/a.png"] = file
    return "grsai", GrsaiProvider(GRSAI_KEY, server.root, poll_interval=0.02), "nano-banana"


def case_grsai_200mb(server: Hostile) -> tuple[str, Any, str, set[str]]:
    stream = server.sse(task("succeeded", 100, (server.url("/files/a.png"),)))
    big = server.partial(PNG[:16], content_length=200_000_000, then="hang")
    return (*_grsai_case(server, stream, big), {"transient"})


def case_grsai_failure_echoing_the_key(server: Hostile) -> tuple[str, Any, str, set[str]]:
    failed = task("failed", 100, failure_reason="error", error=f"bad key {GRSAI_KEY}")
    return (*_grsai_case(server, server.sse(failed)), {"transient"})


def case_grsai_hanging_download(server: Hostile) -> tuple[str, Any, str, set[str]]:
    stream = server.sse(task("succeeded", 100, (server.url("/files/a.png"),)))
    stall = server.partial(PNG[:20], content_length=len(PNG), then="hang")
    return (*_grsai_case(server, stream, stall), {"timeout", "transient"})


def case_grsai_infinite_progress(server: Hostile) -> tuple[str, Any, str, set[str]]:
    # The progress line is skipped now (it once killed the stream); the stream then hangs, and
    # the job ends at its stage timeout, uncharged.
    stream = server.sse(task(progress=math.inf), then="hang")
    server.routes["/v1/draw/result"] = server.reply(
        {"code": 0, "data": task("failed", 100, failure_reason="error", error="boom")}
    )
    return (*_grsai_case(server, stream), {"timeout", "transient"})


def case_openai_not_an_image(server: Hostile) -> tuple[str, Any, str, set[str]]:
    server.routes[OPENAI_PATH] = server.reply({"data": [{"b64_json": b64(b"GIF89a junk")}]})
    return (
        "openai",
        OpenAIImagesProvider(OPENAI_KEY, server.url("/v1")),
        "gpt-image-1",
        {"transient"},
    )


def case_openai_huge_retry_after(server: Hostile) -> tuple[str, Any, str, set[str]]:
    server.routes[OPENAI_PATH] = server.reply(
        _api_error(f"slow down {OPENAI_KEY}", "rate_limit_exceeded"),
        status=429,
        headers={"retry-after": "999999999"},
    )
    return (
        "openai",
        OpenAIImagesProvider(OPENAI_KEY, server.url("/v1")),
        "gpt-image-1",
        {
            "rate_limited",
            "timeout",
        },
    )


def case_gemini_recitation(server: Hostile) -> tuple[str, Any, str, set[str]]:
    server.routes[GEMINI_PATH] = server.reply(gem([], "RECITATION"))
    return "gemini", GeminiProvider(GEMINI_KEY, server.url("/v1beta")), GEMINI_MODEL, {"refused"}


def case_gemini_odd_finish_reason(server: Hostile) -> tuple[str, Any, str, set[str]]:
    server.routes[GEMINI_PATH] = server.reply(gem([], ["SAFETY"]))
    return (
        "gemini",
        GeminiProvider(GEMINI_KEY, server.url("/v1beta")),
        GEMINI_MODEL,
        {
            "refused",
            "transient",
            "internal",
        },
    )


ENGINE_CASES: dict[str, Case] = {
    "grsai 200 MB result": case_grsai_200mb,
    "grsai failure echoing the key": case_grsai_failure_echoing_the_key,
    "grsai download hangs": case_grsai_hanging_download,
    "grsai infinite progress": case_grsai_infinite_progress,
    "openai base64 not an image": case_openai_not_an_image,
    "openai retry-after 999999999": case_openai_huge_retry_after,
    "gemini RECITATION": case_gemini_recitation,
    "gemini finishReason list": case_gemini_odd_finish_reason,
}


@pytest.mark.parametrize("case", ENGINE_CASES)
async def test_engine_ends_hostile_jobs_uncharged(
    server: Hostile, tmp_path: Path, case: str
) -> None:
    name, provider, model, kinds = ENGINE_CASES[case](server)
    try:
        async with engine_with(name, provider, model, tmp_path) as (engine, adapter):
            ticket = await engine.submit(
                Request(
                    user=UserRef("test", "alice"),
                    target=Target("test", chat_id="c1"),
                    prompt="a lighthouse at dusk",
                    options=Options(aspect_ratio="1:1"),
                )
            )
            began = time.monotonic()
            async with asyncio.timeout(10):
                await engine.run_until_idle()
            took = time.monotonic() - began
            async with aiosqlite.connect(tmp_path / "drawbridge.db") as db:
                ((status, cost, kind, error),) = await db.execute_fetchall(
                    "SELECT status, cost_usd, error_kind, error FROM jobs WHERE id = ?",
                    (ticket.job_id,),
                )
            assert kind in kinds, f"error_kind {kind}: {error}"
            assert status == ("refused" if kind == "refused" else "failed")
            assert cost == 0
            assert not any(key in (error or "") for key in KEYS)
            final = [u for j, u in adapter.statuses if j == ticket.job_id and u.kind.final]
            assert final and "not charged" in final[-1].text
            assert not any(key in u.text for _, u in adapter.statuses for key in KEYS)
            assert (await engine.usage(UserRef("test", "alice"))).images == 0
            assert not adapter.deliveries
            assert took < 1.5 * 2 + 1.0  # the stage timeout bounds every job
    finally:
        await provider.aclose()


# -- the shared Retry-After parser on its own ----------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Retry-After": "120"},
        {"Retry-After": "Fri, 31 Dec 9999 23:59:59 GMT"},
        {"Retry-After": "Mon, 99 Foo 20000 99:99:99 GMT"},
        {"Retry-After": "1e400"},
        {"Retry-After": "-1e400"},
        {"Retry-After": "NaN"},
        {"Retry-After": ""},
        {"retry-after-ms": "inf"},
        {"retry-after-ms": "-7"},
        {"retry-after-ms": "nan", "Retry-After": "4"},
    ],
)
def test_engine_wait_is_always_finite_and_capped(headers: dict[str, str]) -> None:
    hint = parse_retry_after(headers)
    assert hint is None or hint >= 0
    wait = engine_wait(RateLimited("x", retry_after=hint))
    assert math.isfinite(wait) and 0.0 <= wait <= 120.0
