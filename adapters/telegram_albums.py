"""Telegram albums: the photos a user sends together reach the bot as one message each.

Telegram delivers an album (a media group) as separate messages sharing a `media_group_id`, the
caption on one of them. Read one by one, every other photo would get "add a caption" and the job
would see one reference of several; gathered here until no part has come for `ALBUM_WAIT`
seconds, the album is handled as its captioned message with the others' images along.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from telegram import Message

log = logging.getLogger("drawbridge.telegram")

ALBUM_WAIT = 0.8  # seconds without a new part before an album is complete
ALBUM_MAX = 10  # Telegram's most items in one media group

Handler = Callable[[Message, tuple[Message, ...]], Awaitable[None]]


class Albums:
    """Gathers the parts of each album, then hands `handle(lead, others)` the whole of it."""

    def __init__(self, handle: Handler, wait: float = ALBUM_WAIT) -> None:
        self._handle = handle
        self._wait = wait
        self._parts: dict[tuple[int, str], list[Message]] = {}
        self._timers: dict[tuple[int, str], asyncio.Task[None]] = {}

    def add(self, msg: Message) -> None:
        """One part of an album (`msg.media_group_id` is set): handled once the album is whole."""
        assert msg.media_group_id is not None
        key = (msg.chat.id, msg.media_group_id)
        parts = self._parts.setdefault(key, [])
        if len(parts) < ALBUM_MAX and all(p.message_id != msg.message_id for p in parts):
            parts.append(msg)
        timer = self._timers.get(key)
        if timer is not None:
            timer.cancel()
        self._timers[key] = asyncio.create_task(self._complete(key), name="telegram-album")

    async def _complete(self, key: tuple[int, str], wait: float | None = None) -> None:
        await asyncio.sleep(self._wait if wait is None else wait)
        self._timers.pop(key, None)
        parts = sorted(self._parts.pop(key, []), key=lambda m: m.message_id)
        if not parts:
            return
        # The caption is on one part (the first, as Telegram's apps send it).
        lead = next((p for p in parts if p.caption), parts[0])
        try:
            await self._handle(lead, tuple(p for p in parts if p is not lead))
        except Exception:
            log.exception("telegram: album %s in chat %s not handled", key[1], key[0])

    async def flush(self) -> None:
        """Handle every album still gathering now (the bot is stopping its intake)."""
        timers = list(self._timers.values())
        for timer in timers:
            timer.cancel()
        await asyncio.gather(*timers, return_exceptions=True)
        self._timers.clear()
        for key in list(self._parts):
            await self._complete(key, wait=0.0)
