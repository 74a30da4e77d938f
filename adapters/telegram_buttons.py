"""The buttons under Telegram results and status messages; they work after a restart.

A button's callback data is an action and a job id (`rr:ab12cd34ef`), so pressing it needs
nothing remembered in memory: the job comes from the database. A button acts only in the chat
of its job, or for the job's owner, so forged callback data cannot reach other chats' jobs.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from telegram import CallbackQuery, Message
from telegram.error import TelegramError

from adapters.telegram_delivery import delivery_error
from adapters.telegram_send import Buttons, Place, place_of
from bot.errors import JobNotFound, UserError
from bot.jobs import Job, Target, UserRef
from bot.texts import pick_lang, queued_text, render_error, t

if TYPE_CHECKING:
    from adapters.telegram_adapter import TelegramAdapter

log = logging.getLogger("drawbridge.telegram")

ORIGINALS_RESEND_AFTER = 600.0  # seconds before 📎 sends the same files to a chat again


def cancel_button(job_id: str, lang: str) -> Buttons:
    return ((t(lang, "button.cancel"), f"cx:{job_id}"),)


async def _answer(query: CallbackQuery, text: str | None = None, *, alert: bool = False) -> None:
    """Answer a button press; a press too old to answer is not worth an error."""
    try:
        await query.answer(text[:200] if text else None, show_alert=alert)
    except TelegramError as exc:
        log.info("button press not answered: %s", exc.message)


class ButtonPresses:
    """Handles button presses for one adapter."""

    def __init__(self, adapter: TelegramAdapter) -> None:
        self.adapter = adapter
        self._originals: dict[tuple[int, str], float] = {}

    async def handle(self, query: CallbackQuery) -> None:
        """Answer one press: `cx:` cancel, `rr:` reroll, `of:` original file."""
        if not query.data:
            await _answer(query)  # (a game button's press): still stop the client's spinner
            return
        lang = pick_lang(query.from_user.language_code)
        user = UserRef("telegram", str(query.from_user.id))
        action, _, job_id = query.data.partition(":")
        try:
            if action == "cx":
                job = await self.adapter.engine.cancel(user, job_id)
                await _answer(query, t(lang, "cancel.done", job=job.id))
            elif action == "rr":
                await self._reroll(query, user, job_id, lang)
            elif action == "of":
                await self._send_originals(query, user, job_id, lang)
            else:
                await _answer(query)
        except UserError as exc:
            await _answer(query, render_error(lang, exc), alert=True)

    async def _button_job(self, query: CallbackQuery, user: UserRef, job_id: str) -> Job:
        """The job a button names, if the button is in that job's chat or the user owns it."""
        job = await self.adapter.engine.store.get_job(job_id)
        message = query.message
        chat = message.chat.id if message is not None else None
        if job is None or job.target.platform != self.adapter.platform:
            raise JobNotFound(job=job_id)
        home = int(job.target.chat_id)
        if job.user != user and chat not in (home, self.adapter.sender.chat(home)):
            raise JobNotFound(job=job_id)
        return job

    def _button_place(self, query: CallbackQuery, job: Job) -> Place:
        message = query.message
        if isinstance(message, Message):
            thread = message.message_thread_id if message.is_topic_message else None
            return Place(message.chat.id, thread, message.message_id)
        return place_of(job.target)

    async def _reroll(self, query: CallbackQuery, user: UserRef, job_id: str, lang: str) -> None:
        job = await self._button_job(query, user, job_id)
        place = self._button_place(query, job)
        target = Target(
            "telegram",
            chat_id=str(place.chat_id),
            thread_id=str(place.thread_id) if place.thread_id else None,
            reply_to=str(place.reply_to) if place.reply_to else None,
        )
        ticket = await self.adapter.engine.reroll(user, job.id, target, lang)
        await _answer(query, t(lang, "button.rerolled", job=ticket.job_id))
        text = queued_text(
            lang, ticket.job_id, ticket.position, ticket.model, ticket.n_images, ticket.reserved_usd
        )
        self.adapter.board.show(
            ticket.job_id, place, text, cancel_button(ticket.job_id, lang), initial=True
        )

    async def _send_originals(
        self, query: CallbackQuery, user: UserRef, job_id: str, lang: str
    ) -> None:
        self.adapter.engine.refuse_banned(user)
        job = await self._button_job(query, user, job_id)
        place = self._button_place(query, job)
        key = (place.chat_id, job.id)
        now = self.adapter.clock()
        if now - self._originals.get(key, float("-inf")) < ORIGINALS_RESEND_AFTER:
            await _answer(query, t(lang, "original.already_sent"))
            return
        images = await self.adapter.engine.store.images_for(job.id)
        if not images:  # deleted after IMAGE_RETENTION_DAYS, as /show says
            raise UserError("error.no_images", job=job.id)
        self._originals = {
            k: v for k, v in self._originals.items() if now - v < ORIGINALS_RESEND_AFTER
        }
        self._originals[key] = now
        await _answer(query)
        try:
            await self.adapter.delivery.originals(images, place)
        except (TelegramError, OSError) as exc:
            self._originals.pop(key, None)
            log.info(
                "job=%s: originals not sent: %s",
                job.id,
                delivery_error(exc) if isinstance(exc, TelegramError) else exc,
            )
            # The press was answered already: the chat hears why nothing came.
            why = "error.no_images" if isinstance(exc, OSError) else "original.failed"
            self.adapter.board.reply(place, t(lang, why, job=job.id), lang, str(user))
