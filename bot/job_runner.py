"""Running one job: generate (with retries and failover), store and charge, deliver, or end it."""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import replace

from bot.adapter import Adapter, StatusKind, StatusUpdate
from bot.catalog import ModelSpec
from bot.engine_base import EngineBase
from bot.errors import (
    BadRequest,
    DeliveryError,
    ErrorKind,
    Malformed,
    ProviderError,
    Transient,
    UserError,
)
from bot.job_rows import told_op
from bot.jobs import GeneratedImage, Job, JobStatus, StoredImage
from bot.operator import scope_of
from bot.providers.base import GenerationRequest
from bot.providers.retry import hinted_wait, outlasts, provider_retrying
from bot.routing import CircuitOpen, Route, fails_over
from bot.texts import t

log = logging.getLogger("drawbridge.engine")

DELIVER_BACKOFF_MAX = 15.0  # seconds between a result's delivery tries, at most


class JobRunner(EngineBase):
    """The life of a job once the scheduler has started it."""

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
                async with asyncio.timeout(timeout) as stage:  # cheaper than wait_for
                    images, served = await self._generate(job, spec, stage)
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
            # The stage ran out on the provider it was with (its call cut off by a cancel,
            # which the breaker does not count): a hang is that provider's failure, so that
            # hung calls open its breaker and later jobs fail over.
            self.router.timed_out(self._jobs.get(job.id, job).provider)
            await self._finish(job, JobStatus.FAILED, ErrorKind.TIMEOUT, "generation timed out")
            return
        except ProviderError as exc:
            status = JobStatus.REFUSED if exc.kind is ErrorKind.REFUSED else JobStatus.FAILED
            await self._finish(
                job, status, exc.kind, str(exc) or exc.kind.value, retry_after=exc.retry_after
            )
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
        del images  # the files hold them now: don't keep the bytes through a slow upload
        await self._deliver(done, stored)

    async def _generate(
        self, job: Job, spec: ModelSpec, stage: asyncio.Timeout
    ) -> tuple[list[GeneratedImage], ModelSpec]:
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
                size = job.options.size
                # A backup that lists sizes but not this one would make another size than the
                # one asked (and held) for; one that lists none makes its own default, which
                # stands for the model's default only.
                if (
                    size is not None
                    and size not in route.spec.sizes
                    and (route.spec.sizes or size != spec.default_size)
                ):
                    log.warning(
                        "job=%s not failing over to %s: it does not make size %s",
                        job.id,
                        route.provider.name,
                        size,
                    )
                    continue
                reserved = self._reserve_route(job, route.spec)
                if reserved is None:
                    log.warning(
                        "job=%s not failing over to %s: its price passes a spending limit",
                        job.id,
                        route.provider.name,
                    )
                    continue
                log.warning(
                    "job=%s failing over from %s to %s", job.id, job.provider, route.provider.name
                )
                job = await self._switch_provider(job, route.provider.name, hooks, reserved)
            try:
                return await self._attempts(
                    job, route, refs, hooks, i == len(routes) - 1, stage
                ), route.spec
            except ProviderError as exc:
                if not fails_over(exc):
                    raise
                last = exc
        if last is None:  # every route would have passed a limit: none was tried
            raise Transient("no provider within today's spending limits")
        raise last

    def _reserve_route(self, job: Job, spec: ModelSpec) -> float | None:
        """What the job holds once it may run on `spec`, or None if a limit forbids it.

        A job holds the price of the route it was submitted for; a backup that costs more (the
        same model at another vendor) first holds the difference, within the user's spend limit
        and the operator's budget, so a failover never charges past either.
        """
        extra = spec.cost(job.options.n, job.options.size) - job.reserved_usd
        if extra <= 1e-9:
            return job.reserved_usd
        try:
            self.quotas.reserve(job.quota_key, job.day, 0, extra, exempt=self.is_admin(job.user))
        except UserError:
            return None
        return job.reserved_usd + extra

    async def _attempts(
        self,
        job: Job,
        route: Route,
        refs: tuple[bytes, ...],
        hooks: _Hooks,
        last_route: bool,
        stage: asyncio.Timeout,
    ) -> list[GeneratedImage]:
        """The retry policy on one route; an open breaker moves on at once unless it is the last.

        A wait that would outlast the stage is not waited for: the error is raised now (a
        Retry-After of an hour ends the job as rate limited, or moves it to the next route).
        """
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

        provider = route.provider.name
        # Most calls succeed at once: only a failure pays for setting up the retry policy.
        malformed = 0
        try:
            await self._retake_slot(job.id, provider)  # it holds one, unless a try gave it up
            return await self.router.call(route, request(), hooks, await_probe=last_route)
        except ProviderError as exc:
            malformed = int(isinstance(exc, Malformed))
            if not exc.retryable or self.config.retry_attempts <= 1:
                raise
            if isinstance(exc, CircuitOpen) and not last_route:
                raise
            initial = self.config.retry_initial
            wait = hinted_wait(exc, initial + random.uniform(0, initial), 120.0)
            if outlasts(exc, wait, _left(stage)):
                raise
            await asyncio.sleep(wait)
        try:
            async for attempt in provider_retrying(
                self.config.retry_attempts - 1,
                self.config.retry_initial * 2,
                within=_left(stage),
                malformed=malformed,
            ):
                with attempt:
                    await self._retake_slot(job.id, provider)
                    try:
                        return await self.router.call(
                            route, request(), hooks, await_probe=last_route
                        )
                    except CircuitOpen as exc:
                        if last_route:
                            raise  # retried: waits for the breaker's probe
                        raise _MoveOn(exc) from None  # not retryable: on to the next route
        except _MoveOn as move:
            raise move.error from None
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    async def _switch_provider(
        self, job: Job, provider: str, hooks: _Hooks, reserved_usd: float
    ) -> Job:
        """Record the provider now serving the job, and what it holds for it; another
        provider's task id means nothing."""
        hooks.task_id = None
        job = replace(job, provider=provider, task_id=None, reserved_usd=reserved_usd)
        if job.id in self._jobs:
            self._jobs[job.id] = job
        hooks._job = job
        await self.store.write(
            (
                "UPDATE jobs SET provider = ?, task_id = NULL, reserved_usd = ? WHERE id = ?",
                (provider, reserved_usd, job.id),
            )
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
        self._unhold(job)  # charged: nothing may end it again as a failure now
        self._check_budget(job.day)
        m = self.metrics
        m.jobs.labels("succeeded", job.provider, job.model).inc()
        m.images.labels(job.provider, job.model).inc(len(stored))
        m.spend.labels(job.provider, job.model).inc(cost)
        if job.started_at is not None:
            m.generate_seconds.labels(job.provider).observe(max(0.0, now - job.started_at))
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
        """Post the result; record the message id so it is never re-sent.

        A platform that refuses it for good (blocked, gone) ends it at once. Any other failure is
        tried again, `deliver_attempts` times at least and for as long as `deliver_timeout`
        lasts from the first try, the waits doubling up to `DELIVER_BACKOFF_MAX`: the Bot API away
        for a minute loses no result (three tries in three seconds gave it up to /show).
        """
        adapter = self.adapters.get(job.target.platform)
        if adapter is None:
            log.warning("job=%s: no %s adapter to deliver to; kept", job.id, job.target.platform)
            return
        delay = self.config.deliver_backoff
        loop = asyncio.get_running_loop()
        until = loop.time() + self.config.deliver_timeout
        attempt = 0
        while True:
            attempt += 1
            try:
                ref = await self._post(adapter, job, images)
            except (DeliveryError, TimeoutError, OSError) as exc:
                permanent = isinstance(exc, DeliveryError) and exc.permanent
                await self.store.write(
                    (
                        "UPDATE jobs SET delivery_attempts = delivery_attempts + ? WHERE id = ?",
                        (self.config.deliver_attempts if permanent else 1, job.id),
                    )
                )
                log.warning("job=%s delivery attempt %d failed: %s", job.id, attempt, exc)
                if self._closing and not permanent:
                    return  # stopping: the next start delivers it (`undelivered_jobs`)
                spent = attempt >= self.config.deliver_attempts and loop.time() + delay > until
                if permanent or spent:
                    self.metrics.deliveries.labels(job.target.platform, "failed").inc()
                    # The images are stored: the status says so, and how to have them again.
                    await self._emit(job, StatusKind.FAILED, "status.undelivered")
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, DELIVER_BACKOFF_MAX)
            else:
                now = self.clock()
                # The result is the news, and it is out; an adapter that confirms its "done"
                # edit says when that is out too (`job_told`).
                told = None if getattr(adapter, "confirms_told", False) else now
                # Not awaited: the platform already has the message; waiting for this commit
                # would not narrow the window in which a crash could make us post it twice.
                self.store.post(
                    (
                        "UPDATE jobs SET delivered_at = ?, delivery_ref = ?, "
                        "told_at = COALESCE(told_at, ?) WHERE id = ?",
                        (now, ref, told, job.id),
                    )
                )
                self.metrics.deliveries.labels(job.target.platform, "ok").inc()
                log.info("✓ job=%s delivered to %s as %s", job.id, job.target.platform, ref)
                self.metrics.total_seconds.observe(max(0.0, now - job.created_at))
                return

    async def _post(self, adapter: Adapter, job: Job, images: Sequence[StoredImage]) -> str:
        """One try at handing the result to the platform. A graceful stop lets a try in flight
        end (`close`): cut off, the platform may have the photo while its message id is never
        recorded, and the next start posts it again."""
        task = asyncio.current_task()
        if task is not None:
            self._posting.add(task)
        try:
            async with asyncio.timeout(self.config.deliver_timeout):
                return await adapter.deliver(job, images)
        finally:
            if task is not None:
                self._posting.discard(task)

    async def _finish(
        self,
        job: Job,
        status: JobStatus,
        kind: ErrorKind,
        error: str,
        *,
        claimed: bool = False,
        retry_after: float | None = None,
    ) -> Job:
        """End a job that produced nothing: record why, refund its hold, tell the user (and,
        for a rate limit the provider said would last, for how long).

        Once: a job another caller is ending, or one that has ended, is left as it is.
        """
        if not claimed and not self._claim_end(job.id):
            return job
        job = self._jobs.get(job.id, job)  # the live copy: a failover may have held more
        now = self.clock()
        try:
            await self.store.write(
                (
                    "UPDATE jobs SET status = ?, cost_usd = 0, error = ?, error_kind = ?, "
                    "finished_at = ? WHERE id = ?",
                    (status.value, error, kind.value, now, job.id),
                )
            )
        except BaseException:
            self._ending.discard(job.id)  # not ended: still held, and a later end may claim it
            raise
        self.quotas.release(job.quota_key, job.day, job.options.n, job.reserved_usd)
        self.quotas.release_scope(scope_of(job.target), job.day, job.options.n)
        self.metrics.jobs.labels(status.value, job.provider, job.model).inc()
        self._unhold(job)
        self._ending.discard(job.id)
        job = replace(job, status=status, error=error, error_kind=kind.value, finished_at=now)
        mark = {JobStatus.REFUSED: "refused", JobStatus.CANCELLED: "cancelled"}.get(
            status, "failed"
        )
        log.info("✗ job=%s %s kind=%s %s", job.id, mark, kind.value, error)
        await self._tell_end(job, retry_after)
        self._check_idle()
        return job

    async def _tell_end(self, job: Job, retry_after: float | None = None) -> None:
        """Tell the user how a job without a result ended; a restart tells again an end a crash
        cut off (`told_at` still NULL)."""
        try:
            kind = ErrorKind(job.error_kind or ErrorKind.INTERNAL.value)
        except ValueError:  # a row written by something else
            kind = ErrorKind.INTERNAL
        if job.status is JobStatus.CANCELLED:
            await self._emit(job, StatusKind.CANCELLED, "status.cancelled")
        elif job.status is JobStatus.REFUSED:
            reason = t(job.lang, "reason.refused")
            await self._emit(job, StatusKind.REFUSED, "status.refused", reason=reason)
        elif kind is ErrorKind.TIMEOUT:
            await self._emit(job, StatusKind.TIMEOUT, "status.timeout")
        else:
            reason = t(job.lang, f"reason.{kind.value}")
            if kind is ErrorKind.RATE_LIMITED and retry_after is not None and retry_after > 90:
                if retry_after > 5400:  # a used-up daily quota, say
                    hours = math.ceil(retry_after / 3600)
                    reason = t(job.lang, "reason.rate_limited_hours", hours=hours)
                else:
                    minutes = math.ceil(retry_after / 60)
                    reason = t(job.lang, "reason.rate_limited_for", minutes=minutes)
            await self._emit(job, StatusKind.FAILED, "status.failed", reason=reason)
        adapter = self.adapters.get(job.target.platform)
        if not getattr(adapter, "confirms_told", False):
            self.job_told(job.id)  # shown when `status` returned (or nowhere to show it)

    def job_told(self, job_id: str) -> None:
        """The user has been sent the job's last word: a restart need not tell it again."""
        self.store.post(told_op(job_id, self.clock()))

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


class _MoveOn(Exception):
    """Leave this route now (its breaker opened): another one can serve the job."""

    def __init__(self, error: ProviderError) -> None:
        super().__init__(str(error))
        self.error = error


class _Hooks:
    """A job's line back from its provider: progress (coalesced) and the task id (persisted)."""

    def __init__(self, engine: JobRunner, job: Job) -> None:
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

    def generated(self) -> None:
        # The provider made the images: its slot goes to the next job while they are fetched.
        self._engine._free_slot(self._job.id)


def _left(stage: asyncio.Timeout) -> float:
    """Seconds left before the stage's timeout fires (infinite without one)."""
    when = stage.when()
    return float("inf") if when is None else when - asyncio.get_running_loop().time()
