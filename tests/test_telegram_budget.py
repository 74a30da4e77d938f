"""SendBudget: results before acks before edits, withdrawn acks never sent, a 429 pauses one chat;
with a PaidLane, only the overflow is paid for, within the day's Stars, and a refusal turns it off.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from telegram.error import BadRequest, RetryAfter

import adapters.telegram_adapter  # noqa: F401  (sets PTB_TIMEDELTA before telegram is used)
from adapters.telegram_budget import (
    PAID_FLAG,
    PaidLane,
    Priority,
    SendBudget,
    Ticket,
    Withdrawn,
    call_context,
)


class Recorder:
    """Stands in for PTB's HTTP call: notes which call went out, and when."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.floods: dict[str, int] = {}

    def call(self, name: str):  # type: ignore[no-untyped-def]
        async def send() -> bool:
            if self.floods.get(name):
                self.floods[name] -= 1
                raise RetryAfter(timedelta(seconds=1))
            self.sent.append(name)
            return True

        return send


async def send(
    budget: SendBudget, rec: Recorder, name: str, priority: Priority, chat: int = 1,
    ticket: Ticket | None = None, retries: int = 0,
) -> Any:  # fmt: skip
    with call_context(priority, ticket):
        return await budget.process_request(
            rec.call(name), (), {}, "sendMessage", {"chat_id": chat}, retries
        )


async def test_when_the_budget_is_short_results_go_before_acks_and_edits() -> None:
    budget = SendBudget(overall=(3, 1.0), headroom=0.0)
    rec = Recorder()
    await budget.initialize()
    try:
        # Spend the burst, then queue an edit, an ack and a result, in that order.
        for i in range(3):
            await send(budget, rec, f"early{i}", Priority.RESULT, chat=10 + i)
        calls = [
            asyncio.create_task(send(budget, rec, "edit", Priority.PROGRESS, chat=20)),
            asyncio.create_task(send(budget, rec, "ack", Priority.ACK, chat=21)),
            asyncio.create_task(send(budget, rec, "photo", Priority.RESULT, chat=22)),
        ]
        await asyncio.wait_for(asyncio.gather(*calls), 10)
        assert rec.sent[3:] == ["photo", "ack", "edit"]
    finally:
        await budget.shutdown()


async def test_a_withdrawn_ack_is_never_sent() -> None:
    budget = SendBudget(overall=(1, 1.0), headroom=0.0)
    rec = Recorder()
    await budget.initialize()
    try:
        await send(budget, rec, "first", Priority.RESULT)
        ticket = Ticket()
        ack = asyncio.create_task(send(budget, rec, "ack", Priority.ACK, chat=2, ticket=ticket))
        await asyncio.sleep(0.05)  # the ack is waiting for budget
        assert ticket.withdraw()
        with pytest.raises(Withdrawn):
            await ack
        assert rec.sent == ["first"]
    finally:
        await budget.shutdown()


async def test_a_429_pauses_only_its_chat_and_the_call_goes_again() -> None:
    budget = SendBudget(overall=None, headroom=0.0)
    rec = Recorder()
    rec.floods["flooded"] = 1
    await budget.initialize()
    try:
        began = time.monotonic()
        flooded = asyncio.create_task(send(budget, rec, "flooded", Priority.RESULT, 5, retries=1))
        await asyncio.sleep(0.05)
        await send(budget, rec, "other chat", Priority.RESULT, chat=6)
        assert rec.sent == ["other chat"]  # not held up by chat 5's pause
        await asyncio.wait_for(flooded, 5)
        assert rec.sent == ["other chat", "flooded"]
        assert time.monotonic() - began >= 1.0  # chat 5 waited out its retry_after
    finally:
        await budget.shutdown()


# ---- paid broadcasts ----------------------------------------------------------------------


class Wire:
    """Stands in for PTB's HTTP call: notes each call's name and whether it was flagged paid."""

    def __init__(self, refuse_paid: bool = False, bad: set[str] | None = None) -> None:
        self.sent: list[tuple[str, bool]] = []
        self.refuse_paid = refuse_paid
        self.bad = bad or set()

    def call(self, name: str, data: dict[str, Any]):  # type: ignore[no-untyped-def]
        async def send() -> bool:
            paid = data.get(PAID_FLAG) is True
            if name in self.bad or (paid and self.refuse_paid):
                raise BadRequest("Bad Request: no")
            self.sent.append((name, paid))
            return True

        return send


async def send_paid(
    budget: SendBudget, wire: Wire, name: str, *, method: str = "sendMessage",
    priority: Priority = Priority.RESULT, chat: int = 1,
) -> Any:  # fmt: skip
    data: dict[str, Any] = {"chat_id": chat}
    with call_context(priority):
        return await budget.process_request(wire.call(name, data), (), {}, method, data, 0)


@dataclass
class PaidRig:
    """A SendBudget with a PaidLane, the wire it sends on, and what the lane reported."""

    budget: SendBudget
    paid: PaidLane
    wire: Wire
    events: list[str]
    spent: list[int]

    async def send(self, name: str, **options: Any) -> Any:
        return await send_paid(self.budget, self.wire, name, **options)


@contextlib.asynccontextmanager
async def paid_rig(
    stars: float, overall: float, wire: Wire | None = None
) -> AsyncIterator[PaidRig]:
    """`overall` free calls a second, `stars` a day for the paid lane."""
    events: list[str] = []
    spent: list[int] = []
    paid = PaidLane(
        stars, today=lambda: "2026-12-01", on_spent=spent.append, on_event=events.append
    )
    budget = SendBudget(overall=(overall, 1.0), headroom=0.0, paid=paid)
    await budget.initialize()
    try:
        yield PaidRig(budget, paid, wire or Wire(), events, spent)
    finally:
        await budget.shutdown()


async def test_only_the_overflow_is_paid_and_only_while_the_stars_last() -> None:
    async with paid_rig(0.3, overall=2) as rig:  # 3 paid messages a day
        for i in range(5):
            await rig.send(f"m{i}", chat=10 + i)
        # two fit the free burst, three go paid at once, the sixth waits for free room
        assert rig.wire.sent == [
            ("m0", False), ("m1", False), ("m2", True), ("m3", True), ("m4", True),
        ]  # fmt: skip
        await rig.send("m5", chat=20)
        assert rig.wire.sent[-1] == ("m5", False)
        assert rig.spent == [1, 1, 1] and rig.paid.sent == 3 and rig.paid.stars_spent == 0.3
        assert rig.events == ["exhausted"]  # said once, however many calls found the Stars spent


async def test_edits_are_never_paid_for() -> None:
    async with paid_rig(10, overall=1) as rig:
        await rig.send("photo")
        await rig.send("edit", method="editMessageText", priority=Priority.DONE)
        assert rig.wire.sent == [("photo", False), ("edit", False)]
        assert rig.paid.sent == 0


async def test_a_refused_paid_call_goes_free_and_turns_the_lane_off() -> None:
    async with paid_rig(10, overall=1, wire=Wire(refuse_paid=True)) as rig:
        await rig.send("a")
        await rig.send("b", chat=2)  # paid, refused, then sent free
        await rig.send("c", chat=3)  # the lane is off: free, no paid attempt
        assert rig.wire.sent == [("a", False), ("b", False), ("c", False)]
        assert rig.events == ["refused"] and not rig.paid.enabled
        assert rig.paid.used == 0  # refused calls cost nothing


def test_the_days_count_is_reported_and_resumed() -> None:
    changes: list[tuple[str, int]] = []
    lane = PaidLane(
        1.0, today=lambda: "2026-12-01", on_used=lambda day, n: changes.append((day, n))
    )
    lane.resume("2026-12-01", 7)  # counted before a restart, today
    lane.resume("2026-11-30", 9)  # another day: not today's
    assert lane.used == 7
    lane.spend(2, 0.0)
    lane.refund(2)  # refused: given back, and said so
    lane.spend(1, 0.0)
    assert changes == [("2026-12-01", 2), ("2026-12-01", -2), ("2026-12-01", 1)]
    assert (lane.used, lane.allowance) == (8, 10)


async def test_a_bad_call_stays_bad_and_the_lane_stays_on() -> None:
    async with paid_rig(10, overall=1, wire=Wire(bad={"broken"})) as rig:
        await rig.send("a")
        with pytest.raises(BadRequest):
            await rig.send("broken", chat=2)
        assert rig.paid.enabled and rig.events == [] and rig.paid.used == 0


async def test_a_new_day_brings_new_stars() -> None:
    day = ["2026-12-01"]
    paid = PaidLane(0.1, today=lambda: day[0], clock=lambda: 0.0)
    assert paid.fits(1, 0.0)
    paid.spend(1, 0.0)
    assert not paid.fits(1, 0.0)
    day[0] = "2026-12-02"
    assert paid.fits(1, 0.0)
