"""Posting a finished job to Telegram: photo, album or document, caption and buttons.

Images go up as bytes. One image is a photo replying to the command, with the caption and the
buttons; several are an album (which can carry no buttons) followed by a short message that
does. An image over Telegram's photo limits (10 MB, width + height > 10000, ratio > 20), or one
Telegram refuses as a photo, goes as a document instead.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal

from telegram.error import BadRequest, Forbidden, NetworkError, TelegramError

from adapters.telegram_budget import Priority
from adapters.telegram_send import Buttons, Place, Sender, Sent, fit_text, utf16_len, utf16_prefix
from bot.commands import escape_html
from bot.errors import DeliveryError
from bot.jobs import Job, StoredImage
from bot.texts import t

log = logging.getLogger("drawbridge.telegram")

CAPTION_LIMIT = 1024
PHOTO_MAX_BYTES = 10_000_000
PHOTO_MAX_SIDES = 10_000
PHOTO_MAX_RATIO = 20.0
ALBUM_MAX = 10


def fits_photo(image: StoredImage) -> bool:
    """Whether Telegram takes this image as a photo (else it goes as a document)."""
    w, h = max(1, image.width), max(1, image.height)
    return (
        image.size_bytes <= PHOTO_MAX_BYTES
        and w + h <= PHOTO_MAX_SIDES
        and max(w / h, h / w) <= PHOTO_MAX_RATIO
    )


def too_large(exc: TelegramError) -> bool:
    """Telegram's front end refused the body (HTTP 413, an HTML page PTB reports as a
    NetworkError): the same upload is refused again."""
    return isinstance(exc, NetworkError) and "(413)" in exc.message


def _refused_as_photo(exc: TelegramError) -> bool:
    if too_large(exc):
        return True  # a photo's limits are the tighter: a document may pass
    if not isinstance(exc, BadRequest):
        return False
    text = exc.message.upper()
    return any(k in text for k in ("PHOTO", "IMAGE_PROCESS", "TOO BIG", "DIMENSIONS"))


def caption_for(job: Job) -> str:
    """The result caption as Telegram HTML: the prompt escaped and cut so the whole fits 1024.

    Telegram counts the caption after parsing, in UTF-16 units: the escapes cost nothing, and
    an emoji costs two, so the prompt keeps the code points whose running count fits."""
    key = "caption.random" if job.options.seed is None else "caption"

    def render(prompt: str) -> str:
        return t(job.lang, key, prompt=prompt, model=job.model, seed=job.options.seed, job=job.id)

    text = render(job.prompt)
    if utf16_len(text) > CAPTION_LIMIT:
        room = CAPTION_LIMIT - utf16_len(render("")) - utf16_len("…")
        text = render(utf16_prefix(job.prompt, room).rstrip() + "…")
    return escape_html(text)


def reroll_button(job_id: str, lang: str) -> Buttons:
    """🔄 under a result, or under a job that ended without one (a new try, a new seed)."""
    return ((t(lang, "button.reroll"), f"rr:{job_id}"),)


def result_buttons(job: Job) -> Buttons:
    return (*reroll_button(job.id, job.lang), (t(job.lang, "button.original"), f"of:{job.id}"))


def filename(image: StoredImage) -> str:
    return f"{image.job_id}-{image.index + 1}{image.path.suffix or '.png'}"


Reader = Callable[[Sequence[StoredImage]], Awaitable[list[bytes]]]


def delivery_error(exc: TelegramError) -> DeliveryError:
    """Forbidden (blocked, kicked) and bad requests are permanent; 429s and timeouts are not."""
    permanent = isinstance(exc, Forbidden | BadRequest) or too_large(exc)
    return DeliveryError(f"telegram: {exc.message}", permanent=permanent)


class Delivery:
    """Sends results and original files for the adapter."""

    def __init__(self, sender: Sender, read: Reader) -> None:
        self.sender = sender
        self._read = read  # the store's `read_images`: off the loop, its hops shared

    async def deliver(self, job: Job, images: Sequence[StoredImage], place: Place) -> list[int]:
        """Post the result; the ids of the messages that carry it. Raises `DeliveryError`."""
        if not images:
            raise DeliveryError("no images to deliver", permanent=True)
        try:
            datas = await self._read(images)
        except OSError as exc:
            raise DeliveryError(f"stored image unreadable: {exc}", permanent=True) from None
        caption = caption_for(job)
        buttons = result_buttons(job)
        try:
            if len(images) == 1:
                kind: Literal["photo", "document"] = (
                    "photo" if fits_photo(images[0]) else "document"
                )
                message = await self._single(kind, images[0], datas[0], place, caption, buttons)
                return [message.message_id]
            kind = "photo" if all(fits_photo(i) for i in images) else "document"
            ids = await self._albums(kind, images, datas, place, caption)
        except TelegramError as exc:
            raise delivery_error(exc) from None
        text = t(job.lang, "result.album", n=len(images), model=job.model, job=job.id)
        try:
            message = await self.sender.send_text(
                place.chat_id,
                fit_text(text),
                thread_id=place.thread_id,
                reply_to=ids[0],
                buttons=buttons,
                priority=Priority.RESULT,
            )
            ids.append(message.message_id)
        except TelegramError as exc:  # the images are out; the buttons are a convenience
            log.warning("job=%s: buttons message not sent: %s", job.id, exc.message)
        return ids

    async def originals(self, images: Sequence[StoredImage], place: Place) -> list[int]:
        """The full-quality files as documents (the 📎 button)."""
        datas = await self._read(images)
        if len(images) == 1:
            message = await self._single("document", images[0], datas[0], place, None, ())
            return [message.message_id]
        return await self._albums("document", images, datas, place, None)

    async def _single(
        self,
        kind: Literal["photo", "document"],
        image: StoredImage,
        data: bytes,
        place: Place,
        caption: str | None,
        buttons: Buttons,
    ) -> Sent:
        try:
            return await self.sender.send_file(
                kind,
                place.chat_id,
                data,
                filename(image),
                caption=caption,
                thread_id=place.thread_id,
                reply_to=place.reply_to,
                buttons=buttons,
            )
        except (BadRequest, NetworkError) as exc:
            if kind != "photo" or not _refused_as_photo(exc):
                raise
            log.info("job=%s: photo refused (%s), sending a document", image.job_id, exc.message)
            return await self._single("document", image, data, place, caption, buttons)

    async def _albums(
        self,
        kind: Literal["photo", "document"],
        images: Sequence[StoredImage],
        datas: Sequence[bytes],
        place: Place,
        caption: str | None,
    ) -> list[int]:
        ids: list[int] = []
        for start in range(0, len(images), ALBUM_MAX):
            chunk = list(
                zip(
                    images[start : start + ALBUM_MAX], datas[start : start + ALBUM_MAX], strict=True
                )
            )
            text = caption if start == 0 else None
            reply_to = place.reply_to if not ids else ids[0]
            if len(chunk) == 1:  # albums hold 2 to 10
                image, data = chunk[0]
                one = Place(place.chat_id, place.thread_id, reply_to)
                ids.append((await self._single(kind, image, data, one, text, ())).message_id)
                continue
            files = [(data, filename(image)) for image, data in chunk]
            try:
                sent = await self.sender.send_album(
                    kind,
                    place.chat_id,
                    files,
                    caption=text,
                    thread_id=place.thread_id,
                    reply_to=reply_to,
                )
            except (BadRequest, NetworkError) as exc:
                if kind != "photo" or not _refused_as_photo(exc):
                    raise
                log.info("album refused as photos (%s), sending documents", exc.message)
                sent = await self.sender.send_album(
                    "document",
                    place.chat_id,
                    files,
                    caption=text,
                    thread_id=place.thread_id,
                    reply_to=reply_to,
                )
            ids.extend(m.message_id for m in sent)
        return ids
