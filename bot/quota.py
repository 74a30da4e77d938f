"""Daily quotas and the operator's budget: reserved at submit, settled on success, released otherwise."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from bot.errors import BudgetExceeded, QuotaExceeded
from bot.store import DayTotals
from bot.texts import money

# Dollar sums are floats; compare with a tolerance so that 0.1 + 0.2 fits a 0.3 limit.
_EPS = 1e-9


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-day limits; 0 means unlimited."""

    user_images: int = 0
    user_usd: float = 0.0
    budget_usd: float = 0.0


@dataclass(slots=True)
class _Tally:
    images: int = 0
    usd: float = 0.0


def quota_day(ts: float, tz: ZoneInfo) -> str:
    """The day (in QUOTA_TZ) that a timestamp falls in, as `jobs.day` has it."""
    return datetime.fromtimestamp(ts, tz).date().isoformat()


def days_before(day: str, n: int) -> str:
    """The calendar day `n` days before `day` (not `n` × 86,400 s: a day may have 23 hours)."""
    return (date.fromisoformat(day) - timedelta(days=n)).isoformat()


class Quotas:
    """Counts held (reserved) and spent images and dollars per user and day.

    The `jobs` table is the truth; these counters are rebuilt from it at start (`load`). Checks
    and reservations happen without an `await` in between, so of many concurrent submits for the
    last slot exactly one passes.
    """

    def __init__(self, limits: Limits, tz: ZoneInfo, clock: Callable[[], float]) -> None:
        self.limits = limits
        self._tz = tz
        self._clock = clock
        self._days: dict[str, dict[str, _Tally]] = {}
        self._totals: dict[str, float] = {}  # held and charged, per day: what the budget checks
        self._charged: dict[str, float] = {}  # charged only, per day: what was spent
        self._scopes: dict[tuple[str, str], int] = {}
        self._day_names: dict[str, str] = {}  # (chat or guild scope, day) → images
        # What another process on the data dir (`drawbridge generate`, or the bot beside it) has
        # held or spent since this one loaded the day: counted against the budget too.
        self._outside: dict[str, float] = {}
        self._outside_charged: dict[str, float] = {}  # of that, spent: for the budget's alerts

    def today(self) -> str:
        return self.day_of(self._clock())

    def day_of(self, ts: float) -> str:
        """The quota day (in QUOTA_TZ) that a timestamp falls in."""
        day = quota_day(ts, self._tz)
        return self._day_names.setdefault(day, day)  # one string per day, not one per job

    def load(self, day: str, totals: Iterable[DayTotals]) -> None:
        users = self._days.setdefault(day, {})
        for row in totals:
            tally = users.setdefault(row.key, _Tally())
            tally.images += row.images
            tally.usd += row.usd
            self._totals[day] = self._totals.get(day, 0.0) + row.usd
            self._charged[day] = self._charged.get(day, 0.0) + row.charged_usd

    def load_scopes(self, day: str, totals: dict[str, int]) -> None:
        for scope, images in totals.items():
            self._scopes[(scope, day)] = self._scopes.get((scope, day), 0) + images

    def set_outside(self, day: str, usd: float, charged: float) -> None:
        """What the other process has held or spent (`usd`), and spent, since the day loaded."""
        self._outside[day] = usd
        self._outside_charged[day] = charged

    def release_scope(self, scope: str, day: str, images: int) -> None:
        key = (scope, day)
        if key in self._scopes:
            self._scopes[key] = max(0, self._scopes[key] - images)

    def merge(self, day: str, source: str, into: str) -> None:
        """Two identities became one account: from now on they share one tally."""
        users = self._days.get(day, {})
        moved = users.pop(source, None)
        if moved is not None and source != into:
            tally = users.setdefault(into, _Tally())
            tally.images += moved.images
            tally.usd += moved.usd

    def used(self, user: str, day: str) -> tuple[int, float]:
        tally = self._days.get(day, {}).get(user)
        return (tally.images, tally.usd) if tally else (0, 0.0)

    def spent_total(self, day: str) -> float:
        """Dollars charged and held (by jobs queued or running) on `day`, all users together."""
        return self._totals.get(day, 0.0)

    def charged_total(self, day: str) -> float:
        """Dollars charged on `day`: what succeeded jobs cost, the other process's too."""
        return self._charged.get(day, 0.0) + self._outside_charged.get(day, 0.0)

    def reserve(
        self,
        user: str,
        day: str,
        images: int,
        usd: float,
        *,
        exempt: bool,
        extra_images: int = 0,
        scope: tuple[str, int] | None = None,
    ) -> None:
        """Hold `images` and `usd` for a new job, or raise if a limit would be passed.

        `exempt` (an admin) skips the user's and the chat's limits, never the operator's budget.
        `extra_images` is what an admin granted this user today; `scope` is the chat (or
        guild) with its own daily image limit, counted for everyone in it.
        """
        if not math.isfinite(usd) or usd < 0:  # NaN would pass every comparison below
            raise ValueError(f"cannot hold {usd!r} dollars")
        self._prune(day)
        users = self._days.setdefault(day, {})
        tally = users.get(user) or _Tally()
        lim = self.limits
        # The operator's budget caps the whole bot's bill: admins (and the batch CLI) too.
        total = self._totals.get(day, 0.0) + self._outside.get(day, 0.0)
        if lim.budget_usd and total + usd > lim.budget_usd + _EPS:
            raise BudgetExceeded()
        if not exempt:
            # Holding more dollars only (a dearer backup route) adds no images: the image
            # limits are not asked again (a grant, or a lowered limit, is not in play then).
            image_limit = lim.user_images + extra_images if lim.user_images and images else 0
            # Some left but less than asked: say what is left, so they can ask for that now
            # (not "resets tomorrow" to someone who may still make three images today).
            if image_limit and tally.images + images > image_limit:
                if tally.images < image_limit:
                    left = image_limit - tally.images
                    raise QuotaExceeded(
                        "error.quota_images_left", asked=images, left=left, limit=image_limit
                    )
                raise QuotaExceeded("error.quota_images", used=tally.images, limit=image_limit)
            if lim.user_usd and tally.usd + usd > lim.user_usd + _EPS:
                limit = money(lim.user_usd)
                if tally.usd < lim.user_usd - _EPS:
                    rest = money(lim.user_usd - tally.usd)
                    raise QuotaExceeded(
                        "error.quota_usd_left", cost=money(usd), left=rest, limit=limit
                    )
                raise QuotaExceeded("error.quota_usd", used=money(tally.usd), limit=limit)
            if scope is not None and scope[1] and images:
                held = self._scopes.get((scope[0], day), 0)
                if held + images > scope[1]:
                    if held < scope[1]:
                        left = scope[1] - held
                        raise QuotaExceeded(
                            "error.quota_chat_left", asked=images, left=left, limit=scope[1]
                        )
                    raise QuotaExceeded("error.quota_chat", used=held, limit=scope[1])
        if scope is not None:
            self._scopes[(scope[0], day)] = self._scopes.get((scope[0], day), 0) + images
        users[user] = tally
        tally.images += images
        tally.usd += usd
        self._totals[day] = self._totals.get(day, 0.0) + usd

    def release(self, user: str, day: str, images: int, usd: float) -> None:
        """Give back what a job held: it failed, was refused, cancelled or timed out."""
        tally = self._days.get(day, {}).get(user)
        if tally is None:
            return  # a day that has rolled out of memory: nothing left to check against
        if not math.isfinite(usd):
            usd = 0.0  # (never held: `reserve` refuses it) `max(0, total - nan)` would be 0
        tally.images = max(0, tally.images - images)
        tally.usd = max(0.0, tally.usd - usd)
        self._totals[day] = max(0.0, self._totals.get(day, 0.0) - usd)

    def settle(
        self, user: str, day: str, reserved: tuple[int, float], charged: tuple[int, float]
    ) -> None:
        """Turn a reservation into the charge: the job may have made fewer images than held."""
        self.release(user, day, reserved[0] - charged[0], reserved[1] - charged[1])
        if day in self._days:  # (a day rolled out of memory keeps no tally)
            self._charged[day] = self._charged.get(day, 0.0) + charged[1]

    def _prune(self, today: str) -> None:
        # Keep yesterday too: jobs reserved before midnight still settle against it.
        if len(self._days) > 2:
            for day in sorted(self._days)[:-2]:
                if day != today:
                    self._days.pop(day, None)
                    self._totals.pop(day, None)
                    self._charged.pop(day, None)
                    self._outside.pop(day, None)
                    self._outside_charged.pop(day, None)
                    for key in [k for k in self._scopes if k[1] == day]:
                        del self._scopes[key]
        if len(self._day_names) > len(self._days) + 1:  # the interned names of days gone
            self._day_names = {d: d for d in self._day_names if d in self._days or d == today}
