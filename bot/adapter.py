"""The core → platform seam: what every adapter (Telegram, Discord, console, batch) implements."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from bot.jobs import Job, JobStatus, StoredImage, Target


class StatusKind(StrEnum):
    """A job's visible step; `final` kinds end the job's status message."""

    QUEUED = "queued"
    STARTED = "started"
    PROGRESS = "progress"
    CANCELLED = "cancelled"
    FAILED = "failed"
    REFUSED = "refused"
    TIMEOUT = "timeout"

    @property
    def final(self) -> bool:
        return self in (
            StatusKind.CANCELLED,
            StatusKind.FAILED,
            StatusKind.REFUSED,
            StatusKind.TIMEOUT,
        )


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    """One status event, with its text already rendered in the job's language."""

    kind: StatusKind
    text: str
    position: int | None = None
    percent: int | None = None


def ended_without_result(job: Job, update: StatusUpdate) -> bool:
    """A job that failed, was refused or timed out (not cancelled, and not a result the
    platform would not take): what a "try again" button belongs under."""
    return (
        update.kind in (StatusKind.FAILED, StatusKind.REFUSED, StatusKind.TIMEOUT)
        and job.status is not JobStatus.SUCCEEDED
    )


class Adapter(Protocol):
    """A platform, as the engine sees it.

    `status` must return quickly: an adapter coalesces edits to its platform's limits and sends
    them in the background, and may drop a stale progress edit. `deliver` is awaited: it returns
    the platform's message id(s) of what it posted, recorded so a restart never posts twice.

    An adapter that sends a job's last word in the background says `confirms_told = True` and
    calls `engine.job_told(job_id)` once it has sent it (or can never send it): until then a
    restart tells the user again, through `status` for an end without a result, and through the
    adapter's `show_delivered(job)` (its status message says "done") for a delivered one.
    Without it, the engine counts a job told when `status` (or `deliver`) returns.
    """

    platform: str

    async def deliver(self, job: Job, images: Sequence[StoredImage]) -> str:
        """Post the images for `job` where its target says; raise `DeliveryError` on failure."""
        ...

    async def status(self, job: Job, update: StatusUpdate) -> None:
        """Show the job's progress (queued position, started, %, or its failure)."""

    async def notify(self, target: Target, text: str) -> None:
        """Send a plain message."""
