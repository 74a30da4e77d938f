"""Taking a burst of updates in batches the bot can handle: the next long poll waits for the last.

Telegram answers a long poll with up to 100 updates. PTB's `Updater` asks for the next hundred as
soon as it has queued the last, so under a burst the one event loop parses the second and third
batch (~0.15 ms an update) and runs their handlers while the first batch's rows are still being
committed and its jobs are opening their provider connections: measured with `bench.e2e`, the
first GrsAI request left ~190 ms after a burst of 300 and the 200th of a burst of 2,000 ~420 ms
after it. `IntakeGate` holds the next poll until every update taken so far is handled (its job
submitted or answered), for at most `wait` seconds. A handler about to wait on something slow (a
reference image's download) lets go of the poll first (`let_go`), and a handler that hangs holds
it no longer than `wait`. The updates not yet taken wait in Telegram's queue, not in ours:
nothing is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections.abc import Awaitable
from typing import Any

from telegram._utils.types import ODVInput
from telegram.ext import SimpleUpdateProcessor
from telegram.request import BaseRequest, HTTPXRequest, RequestData

MAX_CONCURRENT_UPDATES = 256  # as PTB's `concurrent_updates(True)`
INTAKE_WAIT = 0.1  # seconds a poll waits, at most, for the updates before it


class _Hold:
    """One update's hold on its gate's next poll."""

    __slots__ = ("gate", "held")

    def __init__(self, gate: IntakeGate) -> None:
        self.gate = gate
        self.held = True


# The hold of the update that the current task handles (set by `IntakeGate.do_process_update`).
_HOLD: contextvars.ContextVar[_Hold | None] = contextvars.ContextVar("intake_hold", default=None)


class IntakeGate(SimpleUpdateProcessor):
    """PTB's update processor, counting the updates that hold the next poll, and that poll's gate."""

    __slots__ = ("_changed", "in_flight", "queue", "wait")

    def __init__(
        self,
        max_concurrent_updates: int = MAX_CONCURRENT_UPDATES,
        wait: float = INTAKE_WAIT,
    ) -> None:
        super().__init__(max_concurrent_updates)
        self.wait = wait
        self.in_flight = 0  # updates being handled that still hold the next poll
        self._changed = asyncio.Event()
        # The application's update queue (`ApplicationBuilder.update_queue`): the updates in it
        # are taken from Telegram but not yet handled.
        self.queue: asyncio.Queue[object] = asyncio.Queue()

    def idle(self) -> bool:
        return self.in_flight == 0 and self.queue.empty()

    async def do_process_update(self, update: object, coroutine: Awaitable[Any]) -> None:
        hold = _Hold(self)
        token = _HOLD.set(hold)
        self.in_flight += 1
        try:
            await coroutine  # in this task, so it sees the hold
        finally:
            _HOLD.reset(token)
            if hold.held:
                self._count_out()

    def let_go(self) -> None:
        """The update being handled stops holding the next poll: it waits on something slow."""
        hold = _HOLD.get()
        if hold is not None and hold.gate is self and hold.held:
            hold.held = False
            self._count_out()

    def _count_out(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._changed.set()

    async def opened(self) -> None:
        """Until every update taken is handled, or `wait` seconds have passed."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.wait):
                while not self.idle():
                    self._changed.clear()
                    await self._changed.wait()


class GatedPollRequest(HTTPXRequest):
    """PTB's own request for `getUpdates` (one long poll at a time), behind an `IntakeGate`."""

    __slots__ = ("failing_since", "gate")

    def __init__(self, gate: IntakeGate) -> None:
        super().__init__(connection_pool_size=1)  # what ApplicationBuilder gives getUpdates
        self.gate = gate
        # Since when every poll has failed (no answer, or not a 200), for /healthz; None while
        # the Bot API answers.
        self.failing_since: float | None = None

    async def do_request(
        self,
        url: str,
        method: str,
        request_data: RequestData | None = None,
        read_timeout: ODVInput[float] = BaseRequest.DEFAULT_NONE,
        write_timeout: ODVInput[float] = BaseRequest.DEFAULT_NONE,
        connect_timeout: ODVInput[float] = BaseRequest.DEFAULT_NONE,
        pool_timeout: ODVInput[float] = BaseRequest.DEFAULT_NONE,
    ) -> tuple[int, bytes]:
        await self.gate.opened()
        status = 0
        try:
            status, body = await super().do_request(
                url,
                method,
                request_data,
                read_timeout=read_timeout,
                write_timeout=write_timeout,
                connect_timeout=connect_timeout,
                pool_timeout=pool_timeout,
            )
            return status, body
        finally:
            if status == 200:
                self.failing_since = None
            elif self.failing_since is None:
                self.failing_since = time.monotonic()
