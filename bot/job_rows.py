"""How a `Job` maps to a row of the `jobs` table and back."""

from __future__ import annotations

import json
from typing import Any

from bot.dbwriter import Op
from bot.jobs import Job, JobStatus, Options, Target, UserRef

JOB_COLUMNS = (
    "id, platform, user_id, chat_id, thread_id, reply_to, guild_id, target_meta, status_message_id, "
    "lang, prompt, model, provider, n_images, aspect_ratio, size, seed, refs, status, day, admin, "
    "reserved_usd, cost_usd, error, error_kind, task_id, created_at, started_at, finished_at, "
    "delivered_at, parent_id, account, cache_key, cached_from, n_requested"
)


def insert_job_op(job: Job) -> Op:
    t, o = job.target, job.options
    return (
        f"INSERT INTO jobs ({JOB_COLUMNS}) VALUES ({', '.join('?' * 35)})",
        (
            job.id,
            job.user.platform,
            job.user.user_id,
            t.chat_id,
            t.thread_id,
            t.reply_to,
            t.guild_id,
            t.meta,
            job.status_message_id,
            job.lang,
            job.prompt,
            job.model,
            job.provider,
            o.n,
            o.aspect_ratio,
            o.size,
            o.seed,
            json.dumps(list(job.reference_paths)),
            str(job.status),
            job.day,
            int(job.admin),
            job.reserved_usd,
            job.cost_usd,
            job.error,
            job.error_kind,
            job.task_id,
            job.created_at,
            job.started_at,
            job.finished_at,
            job.delivered_at,
            job.parent_id,
            job.account or None,
            job.cache_key,
            job.cached_from,
            job.requested or o.n,
        ),
    )


def told_op(job_id: str, at: float) -> Op:
    """The job's user has been told how it ended (`jobs.told_at`)."""
    return ("UPDATE jobs SET told_at = ? WHERE id = ?", (at, job_id))


def row_to_job(r: Any) -> Job:
    return Job(
        id=r["id"],
        user=UserRef(r["platform"], r["user_id"]),
        target=Target(
            platform=r["platform"],
            chat_id=r["chat_id"],
            thread_id=r["thread_id"],
            reply_to=r["reply_to"],
            guild_id=r["guild_id"],
            meta=r["target_meta"],
        ),
        prompt=r["prompt"],
        model=r["model"],
        provider=r["provider"],
        options=Options(
            aspect_ratio=r["aspect_ratio"], n=r["n_images"], size=r["size"], seed=r["seed"]
        ),
        status=JobStatus(r["status"]),
        lang=r["lang"],
        day=r["day"],
        created_at=r["created_at"],
        reserved_usd=r["reserved_usd"],
        admin=bool(r["admin"]),
        reference_paths=tuple(json.loads(r["refs"])),
        task_id=r["task_id"],
        requested=r["n_requested"],
        cost_usd=r["cost_usd"],
        error=r["error"],
        error_kind=r["error_kind"],
        started_at=r["started_at"],
        finished_at=r["finished_at"],
        delivered_at=r["delivered_at"],
        status_message_id=r["status_message_id"],
        parent_id=r["parent_id"],
        account=r["account"] or "",
        cache_key=r["cache_key"],
        cached_from=r["cached_from"],
    )
