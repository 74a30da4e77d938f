"""SendBudget: results before acks before edits, withdrawn acks never sent, a 429 pauses one chat."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import pytest
from telegram.error import RetryAfter

import adapters.telegram_adapter  # noqa: F401  (sets PTB_TIMEDELTA before telegram is used)
from adapters.telegram_budget import Priority, SendBudget, Ticket, Withdrawn, call_context


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
