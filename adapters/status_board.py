"""Coalesced status edits: per message, only the newest text is sent, at most once per interval.

A platform's edit budget is shared with results, so a progress edit that is overtaken by a newer
one is dropped rather than queued, and a final state (done, failed, cancelled) is sent at once and
ends that message's line. Platform-free: the adapter passes the coroutine that does the edit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger("drawbridge.status")

T = TypeVar("T")


@dataclass
class _Slot(Generic[T]):
    pending: T | None = None
    final: bool = False
    next_at: float = 0.0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class StatusBoard(Generic[T]):
    """Sends `send(key, value)` for the latest value pushed under each key, spaced by `interval`.

    A key's slot lives until its final value is sent, so the spacing holds between bursts.
    """

    def __init__(
        self,
        send: Callable[[str, T], Awaitable[None]],
        interval: float = 1.0,
        first_delay: float = 0.0,
    ) -> None:
        self._send = send
        self._interval = interval
        self._first_delay = first_delay
        self._slots: dict[str, _Slot[T]] = {}

    def push(self, key: str, value: T, *, final: bool = False) -> None:
        """Replace what is waiting under `key`; a final value is never replaced by a later one."""
        slot = self._slots.get(key)
        if slot is None:
            # A message's first edit waits a moment, so "queued" and an immediate "started"
            # (or a fast job's "done") cost one call, not two.
            slot = self._slots[key] = _Slot(
                next_at=asyncio.get_running_loop().time() + self._first_delay
            )
        elif slot.final:
            return
        slot.pending, slot.final = value, final
        if final:
            slot.wake.set()
        if slot.task is None:
            slot.task = asyncio.create_task(self._run(key, slot), name=f"status-{key}")

    def pending(self, key: str) -> bool:
        return key in self._slots

    async def _run(self, key: str, slot: _Slot[T]) -> None:
        loop = asyncio.get_running_loop()
        try:
            while slot.pending is not None:
                wait = slot.next_at - loop.time()
                if wait > 0 and not slot.final:
                    slot.wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(slot.wake.wait(), wait)
                value, final = slot.pending, slot.final
                if value is None:
                    break
                slot.pending = None
                try:
                    await self._send(key, value)
                except Exception:
                    log.warning("status edit for %s failed", key, exc_info=True)
                slot.next_at = loop.time() + self._interval
                if final:
                    break
        finally:
            slot.task = None
            if slot.final:
                self._slots.pop(key, None)

    async def close(self, grace: float = 2.0) -> None:
        """Give pending sends `grace` seconds to go out (final ones at once), then stop them."""
        tasks = [s.task for s in self._slots.values() if s.task is not None]
        for slot in self._slots.values():
            slot.wake.set()
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        self._slots.clear()
