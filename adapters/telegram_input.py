"""Reading a Telegram message: is it for the bot, and what does it ask? Plus its reference image.

In a private chat plain text is a prompt. In a group the bot answers `/imagine`, its other
commands, a mention (`@drawbot a fox`) and replies to its own messages; everything else there is
other people's conversation. A photo (or an image sent as a file) on the message, and on the rest
of its album, or else on the message it replies to, is a reference image.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from telegram import Bot, Message
from telegram.constants import ChatType, MessageEntityType
from telegram.error import TelegramError

from bot.chat import ADMIN_COMMANDS, COMMANDS, USER_COMMANDS
from bot.commands import ALIASES, parse_command
from bot.errors import InvalidRequest

log = logging.getLogger("drawbridge.telegram")

KNOWN_COMMANDS = frozenset((*COMMANDS, *USER_COMMANDS, *ADMIN_COMMANDS, *ALIASES))


class AskKind(StrEnum):
    IMAGINE = "imagine"  # `text` is the prompt with its options
    COMMAND = "command"  # `text` is the whole command, for `Chat.handle`
    HINT = "hint"  # `text` is the key of a short hint to answer with
    IGNORE = "ignore"  # not for the bot


@dataclass(frozen=True, slots=True)
class Ask:
    """What one message asks of the bot."""

    kind: AskKind
    text: str = ""


IGNORE = Ask(AskKind.IGNORE)


def image_file(msg: Message | None) -> tuple[str, int | None] | None:
    """The file id and size of the message's photo (its largest size) or image document."""
    if msg is None:
        return None
    if msg.photo:
        best = msg.photo[-1]
        return best.file_id, best.file_size
    doc = msg.document
    if doc is not None and (doc.mime_type or "").startswith("image/"):
        return doc.file_id, doc.file_size
    return None


def other_attachment(msg: Message) -> bool:
    """A file on the message that cannot be a reference: not an image (a PDF, a video, audio)."""
    if image_file(msg) is not None:
        return False
    files = (msg.document, msg.video, msg.animation, msg.audio, msg.voice, msg.video_note)
    return any(f is not None for f in files)


def strip_mention(msg: Message, text: str, username: str) -> tuple[bool, str]:
    """Whether the bot is @mentioned, and the text without the mention.

    Cut where the entity is (its offsets count UTF-16 units), not by the name wherever it
    appears: `@drawbot` is also the start of `@drawbotfans`."""
    kinds: list[str | None] = [MessageEntityType.MENTION]
    entities = msg.parse_entities(kinds) if msg.text else msg.parse_caption_entities(kinds)
    spans = [
        (2 * e.offset, 2 * (e.offset + e.length))
        for e, mention in entities.items()
        if mention.lstrip("@").lower() == username.lower()
    ]
    if not spans:
        return False, text
    units = text.encode("utf-16-le")
    for start, end in sorted(spans, reverse=True):
        units = units[:start] + " ".encode("utf-16-le") + units[end:]
    return True, " ".join(units.decode("utf-16-le").split())


def read_message(msg: Message, username: str, bot_id: int) -> Ask:
    """Classify a message by the input rules above."""
    ask = _read(msg, username, bot_id)
    if ask.kind is AskKind.IMAGINE and other_attachment(msg):
        # Said at once: made from the words alone, the picture would ignore what was sent.
        return Ask(AskKind.HINT, "error.reference_unreadable")
    return ask


def _read(msg: Message, username: str, bot_id: int) -> Ask:
    private = msg.chat.type == ChatType.PRIVATE
    if msg.forward_origin is not None and msg.text is None:
        # A forwarded photo or file: its caption is someone else's words (or one of the bot's
        # own results, "a fox · job …"), not a request. Asked to use it, a user replies to it.
        if not private:
            return IGNORE
        return Ask(AskKind.HINT, "hint.forwarded" if image_file(msg) else "hint.unsupported")
    text = msg.text if msg.text is not None else (msg.caption or "")
    mentioned, body = strip_mention(msg, text, username)
    replied = msg.reply_to_message
    to_bot = bool(replied and replied.from_user and replied.from_user.id == bot_id)
    if not body.strip():
        if msg.text is not None or mentioned:
            return Ask(AskKind.HINT, "error.empty_prompt") if private or mentioned else IGNORE
        if not private:
            return IGNORE
        key = "hint.photo_needs_caption" if image_file(msg) else "hint.unsupported"
        return Ask(AskKind.HINT, key)
    command = parse_command(body, username)
    if command is None:
        if parse_command(body) is not None:
            return IGNORE  # `/cmd@otherbot`
        return Ask(AskKind.IMAGINE, body) if private or mentioned or to_bot else IGNORE
    if command.name == "imagine":
        return Ask(AskKind.IMAGINE, command.args)
    explicit = "@" in body.split(maxsplit=1)[0]
    if command.name not in KNOWN_COMMANDS and not (private or explicit):
        return IGNORE  # in a group, an unknown bare command is some other bot's
    return Ask(AskKind.COMMAND, body)


async def fetch_reference(
    bot: Bot,
    msg: Message,
    max_bytes: int,
    before_download: Callable[[], None] | None = None,
    others: Sequence[Message] = (),
    allow: Callable[[int], None] | None = None,
) -> tuple[bytes, ...]:
    """The reference images, downloaded through getFile: the message's own (and those of
    `others`, the rest of its album, in the album's order), else the one of the message it
    replies to. `InvalidRequest` when one is too big, gone, or not an image.

    `allow` hears how many there are before anything is downloaded, and raises to refuse them
    (more than the model takes); `before_download` hears that a download is about to start
    (the intake stops waiting for it).
    """
    if any(other_attachment(part) for part in others):
        raise InvalidRequest("error.reference_unreadable")  # a video in the album, say
    # In the order they were sent ("the cat of image 1 in the room of image 2"), wherever the
    # caption with the command is.
    parts = sorted((msg, *others), key=lambda m: m.message_id)
    found = [f for f in (image_file(m) for m in parts) if f is not None]
    if not found:
        replied = image_file(msg.reply_to_message)
        found = [replied] if replied is not None else []
    if not found:
        return ()
    if allow is not None:
        allow(len(found))
    too_big = InvalidRequest("error.reference_too_big", max_mb=max_bytes // 1_000_000)
    if any(size is not None and size > max_bytes for _, size in found):
        raise too_big  # Telegram told us the size: no download at all
    if before_download is not None:
        before_download()
    return tuple([await _download(bot, file_id, max_bytes, too_big) for file_id, _ in found])


async def _download(bot: Bot, file_id: str, max_bytes: int, too_big: InvalidRequest) -> bytes:
    try:
        file = await bot.get_file(file_id)
        if file.file_size is not None and file.file_size > max_bytes:
            raise too_big
        data = bytes(await file.download_as_bytearray())
    except TelegramError as exc:
        log.info("reference image not fetched: %s", exc.message)
        if "too big" in exc.message.lower():  # getFile serves files up to 20 MB
            raise too_big from None
        raise InvalidRequest("error.reference_download") from None
    if len(data) > max_bytes:
        raise too_big
    return data
