"""In-tree fakes for engine tests: a recording adapter and a scriptable provider (no network)."""

from __future__ import annotations

import asyncio
import functools
import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from PIL import Image

from bot.adapter import StatusKind, StatusUpdate
from bot.errors import DeliveryError
from bot.jobs import GeneratedImage, Job, StoredImage, Target
from bot.providers.base import GenerationRequest, JobHooks

# Connections a fake server's socket holds before it accepts them. aiohttp's default (128) is
# less than a client opening 200 connections at once: the kernel then drops the handshakes past
# it, each retried a second later (TCP's initial retransmission timeout), which no real API's
# front end does to a client. Linux caps it at net.core.somaxconn (4096 by default).
LISTEN_BACKLOG = 1024


# `multipart/form-data; boundary=…` with a bare boundary (RFC 2046's characters but the space).
_FORM_TYPE = re.compile(r"multipart/form-data; ?boundary=([0-9A-Za-z'()+_,\-./:=?]{1,70})")


def quick_form_headers() -> None:
    """Make aiohttp's form header parsing cheap in a fake server's process; same answers.

    Reading a form (`request.post()`), aiohttp parses each part's Content-Disposition two or
    three times, and `aiohttp.multipart.parse_content_disposition` escapes its 128 token
    characters into a regex on every call (the default argument of a function it defines
    inside itself); it parses the request's Content-Type with the `email` package, whose cache
    no form's random boundary ever hits. When the bot posted 2,000 photos, that was 60 % of the
    fake Bot API's CPU: 5.4 million `re.escape` calls and 2,000 e-mail header parses, CPU the
    bot under test did not have on a two-core machine, where no real API's front end runs.
    Now a Content-Disposition is parsed once per distinct header (a part's headers repeat from
    request to request; each caller gets its own copy of the parameters), and a plain
    `multipart/form-data; boundary=…` is read directly; anything else goes to aiohttp's parser.
    `tests/test_fakes.py` checks the answers against aiohttp's own.
    """
    from types import MappingProxyType

    from aiohttp import helpers, multipart

    if hasattr(multipart.parse_content_disposition, "original"):
        return
    disposition_of = functools.lru_cache(maxsize=4096)(multipart.parse_content_disposition)
    type_of = helpers.parse_content_type

    def parse_content_disposition(header: str | None) -> tuple[str | None, dict[str, str]]:
        disposition, params = disposition_of(header)
        return disposition, dict(params)

    def parse_content_type(raw: str) -> tuple[str, MappingProxyType[str, str]]:
        if (form := _FORM_TYPE.fullmatch(raw)) is not None:
            return "multipart/form-data", MappingProxyType({"boundary": form[1]})
        return type_of(raw)

    parse_content_disposition.original = disposition_of.__wrapped__  # type: ignore[attr-defined]
    parse_content_type.original = type_of  # type: ignore[attr-defined]
    multipart.parse_content_disposition = parse_content_disposition
    helpers.parse_content_type = parse_content_type  # type: ignore[assignment]


def png_bytes(
    width: int = 8, height: int = 8, color: tuple[int, int, int] = (200, 30, 30)
) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


@dataclass
class RecordingAdapter:
    """Remembers every status update and delivery, as a platform would show them."""

    platform: str = "test"
    statuses: list[tuple[str, StatusUpdate]] = field(default_factory=list)
    deliveries: list[tuple[str, list[StoredImage]]] = field(default_factory=list)
    notices: list[tuple[Target, str]] = field(default_factory=list)
    fail_deliveries: int = 0
    permanent_failure: bool = False
    deliver_delay: float = 0.0

    async def deliver(self, job: Job, images: Sequence[StoredImage]) -> str:
        if self.deliver_delay:
            await asyncio.sleep(self.deliver_delay)
        if self.fail_deliveries:
            self.fail_deliveries -= 1
            raise DeliveryError("platform said no", permanent=self.permanent_failure)
        self.deliveries.append((job.id, list(images)))
        return f"msg-{job.id}"

    async def status(self, job: Job, update: StatusUpdate) -> None:
        self.statuses.append((job.id, update))

    async def notify(self, target: Target, text: str) -> None:
        self.notices.append((target, text))

    def kinds(self, job_id: str) -> list[StatusKind]:
        return [u.kind for j, u in self.statuses if j == job_id]

    def delivered(self, job_id: str) -> int:
        return sum(1 for j, _ in self.deliveries if j == job_id)


Behaviour = Callable[[GenerationRequest, JobHooks], "asyncio.Future[None] | None"]


async def _scripted(
    gates: dict[str, asyncio.Event], errors: dict[str, list[Exception]], prompt: str
) -> None:
    """Wait at the prompt's gate, if it has one, then raise its next scripted error, if any."""
    gate = gates.get(prompt)
    if gate is not None:
        await gate.wait()
    queued = errors.get(prompt)
    if queued:
        raise queued.pop(0)


class ScriptedProvider:
    """A provider whose calls a test controls: gates, failures, task ids; it counts everything."""

    name = "demo"

    def __init__(self) -> None:
        self.calls: list[GenerationRequest] = []
        self.started: list[str] = []
        self.running = 0
        self.max_running = 0
        self.gate: asyncio.Event | None = None  # when set, every call waits for it
        self.errors: dict[str, list[Exception]] = {}  # prompt → errors to raise, in order
        self.task_ids = False  # when True, report a task id before waiting
        self.hang_prompts: set[str] = set()
        self.progress_steps: Sequence[int] = ()
        self.gates: dict[str, asyncio.Event] = {}  # prompt → held while generating
        self.fetch_errors: dict[str, list[Exception]] = {}  # prompt → raised once made
        self.fetch_gates: dict[str, asyncio.Event] = {}  # prompt → held once made (a download)

    async def generate(self, request: GenerationRequest, hooks: JobHooks) -> list[GeneratedImage]:
        self.calls.append(request)
        self.started.append(request.job_id)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        generating = True
        try:
            if self.task_ids and request.task_id is None:
                await hooks.task_submitted(f"task-{request.job_id}")
            for step in self.progress_steps:
                await hooks.progress(step)
            if request.prompt in self.hang_prompts:
                await asyncio.Event().wait()
            if self.gate is not None:
                await self.gate.wait()
            await _scripted(self.gates, self.errors, request.prompt)
            # Made: what is left (a real provider's download) is outside the generating slot.
            self.running -= 1
            generating = False
            hooks.generated()
            await _scripted(self.fetch_gates, self.fetch_errors, request.prompt)
            return [
                GeneratedImage(png_bytes(color=(i * 40 % 255, 90, 10)), "image/png", 8, 8)
                for i in range(request.n)
            ]
        finally:
            if generating:
                self.running -= 1

    async def aclose(self) -> None:
        return None

    def submits(self) -> int:
        """Calls that were new submissions (not resumes of a known task)."""
        return sum(1 for c in self.calls if c.task_id is None)
