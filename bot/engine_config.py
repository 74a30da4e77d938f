"""The engine's settings, a user's day as /usage shows it, and job ids and cache keys."""

from __future__ import annotations

import base64
import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bot.catalog import ModelSpec
from bot.jobs import Job, JobStatus, Options, Request, Target, chat_scope
from bot.quota import Limits

UPDATE_STATUS = "UPDATE jobs SET status = ? WHERE id = ?"


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """The engine's knobs; `bot.app` builds this from the settings."""

    concurrency: int = 16
    queue_max: int = 200
    max_pending_per_user: int = 3
    limits: Limits = field(default_factory=Limits)
    admin_ids: frozenset[str] = frozenset()
    allowed_ids: frozenset[str] = frozenset()
    max_prompt_chars: int = 2000
    generate_timeout: float = 600.0
    deliver_timeout: float = 120.0
    queue_timeout: float = 3600.0
    shutdown_grace: float = 20.0
    retry_attempts: int = 4
    retry_initial: float = 1.0
    deliver_attempts: int = 3
    deliver_backoff: float = 1.0
    provider_concurrency: Mapping[str, int] = field(default_factory=dict)
    sweep_interval: float = 30.0
    finishing_max: int = 0  # jobs storing/delivering at once beyond CONCURRENCY; 0 = auto
    result_cache_ttl: float = 0.0  # seconds; 0 = off
    image_retention_days: float = 30.0  # 0 = keep forever

    def allowed(self, user: str, target: Target, moved_from: Sequence[str] = ()) -> bool:
        """Whether ALLOWED_IDS serves `user` at `target`; `moved_from`, the scopes the chat
        was before (a group before it became a supergroup), count as the chat."""
        if not self.allowed_ids or user in self.allowed_ids or user in self.admin_ids:
            return True
        chat = chat_scope(target.platform, target.chat_id)
        guild = f"{target.platform}-guild:{target.guild_id}" if target.guild_id else None
        return any(
            scope in self.allowed_ids for scope in (chat, *moved_from, guild) if scope is not None
        )


@dataclass(frozen=True, slots=True)
class Usage:
    """A user's day so far, as `/usage` shows it."""

    day: str
    images: int
    image_limit: int
    usd: float
    usd_limit: float
    active_jobs: int
    exempt: bool


def result_cache_key(model: str, prompt: str, options: Options, references: Sequence[bytes]) -> str:
    """Identical requests (model, prompt, options, seed, reference images) share this key."""
    digest = hashlib.sha256()
    for part in (model, prompt, options.aspect_ratio, options.n, options.size, options.seed):
        digest.update(repr(part).encode() + b"\x00")
    for ref in references:
        digest.update(hashlib.sha256(ref).digest())
    return digest.hexdigest()


def new_job_id() -> str:
    """Ten lowercase base32 characters: short enough to type after /cancel, 50 bits of randomness."""
    # Not a secret (every use checks who owns the job), so the fast generator will do.
    return base64.b32encode(random.getrandbits(56).to_bytes(7, "big")).decode()[:10].lower()


def new_job(
    request: Request,
    spec: ModelSpec,
    prompt: str,
    options: Options,
    account: str,
    *,
    status: JobStatus,
    day: str,
    now: float,
    **fields: Any,
) -> Job:
    """A new job for a validated request; `account` is stored only when it is a linked one."""
    return Job(
        id=new_job_id(),
        user=request.user,
        target=request.target,
        prompt=prompt,
        model=spec.name,
        provider=spec.provider,
        options=options,
        status=status,
        lang=request.lang,
        day=day,
        created_at=now,
        account=account if account != str(request.user) else "",
        **fields,
    )
