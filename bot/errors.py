"""Every exception drawbridge raises on purpose, in one tree.

DrawbridgeError
├── SettingsError            a bad setting; the message names it, never a secret
├── UserError                shown to the user in their language (`key` + `params`)
│   ├── InvalidRequest       empty or long prompt, unknown option or model, bad ratio …
│   ├── NotAllowed           banned, or not on ALLOWED_IDS
│   ├── QueueFull            QUEUE_MAX jobs are queued or running
│   ├── TooManyPending       this user has MAX_PENDING_PER_USER jobs in flight
│   ├── QuotaExceeded        the user's daily images or spend would be passed
│   ├── BudgetExceeded       the operator's daily budget would be passed
│   ├── JobNotFound          no such job, or not this user's
│   └── ShuttingDown         the bot is stopping and takes no new work
├── ProviderError            a provider call failed; `kind` is the taxonomy
│   ├── Refused              moderation said no: never retried, never charged
│   ├── RateLimited          429; `retry_after` seconds if the provider said so
│   ├── Transient            5xx, network, timeout, malformed body: retried
│   ├── AuthFailed           the operator's key was rejected: not retried, operator warned
│   ├── BadRequest           the provider rejected the parameters: not retried
│   └── Expired              the result URL or task is gone
└── DeliveryError            the platform would not take the result; `permanent` if retrying is pointless
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class DrawbridgeError(Exception):
    """Root of drawbridge's own exceptions."""


class SettingsError(DrawbridgeError):
    """A setting is missing or malformed; `str()` is one line naming the setting."""


class UserError(DrawbridgeError):
    """An error the user sees, rendered from the text catalog by `key`."""

    key = "error.generic"

    def __init__(self, key: str | None = None, **params: Any) -> None:
        self.key = key or type(self).key
        self.params = params
        super().__init__(f"{self.key} {params}" if params else self.key)


class Listed(str):
    """An error's list of the bot's own choices (the ratios, sizes or models there are): shown
    whole, not cut short as a value the user typed is (`render_error`)."""

    __slots__ = ()


class InvalidRequest(UserError):
    key = "error.invalid"


class NotAllowed(UserError):
    key = "error.not_allowed"


class Blocked(UserError):
    """The prompt hit the operator's blocklist: refused at once, never sent, not charged."""

    key = "error.blocked"


class StorageUnavailable(UserError):
    """The database or the disk refused a new job (full, read-only): nothing was queued."""

    key = "error.storage"


class QueueFull(UserError):
    key = "error.queue_full"


class TooManyPending(UserError):
    key = "error.too_many_pending"


class QuotaExceeded(UserError):
    key = "error.quota_images"


class BudgetExceeded(UserError):
    key = "error.budget"


class JobNotFound(UserError):
    key = "error.job_not_found"


class JobEnded(JobNotFound):
    """The user's own job, no longer queued or running: nothing to cancel."""

    key = "error.job_ended"


class ShuttingDown(UserError):
    key = "error.shutting_down"


class ErrorKind(StrEnum):
    """The provider error taxonomy; the value is what `jobs.error_kind` holds."""

    REFUSED = "refused"
    RATE_LIMITED = "rate_limited"
    TRANSIENT = "transient"
    AUTH = "auth"
    BAD_REQUEST = "bad_request"
    EXPIRED = "expired"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    INTERNAL = "internal"


class ProviderError(DrawbridgeError):
    """A provider call failed. `retryable` kinds are retried by the engine's policy.

    `retry_after` is the provider's own word (`Retry-After`, Gemini's RetryInfo) unless
    `hint_is_ours`: then it is drawbridge's guess (a breaker's cooldown), waited for within the
    job's stage even when the stage ends first, since the provider may be back sooner.
    """

    kind = ErrorKind.TRANSIENT
    retryable = True
    hint_is_ours = False

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Refused(ProviderError):
    kind = ErrorKind.REFUSED
    retryable = False


class RateLimited(ProviderError):
    kind = ErrorKind.RATE_LIMITED
    retryable = True


class Transient(ProviderError):
    kind = ErrorKind.TRANSIENT
    retryable = True


class Malformed(Transient):
    """A synchronous API's answer that cannot be read: a generation it has billed. Retried
    once (providers.md §6), not as often as other transient failures."""


class AuthFailed(ProviderError):
    kind = ErrorKind.AUTH
    retryable = False


class BadRequest(ProviderError):
    kind = ErrorKind.BAD_REQUEST
    retryable = False


class ModelUnavailable(BadRequest):
    """The provider does not serve the model (retired, renamed): the family's next provider
    may (`PROVIDER_FALLBACKS`), so unlike other bad requests this one fails over."""


class Expired(ProviderError):
    kind = ErrorKind.EXPIRED
    retryable = False


class DeliveryError(DrawbridgeError):
    """The platform did not take a result or a message."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent
