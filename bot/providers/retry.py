"""The retry policy for provider calls: only retryable kinds, Retry-After honoured, jittered backoff."""

from __future__ import annotations

import random

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
)
from tenacity.stop import stop_base
from tenacity.wait import wait_base, wait_exponential, wait_random

from bot.errors import Malformed, ProviderError


def is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, ProviderError) and exc.retryable


def outlasts(exc: BaseException | None, wait: float, left: float) -> bool:
    """Whether a retry after `exc` is pointless with `left` seconds to go: the wait, or the
    provider's own Retry-After, ends past it (a breaker's cooldown is waited for regardless)."""
    if not isinstance(exc, ProviderError) or exc.hint_is_ours:
        return False
    return wait >= left or (exc.retry_after is not None and exc.retry_after >= left)


def hinted_wait(exc: BaseException | None, fallback: float, cap: float) -> float:
    """What the provider asked for (with a little jitter), else `fallback`, at most `cap`."""
    hint = exc.retry_after if isinstance(exc, ProviderError) else None
    if hint is not None and hint > 0:
        # Jitter keeps many jobs told "retry in 2 s" from all coming back in the same instant.
        return float(min(cap, hint + random.uniform(0, 0.1 * hint + 0.05)))
    return float(min(cap, fallback))


class wait_retry_after(wait_base):
    """Wait what the provider asked for (plus a little jitter), else back off exponentially."""

    def __init__(self, fallback: wait_base, cap: float) -> None:
        self.fallback = fallback
        self.cap = cap

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None and outcome.failed else None
        return hinted_wait(exc, self.fallback(retry_state), self.cap)


class stop_when_outlasting(stop_base):
    """Stop when the next wait, or the provider's own Retry-After, ends past `within` seconds
    from the first attempt (see `outlasts`)."""

    def __init__(self, within: float) -> None:
        self.within = within

    def __call__(self, retry_state: RetryCallState) -> bool:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None and outcome.failed else None
        left = self.within - (retry_state.seconds_since_start or 0.0)
        return outlasts(exc, retry_state.upcoming_sleep, left)


class stop_after_malformed(stop_base):
    """Stop at the second unreadable answer of a job's stage (`Malformed`: each one was a
    generation the provider billed); `seen` counts those before the policy took over."""

    def __init__(self, seen: int = 0) -> None:
        self.seen = seen

    def __call__(self, retry_state: RetryCallState) -> bool:
        outcome = retry_state.outcome
        if outcome is not None and outcome.failed and isinstance(outcome.exception(), Malformed):
            self.seen += 1
        return self.seen >= 2


def provider_retrying(
    attempts: int = 4,
    initial: float = 1.0,
    max_wait: float = 30.0,
    cap: float = 120.0,
    within: float | None = None,
    malformed: int = 0,
) -> AsyncRetrying:
    """A tenacity policy for one job's generation stage.

    `within` is what is left of the stage's time: a retry whose wait, or the provider's own
    Retry-After, would not end before it is not waited for (`outlasts`): the error is raised now,
    so a job told "retry in an hour" ends as rate limited (or moves to another provider) now
    instead of sleeping out its stage and ending as a timeout. `malformed`: unreadable answers
    the stage had before (`stop_after_malformed`).
    """
    stop: stop_base = stop_after_attempt(attempts) | stop_after_malformed(malformed)
    if within is not None:
        stop = stop | stop_when_outlasting(within)
    return AsyncRetrying(
        retry=retry_if_exception(is_retryable),
        wait=wait_retry_after(
            wait_exponential(multiplier=initial, max=max_wait) + wait_random(0, initial), cap
        ),
        stop=stop,
        reraise=True,
    )
