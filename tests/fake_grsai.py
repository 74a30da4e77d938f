"""A loopback fake of GrsAI's API, faithful to providers.md §7.1, for offline client tests.

    async with FakeGrsai() as fake:
        provider = GrsaiProvider(fake.api_key, fake.base_url)

What it plays:
- the draw API: `POST /v1/draw/nano-banana` and `/v1/draw/completions` in stream mode (SSE-like
  `data:` lines, a bare JSON body, or a trailing `data: [DONE]`), poll mode (`webHook: "-1"`) and
  webhook mode (the task is POSTed to the given URL per progress step, then the final state);
- `POST /v1/draw/result` (running → … → final, `code: -22` for unknown or expired ids);
- the unified API: `POST /v1/api/generate` (`replyType` async/json/stream), `GET /v1/api/result`;
- result URLs served by the fake itself at `/files/{name}` (real PNG bytes), with expiry;
- the key check: a wrong or missing Bearer key gets `{"code":-1,"msg":"apikey error"}`;
- validation: an unknown model, a bad `aspectRatio`, an `imageSize` the model lacks → `code: -1`.

Each test configures it through attributes (the outcome of new tasks, stream variants, file expiry)
and one-shot `Fault`s queued per endpoint (`submit_faults`, `result_faults`): HTTP errors with or
without Retry-After, a hang, malformed bodies, a stream broken after the id line. Every request is
logged, and `submits` counts the paid ones (tasks created), so a test can assert that a resumed job
did not pay twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self

import aiohttp
from aiohttp import web
from PIL import Image

from tests.fakes import LISTEN_BACKLOG

Outcome = Literal["succeeded", "input_moderation", "output_moderation", "error"]
FaultKind = Literal[
    "none", "http", "hang", "truncated", "html", "empty", "break_after_id", "bad_line"
]

BASE_RATIOS = ("auto", "1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3", "5:4", "4:5", "21:9")
WIDE_RATIOS = (*BASE_RATIOS, "1:4", "4:1", "1:8", "8:1")
ALL_SIZES = ("1K", "2K", "4K")
JSON_BODY: web.RequestKey[Any] = web.RequestKey("json_body")


@dataclass(frozen=True)
class ModelRule:
    """What one GrsAI model accepts: its endpoint, ratios and `imageSize` values."""

    endpoint: str
    ratios: tuple[str, ...] = BASE_RATIOS
    sizes: tuple[str, ...] = ()
    pixel_sizes: bool = False  # gpt-image-2 also takes "WxH"


NB = "/v1/draw/nano-banana"
GPT = "/v1/draw/completions"
MODELS: dict[str, ModelRule] = {
    "nano-banana-fast": ModelRule(NB),
    "nano-banana": ModelRule(NB),
    "nano-banana-pro": ModelRule(NB, sizes=ALL_SIZES),
    "nano-banana-pro-vt": ModelRule(NB, sizes=ALL_SIZES),
    "nano-banana-pro-cl": ModelRule(NB, sizes=("1K",)),
    "nano-banana-pro-vip": ModelRule(NB, sizes=("1K", "2K")),
    "nano-banana-pro-4k-vip": ModelRule(NB, sizes=("4K",)),
    "nano-banana-2": ModelRule(NB, WIDE_RATIOS, ALL_SIZES),
    "nano-banana-2-cl": ModelRule(NB, WIDE_RATIOS, ("1K",)),
    "nano-banana-2-2k-cl": ModelRule(NB, WIDE_RATIOS, ("2K",)),
    "nano-banana-2-4k-cl": ModelRule(NB, WIDE_RATIOS, ("4K",)),
    "gpt-image-2": ModelRule(GPT, ("auto", "1:1", "3:2", "2:3"), pixel_sizes=True),
    "gpt-image-2-vip": ModelRule(GPT, ("auto", "1:1", "3:2", "2:3"), pixel_sizes=True),
}


@dataclass(frozen=True)
class Fault:
    """One request's misbehaviour, consumed in order from a fault queue."""

    kind: FaultKind
    status: int = 500
    retry_after: str | None = None
    body: dict[str, Any] | None = None

    @classmethod
    def http(
        cls, status: int, retry_after: str | None = None, body: dict[str, Any] | None = None
    ) -> Fault:
        """An HTTP error; 429 gets the `{"code":429,"msg":"too many requests"}` body by default."""
        return cls("http", status=status, retry_after=retry_after, body=body)


@dataclass
class FakeTask:
    """A task the fake accepted: it steps through `steps` progress values, then ends."""

    id: str
    model: str
    prompt: str
    outcome: Outcome
    steps: list[int]
    files: list[str]
    cursor: int = 0  # how many progress steps have been shown; len(steps) = finished

    @property
    def done(self) -> bool:
        return self.cursor >= len(self.steps)

    def view(self, base_url: str, flat_violation: bool = False) -> dict[str, Any]:
        """The task object of providers.md §1.5 as it stands now."""
        if not self.done:
            return {
                "id": self.id,
                "results": [],
                "progress": self.steps[self.cursor],
                "status": "running",
                "failure_reason": "",
                "error": "",
            }
        if self.outcome == "succeeded":
            return {
                "id": self.id,
                "results": [
                    {"url": f"{base_url}/files/{name}", "content": f"an image of {self.prompt}"}
                    for name in self.files
                ],
                "progress": 100,
                "status": "succeeded",
                "failure_reason": "",
                "error": "",
            }
        moderated = self.outcome != "error"
        return {
            "id": self.id,
            "results": [],
            "progress": 100,
            "status": "violation" if moderated and flat_violation else "failed",
            "failure_reason": self.outcome,
            "error": "content blocked by moderation" if moderated else "upstream generation error",
        }

    def advance(self) -> None:
        self.cursor = min(len(self.steps), self.cursor + 1)

    def finish(self) -> None:
        self.cursor = len(self.steps)


@dataclass
class Logged:
    """One request as the fake saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeGrsai:
    """The fake server; configure the attributes, queue faults, then read the records."""

    api_key: str = "sk-0123456789abcdef0123456789abcdef"
    # behaviour of new tasks
    outcome: Outcome = "succeeded"
    steps: list[int] = field(default_factory=lambda: [0, 30, 70])
    stream_style: Literal["sse", "sse_done", "bare"] = "sse"
    line_delay: float = 0.0  # seconds between stream lines / webhook posts ("slow" mode)
    send_webhooks: bool = True
    # errors
    error_status: int = 200  # HTTP status of `{code:-1,…}` auth and validation answers
    submit_faults: list[Fault] = field(default_factory=list)
    result_faults: list[Fault] = field(default_factory=list)
    file_ttl: float | None = None  # result files expire this long after creation
    expired_status: int = 404
    # records
    requests: list[Logged] = field(default_factory=list)
    tasks: dict[str, FakeTask] = field(default_factory=dict)
    submits: int = 0  # tasks created: what the operator would pay for
    result_calls: int = 0
    file_gets: int = 0
    webhook_statuses: list[int] = field(default_factory=list)
    port: int = 0  # 0: any free port

    def __post_init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self._port = 0
        self._closing = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        self._files: dict[str, tuple[bytes, float]] = {}
        self._client: aiohttp.ClientSession | None = None

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    async def __aenter__(self) -> Self:
        app = web.Application(middlewares=[self._log_middleware])
        app.router.add_post("/v1/draw/nano-banana", self._draw)
        app.router.add_post("/v1/draw/completions", self._draw)
        app.router.add_post("/v1/draw/result", self._result)
        app.router.add_post("/v1/api/generate", self._unified_generate)
        app.router.add_get("/v1/api/result", self._unified_result)
        app.router.add_get("/files/{name}", self._file)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, backlog=LISTEN_BACKLOG)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.Server)
        self._port = server.sockets[0].getsockname()[1]
        self._client = aiohttp.ClientSession()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closing.set()  # releases hung handlers
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._client is not None:
            await self._client.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- test helpers --------------------------------------------------------------------

    def expire_task(self, task_id: str) -> None:
        """Forget a task, as GrsAI does after a while: its result answers `code: -22`."""
        self.tasks.pop(task_id, None)

    def create_task(self, model: str = "nano-banana", prompt: str = "a fox") -> FakeTask:
        """A task accepted earlier (say, before the bot restarted); it counts as one submit."""
        return self._new_task({"model": model, "prompt": prompt})

    def expire_files(self) -> None:
        """Every result URL from now on answers `expired_status`."""
        self.file_ttl = 0.0

    def submitted_bodies(self) -> list[Any]:
        return [r.body for r in self.requests if r.path in (NB, GPT, "/v1/api/generate")]

    # -- middleware and shared checks --------------------------------------------------------

    @web.middleware
    async def _log_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body: Any = None
        if request.can_read_body:
            raw = await request.read()
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw
        request[JSON_BODY] = body
        self.requests.append(Logged(request.method, request.path, dict(request.headers), body))
        response: web.StreamResponse = await handler(request)
        return response

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.api_key}"

    def _business_error(self, msg: str, code: int = -1) -> web.Response:
        return web.json_response({"code": code, "msg": msg}, status=self.error_status)

    async def _play_fault(self, faults: list[Fault]) -> web.Response | None:
        """Answer with the next queued fault, if any (stream faults are left to the stream)."""
        if not faults or faults[0].kind in ("break_after_id", "bad_line"):
            return None
        fault = faults.pop(0)
        if fault.kind == "none":  # a slot in a random fault sequence where all goes well
            return None
        if fault.kind == "hang":
            await self._closing.wait()
            return web.Response(status=503)
        if fault.kind == "truncated":
            return web.Response(text='{"code":0,"msg":"succ', content_type="application/json")
        if fault.kind == "html":
            return web.Response(
                text="<html><body><h1>Bad Gateway</h1></body></html>",
                status=fault.status,
                content_type="text/html",
            )
        if fault.kind == "empty":
            return web.Response(body=b"", content_type="application/json")
        headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
        body = fault.body
        if body is None:
            msg = "too many requests" if fault.status == 429 else "server error"
            body = {"code": fault.status, "msg": msg}
        return web.json_response(body, status=fault.status, headers=headers)

    def _validate(self, endpoint: str, body: Any) -> str | None:
        """The `msg` of a validation error, or None when the body is acceptable."""
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            return "prompt is required"
        if not body["prompt"].strip():
            return "prompt is required"
        rule = MODELS.get(str(body.get("model")))
        if rule is None or rule.endpoint != endpoint:
            return "model not register"
        ratio = body.get("aspectRatio", "auto")
        pixel_ok = rule.pixel_sizes and isinstance(ratio, str) and _valid_pixels(ratio)
        if ratio not in rule.ratios and not pixel_ok:
            return f"aspectRatio {ratio} is not supported"
        size = body.get("imageSize")
        if size is not None and size not in rule.sizes:
            return f"imageSize {size} is not supported by {body['model']}"
        urls = body.get("urls", [])
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            return "urls must be a list of strings"
        return None

    def _new_task(self, body: dict[str, Any]) -> FakeTask:
        self.submits += 1
        task_id = f"task-{self.submits:04d}"
        name = f"{task_id}-0.png"
        self._files[name] = (_png(self.submits), time.monotonic())
        task = FakeTask(
            id=task_id,
            model=str(body["model"]),
            prompt=str(body["prompt"]),
            outcome=self.outcome,
            steps=list(self.steps),
            files=[name],
        )
        self.tasks[task_id] = task
        return task

    # -- the draw API ----------------------------------------------------------------------

    async def _draw(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return self._business_error("apikey error")
        fault = await self._play_fault(self.submit_faults)
        if fault is not None:
            return fault
        body = request[JSON_BODY]
        problem = self._validate(request.path, body)
        if problem is not None:
            return self._business_error(problem)
        task = self._new_task(body)
        hook = body.get("webHook")
        if hook == "-1":
            return web.json_response({"code": 0, "msg": "success", "data": {"id": task.id}})
        if isinstance(hook, str) and hook:
            if self.send_webhooks:
                self._spawn(self._post_webhooks(task, hook, bool(body.get("shutProgress"))))
            return web.json_response({"code": 0, "msg": "success", "data": {"id": task.id}})
        return await self._stream(request, task, bool(body.get("shutProgress")))

    async def _stream(
        self, request: web.Request, task: FakeTask, shut: bool, flat_violation: bool = False
    ) -> web.StreamResponse:
        """Stream mode: one `data:` line per progress step, then the final state."""
        fault = None
        if self.submit_faults and self.submit_faults[0].kind in ("break_after_id", "bad_line"):
            fault = self.submit_faults.pop(0)
        if self.stream_style == "bare" and fault is None:
            task.finish()
            return web.json_response(task.view(self.base_url, flat_violation))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        first = True
        while True:
            if not shut or task.done:
                line = json.dumps(task.view(self.base_url, flat_violation))
                await resp.write(f"data: {line}\n\n".encode())
            if first and fault is not None:
                if fault.kind == "bad_line":
                    await resp.write(b'data: {"id": "' + task.id.encode() + b'", "progr\n\n')
                    await resp.write_eof()
                    return resp
                # break_after_id: drop the connection mid-stream, no terminal line, no EOF chunk
                if request.transport is not None:
                    request.transport.close()
                return resp
            first = False
            if task.done:
                break
            if self.line_delay:
                await asyncio.sleep(self.line_delay)
            task.advance()
        if self.stream_style == "sse_done":
            await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _post_webhooks(self, task: FakeTask, url: str, shut: bool) -> None:
        """Webhook mode: POST each progress step (unless shutProgress), then the final state."""
        assert self._client is not None
        while True:
            if not shut or task.done:
                try:
                    async with self._client.post(url, json=task.view(self.base_url)) as resp:
                        self.webhook_statuses.append(resp.status)
                except aiohttp.ClientError:
                    self.webhook_statuses.append(0)
            if task.done:
                return
            if self.line_delay:
                await asyncio.sleep(self.line_delay)
            task.advance()

    async def _result(self, request: web.Request) -> web.StreamResponse:
        self.result_calls += 1
        if not self._authorized(request):
            return self._business_error("apikey error")
        fault = await self._play_fault(self.result_faults)
        if fault is not None:
            return fault
        body = request[JSON_BODY]
        task_id = body.get("id") if isinstance(body, dict) else None
        task = self.tasks.get(str(task_id))
        if task is None:
            return web.json_response({"code": -22, "msg": "task not found"})
        view = task.view(self.base_url)
        task.advance()
        return web.json_response({"code": 0, "msg": "success", "data": view})

    # -- the unified API -----------------------------------------------------------------

    async def _unified_generate(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return web.json_response({"msg": "apikey error"}, status=401)
        fault = await self._play_fault(self.submit_faults)
        if fault is not None:
            return fault
        body = request[JSON_BODY]
        if isinstance(body, dict) and "images" in body:
            body = {**body, "urls": body["images"]}
        endpoint = MODELS.get(str(body.get("model")) if isinstance(body, dict) else "")
        problem = self._validate(endpoint.endpoint if endpoint else NB, body)
        if problem is not None:
            return web.json_response({"msg": problem}, status=400)
        task = self._new_task(body)
        reply = body.get("replyType", "json")
        if reply == "async":
            return web.json_response(task.view(self.base_url, flat_violation=True))
        if reply == "stream":
            return await self._stream(request, task, False, flat_violation=True)
        while not task.done:
            if self.line_delay:
                await asyncio.sleep(self.line_delay)
            task.advance()
        return web.json_response(task.view(self.base_url, flat_violation=True))

    async def _unified_result(self, request: web.Request) -> web.StreamResponse:
        self.result_calls += 1
        if not self._authorized(request):
            return web.json_response({"msg": "apikey error"}, status=401)
        task = self.tasks.get(request.query.get("id", ""))
        if task is None:
            return web.json_response({"code": -22, "msg": "task not found"})
        view = task.view(self.base_url, flat_violation=True)
        task.advance()
        return web.json_response(view)

    # -- result files ----------------------------------------------------------------------

    async def _file(self, request: web.Request) -> web.StreamResponse:
        self.file_gets += 1
        entry = self._files.get(request.match_info["name"])
        if entry is None:
            return web.Response(status=404, text="not found")
        data, created = entry
        if self.file_ttl is not None and time.monotonic() - created >= self.file_ttl:
            return web.Response(status=self.expired_status, text="expired")
        return web.Response(body=data, content_type="image/png")

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _valid_pixels(value: str) -> bool:
    """A gpt-image-2 pixel size: multiples of 16, edges ≤ 3840, ratio ≤ 3:1, pixel budget."""
    match = re.fullmatch(r"(\d+)x(\d+)", value)
    if match is None:
        return False
    w, h = int(match[1]), int(match[2])
    return (
        w % 16 == 0
        and h % 16 == 0
        and max(w, h) <= 3840
        and max(w, h) <= 3 * min(w, h)
        and 655_360 <= w * h <= 8_294_400
    )


def _png(seed: int) -> bytes:
    """A small, real, distinct PNG per task."""
    buf = io.BytesIO()
    color = ((seed * 67) % 256, (seed * 131) % 256, (seed * 199) % 256)
    Image.new("RGB", (8, 8), color).save(buf, "PNG")
    return buf.getvalue()


async def _serve_forever(port: int, api_key: str) -> None:
    async with FakeGrsai(api_key=api_key, port=port) as fake:
        print(f"fake GrsAI on {fake.base_url} (key {api_key}); Ctrl-C stops it", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    # Start by hand to try drawbridge against it as against the real API:
    #   python -m tests.fake_grsai --port 8765 &
    #   GRSAI_API_KEY=sk-fake GRSAI_BASE_URL=http://127.0.0.1:8765 drawbridge generate --model nano-banana "a fox"
    import argparse

    parser = argparse.ArgumentParser(description="a loopback fake of the GrsAI draw API")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--key", default="sk-fake")
    options = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_forever(options.port, options.key))
