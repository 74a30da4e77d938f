"""Which provider serves a model: fallback chains per family, circuit breakers, rate limits.

A model names one provider in the catalog. An operator may give a model family a chain of
providers (`PROVIDER_FALLBACKS=nano-banana-pro=grsai,gemini`): when the first is down (its
breaker open, or it keeps failing after retries) the job goes to the same family's model on
the next. Each provider has a breaker that opens after consecutive transient failures and
lets one probe through after a cool-down, an optional cap on calls at once, and an optional
requests-per-minute limit (aiolimiter's leaky bucket).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from aiolimiter import AsyncLimiter

from bot.catalog import Catalog, ModelSpec
from bot.errors import ErrorKind, ModelUnavailable, ProviderError, Transient
from bot.jobs import GeneratedImage
from bot.providers.base import GenerationRequest, JobHooks, Provider

log = logging.getLogger("drawbridge.routing")

# Kinds that say "this provider is unwell" (a refusal or a bad request says nothing about it).
_UNWELL = {ErrorKind.TRANSIENT, ErrorKind.TIMEOUT, ErrorKind.EXPIRED}
# Kinds after which another provider may well succeed.
FAILOVER_KINDS = {
    ErrorKind.TRANSIENT,
    ErrorKind.RATE_LIMITED,
    ErrorKind.TIMEOUT,
    ErrorKind.AUTH,
    ErrorKind.EXPIRED,
}


def fails_over(exc: ProviderError) -> bool:
    """Whether the family's next provider may well succeed after `exc` on this one."""
    return exc.kind in FAILOVER_KINDS or isinstance(exc, ModelUnavailable)


class CircuitOpen(Transient):
    """The provider's breaker is open: skip it without calling.

    `retry_after` says when it lets a probe through: a job with no other route waits for
    that (within its stage timeout) instead of failing at once.
    """

    hint_is_ours = True


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Breaker:
    """Opens after `threshold` consecutive failures; after `cooldown` s lets one probe through."""

    def __init__(
        self,
        name: str,
        threshold: int = 5,
        cooldown: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, BreakerState], None] | None = None,
    ) -> None:
        self.name = name
        self.threshold = threshold
        self.cooldown = cooldown
        self.clock = clock
        self.on_change = on_change
        self.failures = 0
        self.opened_at = 0.0
        self._state = BreakerState.CLOSED
        self._probing = False
        self._probed: asyncio.Event | None = None  # set when the probe in flight ends

    def reopens_in(self) -> float:
        """Seconds until an open breaker lets a probe through (0 when it would now)."""
        if self._state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self.cooldown - (self.clock() - self.opened_at))

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self.clock() - self.opened_at >= self.cooldown:
            return BreakerState.HALF_OPEN
        return self._state

    def allow(self) -> bool:
        """May a call go through now? In half-open state only one probe at a time."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._probing:
            self._probing = True
            self._probed = asyncio.Event()
            return True
        return False

    async def probe_ended(self) -> None:
        """Until the probe in flight (if any) has its answer."""
        if self._probing and self._probed is not None:
            await self._probed.wait()

    def end_probe(self) -> None:
        self._probing = False
        if self._probed is not None:
            self._probed.set()
            self._probed = None

    def success(self) -> None:
        self.end_probe()
        self.failures = 0
        if self._state is not BreakerState.CLOSED:
            self._set(BreakerState.CLOSED)

    def failure(self, exc: BaseException) -> None:
        kind = exc.kind if isinstance(exc, ProviderError) else ErrorKind.TIMEOUT
        probing = self._probing
        self.end_probe()
        if kind not in _UNWELL:
            return
        self.failures += 1
        if probing or self.failures >= self.threshold:
            self.opened_at = self.clock()
            self._set(BreakerState.OPEN)

    def _set(self, state: BreakerState) -> None:
        if state is not self._state:
            self._state = state
            level = logging.WARNING if state is BreakerState.OPEN else logging.INFO
            log.log(level, "provider %s breaker %s", self.name, state.value)
            if self.on_change is not None:
                self.on_change(self.name, state)


@dataclass(frozen=True, slots=True)
class Route:
    """One way to serve a job: this catalog model on this provider."""

    spec: ModelSpec
    provider: Provider


class Router:
    """The engine's way to its providers."""

    def __init__(
        self,
        catalog: Catalog,
        providers: Mapping[str, Provider],
        *,
        fallbacks: Mapping[str, Sequence[str]] | None = None,
        concurrency: Mapping[str, int] | None = None,
        rpm: Mapping[str, int] | None = None,
        breaker_threshold: int = 5,
        breaker_cooldown: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        on_breaker: Callable[[str, BreakerState], None] | None = None,
    ) -> None:
        self.catalog = catalog
        self.providers = dict(providers)
        self.fallbacks = {k.lower(): tuple(v) for k, v in (fallbacks or {}).items()}
        self.on_error: Callable[[str, BaseException], None] | None = None
        self.breakers = {
            name: Breaker(name, breaker_threshold, breaker_cooldown, clock, on_breaker)
            for name in self.providers
        }
        self._slots = {
            name: asyncio.Semaphore(n) for name, n in (concurrency or {}).items() if n > 0
        }
        self._limiters = {name: AsyncLimiter(n, 60) for name, n in (rpm or {}).items() if n > 0}

    def chain(self, spec: ModelSpec) -> list[str]:
        """Provider names for `spec`, in order: its own first, then its family's chain."""
        names = [spec.provider]
        for name in self.fallbacks.get(spec.family.lower(), ()) if spec.family else ():
            if name not in names:
                names.append(name)
        return names

    def routes(self, spec: ModelSpec, pinned: str | None = None) -> list[Route]:
        """Configured routes for `spec`; `pinned` (a provider holding the job's task) goes first."""
        routes: list[Route] = []
        for name in self.chain(spec):
            provider = self.providers.get(name)
            if provider is None:
                continue
            target = spec if name == spec.provider else self._family_model(spec, name)
            if target is not None:
                routes.append(Route(target, provider))
        if pinned is not None:
            routes.sort(key=lambda r: r.provider.name != pinned)
        return routes

    def available(self, spec: ModelSpec) -> bool:
        return bool(self.routes(spec))

    def _family_model(self, spec: ModelSpec, provider: str) -> ModelSpec | None:
        same = [s for s in self.catalog.for_provider(provider) if s.family == spec.family]
        exact = [s for s in same if s.remote_model == spec.remote_model]
        if exact:
            return exact[0]
        return same[0] if same else None

    @contextlib.asynccontextmanager
    async def _admitted(self, name: str, hooks: JobHooks) -> AsyncIterator[JobHooks]:
        """Through the provider's cap and rate limit; yields the hooks to call it with.

        The cap counts calls generating, as `CONCURRENCY` does: it is given back when the
        provider reports the images made (`JobHooks.generated`), not after their download.
        """
        slot = self._slots.get(name)
        limiter = self._limiters.get(name)
        if slot is not None:
            await slot.acquire()
        capped = _Capped(hooks, slot)
        try:
            if limiter is not None:
                await limiter.acquire()
            yield capped
        finally:
            capped.release()

    async def call(
        self,
        route: Route,
        request: GenerationRequest,
        hooks: JobHooks,
        *,
        await_probe: bool = False,
    ) -> list[GeneratedImage]:
        """One attempt on `route`, through its provider's cap, rate limit and breaker.

        `await_probe` (a job with no other route): while the half-open breaker's one probe is
        in flight, wait for its answer rather than be refused at once (each refusal spent a
        retry, and every job but the probe failed while the provider answered fine).
        """
        name = route.provider.name
        breaker = self.breakers.get(name) or self.breakers.setdefault(name, Breaker(name))
        if await_probe:
            await breaker.probe_ended()
        if name not in self._slots and name not in self._limiters:
            return await self._call(breaker, route, request, hooks)
        async with self._admitted(name, hooks) as admitted:
            return await self._call(breaker, route, request, admitted)

    def timed_out(self, name: str | None) -> None:
        """A job's time ran out while provider `name` had it: counted as its failure."""
        if not name or (breaker := self.breakers.get(name)) is None:
            return
        self._failed(breaker, name, TimeoutError(f"provider {name}: a job's generation timed out"))

    def _failed(self, breaker: Breaker, name: str, exc: BaseException) -> None:
        """A call's failure, counted by the provider's breaker and told (`on_error`)."""
        breaker.failure(exc)
        if self.on_error is not None:
            self.on_error(name, exc)

    async def _call(
        self, breaker: Breaker, route: Route, request: GenerationRequest, hooks: JobHooks
    ) -> list[GeneratedImage]:
        name = route.provider.name
        if not breaker.allow():
            raise CircuitOpen(
                f"provider {name} is failing; its breaker is open",
                retry_after=max(0.05, breaker.reopens_in()),
            )
        try:
            images = await route.provider.generate(request, hooks)
        except asyncio.CancelledError:
            breaker.end_probe()
            raise
        except (ProviderError, TimeoutError) as exc:
            self._failed(breaker, name, exc)
            raise
        breaker.success()
        return images


class _Capped:
    """A call's hooks that give its provider cap back once, when the images are made."""

    def __init__(self, hooks: JobHooks, slot: asyncio.Semaphore | None) -> None:
        self._hooks = hooks
        self._slot = slot

    async def progress(self, percent: int) -> None:
        await self._hooks.progress(percent)

    async def task_submitted(self, task_id: str | None) -> None:
        await self._hooks.task_submitted(task_id)

    def generated(self) -> None:
        self.release()
        self._hooks.generated()

    def release(self) -> None:
        slot, self._slot = self._slot, None
        if slot is not None:
            slot.release()
