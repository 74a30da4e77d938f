"""The status board: latest value only, spaced edits, finals at once and never overwritten."""

from __future__ import annotations

import asyncio

from adapters.status_board import StatusBoard


class Recorder:
    """The send function: records what went out; `wait_for` a value to have gone."""

    def __init__(self, delay: float = 0.0) -> None:
        self.sent: list[tuple[str, str]] = []
        self.delay = delay
        self._changed = asyncio.Condition()

    async def __call__(self, key: str, value: str) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        self.sent.append((key, value))
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, key: str, value: str) -> None:
        async with asyncio.timeout(2), self._changed:
            await self._changed.wait_for(lambda: (key, value) in self.sent)


async def test_a_burst_costs_two_edits_the_first_and_the_latest() -> None:
    sent = Recorder()
    board: StatusBoard[str] = StatusBoard(sent, interval=0.1)
    for i in range(10):
        board.push("job", f"{i * 10}%")
        await asyncio.sleep(0)
    board.push("job", "done", final=True)
    await sent.wait_for("job", "done")
    assert sent.sent[0] == ("job", "0%") and sent.sent[-1] == ("job", "done")
    assert len(sent.sent) <= 3


async def test_a_first_delay_folds_queued_into_started() -> None:
    sent = Recorder()
    board: StatusBoard[str] = StatusBoard(sent, interval=0.05, first_delay=0.05)
    board.push("job", "queued")
    board.push("job", "started")
    await asyncio.sleep(0.1)
    board.push("job", "done", final=True)
    await sent.wait_for("job", "done")
    assert not board.pending("job")
    assert sent.sent == [("job", "started"), ("job", "done")]


async def test_a_final_value_is_not_replaced_and_ends_the_key() -> None:
    sent = Recorder(delay=0.02)
    board: StatusBoard[str] = StatusBoard(sent, interval=1.0)
    board.push("a", "cancelled", final=True)
    board.push("a", "progress 50%")  # late: dropped
    board.push("b", "queued")
    await sent.wait_for("a", "cancelled")
    assert ("a", "progress 50%") not in sent.sent
    await board.close(grace=0.5)
    assert ("b", "queued") in sent.sent
