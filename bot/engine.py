"""The job engine: submit, cancel, reroll and report; the other parts live beside it.

`Engine` is one class put together from `EngineBase` (state, bookkeeping, alerts),
`JobRunner` (one job's life), `Scheduler` (lifecycle and fair scheduling) and
`OperatorControls` (admin and account commands). See DESIGN.md §2 for the rules it keeps.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import partial
from typing import Any
from zoneinfo import ZoneInfo

from bot.adapter import Adapter
from bot.catalog import Catalog
from bot.engine_base import SlotWaiter
from bot.engine_config import EngineConfig, Usage, new_job, new_job_id, result_cache_key
from bot.errors import (
    Blocked,
    BudgetExceeded,
    ErrorKind,
    InvalidRequest,
    JobEnded,
    JobNotFound,
    Listed,
    NotAllowed,
    QueueFull,
    ShuttingDown,
    StorageUnavailable,
    TooManyPending,
    UserError,
)
from bot.fairqueue import FairQueue
from bot.jobs import Job, JobStatus, Request, Target, Ticket, UserRef
from bot.metrics import Metrics
from bot.offload import off_loop
from bot.operator import Operator, scope_of
from bot.operator_controls import OperatorControls
from bot.providers.base import Provider
from bot.quota import Quotas
from bot.routing import Router
from bot.store import Spend, Store
from bot.validate import check_reference_count, check_references, model_spec, validate_request

__all__ = ["Engine", "EngineConfig", "Usage", "new_job_id", "result_cache_key"]

log = logging.getLogger("drawbridge.engine")

OUTSIDE_EVERY = 1.0  # seconds: how stale the other process's spend may be at a submit


class Engine(OperatorControls):
    """One engine serves every adapter."""

    def __init__(
        self,
        store: Store,
        catalog: Catalog,
        providers: Mapping[str, Provider],
        config: EngineConfig,
        *,
        default_model: str = "demo",
        clock: Callable[[], float] = time.time,
        quotas: Quotas | None = None,
        router: Router | None = None,
        operator: Operator | None = None,
    ) -> None:
        self.store = store
        self.catalog = catalog
        self.providers = dict(providers)
        self.router = router or Router(catalog, self.providers)
        self.operator = operator or Operator()
        self.metrics = Metrics()
        self.metrics.queue_depth.set_function(lambda: len(self._queue))
        self.metrics.in_flight.set_function(lambda: len(self._running))
        self.router.on_error = self._provider_error
        for breaker in self.router.breakers.values():
            breaker.on_change = self.breaker_changed
        self._alerted: set[tuple[str, str]] = set()
        self.config = config
        self.default_model = default_model
        self.clock = clock
        self.quotas = quotas or Quotas(config.limits, ZoneInfo("UTC"), clock)
        self.adapters: dict[str, Adapter] = {}
        self._queue = FairQueue()
        self._jobs: dict[str, Job] = {}  # queued or running, by id
        self._active_by_user: dict[str, int] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        self._slots: dict[str, str] = {}  # jobs generating now → the provider they count on
        self._running_by_provider: dict[str, int] = {}
        # Jobs that gave their slot up to fetch a result and must generate again (a retry).
        self._slot_waiters: deque[SlotWaiter] = deque()
        self._generating: set[str] = set()  # running jobs still in the (cancellable) generate stage
        self._inserting: dict[str, asyncio.Future[None]] = {}
        self._cancelled: set[str] = set()
        self._ending: set[str] = set()
        self._link_tries: dict[str, list[float]] = {}
        self._posting: set[asyncio.Task[Any]] = set()
        # The last new job's row could not be written (a full disk, a locked database): the
        # health check says so until a write goes through again.
        self.storage_failing = False
        # The other side of the data dir (see `_see_outside`): `drawbridge generate`'s jobs for
        # the bot, the bot's for a batch; what they held or spent when this engine started.
        self._batch = False
        self._outside_base: dict[str, Spend] = {}
        self._outside_seen = -math.inf
        self._background: set[asyncio.Task[None]] = set()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._scheduler: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._closing = False

    # ---- platform → core ------------------------------------------------------------------

    def register(self, adapter: Adapter) -> None:
        self.adapters[adapter.platform] = adapter

    async def submit(self, request: Request, *, parent_id: str | None = None) -> Ticket:
        """Validate, reserve quota, persist, enqueue: fast, no provider I/O; raises `UserError`."""
        try:
            ticket = await self._submit(request, parent_id)
        except UserError as exc:
            self.metrics.rejected.labels(exc.key).inc()
            if isinstance(exc, BudgetExceeded):
                self._check_budget(self.quotas.today(), refusing=True)
            raise
        self.metrics.submitted.labels(request.target.platform, ticket.model).inc()
        return ticket

    def refuse_references(self, model: str | None, count: int) -> None:
        """Before an adapter downloads `count` reference images for `model` (None: the
        default): refuse, as submit would, a request that cannot take them, so that an album
        of ten photos is not fetched to be refused."""
        spec = model_spec(self.catalog, model or self.default_model, self.router.available)
        check_reference_count(spec, count)

    async def _submit(self, request: Request, parent_id: str | None) -> Ticket:
        if self._closing:
            raise ShuttingDown()
        cfg = self.config
        user = str(request.user)
        account = self.operator.account_of(user)
        admin = self.is_admin(user)
        if not self.allowed(user, request.target) or (not admin and self.operator.banned(user)):
            raise NotAllowed()
        spec, prompt, options = validate_request(
            request, self.catalog, self.default_model, self.router.available, cfg.max_prompt_chars
        )
        if refs := request.reference_images:
            await off_loop(sum(map(len, refs)), partial(check_references, refs))
        policy = self.operator.policy(request.target)
        if not admin:
            if policy.models and spec.name not in policy.models:
                allowed = Listed(", ".join(policy.models))
                raise InvalidRequest("error.model_not_allowed", model=spec.name, allowed=allowed)
            if policy.max_images and options.n > policy.max_images:
                raise InvalidRequest("error.policy_max_images", max=policy.max_images)
        if policy.blocklist and (term := self.operator.blocklist.match(prompt)) is not None:
            await self._record_blocked(request, spec, prompt, options, account, term)
            raise Blocked()
        cache_key = None
        if cfg.result_cache_ttl > 0 and parent_id is None:  # a reroll asks for new images
            cache_key = result_cache_key(spec.name, prompt, options, request.reference_images)
            hit = await self.store.cached_result(cache_key, self.clock() - cfg.result_cache_ttl)
            if hit is not None:
                return await self._serve_cached(request, account, hit[0], hit[1])
        if cfg.limits.budget_usd:
            await self._see_outside()
        now = self.clock()
        day = self.quotas.day_of(now)
        cost = spec.cost(options.n, options.size)
        if not math.isfinite(cost) or cost < 0:  # a catalog built in code: no load checked it
            log.error(
                "model %s: price %r is not a price; its requests are refused", spec.name, cost
            )
            raise InvalidRequest("error.model_unavailable", model=spec.name)
        scope = scope_of(request.target)
        # Bounds and quota are checked and taken with no await in between: of many concurrent
        # submits for the last slot, exactly one passes.
        if len(self._jobs) >= cfg.queue_max:
            raise QueueFull()
        if self._active_by_user.get(account, 0) >= cfg.max_pending_per_user:
            raise TooManyPending(max=cfg.max_pending_per_user)
        self.quotas.reserve(
            account,
            day,
            options.n,
            cost,
            exempt=admin,
            extra_images=self.operator.granted(account, day),
            scope=(scope, 0 if admin else policy.daily_images),
        )
        job = new_job(
            request,
            spec,
            prompt,
            options,
            account,
            status=JobStatus.QUEUED,
            day=day,
            now=now,
            reserved_usd=cost,
            admin=admin,
            parent_id=parent_id,
            cache_key=cache_key,
        )
        self._hold(job)
        # A /cancel that comes while the row is written (the same poll can carry both) waits
        # for it, then cancels a queued job.
        written = self._inserting[job.id] = asyncio.get_running_loop().create_future()
        try:
            if request.reference_images:
                paths = await self.store.save_reference_images(job.id, request.reference_images)
                job = replace(job, reference_paths=paths)
                self._jobs[job.id] = job
            await self.store.insert_job(job)
        except BaseException as exc:
            self._unhold(job)
            self.quotas.release(account, day, options.n, cost)
            self.quotas.release_scope(scope, day, options.n)
            if isinstance(exc, (sqlite3.Error, OSError)):
                # Full disk, read-only database…: no row was written; the user hears it plainly
                # and the operator gets the cause. The photos saved for it would be kept by
                # no row: they go.
                log.error("cannot store a new job: %s", exc)
                self.storage_failing = True
                await self.store.drop_reference_images(job.id, len(request.reference_images))
                raise StorageUnavailable() from exc
            raise
        else:
            self.storage_failing = False
        finally:
            del self._inserting[job.id]
            written.set_result(None)  # (callbacks run later: the push below comes first)
        self._queue.push(job)
        self._wake()
        position = self._queue.position(job.id) or 1
        log.info(
            "→ job=%s user=%s model=%s n=%d pos=%d", job.id, user, spec.name, options.n, position
        )
        return Ticket(job.id, position, spec.name, options.n, cost)

    async def _see_outside(self) -> None:
        """Count what the other process on this data dir spends today against the budget.

        `drawbridge generate` runs beside the bot on the same database, each with its own
        tally: the budget held for neither's spend but its own (a batch that spent the day's
        budget left the bot taking more). What the other side holds or has spent, past what was
        loaded at start, is read again when a submit finds it over a second old.
        """
        moment = time.monotonic()
        if moment - self._outside_seen < OUTSIDE_EVERY:
            return
        self._outside_seen = moment
        day = self.quotas.today()
        try:
            spend = await self.store.spend_of_batches(day, batches=not self._batch)
        except sqlite3.Error:
            return  # the last figure stands; the submit's own write will say what is wrong
        base = self._outside_base.get(day, Spend(0.0, 0.0))
        self.quotas.set_outside(day, spend.taken - base.taken, spend.charged - base.charged)

    async def cancel(self, user: UserRef, job_id: str | None = None) -> Job:
        """Cancel a queued job (refunded) or abandon a running one (result discarded, refunded)."""
        try:
            job = self._find_active(user, job_id)
        except JobNotFound:
            ended = await self.store.get_job(job_id.lower()) if job_id else None
            if ended is not None and str(ended.user) == str(user):
                raise JobEnded(job=ended.id) from None
            raise
        return await self._cancel(job, "cancelled by user")

    async def cancel_banned(self) -> int:
        """End every job, queued or running, of an account banned now: not generated (or its
        result discarded), not posted, not charged. A ban stops the bot making images for them,
        not only taking their next request."""
        ended = 0
        for job in [job for job in self._jobs.values() if self.operator.banned(job.user)]:
            try:
                await self._cancel(job, "cancelled: the user is banned")
            except JobNotFound:
                continue  # ending already, or gone
            except UserError as exc:  # finishing (it stands), or the database refused the end
                log.warning("job=%s of a banned user not cancelled: %s", job.id, exc.key)
                continue
            ended += 1
        return ended

    async def _cancel(self, job: Job, reason: str) -> Job:
        if (written := self._inserting.get(job.id)) is not None:
            await asyncio.wait([written])  # its row is being written: then it is queued
            if job.id not in self._jobs:
                raise JobNotFound(job=job.id)  # the write failed: there is no job
            job = self._jobs[job.id]
        if job.id in self._queue:
            if not self._claim_end(job.id):
                raise JobNotFound(job=job.id)
            self._queue.remove(job.id)
        elif job.id in self._generating:
            if not self._claim_end(job.id):
                raise JobNotFound(job=job.id)  # another cancel is ending it
            self._cancelled.add(job.id)
            task = self._running[job.id]
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        else:
            raise UserError("error.job_finishing", job=job.id)
        try:
            return await self._end_waiting(job, JobStatus.CANCELLED, ErrorKind.CANCELLED, reason)
        except (sqlite3.Error, OSError) as exc:  # not cancelled: it waits in line again
            log.error("cannot record a cancel: %s", exc)
            raise StorageUnavailable() from exc

    async def reroll(
        self, user: UserRef, job_id: str, target: Target | None = None, lang: str | None = None
    ) -> Ticket:
        """Submit the same prompt and options again (a new seed unless one was fixed), for
        `user`, in their `lang` (who pressed 🔄 may not be who asked first)."""
        job = await self.store.get_job(job_id)
        if job is None:
            raise JobNotFound(job=job_id)
        try:
            refs = await self.store.load_reference_images(job.reference_paths)
        except OSError:  # deleted with the job's images (IMAGE_RETENTION_DAYS), or by hand
            raise InvalidRequest("error.refs_gone", job=job.id) from None
        request = Request(
            user=user,
            target=target or job.target,
            prompt=job.prompt,
            options=replace(job.options, n=job.requested or job.options.n),
            model=job.model,
            reference_images=refs,
            lang=lang or job.lang,
        )
        return await self.submit(request, parent_id=job.id)

    async def usage(self, user: UserRef) -> Usage:
        key = str(user)
        account = self.operator.account_of(key)
        day = self.quotas.today()
        images, usd = self.quotas.used(account, day)
        lim = self.quotas.limits
        extra = self.operator.granted(account, day)
        return Usage(
            day=day,
            images=images,
            image_limit=lim.user_images + extra if lim.user_images else 0,
            usd=usd,
            usd_limit=lim.user_usd,
            active_jobs=sum(self._active_by_user.get(m, 0) for m in self.operator.members(account)),
            exempt=self.is_admin(key),
        )

    async def jobs(self, user: UserRef, limit: int = 10) -> list[Job]:
        """A user's latest jobs; live ones as the engine holds them (their row may lag a bit)."""
        return [self._jobs.get(job.id, job) for job in await self.store.recent_jobs(user, limit)]

    def active_jobs(self, user: UserRef) -> list[Job]:
        """A user's queued and running jobs, newest first, from memory (no database read)."""
        key = str(user)
        mine = [job for job in self._jobs.values() if str(job.user) == key]
        return sorted(mine, key=lambda job: job.created_at, reverse=True)

    def position(self, job_id: str) -> int:
        return self._queue.position(job_id)

    async def attach_status_message(self, job_id: str, message_id: str) -> None:
        """Remember the adapter's status message, so a restarted bot edits the same one."""
        job = self._jobs.get(job_id)
        if job is not None:
            self._jobs[job_id] = replace(job, status_message_id=message_id)
        await self.store.write(
            ("UPDATE jobs SET status_message_id = ? WHERE id = ?", (message_id, job_id))
        )

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def _find_active(self, user: UserRef, job_id: str | None) -> Job:
        if job_id is None:
            mine = self.active_jobs(user)
            if not mine:
                raise JobNotFound("error.no_active_job")
            return mine[0]
        job = self._jobs.get(job_id.lower())
        if job is None or (str(job.user) != str(user) and not self.is_admin(user)):
            raise JobNotFound(job=job_id)
        return job
