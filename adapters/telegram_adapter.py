"""The Telegram adapter: python-telegram-bot 22 in our event loop, turning chats into engine calls.

Input rules: in a private chat plain text is a prompt; in groups `/imagine`, a mention of the bot
or a reply to the bot; forum topics keep their thread; a photo with a caption, or `/imagine`
replying to a photo, makes that photo a reference image (`telegram_input`). Long polling by
default, or webhook updates fed through `process_webhook_update`. `telegram_status` shows what a
job is doing, `telegram_delivery` posts results, `telegram_buttons` answers their buttons, and
every call goes through `telegram_send`, which keeps the chats' send budgets.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from datetime import timedelta
from functools import partial
from typing import Any

# PTB 22 warns on every RetryAfter unless durations are timedeltas; our code takes either.
os.environ.setdefault("PTB_TIMEDELTA", "true")

from telegram import BotCommand, Message, Update
from telegram.constants import ChatType, UpdateType
from telegram.error import Conflict, InvalidToken, NetworkError, TelegramError
from telegram.ext import (
    Application,
    ApplicationBuilder,
    BaseRateLimiter,
    CallbackQueryHandler,
    ContextTypes,
    MessageHandler,
    filters,
)

from adapters.telegram_albums import Albums
from adapters.telegram_budget import PaidLane, SendBudget
from adapters.telegram_buttons import ButtonPresses, cancel_button
from adapters.telegram_delivery import Delivery, reroll_button
from adapters.telegram_http import AiohttpRequest
from adapters.telegram_input import AskKind, fetch_reference, read_message
from adapters.telegram_intake import INTAKE_WAIT, GatedPollRequest, IntakeGate
from adapters.telegram_send import Buttons, Sender, place_of
from adapters.telegram_status import ChatStatus
from bot.adapter import StatusKind, StatusUpdate, ended_without_result
from bot.chat import Chat
from bot.commands import escape_html, parse_prompt
from bot.engine import Engine
from bot.errors import SettingsError, UserError
from bot.jobs import Job, StoredImage, Target, UserRef
from bot.texts import pick_lang, render_error, t

log = logging.getLogger("drawbridge.telegram")

ALLOWED_UPDATES = [UpdateType.MESSAGE, UpdateType.CALLBACK_QUERY]
MENU = ("imagine", "usage", "jobs", "cancel", "models", "settings", "help")
REFERENCE_MAX_BYTES = 10_000_000


def job_message_id(job: Job) -> int | None:
    return int(job.status_message_id) if job.status_message_id else None


REPLAY_CHECKS = 100  # getUpdates' limit: the most updates one poll takes
POLL_WARN_EVERY = 60.0  # seconds between warnings of the same kind of failed poll
POLL_UNWELL_AFTER = 5.0  # seconds of failing polls before /healthz says so
UPDATER_STOP_TIMEOUT = 2.0  # seconds PTB's updater may take to stop (its last poll)
WEBHOOK_SEEN = 10_000  # webhook update ids remembered, so that one Telegram sends again is dropped


def derived_secret(token: str) -> str:
    """A webhook secret for a bot whose operator set none: from the token, stable across starts."""
    return hashlib.sha256(b"drawbridge telegram webhook\0" + token.encode()).hexdigest()


class TelegramAdapter:
    """Telegram as the engine's adapter and as one of the app's services."""

    platform = "telegram"
    confirms_told = True  # the status board says when a job's outcome is out (`ChatStatus.told`)

    def __init__(
        self,
        engine: Engine,
        token: str,
        api_url: str = "https://api.telegram.org",
        *,
        poll_timeout: float = 10,
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
        edit_interval: float = 3.0,
        action_interval: float = 4.5,
        reference_max_bytes: int = REFERENCE_MAX_BYTES,
        rate_limiter: BaseRateLimiter[Any] | None = None,
        paid_broadcast_stars: float = 0.0,
        intake_wait: float = INTAKE_WAIT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.chat = Chat(engine)
        self.poll_timeout = poll_timeout
        self.webhook_url = webhook_url
        # Never a webhook anyone can post to: without TELEGRAM_WEBHOOK_SECRET the secret is
        # derived from the token (which only Telegram and this bot know), so a forged update,
        # an "admin" command from anyone, is refused all the same.
        self.webhook_secret = webhook_secret or derived_secret(token)
        self.reference_max_bytes = reference_max_bytes
        self.clock = clock
        # Messages sent before this process started may have been taken by the one before it:
        # Telegram sends an update again until a poll's offset confirms it (PTB keeps the
        # offset in memory only), so a bot killed in between would see those commands twice.
        # Only the last batch it took can come again (the intake gate holds the next poll until
        # a batch is handled), at most a poll's 100 updates, and they come first: so many
        # prompts and commands are looked up among the messages the last day's jobs and
        # changes (a /grant, a /link) came from (read at `open`, then let go), with no wait
        # for the database.
        self.started_at = time.time()
        self._replay_checks = REPLAY_CHECKS
        self._taken: set[tuple[str, str, str]] | None = None
        self._poll_warned: dict[str, float] = {}  # kind of failed poll → when it was last said
        # Telegram sends a webhook update again when our 200 did not reach it in time (a slow
        # or cut response): the same update id, the same paid /imagine. The last ones taken.
        self._webhook_seen: OrderedDict[int, None] = OrderedDict()
        self.errors: deque[BaseException] = deque(maxlen=100)  # handler errors, for tests
        self.api_url = api_url = api_url.rstrip("/")
        if rate_limiter is None:
            rate_limiter = SendBudget(paid=self._paid_lane(paid_broadcast_stars))
        budget = rate_limiter if isinstance(rate_limiter, SendBudget) else None
        self.paid_lane = budget.paid if budget is not None else None
        self.intake = IntakeGate(wait=intake_wait)
        self.polls = GatedPollRequest(self.intake)
        self.albums = Albums(self._handle)
        builder = (
            ApplicationBuilder()
            .token(token)
            .base_url(f"{api_url}/bot")
            .base_file_url(f"{api_url}/file/bot")
            .request(AiohttpRequest())
            .get_updates_request(self.polls)
            .update_queue(self.intake.queue)
            .rate_limiter(rate_limiter)
            .concurrent_updates(self.intake)
        )
        if webhook_url:
            builder = builder.updater(None)
        self.app: Application[Any, Any, Any, Any, Any, Any] = builder.build()
        self.app.add_handler(MessageHandler(filters.UpdateType.MESSAGE, self._on_message))
        self.app.add_handler(CallbackQueryHandler(self._on_callback))
        self.app.add_error_handler(self._on_error)
        self.sender = Sender(self.app.bot, clock, budget)
        self.board = ChatStatus(
            self.sender,
            self.engine.attach_status_message,
            edit_interval=edit_interval,
            action_interval=action_interval,
            clock=clock,
            told=self.engine.job_told,
        )
        self.delivery = Delivery(self.sender, self.engine.store.read_images)
        self.buttons = ButtonPresses(self)

    def _paid_lane(self, stars_per_day: float) -> PaidLane | None:
        """The operator's paid broadcasts (`TELEGRAM_PAID_BROADCAST_STARS`), counted and alerted."""
        if stars_per_day <= 0:
            return None
        engine = self.engine
        counter = engine.metrics.paid_messages.labels("telegram")

        def on_event(kind: str) -> None:
            log.warning("telegram paid broadcasts: %s", kind)
            key = "alert.paid_exhausted" if kind == "exhausted" else "alert.paid_refused"
            engine.alert(f"telegram-paid:{kind}", key, stars=f"{stars_per_day:g}")  # once a day

        def on_used(day: str, messages: int) -> None:
            engine.store.add_paid_messages("telegram", day, messages)

        return PaidLane(
            stars_per_day,
            today=engine.quotas.today,
            on_spent=counter.inc,
            on_event=on_event,
            on_used=on_used,
        )

    # ---- service lifecycle ----------------------------------------------------------------

    async def open(self) -> None:
        """Check the token (getMe) and register with the engine, so deliveries can resume."""
        try:
            await self.app.initialize()
        except InvalidToken:
            await self.app.bot.shutdown()  # its HTTP clients were opened before getMe failed
            # PTB's message carries the token: never pass it on.
            raise SettingsError("TELEGRAM_BOT_TOKEN: Telegram rejected the token") from None
        except TelegramError as exc:
            await self.app.bot.shutdown()
            raise SettingsError(
                f"TELEGRAM_API_URL: the Bot API at {self.api_url} did not answer getMe "
                f"({type(exc).__name__})"
            ) from None
        self._taken = await self.engine.store.handled_messages(
            self.platform,
            self.engine.clock() - 86400,  # Telegram keeps an update for 24 hours
        )
        if self.paid_lane is not None:  # today's paid messages, as counted before a restart
            day = self.engine.quotas.today()
            self.paid_lane.resume(day, await self.engine.store.paid_messages("telegram", day))
        self.engine.register(self)

    async def start(self) -> None:
        await self._set_commands()
        await self.app.start()
        if self.webhook_url:
            await self.app.bot.set_webhook(
                self.webhook_url, secret_token=self.webhook_secret, allowed_updates=ALLOWED_UPDATES
            )
        elif self.app.updater is not None:
            await self.app.updater.start_polling(
                timeout=timedelta(seconds=self.poll_timeout),
                allowed_updates=ALLOWED_UPDATES,
                error_callback=self._poll_failed,
            )
        me = self.app.bot
        log.info(
            "telegram: serving as @%s (%s)",
            me.username,
            "webhook" if self.webhook_url else "polling",
        )

    def _poll_failed(self, exc: TelegramError) -> None:
        """A failed getUpdates, which PTB retries: one plain line a minute for each kind, not
        PTB's traceback on every retry."""
        if isinstance(exc, Conflict):
            kind, text = "conflict", "another process is polling this bot's token (409 Conflict)"
        elif isinstance(exc, NetworkError):
            kind, text = "network", f"the Bot API did not answer a poll ({exc.message})"
        else:
            kind, text = "other", f"a poll failed ({type(exc).__name__}: {exc.message})"
        now = time.monotonic()
        if now - self._poll_warned.get(kind, -math.inf) >= POLL_WARN_EVERY:
            self._poll_warned[kind] = now
            log.warning("telegram: %s; polling again", text)

    def healthy(self) -> bool:
        """For /healthz: taking updates (the webhook route is live, or polling, and the polls
        not failing for POLL_UNWELL_AFTER: PTB's updater runs on through any outage)."""
        if not self.app.running:
            return False
        if self.webhook_url:
            return True
        if not (self.app.updater and self.app.updater.running):
            return False
        since = self.polls.failing_since
        return since is None or time.monotonic() - since < POLL_UNWELL_AFTER

    async def stop_intake(self) -> None:
        if self.app.updater is not None and self.app.updater.running:
            # PTB's stop ends with one more getUpdates, to confirm the last updates taken; a
            # Bot API that hangs held the whole stop for its read timeout. Cut short, those
            # updates come again at the next start, which knows them (`_replayed`).
            try:
                async with asyncio.timeout(UPDATER_STOP_TIMEOUT):
                    await self.app.updater.stop()
            except TimeoutError:
                log.warning("telegram: the Bot API did not answer the last poll; stopping anyway")
        if self.app.running:
            await self.app.stop()
        await self.albums.flush()  # the albums whose parts all came before the intake stopped

    async def close(self) -> None:
        await self.board.close()
        await self.app.shutdown()

    @property
    def taking_updates(self) -> bool:
        """Whether an update fed now is handled (not once the intake has stopped)."""
        return self.app.running

    async def process_webhook_update(self, payload: object) -> bool:
        """Feed one update from a webhook request (the route has checked the secret); False,
        and nothing fed, for a body that is not an update."""
        if not isinstance(payload, dict) or not isinstance(payload.get("update_id"), int):
            log.warning("telegram: a webhook request that is not an update was refused")
            return False
        update_id = payload["update_id"]
        if update_id in self._webhook_seen:
            log.info("telegram: webhook update %s came again; taken once", update_id)
            return True  # (a 200, so that Telegram stops sending it)
        try:
            update = Update.de_json(payload, self.app.bot)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("telegram: a webhook update PTB could not read (%s)", type(exc).__name__)
            return False
        self._webhook_seen[update_id] = None
        if len(self._webhook_seen) > WEBHOOK_SEEN:
            self._webhook_seen.popitem(last=False)
        await self.app.update_queue.put(update)
        return True

    def webhook_secret_ok(self, header: str | None) -> bool:
        """Whether `X-Telegram-Bot-Api-Secret-Token` matches the webhook's secret."""
        # As bytes: on text, `compare_digest` raises for anything not ASCII (a 500 to anyone).
        return header is not None and hmac.compare_digest(
            header.encode(errors="surrogateescape"), self.webhook_secret.encode()
        )

    async def _set_commands(self) -> None:
        for lang, code in (("en", None), ("zh", "zh")):
            commands = [BotCommand(name, t(lang, f"menu.{name}")) for name in MENU]
            try:
                await self.app.bot.set_my_commands(commands, language_code=code)
            except TelegramError as exc:
                log.warning("telegram: command menu (%s) not set: %s", lang, exc.message)

    # ---- the engine's side ----------------------------------------------------------------

    async def deliver(self, job: Job, images: Sequence[StoredImage]) -> str:
        self.board.stop_typing(job.id)
        place = place_of(job.target)
        ids = await self.delivery.deliver(job, images, place)
        self.show_delivered(job)
        return ",".join(str(i) for i in ids)

    def show_delivered(self, job: Job) -> None:
        """The job's status message says "done" (after its result, or again after a restart)."""
        done = t(job.lang, "status.delivered", job=job.id)
        self.board.delivered(job.id, place_of(job.target), done, job_message_id(job))

    async def status(self, job: Job, update: StatusUpdate) -> None:
        place = place_of(job.target)
        active = update.kind in (StatusKind.QUEUED, StatusKind.STARTED, StatusKind.PROGRESS)
        if update.kind in (StatusKind.STARTED, StatusKind.PROGRESS):
            self.board.typing(job.id, place)
        else:
            self.board.stop_typing(job.id)
        if active:
            buttons = self._cancel_button(job.id, job.lang)
        elif ended_without_result(job, update):
            buttons = reroll_button(job.id, job.lang)  # try again without typing it all again
        else:
            buttons = ()
        self.board.show(
            job.id,
            place,
            update.text,
            buttons,
            droppable=update.kind in (StatusKind.STARTED, StatusKind.PROGRESS),
            final=update.kind.final,
            message_id=job_message_id(job),
        )

    async def notify(self, target: Target, text: str) -> None:
        self.board.reply(place_of(target), text, "en")

    @staticmethod
    def _cancel_button(job_id: str, lang: str) -> Buttons:
        return cancel_button(job_id, lang)

    # ---- messages -------------------------------------------------------------------------

    async def _on_message(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        msg = update.message
        if msg is None or msg.is_automatic_forward:  # (a linked channel's post, copied in)
            return
        if _speaker(msg) is None:
            return
        # The group became a supergroup (Telegram says so in both): follow it from now on, its
        # policy and its place in ALLOWED_IDS too.
        moved = (
            (msg.chat.id, msg.migrate_to_chat_id)
            if msg.migrate_to_chat_id
            else (msg.migrate_from_chat_id, msg.chat.id)
            if msg.migrate_from_chat_id
            else None
        )
        if moved is not None:
            old, new = moved
            self.sender.migrated[old] = new
            await self.engine.chat_moved(self.platform, str(old), str(new))
            return
        if msg.media_group_id is not None and msg.forward_origin is None:
            self.albums.add(msg)  # handled as one message once all its parts have come
            return
        await self._handle(msg)

    async def _handle(self, msg: Message, others: tuple[Message, ...] = ()) -> None:
        """Answer one message (with `others`, the rest of its album)."""
        speaker = _speaker(msg)
        if speaker is None:
            return
        identity, lang_code = speaker
        bot = self.app.bot
        ask = read_message(msg, bot.username or "", bot.id)
        if ask.kind is AskKind.IGNORE:
            return
        lang = pick_lang(lang_code)
        user = UserRef("telegram", identity)
        thread = msg.message_thread_id if msg.is_topic_message else None
        target = Target(
            "telegram",
            chat_id=str(msg.chat.id),
            thread_id=str(thread) if thread else None,
            reply_to=str(msg.message_id),
        )
        place = place_of(target)
        if ask.kind is not AskKind.HINT and self._replayed(msg, user, target):
            return
        try:
            if ask.kind is AskKind.HINT:
                self.board.reply(place, t(lang, ask.text), lang, str(user))
            elif ask.kind is AskKind.COMMAND:
                private = msg.chat.type == ChatType.PRIVATE
                reply = await self.chat.handle(
                    user, target, ask.text, lang=lang, private=private, bot_username=bot.username
                )
                if reply is not None and reply.document is not None:  # /export
                    name, data = reply.document
                    self.intake.let_go()  # an upload: the next poll need not wait for it
                    await self.sender.send_file(
                        "document",
                        place.chat_id,
                        data,
                        name,
                        caption=escape_html(reply.text),
                        thread_id=place.thread_id,
                        reply_to=place.reply_to,
                    )
                elif reply is not None:
                    self.board.reply(place, reply.text, lang, str(user))
            else:
                await self._imagine(msg, user, target, ask.text, lang, others)
        except Exception:
            self.board.reply(place, t(lang, "error.generic"), lang, str(user))  # never silence
            raise

    def _replayed(self, msg: Message, user: UserRef, target: Target) -> bool:
        """Whether a process before this one took this message (see `started_at`).

        (Dates are whole seconds, so the first second's messages are checked too: a restart
        can be that quick.)
        """
        taken = self._taken
        if taken is None or msg.date.timestamp() >= self.started_at:
            return False
        self._replay_checks -= 1
        if self._replay_checks <= 0:
            self._taken = None  # past the replays: the memory goes
        if (str(user), target.chat_id, str(target.reply_to)) in taken:
            log.info("telegram: message %s was handled before a restart", msg.id)
            return True
        return False

    async def _imagine(
        self,
        msg: Message,
        user: UserRef,
        target: Target,
        prompt: str,
        lang: str,
        others: tuple[Message, ...] = (),
    ) -> None:
        place = place_of(target)
        try:
            self.chat.admit(user, target)  # before any fetch
            parsed = parse_prompt(prompt, max_chars=self.engine.config.max_prompt_chars)
            refs = await fetch_reference(
                self.app.bot,
                msg,
                self.reference_max_bytes,
                allow=partial(self.engine.refuse_references, parsed.model),
                before_download=self.intake.let_go,
                others=others,
            )
        except UserError as exc:
            self.board.reply(place, render_error(lang, exc), lang, str(user))
            return
        reply = await self.chat.imagine(user, target, prompt, lang, refs)
        if reply.ticket is None:
            self.board.reply(place, reply.text, lang, str(user))
            return
        job_id = reply.ticket.job_id
        self.board.show(job_id, place, reply.text, self._cancel_button(job_id, lang), initial=True)

    async def _on_callback(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        if update.callback_query is not None:
            await self.buttons.handle(update.callback_query)

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        error = context.error
        if error is not None:
            self.errors.append(error)
            log.error("telegram: update failed", exc_info=error)


def _speaker(msg: Message) -> tuple[str, str | None] | None:
    """Who asks (an id and their language code), or None for a bot or nobody.

    An anonymous group admin (from @GroupAnonymousBot) or a member posting as a channel: the
    chat they speak as is who asks, with its own quota.
    """
    if msg.sender_chat is not None:
        return str(msg.sender_chat.id), None
    sender = msg.from_user
    if sender is None or sender.is_bot:
        return None
    return str(sender.id), sender.language_code
