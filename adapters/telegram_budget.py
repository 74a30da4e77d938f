"""The Telegram send budget as one priority gate: results first, then acks, then edits.

Telegram allows a bot about 30 messages a second in all, 20 a minute in one group and about one a
second in one chat, and acks, status edits and results all spend that one budget (DESIGN rule 6).
PTB's `AIORateLimiter` keeps the rates but serves calls first come, first served, and a 429
anywhere halts every call for `retry_after` + 0.1 s. Under load that puts a burst of acks in front
of the results and turns every small timing slip into a pause for the whole bot.

`SendBudget` is a PTB rate limiter that instead:
- admits message-sending calls (sends and edits) by priority (`Priority`), first come first served
  within one priority, holding a call back only for the budget it needs: a chat that is out of
  budget does not hold up calls to other chats;
- keeps its buckets a little under Telegram's (`headroom`), since a call admitted at one moment
  reaches Telegram a moment later and calls that left spread out can arrive bunched;
- keeps part of the overall burst for results: lower priorities leave a share of it (`RESERVE`)
  unspent, so a wave of results finds room at once and edits go when the budget is idle;
- on a 429 pauses only the chat that got it for `retry_after`, treats the overall bucket as full,
  and sends the call again (up to `rate_limit_args` times) in its place in the queue;
- lets a caller withdraw a call that has not been admitted yet (`Ticket.withdraw`): an ack whose
  job was delivered meanwhile is never sent;
- with a `PaidLane` (the operator's `TELEGRAM_PAID_BROADCAST_STARS`), sends a message that would
  wait for the free budget at once instead, as a paid broadcast (`allow_paid_broadcast`: up to
  1000 messages a second, 0.1 Star each), while today's Stars last. Only overflow is paid: a call
  that fits the free budget goes free. Edits cannot be paid for (the Bot API has no such flag
  on them), so they keep waiting for free room, behind everything else.

Other calls (updates, chat actions, deletes, callback answers, files) go straight through:
Telegram does not count them as messages.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import time
import warnings
from collections.abc import Callable, Coroutine, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import timedelta
from enum import IntEnum
from typing import Any

from telegram._utils.types import JSONDict
from telegram.error import BadRequest, RetryAfter
from telegram.ext import BaseRateLimiter


class Priority(IntEnum):
    """What a call is for; lower goes first."""

    RESULT = 0  # photos, albums, documents and the buttons that go with them
    REPLY = 1  # answers to commands (help, usage, refusals) and outcomes (failed, cancelled)
    ACK = 2  # a job's first status message ("queued")
    DONE = 3  # the status edit that says "done" after the result is out
    PROGRESS = 4  # progress edits: droppable, sent only when the budget has room


# Calls of each priority leave this share of the overall burst unspent, for the priorities above
# them: results find room at once when they come, and edits go when the budget is idle.
RESERVE = {
    Priority.RESULT: 0.0,
    Priority.REPLY: 0.0,
    Priority.ACK: 0.2,
    Priority.DONE: 0.8,
    Priority.PROGRESS: 0.8,
}

MESSAGE_METHODS = frozenset(
    {
        "sendmessage",
        "sendphoto",
        "senddocument",
        "sendmediagroup",
        "sendanimation",
        "sendvideo",
        "sendaudio",
        "sendvoice",
        "sendsticker",
        "copymessage",
        "forwardmessage",
        "editmessagetext",
        "editmessagecaption",
        "editmessagemedia",
        "editmessagereplymarkup",
    }
)
# Sends that take `allow_paid_broadcast` (edits do not).
PAYABLE_METHODS = frozenset(m for m in MESSAGE_METHODS if not m.startswith("edit"))
PAID_FLAG = "allow_paid_broadcast"


class Withdrawn(Exception):
    """The call was withdrawn before the budget admitted it: nothing was sent."""


class Ticket:
    """A handle on one call: `withdraw()` cancels it if it is still waiting for the budget.

    `seq` is the call's place in the queue, set when it first asks for the budget; a call made
    again with a new ticket carrying the old `seq` (say, an ack redone with newer text) keeps it.
    """

    __slots__ = ("admitted", "on_withdraw", "seq", "withdrawn")

    def __init__(self, seq: int | None = None) -> None:
        self.seq = seq
        self.admitted = False
        self.withdrawn = False
        self.on_withdraw: Callable[[], None] | None = None

    def withdraw(self) -> bool:
        """Cancel the call unless it was admitted already; whether it was cancelled."""
        if self.admitted:
            return False
        self.withdrawn = True
        if self.on_withdraw is not None:
            self.on_withdraw()
        return True


@dataclass(frozen=True, slots=True)
class CallContext:
    priority: Priority = Priority.REPLY
    ticket: Ticket | None = None


CALL: ContextVar[CallContext | None] = ContextVar("telegram_call", default=None)


@contextlib.contextmanager
def call_context(priority: Priority, ticket: Ticket | None = None) -> Iterator[None]:
    """Calls made inside go at `priority`; `ticket` lets the caller withdraw them."""
    token = CALL.set(CallContext(priority, ticket))
    try:
        yield
    finally:
        CALL.reset(token)


class Bucket:
    """A leaky bucket: `capacity` calls at once, draining at `rate` calls a second."""

    __slots__ = ("capacity", "level", "rate", "stamp")

    def __init__(self, capacity: float, rate: float, now: float) -> None:
        self.capacity = capacity
        self.rate = rate
        self.level = 0.0
        self.stamp = now

    def room(self, now: float) -> float:
        self.level = max(0.0, self.level - (now - self.stamp) * self.rate)
        self.stamp = now
        return self.capacity - self.level

    def wait_for(self, cost: float, now: float) -> float:
        """Seconds until `cost` calls fit (0 if they fit now)."""
        short = cost - self.room(now)
        return max(0.0, short / self.rate)

    def spend(self, cost: float, now: float) -> None:
        self.room(now)
        self.level += cost


class PaidLane:
    """Telegram's paid broadcasts as a second overall bucket, with a daily allowance of Stars.

    `stars_per_day` is what the operator lets the bot spend a day; each message costs
    `STARS_PER_MESSAGE`, an album one per item. Stars are reserved when a call is admitted and
    given back when Telegram refuses the call, so the count follows what Telegram charged.
    `today` names the current day (the engine's quota day); the count starts again each day.
    `on_spent(messages)` hears every paid message sent; `on_event(kind)` hears "exhausted"
    (today's Stars are spent) and "refused" (Telegram refused a paid broadcast: the lane is off
    until the bot restarts). `on_used(day, delta)` hears every change to the day's count, to
    keep it across restarts (`resume` brings it back).
    """

    STARS_PER_MESSAGE = 0.1

    def __init__(
        self,
        stars_per_day: float,
        *,
        rate: float = 1000.0,
        headroom: float = 0.15,
        today: Callable[[], str] = lambda: time.strftime("%Y-%m-%d", time.gmtime()),
        clock: Callable[[], float] = time.monotonic,
        on_spent: Callable[[int], None] | None = None,
        on_event: Callable[[str], None] | None = None,
        on_used: Callable[[str, int], None] | None = None,
    ) -> None:
        self.allowance = int(stars_per_day / self.STARS_PER_MESSAGE + 1e-9)  # messages a day
        self.bucket = Bucket(max(1.0, rate * (1 - headroom)), rate, clock())
        self.today = today
        self.on_spent = on_spent
        self.on_event = on_event
        self.on_used = on_used
        self.enabled = self.allowance > 0
        self.day = today()
        self.used = 0  # messages reserved or sent today
        self.sent = 0  # paid messages Telegram accepted, since start
        self._told: str | None = None  # the day "exhausted" was said

    @property
    def stars_spent(self) -> float:
        """Stars spent on today's paid messages (reserved ones included)."""
        return round(self.used * self.STARS_PER_MESSAGE, 1)

    def fits(self, cost: float, now: float) -> bool:
        if not self.enabled:
            return False
        day = self.today()
        if day != self.day:
            self.day, self.used = day, 0
        if self.used + cost > self.allowance:
            if self._told != day:
                self._told = day
                if self.on_event is not None:
                    self.on_event("exhausted")
            return False
        return self.bucket.wait_for(cost, now) == 0

    def resume(self, day: str, used: int) -> None:
        """Start from what was counted on `day` before a restart."""
        if day == self.today():
            self.day, self.used = day, max(self.used, used)

    def spend(self, cost: float, now: float) -> None:
        self.bucket.spend(cost, now)
        self.used += int(cost)
        if self.on_used is not None:
            self.on_used(self.day, int(cost))

    def settle(self, cost: float) -> None:
        """Telegram took the paid call."""
        self.sent += int(cost)
        if self.on_spent is not None:
            self.on_spent(int(cost))

    def refund(self, cost: float) -> None:
        """Telegram refused the paid call: it cost nothing."""
        given_back = min(self.used, int(cost))
        self.used -= given_back
        if given_back and self.on_used is not None:
            self.on_used(self.day, -given_back)

    def refuse(self) -> None:
        """Telegram refuses paid broadcasts for this bot: stop asking."""
        if self.enabled:
            self.enabled = False
            if self.on_event is not None:
                self.on_event("refused")


@dataclass(order=True)
class _Waiter:
    priority: int
    seq: int
    chat: int | str | None = field(compare=False)
    cost: float = field(compare=False)
    future: asyncio.Future[bool] = field(compare=False)  # True: admitted on the paid lane
    payable: bool = field(compare=False, default=False)


def _retry_seconds(exc: RetryAfter) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PTB 22 warns that the type will become timedelta
        value: Any = exc.retry_after
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


class SendBudget(BaseRateLimiter[int]):
    """A PTB rate limiter that admits calls by priority; see the module docstring.

    `overall`, `group` and `private` are Telegram's limits as (calls, seconds); None switches
    one off. Private chats are off by default, as in PTB's limiter: Telegram tolerates short
    bursts there, and a 429 from one chat pauses only that chat. `headroom` is the share of each
    burst kept unused against arrival jitter. `paid`, when given, lets sends that would wait
    for the overall budget go at once as paid broadcasts (`PaidLane`).
    """

    def __init__(
        self,
        overall: tuple[float, float] | None = (30.0, 1.0),
        group: tuple[float, float] | None = (20.0, 60.0),
        private: tuple[float, float] | None = None,
        *,
        headroom: float = 0.15,
        max_retries: int = 0,
        paid: PaidLane | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        self.paid = paid
        self.headroom = headroom
        self.max_retries = max_retries
        self.limits = {"group": group, "private": private}
        self._overall = self._new_bucket(overall)
        self._chats: dict[int | str, Bucket] = {}
        self._paused: dict[int | str | None, float] = {}  # chat (None: all) → until
        self._waiting: list[_Waiter] = []
        self._seq = itertools.count()
        self._pump: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def _new_bucket(self, limit: tuple[float, float] | None) -> Bucket | None:
        if limit is None:
            return None
        calls, seconds = limit
        capacity = max(1.0, calls * (1 - self.headroom))
        return Bucket(capacity, calls / seconds, self.clock())

    def _chat_bucket(self, chat: int | str | None) -> Bucket | None:
        if chat is None:
            return None
        bucket = self._chats.get(chat)
        if bucket is None:
            group = isinstance(chat, str) or chat < 0
            limit = self.limits["group" if group else "private"]
            if limit is None:
                return None
            bucket = self._new_bucket(limit)
            assert bucket is not None
            self._chats[chat] = bucket
            if len(self._chats) > 10_000:  # forget idle chats
                now = self.clock()
                idle = [k for k, b in self._chats.items() if b.room(now) >= b.capacity]
                for key in idle:
                    if key != chat:
                        del self._chats[key]
        return bucket

    # ---- what the adapter asks ------------------------------------------------------------

    def has_room(self, chat: int | str | None, priority: Priority = Priority.PROGRESS) -> bool:
        """Whether a call of `priority` to `chat` would go now without holding up another."""
        now = self.clock()
        for waiter in self._waiting:  # sorted: the first live one is the most urgent
            if not waiter.future.done():
                if waiter.priority <= priority:
                    return False
                break
        overall = self._overall
        if overall is not None and overall.wait_for(1 + self._reserve(priority), now) > 0:
            return False
        if max(self._paused.get(chat, 0.0), self._paused.get(None, 0.0)) > now:
            return False
        bucket = self._chat_bucket(chat)
        return bucket is None or bucket.wait_for(1, now) == 0

    def _reserve(self, priority: Priority) -> float:
        return RESERVE[priority] * self._overall.capacity if self._overall is not None else 0.0

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiting if not w.future.done())

    # ---- the rate limiter interface -------------------------------------------------------

    async def initialize(self) -> None:
        return None

    async def shutdown(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
            self._pump = None
        for waiter in self._waiting:
            if not waiter.future.done():
                waiter.future.set_exception(Withdrawn("shutting down"))
        self._waiting.clear()

    async def process_request(
        self,
        callback: Callable[..., Coroutine[Any, Any, bool | JSONDict | list[JSONDict]]],
        args: Any,
        kwargs: dict[str, Any],
        endpoint: str,
        data: dict[str, Any],
        rate_limit_args: int | None,
    ) -> bool | JSONDict | list[JSONDict]:
        method = endpoint.lower()
        if method not in MESSAGE_METHODS:
            return await callback(*args, **kwargs)
        context = CALL.get() or CallContext()
        retries = rate_limit_args if rate_limit_args is not None else self.max_retries
        chat = _chat_key(data.get("chat_id"))
        media = data.get("media")
        cost = float(len(media)) if isinstance(media, list) and media else 1.0
        ticket = context.ticket
        if ticket is not None and ticket.seq is not None:
            seq = ticket.seq
        else:
            seq = next(self._seq)
            if ticket is not None:
                ticket.seq = seq
        payable = method in PAYABLE_METHODS and self.paid is not None
        probing = False  # a paid call was refused: this attempt goes free to find out why
        attempt = 0
        while True:
            paid = await self._admit(context, chat, cost, seq, payable and not probing)
            if paid:
                data[PAID_FLAG] = True
            else:
                data.pop(PAID_FLAG, None)
            try:
                result = await callback(*args, **kwargs)
            except RetryAfter as exc:
                if paid:
                    self._paid_refund(cost)
                if attempt >= retries:
                    raise
                attempt += 1
                self._flooded(chat, _retry_seconds(exc) + 0.1)
                continue
            except BadRequest:
                if not paid:
                    raise
                # Perhaps the call is bad, perhaps paid broadcasts are not open to this bot
                # (not enabled, no Stars): the same call once more, free, tells which.
                self._paid_refund(cost)
                probing = True
                continue
            # A paid call that failed otherwise (timed out, cut off) keeps its Stars counted:
            # Telegram may have sent and charged it, and the cap must hold either way.
            if paid:
                self._paid_settle(cost)
            elif probing and self.paid is not None:
                self.paid.refuse()  # the free call went: it was the paid lane Telegram refused
            return result

    def _paid_settle(self, cost: float) -> None:
        if self.paid is not None:
            self.paid.settle(cost)

    def _paid_refund(self, cost: float) -> None:
        if self.paid is not None:
            self.paid.refund(cost)

    # ---- admission ------------------------------------------------------------------------

    async def _admit(
        self, context: CallContext, chat: int | str | None, cost: float, seq: int, payable: bool
    ) -> bool:
        """Wait until the call may go; whether it goes on the paid lane."""
        ticket = context.ticket
        if ticket is not None and ticket.withdrawn:
            raise Withdrawn("withdrawn")
        loop = asyncio.get_running_loop()
        waiter = _Waiter(int(context.priority), seq, chat, cost, loop.create_future(), payable)
        if ticket is not None:

            def withdraw() -> None:
                if not waiter.future.done():
                    waiter.future.set_exception(Withdrawn("withdrawn"))
                self._wake.set()

            ticket.on_withdraw = withdraw
        bisect.insort(self._waiting, waiter)
        self._admit_ready()
        if not waiter.future.done():
            self._ensure_pump()
        try:
            paid = await waiter.future
        except asyncio.CancelledError:
            future = waiter.future
            admitted = future.done() and not future.cancelled() and future.exception() is None
            if admitted and future.result():
                self._paid_refund(cost)  # admitted on the paid lane, but never sent
            self._wake.set()  # the caller gave up: its place goes to the next one
            raise
        finally:
            if ticket is not None:
                ticket.on_withdraw = None
        if ticket is not None:
            ticket.admitted = True
        return paid

    def _admit_ready(self) -> float | None:
        """Admit every waiter that fits now; the seconds until the next one might fit."""
        now = self.clock()
        if self._paused:
            self._paused = {k: t for k, t in self._paused.items() if t > now}
        paused_all = self._paused.get(None)
        if paused_all is not None:  # Telegram told every chat to wait
            return paused_all - now
        overall = self._overall
        keep: list[_Waiter] = []
        next_in: float | None = None
        waiting = self._waiting
        for i, waiter in enumerate(waiting):
            if waiter.future.done():
                continue
            until = self._paused.get(waiter.chat)
            if until is not None:  # this chat was told to wait; other chats may go
                keep.append(waiter)
                next_in = until - now if next_in is None else min(next_in, until - now)
                continue
            paid = False
            if overall is not None:
                reserve = self._reserve(Priority(waiter.priority))
                wait = overall.wait_for(min(overall.capacity, waiter.cost + reserve), now)
                if wait > 0:
                    if (
                        waiter.payable
                        and self.paid is not None
                        and self.paid.fits(waiter.cost, now)
                    ):
                        paid = True  # the operator pays for it to go now
                    else:
                        # Nothing of this priority or below may pass it (higher ones went
                        # first): the rest wait as they are, unlooked at.
                        keep.extend(waiting[i:])
                        next_in = wait if next_in is None else min(next_in, wait)
                        break
            bucket = self._chat_bucket(waiter.chat)
            if bucket is not None:
                wait = bucket.wait_for(min(waiter.cost, bucket.capacity), now)
                if wait > 0:  # this chat is out of budget; other chats may go
                    keep.append(waiter)
                    next_in = wait if next_in is None else min(next_in, wait)
                    continue
                bucket.spend(waiter.cost, now)
            if paid:
                assert self.paid is not None
                self.paid.spend(waiter.cost, now)
            elif overall is not None:
                overall.spend(waiter.cost, now)
            waiter.future.set_result(paid)
        self._waiting = keep
        return next_in

    def _ensure_pump(self) -> None:
        if self._pump is None or self._pump.done():
            self._pump = asyncio.get_running_loop().create_task(self._run_pump())

    async def _run_pump(self) -> None:
        while True:
            self._wake.clear()
            next_in = self._admit_ready()
            if not self._waiting:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), next_in if next_in else 1.0)

    def _flooded(self, chat: int | str | None, seconds: float) -> None:
        """Telegram said 429: that chat waits `seconds`, and the overall bucket counts as full."""
        now = self.clock()
        if self._overall is not None:
            self._overall.room(now)
            self._overall.level = max(self._overall.level, self._overall.capacity)
        # No chat to blame (None): everyone waits.
        self._paused[chat] = max(self._paused.get(chat, 0.0), now + seconds)
        self._wake.set()


def _chat_key(value: Any) -> int | str | None:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return str(value)
