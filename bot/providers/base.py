"""The provider seam: what the engine hands a provider and what it gets back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from bot.jobs import GeneratedImage


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One call's worth of work for a provider.

    `task_id` is set when the provider had already accepted this job before (a retry
    or a restart): the provider must resume that task instead of submitting again.
    """

    job_id: str
    model: str
    remote_model: str
    endpoint: str
    prompt: str
    n: int
    aspect_ratio: str | None
    size: str | None
    seed: int | None
    reference_images: tuple[bytes, ...] = ()
    task_id: str | None = None
    timeout_s: float = 600.0


class JobHooks(Protocol):
    """What a provider may tell the engine while it works."""

    async def progress(self, percent: int) -> None:
        """Report progress, 0–100; the engine coalesces and forwards it."""

    async def task_submitted(self, task_id: str | None) -> None:
        """Persist the provider's task id at once, so a restart resumes instead of paying again.

        `None` forgets a task that ended in a retryable failure, so the next attempt submits anew.
        """

    def generated(self) -> None:
        """The provider has made the images; all that is left is to fetch them.

        The engine gives the job's generating slot to the next job then: a download is not a
        generation, and `CONCURRENCY` counts generations. A retry takes a slot again.
        """


class Provider(Protocol):
    """An image API. Every failure is raised as a `bot.errors.ProviderError` subclass."""

    name: str

    async def generate(self, request: GenerationRequest, hooks: JobHooks) -> list[GeneratedImage]:
        """Produce `request.n` images (or fewer, if the API gives fewer), as verified bytes."""
        ...

    async def aclose(self) -> None:
        """Release connections."""


class NullHooks:
    """Hooks that drop everything, for callers outside the engine."""

    async def progress(self, percent: int) -> None:
        return None

    async def task_submitted(self, task_id: str | None) -> None:
        return None

    def generated(self) -> None:
        return None
