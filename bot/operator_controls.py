"""The operator's controls on the engine: admins, links, re-posts, the result cache, blocklist rows."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import replace

from bot.catalog import ModelSpec
from bot.dbwriter import Op
from bot.engine_config import new_job, new_job_id
from bot.errors import ErrorKind, InvalidRequest, JobNotFound, NotAllowed, UserError
from bot.job_rows import insert_job_op
from bot.jobs import (
    Job,
    JobStatus,
    Options,
    Request,
    StoredImage,
    Target,
    Ticket,
    UserRef,
    chat_scope,
)
from bot.operator import LINK_CODE_TTL, LINK_TRIES, command_ops
from bot.quota import days_before
from bot.scheduler import Scheduler
from bot.stats import usage_csv

log = logging.getLogger("drawbridge.engine")


class OperatorControls(Scheduler):
    """What admin and account commands do, and the free paths of submit (cache, blocklist)."""

    async def usage_csv(self) -> bytes:
        return usage_csv(await self.store.usage())

    async def new_link_code(self, user: UserRef) -> str:
        code, ops = self.operator.new_link_code(str(user), self.clock())
        await self.store.write(*ops)
        return code

    def allowed(self, user: str, target: Target) -> bool:
        """ALLOWED_IDS, for this chat and the chats it was before (`chat_moved`)."""
        moved_from = self.operator.origins(chat_scope(target.platform, target.chat_id))
        return self.config.allowed(user, target, moved_from)

    async def chat_moved(self, platform: str, old_chat: str, new_chat: str) -> None:
        """A chat lives on under a new id (a Telegram group upgraded to a supergroup): its
        policy and its place in ALLOWED_IDS follow it, at once and after a restart."""
        old, new = chat_scope(platform, old_chat), chat_scope(platform, new_chat)
        ops = self.operator.move(old, new, platform, self.clock())  # in memory before any await
        if ops:
            log.info("%s moved to %s: its policy and ALLOWED_IDS follow", old, new)
            await self.store.write(*ops)

    def refuse_banned(self, user: UserRef) -> None:
        """Raise `NotAllowed` for a banned user: a ban stops the bot posting images for them,
        old ones too (`/show`, the original files)."""
        if self.operator.banned(user) and not self.is_admin(user):
            raise NotAllowed()

    async def show(self, user: UserRef, job_id: str, target: Target) -> int:
        """Post a finished job's stored images again, here; returns how many."""
        self.refuse_banned(user)
        job = await self.store.get_job(job_id.lower())
        account = self.operator.account_of(user)
        if job is None or (
            self.operator.account_of(job.user) != account and not self.is_admin(user)
        ):
            raise JobNotFound(job=job_id)
        images = await self.store.images_for(job.id)
        existing = [img for img in images if img.path.exists()]
        if job.status is not JobStatus.SUCCEEDED or not existing:
            raise UserError("error.no_images", job=job.id)
        adapter = self.adapters.get(target.platform)
        if adapter is None:
            raise UserError("error.no_images", job=job.id)
        # Posted here, as a new message: the job's status message (in the chat it was asked in;
        # a message id counts per chat) is not this one's to edit.
        again = replace(job, target=target, status_message_id=None)
        async with asyncio.timeout(self.config.deliver_timeout):
            await adapter.deliver(again, existing)
        return len(existing)

    async def apply(self, ops: Sequence[Op], source: tuple[UserRef, Target] | None = None) -> None:
        """Persist an operator change (its in-memory part is already applied); `source`, the
        command's sender and message, is recorded with it (`command_ops`)."""
        if source is not None:
            ops = [*ops, *command_ops(*source, self.clock())]
        await self.store.write(*ops)

    async def link(self, joiner: UserRef, code: str, source: Target | None = None) -> str:
        """Join `joiner` to the account that asked for `code`; they share quota from now on.
        `source` is the message that asked (`command_ops`)."""
        now = self.clock()
        key = str(joiner)
        tries = [t for t in self._link_tries.get(key, []) if t > now - LINK_CODE_TTL]
        if len(tries) >= LINK_TRIES:
            raise InvalidRequest("error.link_tries", minutes=int(LINK_CODE_TTL // 60))
        code = code.strip().upper()  # as `new_link_code` makes them; typed in any case
        owner = await self.store.link_code_owner(code, now)
        if owner is None:
            # Those whose wrong tries are past their window go (a few users at most are left).
            self._link_tries = {
                k: v for k, v in self._link_tries.items() if v[-1] > now - LINK_CODE_TTL
            }
            self._link_tries[key] = [*tries, now]
            raise InvalidRequest("error.link_code")
        self._link_tries.pop(key, None)
        if self.operator.account_of(owner) == self.operator.account_of(joiner):
            return self.operator.account_of(owner)
        account, old, ops = self.operator.link(owner, str(joiner), now)
        ops.append(("DELETE FROM link_codes WHERE code = ?", (code.strip(),)))
        if source is not None:
            ops += command_ops(joiner, source, now)
        # Jobs still queued or running settle (or are refunded) against the account now, in
        # memory and in their rows.
        moved = [job for job in self._jobs.values() if job.quota_key == old]
        ops += [("UPDATE jobs SET account = ? WHERE id = ?", (account, job.id)) for job in moved]
        await self.store.write(*ops)
        today = self.quotas.today()
        for day in (today, days_before(today, 1)):  # (not now - 86400: a day may have 23 h)
            self.quotas.merge(day, old, account)
        live = 0
        for job in moved:
            if job.id in self._jobs:
                self._jobs[job.id] = replace(self._jobs[job.id], account=account)
                live += 1
        if live:  # their pending count (MAX_PENDING_PER_USER) moves with them (`_hold`)
            self._count_pending(old, -live)
            self._count_pending(account, live)
        log.info("linked %s into account %s", joiner, account)
        return account

    async def _serve_cached(
        self, request: Request, account: str, source: Job, images: list[StoredImage]
    ) -> Ticket:
        """An identical recent request: a new row pointing at the same files, free, delivered."""
        now = self.clock()
        job = replace(
            source,
            id=new_job_id(),
            user=request.user,
            target=request.target,
            status=JobStatus.SUCCEEDED,
            lang=request.lang,
            day=self.quotas.day_of(now),
            created_at=now,
            started_at=now,
            finished_at=now,
            delivered_at=None,
            reserved_usd=0.0,
            cost_usd=0.0,
            task_id=None,
            status_message_id=None,
            parent_id=None,
            account=account if account != str(request.user) else "",
            cached_from=source.id,
        )
        copies = [replace(img, job_id=job.id) for img in images]
        await self.store.write(insert_job_op(job), *self.store.image_ops(copies))
        # On /metrics as on /stats: a job and its images, served by the cache, not a provider.
        self.metrics.jobs.labels(JobStatus.SUCCEEDED.value, "cache", job.model).inc()
        self.metrics.images.labels("cache", job.model).inc(len(copies))
        log.info("→ job=%s served from the cache of job=%s", job.id, source.id)
        self._spawn(self._deliver(job, copies))
        return Ticket(job.id, 0, job.model, len(copies), 0.0, cached_from=source.id)

    async def _record_blocked(
        self,
        request: Request,
        spec: ModelSpec,
        prompt: str,
        options: Options,
        account: str,
        term: str,
    ) -> None:
        """A blocklisted prompt still gets a row (refused, free), so the operator sees it."""
        now = self.clock()
        job = new_job(
            request,
            spec,
            prompt,
            options,
            account,
            status=JobStatus.REFUSED,
            day=self.quotas.day_of(now),
            now=now,
            error=f"blocklist: {term}",
            error_kind=ErrorKind.REFUSED.value,
            finished_at=now,
        )
        await self.store.insert_job(job)
        # Told at once, by the refusal submit raises: not an end for a restart to tell again.
        self.job_told(job.id)
        self.metrics.jobs.labels(JobStatus.REFUSED.value, "blocklist", spec.name).inc()
        log.info("✗ job=%s refused by the blocklist (%s)", job.id, term)
