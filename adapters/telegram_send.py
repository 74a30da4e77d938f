"""Every Bot API call the Telegram adapter makes: the send budget, migrated groups, retries.

Telegram's flood limits are one budget for acks, status edits and results (DESIGN rule 6). The
adapter's rate limiter, `telegram_budget.SendBudget`, admits calls by priority within it: every
call here says what it is for (a result, a reply, an ack, a final or a progress edit). A
*droppable* call (a progress edit, a chat action) is skipped when the budget has no room instead
of queueing in front of a result. Essential calls retry a 429 after its `retry_after` (through the
limiter); droppable calls never wait for one. With another PTB rate limiter (say `AIORateLimiter`)
the sender keeps its own picture of each chat's budget for those decisions.

The calls that post or edit a message go through PTB's `do_api_request` and hand back a `Sent`
(the message id and its chat) rather than a `telegram.Message`: the dedicated methods parse the
whole answer, the replied-to command and the photo sizes included, into PTB objects, which took
0.3–0.7 ms of the bot's one thread a call, a sixth of its CPU at load (`bench/e2e.py`), for the
two fields the adapter reads. Keyboards and reply parameters go as the Bot API's JSON, not as
PTB objects to build and turn back into JSON. PTB still builds, limits and checks each request.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, TypeVar

from telegram import (
    InputFile,
    InputMediaDocument,
    InputMediaPhoto,
)
from telegram.constants import ChatAction
from telegram.error import BadRequest, ChatMigrated, RetryAfter
from telegram.ext import ExtBot
from telegram.warnings import PTBUserWarning

from adapters.telegram_budget import Priority, SendBudget, Ticket, call_context
from bot.commands import whole_chars
from bot.jobs import Target

log = logging.getLogger("drawbridge.telegram")

T = TypeVar("T")
Buttons = tuple[tuple[str, str], ...]  # (label, callback_data), one row
ESSENTIAL_RETRIES = 3
TEXT_LIMIT = 4096
LEAN_METHODS = ("sendMessage", "sendPhoto", "sendDocument", "sendMediaGroup", "editMessageText")
# PTB points `do_api_request` callers at the dedicated method; these calls know it exists.
LEAN_WARNING = rf"Please use 'Bot\.({'|'.join(LEAN_METHODS)})'"
warnings.filterwarnings("ignore", LEAN_WARNING, PTBUserWarning)


def fit_text(text: str, limit: int = TEXT_LIMIT) -> str:
    """Cut `text` to `limit` UTF-16 code units (how Telegram counts), with an ellipsis."""
    if utf16_len(text) <= limit:
        return text
    return utf16_prefix(text, limit - 1) + "…"


def utf16_len(text: str) -> int:
    """Length as Telegram counts it: UTF-16 code units (two for an emoji)."""
    return len(text.encode("utf-16-le")) // 2


def utf16_prefix(text: str, units: int) -> str:
    """The longest start of `text` that is at most `units` UTF-16 code units long, ending on a
    whole character (`whole_chars`)."""
    used = 0
    for i, char in enumerate(text):
        used += 2 if ord(char) > 0xFFFF else 1
        if used > units:
            return text[: whole_chars(text, i)]
    return text


@dataclass(frozen=True, slots=True)
class Sent:
    """A message the bot posted: all the adapter needs of Telegram's answer."""

    message_id: int
    chat_id: int

    @classmethod
    def of(cls, result: Any) -> Sent:
        return cls(int(result["message_id"]), int(result["chat"]["id"]))


@dataclass(frozen=True, slots=True)
class Place:
    """A spot in a chat: the chat, its forum topic, and the message to reply to."""

    chat_id: int
    thread_id: int | None = None
    reply_to: int | None = None


def place_of(target: Target) -> Place:
    """Where a job's answers go, from its stored target."""

    def num(value: str | None) -> int | None:
        return int(value) if value else None

    return Place(int(target.chat_id), num(target.thread_id), num(target.reply_to))


def retry_seconds(exc: RetryAfter) -> float:
    """`retry_after` in seconds, whichever type this PTB version hands out."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PTB 22 warns that the type will become timedelta
        value: Any = exc.retry_after
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def not_modified(exc: BadRequest) -> bool:
    return "not modified" in exc.message.lower()


class Bucket:
    """A leaky bucket: `capacity` calls at once, refilled at `capacity / period` a second."""

    def __init__(self, capacity: float, period: float, clock: Callable[[], float]) -> None:
        self.capacity = capacity
        self.rate = capacity / period
        self.clock = clock
        self.level = 0.0
        self.stamp = clock()

    def room(self) -> float:
        now = self.clock()
        self.level = max(0.0, self.level - (now - self.stamp) * self.rate)
        self.stamp = now
        return self.capacity - self.level

    def spend(self) -> None:
        self.room()
        self.level += 1


class Sender:
    """Sends through PTB's bot, following migrated groups and keeping per-chat budgets."""

    # (capacity, period, calls kept free for results and acks) per kind of budget
    GROUP = (20.0, 60.0, 6.0)
    PRIVATE = (5.0, 5.0, 2.0)
    OVERALL = (30.0, 1.0, 10.0)

    def __init__(
        self,
        bot: ExtBot[Any],
        clock: Callable[[], float] = time.monotonic,
        budget: SendBudget | None = None,
    ) -> None:
        self.bot = bot
        self.clock = clock
        self.budget = budget
        self.migrated: dict[int, int] = {}
        self._buckets: dict[int, Bucket] = {}
        self._overall = Bucket(self.OVERALL[0], self.OVERALL[1], clock)

    # ---- budget ---------------------------------------------------------------------------

    def chat(self, chat_id: int) -> int:
        """Where a chat lives now (a group upgraded to a supergroup moves)."""
        return self.migrated.get(chat_id, chat_id)

    def _bucket(self, chat_id: int) -> Bucket:
        bucket = self._buckets.get(chat_id)
        if bucket is None:
            capacity, period, _ = self.GROUP if chat_id < 0 else self.PRIVATE
            bucket = self._buckets[chat_id] = Bucket(capacity, period, self.clock)
            if len(self._buckets) > 10_000:  # forget idle chats
                for key in [k for k, b in self._buckets.items() if b.room() >= b.capacity]:
                    del self._buckets[key]
                self._buckets[chat_id] = bucket
        return bucket

    def has_room(self, chat_id: int, priority: Priority = Priority.PROGRESS) -> bool:
        """Whether a deferrable call to this chat fits without delaying anything that matters."""
        chat = self.chat(chat_id)
        reserve = (self.GROUP if chat < 0 else self.PRIVATE)[2]
        if self._bucket(chat).room() <= reserve:
            return False
        if self.budget is not None:
            return self.budget.has_room(chat, priority)
        return self._overall.room() > self.OVERALL[2]

    async def call(
        self,
        chat_id: int,
        send: Callable[[int], Awaitable[T]],
        *,
        message: bool = True,
        priority: Priority = Priority.REPLY,
        ticket: Ticket | None = None,
    ) -> T:
        """Run `send(chat)` at `priority`, spending the chat's budget, following a migrated group.

        Calls that post no message (chat actions, deletes) are not held against a private chat,
        but PTB's limiter counts everything in a group, so there they are. A `ticket` lets the
        caller withdraw the call while it waits for the budget (`telegram_budget.Withdrawn`).
        """
        chat = self.chat(chat_id)
        if ticket is not None and self.budget is None:
            ticket.admitted = True  # another rate limiter: nothing can be withdrawn
        for _ in range(3):
            if message or chat < 0:
                self._bucket(chat).spend()
            self._overall.spend()
            try:
                with call_context(priority, ticket):
                    return await send(chat)
            except ChatMigrated as exc:
                log.info("chat %s moved to %s", chat, exc.new_chat_id)
                self.migrated[chat_id] = self.migrated[chat] = exc.new_chat_id
                chat = exc.new_chat_id
        raise BadRequest("the chat keeps migrating")

    # ---- calls ----------------------------------------------------------------------------

    @staticmethod
    def markup(buttons: Buttons) -> dict[str, Any] | None:
        """An inline keyboard of one row, as the Bot API's JSON (no PTB objects to build)."""
        if not buttons:
            return None
        return {
            "inline_keyboard": [[{"text": label, "callback_data": data} for label, data in buttons]]
        }

    @staticmethod
    def _reply(reply_to: int | None) -> dict[str, Any] | None:
        if reply_to is None:
            return None
        return {"message_id": reply_to, "allow_sending_without_reply": True}

    async def _api(self, method: str, params: dict[str, Any], retries: int | None) -> Any:
        """`method` through PTB (built, limited and checked as ever), its answer left as JSON.

        A forum topic deleted meanwhile ("message thread not found") does not silence the job:
        the message goes to the chat itself instead.
        """
        kwargs = {key: value for key, value in params.items() if value is not None}
        try:
            return await self.bot.do_api_request(method, kwargs, rate_limit_args=retries)
        except BadRequest as exc:
            if "message_thread_id" not in kwargs or "thread not found" not in exc.message.lower():
                raise
            log.info("chat %s: topic gone, %s goes to the chat", kwargs.get("chat_id"), method)
            del kwargs["message_thread_id"]
            return await self.bot.do_api_request(method, kwargs, rate_limit_args=retries)

    async def send_text(
        self,
        chat_id: int,
        text: str,
        *,
        thread_id: int | None = None,
        reply_to: int | None = None,
        buttons: Buttons = (),
        priority: Priority = Priority.REPLY,
        ticket: Ticket | None = None,
    ) -> Sent:
        result = await self.call(
            chat_id,
            lambda chat: self._api(
                "sendMessage",
                {
                    "chat_id": chat,
                    "text": text,
                    "message_thread_id": thread_id,
                    "reply_parameters": self._reply(reply_to),
                    "reply_markup": self.markup(buttons),
                },
                ESSENTIAL_RETRIES,
            ),
            priority=priority,
            ticket=ticket,
        )
        return Sent.of(result)

    async def edit_text(
        self,
        chat_id: int,
        message_id: int,
        text: str,
        buttons: Buttons,
        *,
        essential: bool,
        priority: Priority | None = None,
    ) -> None:
        """Edit a message's text; "message is not modified" counts as done.

        An essential edit retries a 429 and goes at `priority` (`REPLY` unless told); any other
        is a droppable progress edit.
        """
        retries = ESSENTIAL_RETRIES if essential else None
        if priority is None:
            priority = Priority.REPLY if essential else Priority.PROGRESS
        try:
            await self.call(
                chat_id,
                lambda chat: self._api(
                    "editMessageText",
                    {
                        "chat_id": chat,
                        "message_id": message_id,
                        "text": text,
                        "reply_markup": self.markup(buttons),
                    },
                    retries,
                ),
                priority=priority,
            )
        except BadRequest as exc:
            if not not_modified(exc):
                raise

    async def delete(self, chat_id: int, message_id: int) -> None:
        await self.call(
            chat_id, lambda chat: self.bot.delete_message(chat, message_id), message=False
        )

    async def chat_action(self, chat_id: int, thread_id: int | None) -> None:
        await self.call(
            chat_id,
            lambda chat: self.bot.send_chat_action(
                chat, ChatAction.UPLOAD_PHOTO, message_thread_id=thread_id
            ),
            message=False,
        )

    async def send_file(
        self,
        kind: Literal["photo", "document"],
        chat_id: int,
        data: bytes,
        filename: str,
        *,
        caption: str | None = None,
        thread_id: int | None = None,
        reply_to: int | None = None,
        buttons: Buttons = (),
    ) -> Sent:
        """One photo or document, uploaded as bytes; `caption` is Telegram HTML."""
        params: dict[str, Any] = {
            kind: InputFile(data, filename=filename),
            "caption": caption,
            "parse_mode": "HTML" if caption else None,
            "message_thread_id": thread_id,
            "reply_parameters": self._reply(reply_to),
            "reply_markup": self.markup(buttons),
        }
        method = "sendPhoto" if kind == "photo" else "sendDocument"
        result = await self.call(
            chat_id,
            lambda chat: self._api(method, {"chat_id": chat, **params}, ESSENTIAL_RETRIES),
            priority=Priority.RESULT,
        )
        return Sent.of(result)

    async def send_album(
        self,
        kind: Literal["photo", "document"],
        chat_id: int,
        files: Sequence[tuple[bytes, str]],
        *,
        caption: str | None = None,
        thread_id: int | None = None,
        reply_to: int | None = None,
    ) -> list[Sent]:
        """2–10 photos or documents as one album; the caption goes on the first item."""
        media: list[InputMediaPhoto | InputMediaDocument] = []
        for i, (data, filename) in enumerate(files):
            text = caption if i == 0 else None
            parse_mode = "HTML" if text else None
            if kind == "photo":
                media.append(
                    InputMediaPhoto(data, caption=text, parse_mode=parse_mode, filename=filename)
                )
            else:
                media.append(
                    InputMediaDocument(data, caption=text, parse_mode=parse_mode, filename=filename)
                )
        result = await self.call(
            chat_id,
            lambda chat: self._api(
                "sendMediaGroup",
                {
                    "chat_id": chat,
                    "media": media,
                    "message_thread_id": thread_id,
                    "reply_parameters": self._reply(reply_to),
                },
                ESSENTIAL_RETRIES,
            ),
            priority=Priority.RESULT,
        )
        return [Sent.of(item) for item in result]
