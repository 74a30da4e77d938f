"""The GrsAI draw API (`/v1/draw/nano-banana`, `/v1/draw/completions`, `/v1/draw/result`).

One task per job. The task id is persisted through `hooks.task_submitted` the moment GrsAI names
it, because GrsAI charges per submit: a retry or a restart must resume that task by polling
`/v1/draw/result`, never submit again. Three ways to learn the outcome, as the API offers them:

- stream (default): the submit call stays open and sends one task object per progress step;
- poll: submit with `webHook: "-1"`, get the id at once, poll the result endpoint;
- webhook: submit with `webHook: <url>`; GrsAI POSTs the task to the bot's HTTP route, which calls
  `webhook_received`. A webhook body is unauthenticated, so it only wakes the waiting job early: the
  outcome is always read from the (authenticated) result endpoint, which is also the safety net
  when a callback never comes.

Result URLs live two hours, so they are downloaded at once. Every failure becomes one
`bot.errors.ProviderError` kind; the API key never appears in a message or a log line.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, Callable, Mapping
from contextlib import aclosing, suppress
from typing import Any, Literal

import aiohttp

from bot.errors import (
    AuthFailed,
    BadRequest,
    ModelUnavailable,
    ProviderError,
    RateLimited,
    Refused,
    Transient,
)
from bot.images import MAX_IMAGE_BYTES, parse_ratio, ratio_size
from bot.jobs import GeneratedImage
from bot.providers.base import GenerationRequest, JobHooks
from bot.providers.http import (
    data_uri,
    download,
    new_session,
    parse_retry_after,
    read_capped,
    says_model_gone,
    status_error,
)

log = logging.getLogger("drawbridge.providers.grsai")

NANO_BANANA = "/v1/draw/nano-banana"
COMPLETIONS = "/v1/draw/completions"
RESULT = "/v1/draw/result"

TASK_GONE = -22  # the result endpoint's "task does not exist" (unknown or expired id)
CALL_TIMEOUT_S = 30.0  # one submit (poll/webhook modes) or one result poll
MAX_BODY_BYTES = 1_000_000  # a task object is small; anything bigger is not one
MAX_POLL_FAILURES = 3  # consecutive transient poll failures tolerated inside one attempt
MAX_EARLY_TASKS = 256  # webhook bodies kept for tasks whose submit has not returned yet
MAX_TASK_ID = 128  # characters; a webhook body naming a longer id is not GrsAI's
MAX_INBOX = 64

MODERATION = frozenset({"input_moderation", "output_moderation"})
TERMINAL = frozenset({"succeeded", "failed", "violation"})
AUTH_HINTS = ("apikey", "api key", "api_key", "unauthorized", "invalid key")
BILLING_HINTS = ("insufficient", "balance", "credit", "余额", "积分")
RATE_HINTS = ("too many", "too frequent", "rate limit")

# gpt-image-2 takes a pixel size: the long side per requested size, both sides multiples of 16.
GPT_IMAGE_LONG_SIDE = {"1K": 1536, "2K": 2048, "4K": 3840}
GPT_IMAGE_SQUARE_SIDE = {"1K": 1024, "2K": 2048, "4K": 2880}

Task = dict[str, Any]


class _TaskGone(Transient):
    """`code: -22`: the task id is unknown or expired; the next attempt must submit anew."""


class _StreamBroken(Exception):
    """The stream stopped or garbled after the task id was known: polling takes over."""

    def __init__(self, task_id: str, why: str) -> None:
        super().__init__(why)
        self.task_id = task_id


class GrsaiProvider:
    """A client of GrsAI's draw API; see the module docstring for the three delivery modes."""

    name = "grsai"

    def __init__(
        self,
        api_key: str,
        base_url: str = "https://grsaiapi.com",
        *,
        session: aiohttp.ClientSession | None = None,
        poll_interval: float = 2.0,
        mode: Literal["stream", "poll"] = "stream",
        max_image_bytes: int = MAX_IMAGE_BYTES,
        webhook_url: Callable[[str], str] | None = None,
    ) -> None:
        if mode not in ("stream", "poll"):
            raise ValueError(f"mode must be 'stream' or 'poll', not {mode!r}")
        self._api_key = api_key
        self.base_url = base_url.rstrip("/")
        self._session = session
        self._owns_session = session is None
        self.poll_interval = poll_interval
        self.mode = mode
        self.max_image_bytes = max_image_bytes
        self.webhook_url = webhook_url
        # Task id → the job following it, and the queue its webhook bodies wake it through.
        self._inboxes: dict[str, tuple[str, asyncio.Queue[Task]]] = {}
        # Webhook bodies for a task whose submit has not returned yet, each with the job whose
        # signed URL it came to (None: unsigned); only while such a job's submit is in flight.
        self._early: OrderedDict[str, deque[tuple[str | None, Task]]] = OrderedDict()
        self._submitting: set[str] = set()  # jobs whose webhook-mode submit is in flight

    # -- the Provider protocol -------------------------------------------------------------

    async def generate(self, request: GenerationRequest, hooks: JobHooks) -> list[GeneratedImage]:
        """Resume `request.task_id` if set; else submit once and follow the task to its end."""
        deadline = asyncio.get_running_loop().time() + request.timeout_s
        if request.task_id:
            log.info("job=%s: resuming GrsAI task %s", request.job_id, request.task_id)
            return await self._follow(request, request.task_id, hooks, deadline, wait_first=False)
        if self.webhook_url is not None:
            hook_url = self.webhook_url(request.job_id)
            task_id = await self._submit_for_id(request, hooks, hook_url, deadline)
            return await self._follow(request, task_id, hooks, deadline, wait_first=True)
        if self.mode == "poll":
            task_id = await self._submit_for_id(request, hooks, "-1", deadline)
            return await self._follow(request, task_id, hooks, deadline, wait_first=True)
        return await self._stream(request, hooks, deadline)

    async def aclose(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def webhook_received(self, payload: dict[str, Any], job_id: str | None = None) -> None:
        """A body GrsAI POSTed to our webhook route: wake the job waiting on that task.

        `job_id` is the job the route's signed URL was made for: a body naming another job's
        task is dropped (a URL leaked for one job must not drive another's). Bodies for a task
        whose submit call has not returned yet are kept briefly, since GrsAI may call back
        before we have read its answer to the submit: only while that job's submit is in
        flight, few of them, and only what a waiting job reads of them (`_news`).
        """
        task = _unwrap(payload) if isinstance(payload, dict) else None
        key = _task_id(task) if task is not None else None
        if task is None or key is None or len(key) > MAX_TASK_ID:
            log.debug("ignored a GrsAI webhook body without a task id")
            return
        news = _news(key, task)
        following = self._inboxes.get(key)
        if following is not None:
            follower, inbox = following
            if job_id is not None and follower != job_id:
                log.warning("GrsAI webhook for job %s named another job's task; ignored", job_id)
                return
            with suppress(asyncio.QueueFull):
                inbox.put_nowait(news)
            return
        if job_id is not None and job_id not in self._submitting:
            log.debug("ignored a GrsAI webhook body for job %s, which is not submitting", job_id)
            return
        self._early.setdefault(key, deque(maxlen=8)).append((job_id, news))
        self._early.move_to_end(key)
        while len(self._early) > MAX_EARLY_TASKS:
            self._early.popitem(last=False)

    # -- submitting ------------------------------------------------------------------------

    def _body(self, request: GenerationRequest, webhook: str | None) -> dict[str, Any]:
        """The submit body of providers.md §1.2/§1.3 for this request."""
        endpoint = request.endpoint or NANO_BANANA
        size = request.size.upper() if request.size else None
        if endpoint == COMPLETIONS:
            aspect = gpt_image_size(request.aspect_ratio, size)
        else:
            aspect = request.aspect_ratio or "auto"
        body: dict[str, Any] = {
            "model": request.remote_model or request.model,
            "prompt": request.prompt,
            "urls": [data_uri(image) for image in request.reference_images],
            "aspectRatio": aspect,
            "shutProgress": False,
        }
        if size is not None and endpoint != COMPLETIONS:
            body["imageSize"] = size
        if webhook is not None:
            body["webHook"] = webhook
        return body

    async def _submit_for_id(
        self, request: GenerationRequest, hooks: JobHooks, hook: str, deadline: float
    ) -> str:
        """Submit in poll or webhook mode: GrsAI answers with the task id at once.

        If this call times out after GrsAI accepted it, the id is lost and a retry pays again;
        that is the price of these modes, which stream mode narrows to the first line.
        """
        endpoint = request.endpoint or NANO_BANANA
        self._submitting.add(request.job_id)
        try:
            answer = await self._call(endpoint, self._body(request, hook), _budget(deadline))
        finally:
            self._submitting.discard(request.job_id)
        data = answer.get("data")
        task_id = _task_id(data) if isinstance(data, dict) else None
        if task_id is None:
            raise Transient("GrsAI accepted the request but named no task id")
        await hooks.task_submitted(task_id)
        log.info("job=%s: GrsAI task %s submitted", request.job_id, task_id)
        return task_id

    # -- stream mode -----------------------------------------------------------------------

    async def _stream(
        self, request: GenerationRequest, hooks: JobHooks, deadline: float
    ) -> list[GeneratedImage]:
        """Submit and read the task stream; if it breaks once the id is known, poll instead."""
        try:
            final = await self._read_stream(request, hooks, deadline)
        except _StreamBroken as exc:
            log.warning(
                "job=%s: the GrsAI stream broke (%s); polling task %s",
                request.job_id,
                exc,
                exc.task_id,
            )
            return await self._follow(request, exc.task_id, hooks, deadline, wait_first=False)
        images = await self._conclude(final, request, hooks, deadline)
        if images is None:  # _read_stream only returns terminal tasks
            raise Transient("GrsAI's stream ended on an unfinished task")
        return images

    async def _read_stream(
        self, request: GenerationRequest, hooks: JobHooks, deadline: float
    ) -> Task:
        """The terminal task from the submit stream.

        Raises `_StreamBroken` for any trouble after the task id is known (the task lives on and
        polling will find it), and a `ProviderError` for trouble before.
        """
        task_id: str | None = None
        remaining = deadline - asyncio.get_running_loop().time()
        timeout = aiohttp.ClientTimeout(total=max(0.001, remaining), sock_connect=CALL_TIMEOUT_S)
        url = self.base_url + (request.endpoint or NANO_BANANA)
        session = self._get_session()
        try:
            async with session.post(
                url, json=self._body(request, None), headers=self._headers(), timeout=timeout
            ) as resp:
                if resp.status >= 400:
                    raw = await read_capped(resp, MAX_BODY_BYTES, "GrsAI's answer")
                    raise self._error(resp.status, _parse_object(raw), resp.headers)
                # Closed here, not left to the garbage collector: asyncio finalizes an abandoned
                # async generator through a self-pipe wakeup, a syscall on every job.
                async with aclosing(_json_objects(resp.content)) as objects:
                    async for obj in objects:
                        if obj is None:
                            if task_id is not None:
                                raise _StreamBroken(task_id, "a line was not JSON")
                            raise Transient("GrsAI sent a malformed stream line")
                        task = _unwrap(obj)
                        if task is None:  # an error envelope `{code, msg}` instead of a task
                            if task_id is not None:
                                raise _StreamBroken(
                                    task_id, f"an error line, code {obj.get('code')}"
                                )
                            raise self._error(resp.status, obj, resp.headers)
                        if task_id is None and (task_id := _task_id(task)) is not None:
                            # Persisted before anything else: from here on, a retry must not pay again.
                            await hooks.task_submitted(task_id)
                            log.info("job=%s: GrsAI task %s submitted", request.job_id, task_id)
                        if _is_terminal(task):
                            return task
                        await _report_progress(task, hooks)
        except (aiohttp.ClientError, TimeoutError) as exc:
            if task_id is not None:
                raise _StreamBroken(task_id, exc.__class__.__name__) from None
            raise Transient(f"GrsAI submit failed ({exc.__class__.__name__})") from None
        if task_id is not None:
            raise _StreamBroken(task_id, "the stream ended before the task did")
        raise Transient("GrsAI's stream ended without a task")

    # -- polling (poll mode, webhook safety net, resume) --------------------------------------

    async def _follow(
        self,
        request: GenerationRequest,
        task_id: str,
        hooks: JobHooks,
        deadline: float,
        *,
        wait_first: bool,
    ) -> list[GeneratedImage]:
        """Poll `task_id` until it ends; a webhook for it cuts the wait between polls short.

        `wait_first`: the task was submitted just now. GrsAI's result store can lag its
        submit, so a task it has just accepted may be "not found" (-22) at first: that is polled
        again, as a transient failure, before the id is given up (giving it up at once had the
        retry submit anew: two tasks billed for one job). A resumed task that is gone is gone.
        """
        loop = asyncio.get_running_loop()
        inbox = self._open_inbox(task_id, request.job_id)
        try:
            failures = 0
            wait = wait_first
            while True:
                if wait:
                    await self._wait_for_news(inbox, hooks, deadline)
                wait = True
                try:
                    task = await self._fetch_result(task_id, deadline)
                except _TaskGone:
                    failures += 1
                    if wait_first and failures <= MAX_POLL_FAILURES and loop.time() < deadline:
                        continue
                    log.info(
                        "GrsAI task %s is gone (code -22); the next attempt submits anew", task_id
                    )
                    await hooks.task_submitted(None)
                    raise
                except (Transient, RateLimited) as exc:
                    failures += 1
                    if failures > MAX_POLL_FAILURES or loop.time() >= deadline:
                        raise
                    if exc.retry_after:
                        await asyncio.sleep(min(exc.retry_after, max(0.0, deadline - loop.time())))
                    continue
                failures = 0
                images = await self._conclude(task, request, hooks, deadline)
                if images is not None:
                    return images
                if loop.time() >= deadline:
                    raise Transient(
                        f"GrsAI task still running after {request.timeout_s:g} s"
                    )  # the id stays: a later attempt resumes it
        finally:
            if (following := self._inboxes.get(task_id)) is not None and following[1] is inbox:
                del self._inboxes[task_id]

    async def _wait_for_news(
        self, inbox: asyncio.Queue[Task], hooks: JobHooks, deadline: float
    ) -> None:
        """Sleep one poll interval, forwarding webhook progress; a terminal webhook ends it early."""
        loop = asyncio.get_running_loop()
        until = min(loop.time() + self.poll_interval, deadline)
        while (remaining := until - loop.time()) > 0:
            try:
                task = await asyncio.wait_for(inbox.get(), remaining)
            except TimeoutError:
                return
            if _is_terminal(task):
                return  # the result endpoint confirms it: a webhook body proves nothing
            await _report_progress(task, hooks)

    async def _fetch_result(self, task_id: str, deadline: float) -> Task:
        """One poll of `/v1/draw/result` (`_TaskGone` for -22: the caller decides)."""
        answer = await self._call(RESULT, {"id": task_id}, _budget(deadline))
        task = _unwrap(answer)
        if task is None:
            raise Transient("GrsAI's result answer holds no task")
        return task

    def _open_inbox(self, task_id: str, job_id: str) -> asyncio.Queue[Task]:
        inbox: asyncio.Queue[Task] = asyncio.Queue(MAX_INBOX)
        for sent_for, task in self._early.pop(task_id, ()):
            if sent_for in (None, job_id):
                with suppress(asyncio.QueueFull):
                    inbox.put_nowait(task)
        self._inboxes[task_id] = (job_id, inbox)
        return inbox

    # -- outcomes --------------------------------------------------------------------------

    async def _conclude(
        self, task: Task, request: GenerationRequest, hooks: JobHooks, deadline: float
    ) -> list[GeneratedImage] | None:
        """Images for a succeeded task, an error for a failed one, None while it runs."""
        status = str(task.get("status") or "").lower()
        urls = _result_urls(task)
        if status == "succeeded" or (not status and urls):
            if not urls:
                await hooks.task_submitted(None)
                raise Transient("GrsAI reported success without an image")
            hooks.generated()
            session = self._get_session()
            return [
                await download(
                    session, url, max_bytes=self.max_image_bytes, timeout_s=_left(deadline)
                )
                for url in urls[: max(1, request.n)]
            ]
        if status in ("failed", "violation"):
            reason = str(task.get("failure_reason") or "")
            detail = self._scrub(str(task.get("error") or reason or status))[:200]
            if status == "violation" or reason in MODERATION:
                raise Refused(f"GrsAI refused the request ({reason or status}): {detail}")
            await hooks.task_submitted(None)  # the task is dead: a retry must submit anew
            raise Transient(f"GrsAI's task failed: {detail}")
        await _report_progress(task, hooks)
        return None

    def _error(
        self, status: int, body: dict[str, Any] | None, headers: Mapping[str, str]
    ) -> ProviderError:
        """Map an HTTP status and a `{code, msg}` body onto the error taxonomy (§1.7)."""
        code = body.get("code") if body is not None else None
        msg = ""
        if body is not None:
            msg = self._scrub(str(body.get("msg") or body.get("error") or ""))[:200]
        low = msg.lower()
        if status == 401 or any(hint in low for hint in AUTH_HINTS + BILLING_HINTS):
            log.warning("GrsAI rejected the API key (%s): check GRSAI_API_KEY", msg or status)
            return AuthFailed(f"GrsAI rejected the API key: {msg or f'HTTP {status}'}")
        if status == 429 or code == 429 or any(hint in low for hint in RATE_HINTS):
            return RateLimited(
                f"GrsAI: too many requests ({msg or status})",
                retry_after=parse_retry_after(headers),
            )
        if status == 403:
            log.warning("GrsAI answered 403 (%s): check GRSAI_API_KEY", msg or "no message")
            return AuthFailed(f"GrsAI refused access: {msg or 'HTTP 403'}")
        if says_model_gone(low):
            log.warning("GrsAI does not serve the model (%s): check MODELS_FILE", msg)
            return ModelUnavailable(f"GrsAI does not serve the model: {msg}")
        if status >= 400:
            return status_error(status, f"GrsAI: HTTP {status}{': ' + msg if msg else ''}", headers)
        if body is None:
            return Transient("GrsAI sent a malformed answer")
        if code == TASK_GONE:
            return _TaskGone(f"GrsAI task not found ({msg or 'code -22'})")
        if isinstance(code, int) and not isinstance(code, bool) and code >= 500:
            # `{code: 503, msg: "server error"}` under HTTP 200: their server's trouble, not
            # the request's (§1.7: the body's code counts as the status would).
            return Transient(f"GrsAI: server error (code {code}){': ' + msg if msg else ''}")
        return BadRequest(f"GrsAI rejected the request (code {code}): {msg}")

    # -- HTTP ------------------------------------------------------------------------------

    async def _call(self, path: str, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """POST JSON and return the `{code: 0, …}` answer; anything else raises."""
        session = self._get_session()
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        try:
            async with session.post(
                self.base_url + path, json=body, headers=self._headers(), timeout=timeout
            ) as resp:
                raw = await read_capped(resp, MAX_BODY_BYTES, "GrsAI's answer")
                status, headers = resp.status, resp.headers
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Transient(f"GrsAI call failed ({exc.__class__.__name__})") from None
        answer = _parse_object(raw)
        if status >= 400 or answer is None or answer.get("code", 0) != 0:
            raise self._error(status, answer, headers)
        return answer

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}", "Accept": "application/json"}

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = new_session()
            self._owns_session = True
        return self._session

    def _scrub(self, text: str) -> str:
        """Text from the server, minus the key should it ever be echoed back."""
        return text.replace(self._api_key, "***") if self._api_key else text


# -- pure helpers ------------------------------------------------------------------------------


def _left(deadline: float) -> float:
    """What is left of the job's time (a little at least): the bound of a result's download."""
    return max(0.05, deadline - asyncio.get_running_loop().time())


def _budget(deadline: float) -> float:
    """The timeout of one short call: what is left of the job's time, within bounds."""
    remaining = deadline - asyncio.get_running_loop().time()
    return max(0.05, min(CALL_TIMEOUT_S, remaining))


def gpt_image_size(ratio: str | None, size: str | None = None) -> str:
    """The pixel string gpt-image-2 takes for a ratio: 1:1 → 1024x1024, 3:2 → 1536x1024 …"""
    if ratio is None:
        return "auto"
    try:
        w, h = parse_ratio(ratio)
    except ValueError:
        return ratio  # let GrsAI judge what it was given
    key = size if size in GPT_IMAGE_LONG_SIDE else "1K"
    if w == h:
        side = GPT_IMAGE_SQUARE_SIDE[key]
        return f"{side}x{side}"
    width, height = ratio_size(ratio, GPT_IMAGE_LONG_SIDE[key], multiple=16)
    return f"{width}x{height}"


def _unwrap(obj: dict[str, Any]) -> Task | None:
    """The task object in a stream line, a webhook body or a `{code, data}` answer.

    None for a `{code, msg}` error envelope, which carries no task.
    """
    data = obj.get("data")
    if isinstance(data, dict):
        return data
    if "id" in obj or "status" in obj:
        return obj
    return None if "code" in obj or "msg" in obj else obj


def _news(task_id: str, task: Task) -> Task:
    """What a waiting job reads of a webhook body: the id, the status and the progress, each
    small. (The outcome is always read from the result endpoint: a body only wakes the job.)"""
    news: Task = {"id": task_id}
    status = task.get("status")
    if isinstance(status, str) and len(status) <= 32:
        news["status"] = status
    elif _is_terminal(task):  # results without a status: ended, the result endpoint says how
        news["status"] = "succeeded"
    progress = task.get("progress")
    number = isinstance(progress, int | float) and not isinstance(progress, bool)
    if number or (isinstance(progress, str) and len(progress) <= 16):
        news["progress"] = progress
    return news


def _task_id(task: Task) -> str | None:
    """The task's id as text, None when it names none."""
    value = task.get("id")
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        return None
    return str(value)


def _is_terminal(task: Task) -> bool:
    status = str(task.get("status") or "").lower()
    return status in TERMINAL or (not status and bool(_result_urls(task)))


def _result_urls(task: Task) -> list[str]:
    """`results[].url`, or the older top-level `url`."""
    urls: list[str] = []
    results = task.get("results")
    if isinstance(results, list):
        for item in results:
            url = item.get("url") if isinstance(item, dict) else None
            if isinstance(url, str) and url:
                urls.append(url)
    top = task.get("url")
    if not urls and isinstance(top, str) and top:
        urls.append(top)
    return urls


async def _report_progress(task: Task, hooks: JobHooks) -> None:
    value = task.get("progress")
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return
    try:
        percent = int(float(value))
    except (ValueError, OverflowError):  # "abc", "Infinity", 1e400
        return
    await hooks.progress(max(0, min(100, percent)))


def _parse_object(raw: bytes) -> dict[str, Any] | None:
    """A JSON object, or None when the bytes are not one (HTML error page, truncation …)."""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


async def _json_objects(
    content: aiohttp.StreamReader,
) -> AsyncGenerator[dict[str, Any] | None, None]:
    """The JSON objects of a GrsAI stream, None for a line that is not one.

    Accepts SSE-style `data: {…}` lines (blank lines, comments and `data: [DONE]` too) and bare
    JSON, one object a line or one object spread over several lines.
    """
    pending = ""
    async with aclosing(_lines(content)) as lines:
        async for line in lines:
            text = line.strip()
            if not text or text.startswith(":") or text.startswith(("event:", "id:", "retry:")):
                continue
            if text.startswith("data:"):
                payload = text[5:].strip()
                if payload == "[DONE]":
                    return
                yield _parse_object(payload.encode())
                continue
            pending += text
            obj = _parse_object(pending.encode())
            if obj is not None:
                pending = ""
                yield obj
            elif len(pending) > MAX_BODY_BYTES:
                yield None
                return
    if pending:
        yield None


async def _lines(content: aiohttp.StreamReader) -> AsyncGenerator[str, None]:
    """Decoded lines, each capped, without aiohttp's own line-length limit.

    A byte-order mark before the first line goes, as the event-stream format says (it made
    that line unreadable: its task id was lost and the retry paid for a second task).
    """
    buffer = b""
    first = True
    async for chunk in content.iter_any():
        buffer += chunk
        if first and len(buffer) >= 3:
            buffer, first = buffer.removeprefix(codecs.BOM_UTF8), False
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line.decode("utf-8", "replace")
        if len(buffer) > MAX_BODY_BYTES:
            yield "\x00"  # not JSON: the reader treats it as a garbled line and stops
            return
    if buffer:
        yield buffer.removeprefix(codecs.BOM_UTF8).decode("utf-8", "replace")
