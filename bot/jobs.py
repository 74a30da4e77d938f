"""The neutral data that flows between adapters, the engine and providers."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

PLATFORMS = frozenset({"telegram", "discord", "console", "cli"})  # where users come from
BATCH_PLATFORM = "cli"  # `drawbridge generate`, a process of its own beside the bot


class JobStatus(StrEnum):
    """A job's state; the value is what the `jobs.status` column holds."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REFUSED = "refused"
    CANCELLED = "cancelled"

    @property
    def active(self) -> bool:
        return self in (JobStatus.QUEUED, JobStatus.RUNNING)


@dataclass(frozen=True, slots=True)
class UserRef:
    """One user on one platform, written `telegram:42`."""

    platform: str
    user_id: str

    def __str__(self) -> str:
        return f"{self.platform}:{self.user_id}"

    @classmethod
    def parse(cls, text: str) -> UserRef:
        platform, sep, user_id = text.strip().partition(":")
        if not sep or not platform or not user_id:
            raise ValueError(f"expected platform:id, got {text!r}")
        return cls(platform, user_id)


def chat_scope(platform: str, chat_id: str) -> str:
    """A chat as ALLOWED_IDS, policies and chat moves name it: `telegram-chat:-100…`."""
    return f"{platform}-chat:{chat_id}"


@dataclass(frozen=True, slots=True)
class Target:
    """Where answers for a job go: chat, thread or topic, and what to reply to.

    `meta` is opaque to the core: an adapter keeps what it needs there (a Discord
    interaction token, say) and gets it back after a restart.
    """

    platform: str
    chat_id: str
    thread_id: str | None = None
    reply_to: str | None = None
    guild_id: str | None = None
    meta: str | None = None


@dataclass(frozen=True, slots=True)
class Options:
    """What the user asked for besides the prompt; `None` means the model's default."""

    aspect_ratio: str | None = None
    n: int = 1
    size: str | None = None
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class Request:
    """A user's ask, as an adapter hands it to `engine.submit`."""

    user: UserRef
    target: Target
    prompt: str
    options: Options = field(default_factory=Options)
    model: str | None = None
    reference_images: tuple[bytes, ...] = ()
    lang: str = "en"


@dataclass(frozen=True, slots=True)
class Ticket:
    """The engine's answer to a submit: the job is durable and queued."""

    job_id: str
    position: int
    model: str
    n_images: int
    reserved_usd: float
    cached_from: str | None = None  # served from this earlier job's images, free


@dataclass(frozen=True, slots=True)
class Job:
    """One request as the engine tracks it; a row of the `jobs` table."""

    id: str
    user: UserRef
    target: Target
    prompt: str
    model: str
    provider: str
    options: Options
    status: JobStatus
    lang: str
    day: str
    created_at: float
    reserved_usd: float = 0.0
    admin: bool = False
    reference_paths: tuple[str, ...] = ()
    task_id: str | None = None
    cost_usd: float = 0.0
    error: str | None = None
    error_kind: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    delivered_at: float | None = None
    status_message_id: str | None = None
    parent_id: str | None = None
    account: str = ""  # the quota account (a linked identity's), "" = the user itself
    cache_key: str | None = None  # identical requests share it (the result cache)
    cached_from: str | None = None  # served, free, from this earlier job's images
    requested: int | None = None  # images asked for, once `options.n` says how many were made

    @property
    def n_images(self) -> int:
        return self.options.n

    @property
    def quota_key(self) -> str:
        """Whose daily images and spend this job counts against."""
        return self.account or str(self.user)


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    """Image bytes a provider produced, already verified to be a PNG, JPEG or WebP."""

    data: bytes
    mime: str
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class StoredImage:
    """A generated image saved under the data dir."""

    job_id: str
    index: int
    path: Path
    mime: str
    width: int
    height: int
    size_bytes: int
