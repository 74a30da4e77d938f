"""The job engine: submit, schedule fairly under bounds, generate, store, deliver, settle; resume on start."""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import logging
import random
import sqlite3
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any
from zoneinfo import ZoneInfo

from bot.adapter import Adapter, StatusKind, StatusUpdate
from bot.catalog import Catalog, ModelSpec
from bot.dbwriter import Op
from bot.errors import (
    BadRequest,
    Blocked,
    BudgetExceeded,
    DeliveryError,
    ErrorKind,
    InvalidRequest,
    JobNotFound,
    NotAllowed,
    ProviderError,
    QueueFull,
    ShuttingDown,
    StorageUnavailable,
    TooManyPending,
    UserError,
)
from bot.fairqueue import FairQueue
from bot.jobs import (
    GeneratedImage,
    Job,
    JobStatus,
    Options,
    Request,
    StoredImage,
    Target,
    Ticket,
    UserRef,
)
from bot.metrics import Metrics
from bot.operator import Operator, scope_of
from bot.providers.base import GenerationRequest, Provider
from bot.providers.retry import hinted_wait, provider_retrying
from bot.quota import Limits, Quotas
from bot.routing import FAILOVER_KINDS, BreakerState, CircuitOpen, Route, Router
from bot.stats import usage_csv
from bot.store import Store, insert_job_op
from bot.texts import t
from bot.validate import validate_request

log = logging.getLogger("drawbridge.engine")

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

    def allowed(self, user: str, target: Target) -> bool:
        if not self.allowed_ids or user in self.allowed_ids or user in self.admin_ids:
            return True
        chat = f"{target.platform}-chat:{target.chat_id}"
        guild = f"{target.platform}-guild:{target.guild_id}" if target.guild_id else None
        return chat in self.allowed_ids or (guild is not None and guild in self.allowed_ids)


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


class Engine:
    """One engine serves every adapter; see DESIGN.md §2 for the rules it keeps."""

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
        self._generating: set[str] = set()  # running jobs still in the (cancellable) generate stage
        self._cancelled: set[str] = set()
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
                self._check_budget(self.quotas.today())
            raise
        self.metrics.submitted.labels(request.target.platform, ticket.model).inc()
        return ticket

    async def _submit(self, request: Request, parent_id: str | None) -> Ticket:
        if self._closing:
            raise ShuttingDown()
        cfg = self.config
        user = str(request.user)
        account = self.operator.account_of(user)
        admin = user in cfg.admin_ids or account in cfg.admin_ids
        if not cfg.allowed(user, request.target) or (not admin and self.operator.banned(user)):
            raise NotAllowed()
        spec, prompt, options = validate_request(
            request, self.catalog, self.default_model, self.router.available, cfg.max_prompt_chars
        )
        policy = self.operator.policy(request.target)
        if not admin:
            if policy.models and spec.name not in policy.models:
                allowed = ", ".join(policy.models)
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
        now = self.clock()
        day = self.quotas.day_of(now)
        cost = spec.cost(options.n, options.size)
        scope = scope_of(request.target)
        # Bounds and quota are checked and taken with no await in between: of many concurrent
        # submits for the last slot, exactly one passes.
        if len(self._jobs) >= cfg.queue_max:
            raise QueueFull()
        if self._active_by_user.get(user, 0) >= cfg.max_pending_per_user:
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
        job = Job(
            id=new_job_id(),
            user=request.user,
            target=request.target,
            prompt=prompt,
            model=spec.name,
            provider=spec.provider,
            options=options,
            status=JobStatus.QUEUED,
            lang=request.lang,
            day=day,
            created_at=now,
            reserved_usd=cost,
            admin=admin,
            parent_id=parent_id,
            account=account if account != user else "",
            cache_key=cache_key,
        )
        self._hold(job)
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
                # Full disk, read-only database…: nothing was written; the user hears it plainly
                # and the operator gets the cause.
                log.error("cannot store a new job: %s", exc)
                raise StorageUnavailable() from exc
            raise
        self._queue.push(job)
        self._wake()
        position = self._queue.position(job.id) or 1
        log.info(
            "→ job=%s user=%s model=%s n=%d pos=%d", job.id, user, spec.name, options.n, position
        )
        return Ticket(job.id, position, spec.name, options.n, cost)

    async def cancel(self, user: UserRef, job_id: str | None = None) -> Job:
        """Cancel a queued job (refunded) or abandon a running one (result discarded, refunded)."""
        job = self._find_active(user, job_id)
        if job.id in self._queue:
            self._queue.remove(job.id)
        elif job.id in self._generating:
            self._cancelled.add(job.id)
            task = self._running[job.id]
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        else:
            raise UserError("error.job_finishing", job=job.id)
        return await self._finish(
            job, JobStatus.CANCELLED, ErrorKind.CANCELLED, "cancelled by user"
        )

    async def reroll(self, user: UserRef, job_id: str, target: Target | None = None) -> Ticket:
        """Submit the same prompt and options again (a new seed unless one was fixed)."""
        job = await self.store.get_job(job_id)
        if job is None:
            raise JobNotFound(job=job_id)
        refs = await self.store.load_reference_images(job.reference_paths)
        request = Request(
            user=user,
            target=target or job.target,
            prompt=job.prompt,
            options=job.options,
            model=job.model,
            reference_images=refs,
            lang=job.lang,
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
            exempt=key in self.config.admin_ids or account in self.config.admin_ids,
        )

    def _provider_error(self, provider: str, exc: BaseException) -> None:
        kind = exc.kind.value if isinstance(exc, ProviderError) else "timeout"
        self.metrics.provider_errors.labels(provider, kind).inc()
        if kind == ErrorKind.AUTH.value:
            log.error("provider %s rejected its API key: check the key and the account", provider)
            self.alert(f"auth:{provider}", "alert.auth", provider=provider)

    def breaker_changed(self, provider: str, state: BreakerState) -> None:
        if state is BreakerState.OPEN:
            self.alert(f"breaker:{provider}:{self.clock():.0f}", "alert.breaker", provider=provider)

    def alert(self, key: str, text_key: str, **params: object) -> None:
        """Tell every admin once per `key` (and day): budget marks, rejected keys, open breakers.

        Sent in the background as a direct message (`Target.meta == "dm"`: `chat_id` is the
        admin's user id), so an alert never holds up the job that raised it.
        """
        day = self.quotas.today()
        if (key, day) in self._alerted:
            return
        self._alerted.add((key, day))
        for admin in sorted(self.config.admin_ids):
            platform, _, user_id = admin.partition(":")
            adapter = self.adapters.get(platform)
            if adapter is None or not user_id:
                continue
            text = t("en", text_key, **params)
            self._spawn(
                self._send_alert(adapter, Target(platform, chat_id=user_id, meta="dm"), text)
            )

    async def _send_alert(self, adapter: Adapter, target: Target, text: str) -> None:
        try:
            async with asyncio.timeout(self.config.deliver_timeout):
                await adapter.notify(target, text)
        except Exception:
            log.warning(
                "admin alert to %s:%s not sent", target.platform, target.chat_id, exc_info=True
            )

    def _check_budget(self, day: str) -> None:
        budget = self.quotas.limits.budget_usd
        if not budget:
            return
        spent = self.quotas.spent_total(day)
        for mark in (100, 80):
            if spent >= budget * mark / 100 - 1e-9:
                self.alert(
                    f"budget:{mark}", "alert.budget", percent=mark, spent=f"${spent:.2f}",
                    budget=f"${budget:.2f}",
                )  # fmt: skip
                return

    # ---- the operator's controls ----------------------------------------------------------

    def is_admin(self, user: UserRef | str) -> bool:
        key = str(user)
        ids = self.config.admin_ids
        return key in ids or self.operator.account_of(key) in ids

    async def usage_csv(self) -> bytes:
        return usage_csv(await self.store.usage())

    async def new_link_code(self, user: UserRef) -> str:
        code, ops = self.operator.new_link_code(str(user), self.clock())
        await self.store.write(*ops)
        return code

    async def show(self, user: UserRef, job_id: str, target: Target) -> int:
        """Post a finished job's stored images again, here; returns how many."""
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
        async with asyncio.timeout(self.config.deliver_timeout):
            await adapter.deliver(replace(job, target=target), existing)
        return len(existing)

    async def apply(self, ops: Sequence[Op]) -> None:
        """Persist an operator change (its in-memory part is already applied)."""
        await self.store.write(*ops)

    async def link(self, joiner: UserRef, code: str) -> str:
        """Join `joiner` to the account that asked for `code`; they share quota from now on."""
        now = self.clock()
        owner = await self.store.link_code_owner(code.strip(), now)
        if owner is None:
            raise InvalidRequest("error.link_code")
        if self.operator.account_of(owner) == self.operator.account_of(joiner):
            return self.operator.account_of(owner)
        account, old, ops = self.operator.link(owner, str(joiner), now)
        ops.append(("DELETE FROM link_codes WHERE code = ?", (code.strip(),)))
        await self.store.write(*ops)
        for day in (self.quotas.today(), self.quotas.day_of(now - 86400)):
            self.quotas.merge(day, old, account)
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
        job = Job(
            id=new_job_id(),
            user=request.user,
            target=request.target,
            prompt=prompt,
            model=spec.name,
            provider=spec.provider,
            options=options,
            status=JobStatus.REFUSED,
            lang=request.lang,
            day=self.quotas.day_of(now),
            created_at=now,
            error=f"blocklist: {term}",
            error_kind=ErrorKind.REFUSED.value,
            finished_at=now,
            account=account if account != str(request.user) else "",
        )
        await self.store.insert_job(job)
        log.info("✗ job=%s refused by the blocklist (%s)", job.id, term)

    async def jobs(self, user: UserRef, limit: int = 10) -> list[Job]:
        return await self.store.recent_jobs(user, limit)

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

    def active_job(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return len(self._running)

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self, *, resume: bool = True) -> None:
        """Resume from the database: queued jobs, submitted provider tasks, undelivered results.

        `resume=False` (the batch CLI) leaves other processes' jobs alone and only loads quotas.
        """
        resumed = 0
        ops = []
        unfinished = await self.store.unfinished_jobs() if resume else []
        for job in unfinished:
            spec = self.catalog.get(job.model)
            if spec is None or not self.router.available(spec):
                # Counted, so that _finish's release balances; the model is gone from this config.
                self._hold(job)
                await self._finish(
                    job, JobStatus.FAILED, ErrorKind.BAD_REQUEST, "model unavailable"
                )
                continue
            if job.status is JobStatus.RUNNING:
                ops.append((UPDATE_STATUS, (JobStatus.QUEUED.value, job.id)))
                job = replace(job, status=JobStatus.QUEUED)
            self._hold(job)
            # A job whose provider task was already submitted goes first: it is already paid for.
            self._queue.push(job, front=job.task_id is not None)
            resumed += 1
        if ops:
            await self.store.write(*ops)
        if resume:
            self.operator = await self.store.load_operator(self.operator.blocklist)
        day = self.quotas.today()
        self.quotas.load(day, await self.store.day_totals(day))
        self.quotas.load_scopes(day, await self.store.scope_totals(day))
        undelivered = (
            await self.store.undelivered_jobs(self.config.deliver_attempts) if resume else []
        )
        for job in undelivered:
            if job.target.platform in self.adapters:
                self._spawn(self._deliver_stored(job))
        if resumed or undelivered:
            log.info("resumed %d queued jobs, %d undelivered results", resumed, len(undelivered))
        self._scheduler = asyncio.create_task(self._schedule(), name="engine-scheduler")
        self._sweeper = asyncio.create_task(self._sweep(), name="engine-sweeper")
        self._wake()

    async def close(self) -> None:
        """Stop intake, give running jobs a grace period, park the rest for the next start."""
        self._closing = True
        for task in (self._scheduler, self._sweeper):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        pending = set(self._running.values()) | self._background
        if pending:
            _, late = await asyncio.wait(pending, timeout=self.config.shutdown_grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
            if late:
                log.info("parked %d unfinished jobs for the next start", len(late))

    async def run_until_idle(self) -> None:
        """Wait until nothing is queued, running or being delivered (for tests and batch runs)."""
        while self._jobs or self._running or self._background:
            self._idle.clear()
            await self._idle.wait()

    # ---- scheduling -----------------------------------------------------------------------

    def _wake(self) -> None:
        self._wakeup.set()

    def _provider_has_room(self, job: Job) -> bool:
        cap = self.config.provider_concurrency.get(job.provider)
        return cap is None or self._running_by_provider.get(job.provider, 0) < cap

    async def _schedule(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            cfg = self.config
            # Generating jobs take a slot; finished ones storing and delivering their result
            # hold none but are bounded too, so a slow platform backs up the queue, not memory.
            in_flight_max = cfg.concurrency + (cfg.finishing_max or max(64, 4 * cfg.concurrency))
            while len(self._slots) < cfg.concurrency and len(self._running) < in_flight_max:
                job = self._queue.pop(self._provider_has_room)
                if job is None:
                    break
                self._slots[job.id] = job.provider
                self._running_by_provider[job.provider] = (
                    self._running_by_provider.get(job.provider, 0) + 1
                )
                task = asyncio.create_task(self._run(job), name=f"job-{job.id}")
                self._running[job.id] = task
                task.add_done_callback(functools.partial(self._job_done, job))

    def _free_slot(self, job_id: str) -> None:
        """The job stopped generating (or never started): its slot goes to the next one."""
        provider = self._slots.pop(job_id, None)
        if provider is not None:
            self._running_by_provider[provider] -= 1
            self._wake()

    def _job_done(self, job: Job, _task: asyncio.Task[None]) -> None:
        self._running.pop(job.id, None)
        self._generating.discard(job.id)
        self._cancelled.discard(job.id)
        self._free_slot(job.id)  # a task cancelled before it ran never freed its own
        self._wake()
        self._check_idle()

    def _check_idle(self) -> None:
        if not self._jobs and not self._running and not self._background:
            self._idle.set()

    async def _sweep(self) -> None:
        """Fail jobs that waited in the queue past QUEUE_TIMEOUT: every job ends.

        Once an hour it also deletes image files older than IMAGE_RETENTION_DAYS.
        """
        last_cleanup = 0.0
        while True:
            await asyncio.sleep(self.config.sweep_interval)
            days = self.config.image_retention_days
            if days > 0 and self.clock() - last_cleanup >= 3600:
                last_cleanup = self.clock()
                try:
                    removed = await self.store.expire_images(self.clock() - days * 86400)
                except Exception:
                    log.warning("image cleanup failed", exc_info=True)
                else:
                    if removed:
                        log.info("deleted %d images older than %g days", removed, days)
            cutoff = self.clock() - self.config.queue_timeout
            for job in [j for j in self._queue if j.created_at < cutoff and j.task_id is None]:
                self._queue.remove(job.id)
                await self._finish(job, JobStatus.FAILED, ErrorKind.TIMEOUT, "queue timeout")

    # ---- running one job ------------------------------------------------------------------

    async def _run(self, job: Job) -> None:
        spec = self.catalog.get(job.model)
        assert spec is not None  # checked at submit and at start
        began = self.clock()
        # The live copy: it may carry what adapters attached since it was queued.
        job = replace(self._jobs.get(job.id, job), status=JobStatus.RUNNING, started_at=began)
        self._jobs[job.id] = job
        self.metrics.queue_seconds.observe(max(0.0, began - job.created_at))
        log.info("▶ job=%s started on %s after %.1fs", job.id, job.provider, began - job.created_at)
        self._generating.add(job.id)
        try:
            try:
                # Not awaited: a restart requeues a running job anyway, and the unit still
                # commits before the job's outcome, which is queued after it.
                self.store.post(
                    (
                        "UPDATE jobs SET status = 'running', started_at = ?, "
                        "attempts = attempts + 1 WHERE id = ?",
                        (began, job.id),
                    )
                )
                await self._emit(job, StatusKind.STARTED, "status.started", model=job.model)
                timeout = min(spec.timeout_s, self.config.generate_timeout)
                async with asyncio.timeout(timeout):  # cheaper than wait_for: no extra task
                    images, served = await self._generate(job, spec)
            finally:
                # CONCURRENCY counts jobs generating: storing and delivering the result (or the
                # failure) happens outside the slot, so the next job starts now.
                self._generating.discard(job.id)
                self._free_slot(job.id)
        except asyncio.CancelledError:
            if job.id in self._cancelled:
                return  # cancel() records the outcome
            raise  # shutdown: the row stays queued/running and resumes on the next start
        except TimeoutError:
            await self._finish(job, JobStatus.FAILED, ErrorKind.TIMEOUT, "generation timed out")
            return
        except ProviderError as exc:
            status = JobStatus.REFUSED if exc.kind is ErrorKind.REFUSED else JobStatus.FAILED
            await self._finish(job, status, exc.kind, str(exc) or exc.kind.value)
            return
        except Exception as exc:
            log.exception("job=%s failed unexpectedly", job.id)
            await self._finish(job, JobStatus.FAILED, ErrorKind.INTERNAL, type(exc).__name__)
            return
        if not images:
            await self._finish(job, JobStatus.FAILED, ErrorKind.TRANSIENT, "no image returned")
            return
        try:
            done, stored = await self._settle(self._jobs.get(job.id, job), served, images)
        except Exception as exc:
            # The disk or the database refused the result: the job ends, uncharged, and says so.
            log.exception("job=%s: could not store its images", job.id)
            await self._finish(job, JobStatus.FAILED, ErrorKind.INTERNAL, type(exc).__name__)
            return
        await self._deliver(done, stored)

    async def _generate(self, job: Job, spec: ModelSpec) -> tuple[list[GeneratedImage], ModelSpec]:
        """Images from the first route that works, and the model that made them.

        Each route gets the retry policy; when a route stays down (its breaker open, or still
        failing after the retries), the job moves on to the next provider of the family.
        """
        refs = await self.store.load_reference_images(job.reference_paths)
        hooks = _Hooks(self, job)
        routes = self.router.routes(spec, pinned=job.provider if job.task_id else None)
        if not routes:
            raise BadRequest(f"no configured provider serves {spec.name}")
        last: ProviderError | None = None
        for i, route in enumerate(routes):
            if route.provider.name != job.provider:
                log.warning(
                    "job=%s failing over from %s to %s", job.id, job.provider, route.provider.name
                )
                job = await self._switch_provider(job, route.provider.name, hooks)
            try:
                return await self._attempts(
                    job, route, refs, hooks, i == len(routes) - 1
                ), route.spec
            except ProviderError as exc:
                if exc.kind not in FAILOVER_KINDS:
                    raise
                last = exc
        assert last is not None
        raise last

    async def _attempts(
        self, job: Job, route: Route, refs: tuple[bytes, ...], hooks: _Hooks, last_route: bool
    ) -> list[GeneratedImage]:
        """The retry policy on one route; an open breaker moves on at once unless it is the last."""
        spec = route.spec

        def request() -> GenerationRequest:
            return GenerationRequest(
                job_id=job.id,
                model=spec.name,
                remote_model=spec.remote_model,
                endpoint=spec.endpoint,
                prompt=job.prompt,
                n=job.options.n,
                aspect_ratio=job.options.aspect_ratio,
                size=job.options.size if job.options.size in spec.sizes else None,
                seed=job.options.seed,
                reference_images=refs,
                task_id=hooks.task_id,
                timeout_s=spec.timeout_s,
            )

        # Most calls succeed at once: only a failure pays for setting up the retry policy.
        try:
            return await self.router.call(route, request(), hooks)
        except ProviderError as exc:
            if not exc.retryable or self.config.retry_attempts <= 1:
                raise
            if isinstance(exc, CircuitOpen) and not last_route:
                raise
            initial = self.config.retry_initial
            await asyncio.sleep(hinted_wait(exc, initial + random.uniform(0, initial), 120.0))
        try:
            async for attempt in provider_retrying(
                self.config.retry_attempts - 1, self.config.retry_initial * 2
            ):
                with attempt:
                    try:
                        return await self.router.call(route, request(), hooks)
                    except CircuitOpen as exc:
                        if last_route:
                            raise  # retried: waits for the breaker's probe
                        raise _MoveOn(exc) from None  # not retryable: on to the next route
        except _MoveOn as move:
            raise move.error from None
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    async def _switch_provider(self, job: Job, provider: str, hooks: _Hooks) -> Job:
        """Record the provider now serving the job; another provider's task id means nothing."""
        hooks.task_id = None
        job = replace(job, provider=provider, task_id=None)
        if job.id in self._jobs:
            self._jobs[job.id] = job
        hooks._job = job
        await self.store.write(
            ("UPDATE jobs SET provider = ?, task_id = NULL WHERE id = ?", (provider, job.id))
        )
        return job

    async def _settle(
        self, job: Job, spec: ModelSpec, images: Sequence[GeneratedImage]
    ) -> tuple[Job, list[StoredImage]]:
        """Store the images and charge the job in one transaction: only success is charged."""
        generated = list(images)[: job.options.n]
        cost = spec.cost(len(generated), job.options.size)
        now = self.clock()
        stored = await self.store.save_images(
            job.id,
            generated,
            (
                "UPDATE jobs SET status = 'succeeded', cost_usd = ?, n_images = ?, finished_at = ?, "
                "error = NULL, error_kind = NULL WHERE id = ?",
                (cost, len(generated), now, job.id),
            ),
        )
        self.quotas.settle(
            job.quota_key, job.day, (job.options.n, job.reserved_usd), (len(stored), cost)
        )
        self.quotas.release_scope(scope_of(job.target), job.day, job.options.n - len(stored))
        self._check_budget(job.day)
        m = self.metrics
        m.jobs.labels("succeeded", job.provider, job.model).inc()
        m.images.labels(job.provider, job.model).inc(len(stored))
        m.spend.labels(job.provider, job.model).inc(cost)
        if job.started_at is not None:
            m.generate_seconds.labels(job.provider).observe(max(0.0, now - job.started_at))
        self._unhold(job)
        job = replace(
            job,
            status=JobStatus.SUCCEEDED,
            cost_usd=cost,
            finished_at=now,
            options=replace(job.options, n=len(stored)),
        )
        took = now - (job.started_at or now)
        log.info("← job=%s ok %.1fs images=%d cost=%.4f", job.id, took, len(stored), cost)
        return job, stored

    async def _deliver_stored(self, job: Job) -> None:
        await self._deliver(job, await self.store.images_for(job.id))

    async def _deliver(self, job: Job, images: Sequence[StoredImage]) -> None:
        """Post the result, retrying a few times; record the message id so it is never re-sent."""
        adapter = self.adapters.get(job.target.platform)
        if adapter is None:
            log.warning("job=%s: no %s adapter to deliver to; kept", job.id, job.target.platform)
            return
        delay = self.config.deliver_backoff
        for attempt in range(1, self.config.deliver_attempts + 1):
            try:
                async with asyncio.timeout(self.config.deliver_timeout):
                    ref = await adapter.deliver(job, images)
            except (DeliveryError, TimeoutError, OSError) as exc:
                permanent = isinstance(exc, DeliveryError) and exc.permanent
                await self.store.write(
                    (
                        "UPDATE jobs SET delivery_attempts = delivery_attempts + ? WHERE id = ?",
                        (self.config.deliver_attempts if permanent else 1, job.id),
                    )
                )
                log.warning("job=%s delivery attempt %d failed: %s", job.id, attempt, exc)
                if permanent or attempt == self.config.deliver_attempts:
                    self.metrics.deliveries.labels(job.target.platform, "failed").inc()
                    return
                await asyncio.sleep(delay)
                delay *= 2
            else:
                now = self.clock()
                # Not awaited: the platform already has the message; waiting for this commit
                # would not narrow the window in which a crash could make us post it twice.
                self.store.post(
                    (
                        "UPDATE jobs SET delivered_at = ?, delivery_ref = ? WHERE id = ?",
                        (now, ref, job.id),
                    )
                )
                self.metrics.deliveries.labels(job.target.platform, "ok").inc()
                log.info("✓ job=%s delivered to %s as %s", job.id, job.target.platform, ref)
                self.metrics.total_seconds.observe(max(0.0, now - job.created_at))
                return

    async def _finish(self, job: Job, status: JobStatus, kind: ErrorKind, error: str) -> Job:
        """End a job that produced nothing: record why, refund its hold, tell the user."""
        now = self.clock()
        await self.store.write(
            (
                "UPDATE jobs SET status = ?, cost_usd = 0, error = ?, error_kind = ?, "
                "finished_at = ? WHERE id = ?",
                (status.value, error, kind.value, now, job.id),
            )
        )
        self.quotas.release(job.quota_key, job.day, job.options.n, job.reserved_usd)
        self.quotas.release_scope(scope_of(job.target), job.day, job.options.n)
        self.metrics.jobs.labels(status.value, job.provider, job.model).inc()
        self._unhold(job)
        job = replace(job, status=status, error=error, error_kind=kind.value, finished_at=now)
        mark = {JobStatus.REFUSED: "refused", JobStatus.CANCELLED: "cancelled"}.get(
            status, "failed"
        )
        log.info("✗ job=%s %s kind=%s %s", job.id, mark, kind.value, error)
        if status is JobStatus.CANCELLED:
            await self._emit(job, StatusKind.CANCELLED, "status.cancelled")
        elif status is JobStatus.REFUSED:
            reason = t(job.lang, "reason.refused")
            await self._emit(job, StatusKind.REFUSED, "status.refused", reason=reason)
        elif kind is ErrorKind.TIMEOUT:
            await self._emit(job, StatusKind.TIMEOUT, "status.timeout")
        else:
            reason = t(job.lang, f"reason.{kind.value}")
            await self._emit(job, StatusKind.FAILED, "status.failed", reason=reason)
        self._check_idle()
        return job

    async def _emit(
        self, job: Job, kind: StatusKind, key: str, percent: int | None = None, **params: object
    ) -> None:
        adapter = self.adapters.get(job.target.platform)
        if adapter is None:
            return
        text = t(job.lang, key, job=job.id, percent=percent, **params)
        update = StatusUpdate(kind=kind, text=text, percent=percent)
        try:
            # The protocol has status() return at once (adapters queue their edits), so no
            # per-call timer here: this runs several times for every job.
            await adapter.status(job, update)
        except Exception:
            log.warning("job=%s status %s not shown", job.id, kind, exc_info=True)

    # ---- bookkeeping ----------------------------------------------------------------------

    def _hold(self, job: Job) -> None:
        key = str(job.user)
        self._jobs[job.id] = job
        self._active_by_user[key] = self._active_by_user.get(key, 0) + 1

    def _unhold(self, job: Job) -> None:
        if self._jobs.pop(job.id, None) is None:
            return
        key = str(job.user)
        left = self._active_by_user.get(key, 1) - 1
        if left > 0:
            self._active_by_user[key] = left
        else:
            self._active_by_user.pop(key, None)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._background.discard(t)
            self._check_idle()

        task.add_done_callback(done)

    def _find_active(self, user: UserRef, job_id: str | None) -> Job:
        key = str(user)
        admin = key in self.config.admin_ids
        if job_id is None:
            mine = [j for j in self._jobs.values() if str(j.user) == key]
            if not mine:
                raise JobNotFound("error.no_active_job")
            return max(mine, key=lambda j: j.created_at)
        job = self._jobs.get(job_id.lower())
        if job is None or (str(job.user) != key and not admin):
            raise JobNotFound(job=job_id)
        return job


class _MoveOn(Exception):
    """Leave this route now (its breaker opened): another one can serve the job."""

    def __init__(self, error: ProviderError) -> None:
        super().__init__(str(error))
        self.error = error


class _Hooks:
    """A job's line back from its provider: progress (coalesced) and the task id (persisted)."""

    def __init__(self, engine: Engine, job: Job) -> None:
        self._engine = engine
        self._job = job
        self.task_id = job.task_id
        self._last = -100

    async def progress(self, percent: int) -> None:
        percent = max(0, min(100, int(percent)))
        if percent - self._last < 5 and percent != 100:
            return
        self._last = percent
        job = self._engine.active_job(self._job.id) or self._job
        await self._engine._emit(job, StatusKind.PROGRESS, "status.progress", percent=percent)

    async def task_submitted(self, task_id: str | None) -> None:
        self.task_id = task_id
        engine = self._engine
        job = engine.active_job(self._job.id)
        if job is not None:
            engine._jobs[job.id] = replace(job, task_id=task_id)
        # Queued for the very next commit, but not waited for: the provider goes on streaming
        # meanwhile, and the job's outcome (queued after it) can never overtake it.
        engine.store.post(("UPDATE jobs SET task_id = ? WHERE id = ?", (task_id, self._job.id)))
