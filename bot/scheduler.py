"""Starting and stopping the engine, and the scheduler that starts jobs fairly within bounds."""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import replace

from bot.engine_config import UPDATE_STATUS
from bot.errors import ErrorKind
from bot.job_runner import JobRunner
from bot.jobs import BATCH_PLATFORM, Job, JobStatus
from bot.locks import batch_running

log = logging.getLogger("drawbridge.engine")

RETELL_WINDOW = 3600.0  # seconds: an end a crash left untold is told again if this recent
POSTING_GRACE = 10.0  # seconds past SHUTDOWN_GRACE a result already on its way may take


class Scheduler(JobRunner):
    """Lifecycle (resume, drain, park) and the loop that hands out generating slots."""

    async def start(self, *, resume: bool = True) -> None:
        """Resume from the database: queued jobs, submitted provider tasks, undelivered results.

        `resume=False` (the batch CLI) leaves other processes' jobs alone and only loads quotas.
        """
        resumed = 0
        ops = []
        if resume:
            self.operator = await self.store.load_operator(self.operator.blocklist)
        unfinished = await self.store.unfinished_jobs() if resume else []
        if unfinished and batch_running(self.store.data_dir):
            # A live `drawbridge generate` runs its own jobs: resumed here too, each ran twice.
            unfinished = [job for job in unfinished if job.target.platform != BATCH_PLATFORM]
        # A job for a platform this start has no adapter for (its token unset now) could not
        # be posted: generated, it would be paid for and kept. It waits in the database for a
        # start that has its adapter (a dead batch's jobs are finished here, as before).
        kept = [
            job
            for job in unfinished
            if job.target.platform not in self.adapters and job.target.platform != BATCH_PLATFORM
        ]
        if kept:
            platforms = ", ".join(sorted({job.target.platform for job in kept}))
            log.warning(
                "%d unfinished job(s) for %s kept for a start with that adapter",
                len(kept),
                platforms,
            )
            kept_ids = {job.id for job in kept}
            unfinished = [job for job in unfinished if job.id not in kept_ids]
        for job in unfinished:
            # Held against the account its user belongs to now, as `day_totals` counts it (a
            # /link since it was queued moved it there).
            job = replace(job, account=self.operator.account_of(str(job.user)))
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
        day = self.quotas.today()
        if resume:
            self._alerted.update((key, day) for key in await self.store.alerts_sent(day))
        # Today's totals, and those of the days the resumed jobs were reserved on (a job queued
        # before midnight settles, or fails over, against its own day's limits, not against
        # an empty tally of that day).
        self._batch = not resume
        for each in sorted({day} | {job.day for job in unfinished if job.day < day})[-2:]:
            self.quotas.load(each, await self.store.day_totals(each))
            self.quotas.load_scopes(each, await self.store.scope_totals(each))
            if self.quotas.limits.budget_usd:  # counted now: later, only what it adds
                outside = await self.store.spend_of_batches(each, batches=resume)
                self._outside_base[each] = outside
        undelivered = (
            await self.store.undelivered_jobs(self.config.deliver_attempts) if resume else []
        )
        for job in undelivered:
            if job.target.platform in self.adapters:
                self._spawn(self._deliver_stored(job))
        since = self.clock() - RETELL_WINDOW
        untold = await self.store.untold_ends(since) if resume else []
        for job in untold:
            if job.target.platform in self.adapters:
                self._spawn(self._tell_end(job))
        for job in await self.store.untold_successes(since) if resume else []:
            adapter = self.adapters.get(job.target.platform)
            show = getattr(adapter, "show_delivered", None)
            if show is not None:
                show(job)  # its status message says "done" (a crash cut that edit off)
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
            posting = late & self._posting
            if posting:  # a result on its way: its answer says whether the platform has it
                log.info("waiting for %d results being posted", len(posting))
                await asyncio.wait(posting, timeout=POSTING_GRACE)
                late = {task for task in late if not task.done()}
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
        await self.store.flush()  # and the bookkeeping posted without waiting is committed

    # ---- scheduling -----------------------------------------------------------------------

    def _provider_has_room(self, job: Job) -> bool:
        return self._room_on(job.provider)

    def _room_on(self, provider: str) -> bool:
        cap = self.config.provider_concurrency.get(provider)
        return cap is None or self._running_by_provider.get(provider, 0) < cap

    def _take_slot(self, job_id: str, provider: str) -> None:
        self._slots[job_id] = provider
        self._running_by_provider[provider] = self._running_by_provider.get(provider, 0) + 1

    async def _schedule(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            self._fill_slots()

    def _fill_slots(self) -> None:
        """Start queued jobs while there are free slots, unless the scheduler is stopped.

        A freed slot fills at once, in the same step: going through the scheduler task would
        cost the next job a turn of a loop that is busiest exactly when slots free up.
        """
        scheduler = self._scheduler
        if scheduler is None or scheduler.done() or self._closing:
            return
        cfg = self.config
        # Running jobs that must generate again go first (they are running: no in-flight bound).
        waiters = self._slot_waiters
        while waiters and len(self._slots) < cfg.concurrency:
            job_id, provider, waiter = waiters[0]
            if waiter.done():  # its job was cancelled meanwhile
                waiters.popleft()
                continue
            if not self._room_on(provider):
                break
            waiters.popleft()
            self._take_slot(job_id, provider)
            waiter.set_result(None)
        # Generating jobs take a slot; finished ones storing and delivering their result
        # hold none but are bounded too, so a slow platform backs up the queue, not memory.
        in_flight_max = cfg.concurrency + (cfg.finishing_max or max(64, 4 * cfg.concurrency))
        while len(self._slots) < cfg.concurrency and len(self._running) < in_flight_max:
            job = self._queue.pop(self._provider_has_room)
            if job is None:
                break
            self._take_slot(job.id, job.provider)
            task = asyncio.create_task(self._run(job), name=f"job-{job.id}")
            self._running[job.id] = task
            self._generating.add(job.id)  # cancellable before its task first runs, too
            task.add_done_callback(functools.partial(self._job_done, job))

    def _job_done(self, job: Job, _task: asyncio.Task[None]) -> None:
        self._running.pop(job.id, None)
        self._generating.discard(job.id)
        self._cancelled.discard(job.id)
        self._free_slot(job.id)  # a task cancelled before it ran never freed its own
        self._wake()
        self._check_idle()

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
                if not self._claim_end(job.id):
                    continue  # cancelled while an earlier one was being ended
                if self._queue.remove(job.id) is None:
                    self._ending.discard(job.id)  # started meanwhile
                    continue
                try:
                    await self._end_waiting(
                        job, JobStatus.FAILED, ErrorKind.TIMEOUT, "queue timeout"
                    )
                except Exception:  # the database refused it: the next sweep tries again
                    log.warning("job=%s: queue timeout not recorded", job.id, exc_info=True)

    async def _end_waiting(self, job: Job, status: JobStatus, kind: ErrorKind, error: str) -> Job:
        """End a claimed job that is out of the queue and not running (a cancel, a queue
        timeout). If the database refuses the end, the job goes back to the front of its
        user's line, as it was, and the error is raised: it is not left held by nothing."""
        try:
            return await self._finish(job, status, kind, error, claimed=True)
        except BaseException:
            live = self._jobs.get(job.id)
            if live is not None and job.id not in self._queue and job.id not in self._running:
                self._queue.push(live, front=True)
                self._wake()
            raise
