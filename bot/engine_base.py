"""The engine's shared state and bookkeeping, and the alerts it sends the operator's admins."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from bot.adapter import Adapter
from bot.catalog import Catalog
from bot.engine_config import EngineConfig
from bot.errors import ErrorKind, ModelUnavailable, ProviderError
from bot.fairqueue import FairQueue
from bot.jobs import Job, Target, UserRef
from bot.metrics import Metrics
from bot.operator import Operator, audit_op
from bot.providers.base import Provider
from bot.quota import Quotas
from bot.routing import BreakerState, Router
from bot.store import Spend, Store
from bot.texts import money, t

log = logging.getLogger("drawbridge.engine")

# (job id, provider, resolved once the job holds a generating slot again)
SlotWaiter = tuple[str, str, "asyncio.Future[None]"]


class EngineBase:
    """What every part of the engine reads and writes; `Engine.__init__` sets it all."""

    store: Store
    catalog: Catalog
    providers: dict[str, Provider]
    router: Router
    operator: Operator
    metrics: Metrics
    config: EngineConfig
    default_model: str
    clock: Callable[[], float]
    quotas: Quotas
    adapters: dict[str, Adapter]
    _queue: FairQueue
    _jobs: dict[str, Job]  # queued or running, by id
    _active_by_user: dict[str, int]
    _running: dict[str, asyncio.Task[None]]
    _slots: dict[str, str]  # jobs generating now → the provider they count on
    _running_by_provider: dict[str, int]
    _slot_waiters: deque[SlotWaiter]
    _generating: set[str]  # running jobs still in the (cancellable) generate stage
    _inserting: dict[str, asyncio.Future[None]]  # submitted jobs whose row is being written
    _cancelled: set[str]
    _ending: set[str]  # jobs whose end (`_finish`) one caller has claimed
    _link_tries: dict[str, list[float]]  # user → when they tried a wrong link code
    _batch: bool  # a `drawbridge generate` engine (`start(resume=False)`)
    _outside_base: dict[str, Spend]  # day → the other process's spend when this one loaded it
    _background: set[asyncio.Task[None]]
    _posting: set[asyncio.Task[Any]]  # tasks handing a result to the platform right now
    _wakeup: asyncio.Event
    _idle: asyncio.Event
    _scheduler: asyncio.Task[None] | None
    _sweeper: asyncio.Task[None] | None
    _closing: bool
    _alerted: set[tuple[str, str]]

    def active_job(self, job_id: str) -> Job | None:
        """A queued or running job, as the engine holds it now."""
        return self._jobs.get(job_id)

    # ---- bookkeeping ----------------------------------------------------------------------

    def _hold(self, job: Job) -> None:
        self._jobs[job.id] = job
        self._count_pending(job.quota_key, 1)

    def _unhold(self, job: Job) -> None:
        if self._jobs.pop(job.id, None) is not None:
            self._count_pending(job.quota_key, -1)

    def _count_pending(self, key: str, delta: int) -> None:
        """Add `delta` to the jobs `key` (a linked account's identities together) has queued
        or running, for MAX_PENDING_PER_USER; a count that reaches 0 goes."""
        left = self._active_by_user.get(key, 0) + delta
        if left > 0:
            self._active_by_user[key] = left
        else:
            self._active_by_user.pop(key, None)

    def is_admin(self, user: UserRef | str) -> bool:
        """An ADMIN_IDS member, or linked into an account that is one."""
        key = str(user)
        ids = self.config.admin_ids
        return key in ids or self.operator.account_of(key) in ids

    def _claim_end(self, job_id: str) -> bool:
        """Whoever ends a job without a result claims it first, and only one caller can.

        A second /cancel while the first waits for the job's task, or the queue-timeout sweep
        racing a start or a cancel, must not release the job's hold (or rewrite its row) again.
        """
        if job_id in self._ending or job_id not in self._jobs:
            return False
        self._ending.add(job_id)
        return True

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._background.discard(t)
            self._check_idle()

        task.add_done_callback(done)

    def _wake(self) -> None:
        self._wakeup.set()

    def _fill_slots(self) -> None:
        """Start queued jobs in the free slots now (`Scheduler` does; here, wake it)."""
        self._wake()

    async def _retake_slot(self, job_id: str, provider: str) -> None:
        """Hold a generating slot again, waiting for one if need be.

        A job gives its slot up once its provider has made the images (`JobHooks.generated`),
        so the next job starts while the result is fetched. If the fetch fails and the job must
        generate again, it takes a slot here first: ahead of the queue, as it had its turn.
        """
        if job_id in self._slots:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._slot_waiters.append((job_id, provider, waiter))
        self._fill_slots()
        await waiter

    def _free_slot(self, job_id: str) -> None:
        """The job stopped generating (or never started): its slot goes to the next one, now."""
        provider = self._slots.pop(job_id, None)
        if provider is not None:
            self._running_by_provider[provider] -= 1
            self._fill_slots()

    def _check_idle(self) -> None:
        if not self._jobs and not self._running and not self._background:
            self._idle.set()

    # ---- alerts to admins -----------------------------------------------------------------

    def _provider_error(self, provider: str, exc: BaseException) -> None:
        kind = exc.kind.value if isinstance(exc, ProviderError) else "timeout"
        self.metrics.provider_errors.labels(provider, kind).inc()
        if kind == ErrorKind.AUTH.value:
            log.error("provider %s rejected its API key: check the key and the account", provider)
            self.alert(f"auth:{provider}", "alert.auth", provider=provider)
        elif isinstance(exc, ModelUnavailable):  # once a day: the catalog needs the operator
            self.alert(f"model:{provider}", "alert.model_gone", provider=provider, error=str(exc))

    def breaker_changed(self, provider: str, state: BreakerState) -> None:
        if state is BreakerState.OPEN:
            # At most once an hour a provider: one that keeps recovering and failing (its
            # breaker opening every minute) does not send the admins a message each time.
            hour = int(self.clock() // 3600)
            self.alert(f"breaker:{provider}:{hour}", "alert.breaker", provider=provider)

    def alert(self, key: str, text_key: str, **params: object) -> None:
        """Tell every admin once per `key` and day: budget marks, rejected keys, open breakers.

        Sent in the background as a direct message (`Target.meta == "dm"`: `chat_id` is the
        admin's user id), so an alert never holds up the job that raised it. Each one sent is an
        `audit` row, so a restart the same day does not send it again.
        """
        day = self.quotas.today()
        if (key, day) in self._alerted:
            return
        if any(d != day for _, d in self._alerted):  # a new day: the old days' marks go
            self._alerted = {(k, d) for k, d in self._alerted if d == day}
        self._alerted.add((key, day))
        self.store.post(audit_op(self.clock(), "drawbridge", "alert", key, day))
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

    def _check_budget(self, day: str, *, refusing: bool = False) -> None:
        """Alert the admins when today's spend passes 80 % and 100 % of the budget, and when
        the budget (spent, or held by jobs in progress) turns a request away."""
        budget = self.quotas.limits.budget_usd
        if not budget or day != self.quotas.today():
            return  # a job of yesterday's settling now: that budget has no one to warn
        spent = self.quotas.charged_total(day)
        amounts = {"spent": money(spent), "budget": money(budget)}
        # Each alert once a day for each budget: one raised (and the bot restarted) warns again.
        of = f"{budget:g}"
        if refusing and spent < budget - 1e-9:  # (all of it spent: the 100 % mark says so)
            self.alert(f"budget:full:{of}", "alert.budget_full", **amounts)
        for mark in (100, 80):
            if spent >= budget * mark / 100 - 1e-9:
                self.alert(f"budget:{mark}:{of}", "alert.budget", percent=mark, **amounts)
                return
