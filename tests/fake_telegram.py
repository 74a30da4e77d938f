"""A loopback fake of the Telegram Bot API that the real python-telegram-bot talks to over HTTP.

It serves `/bot{token}/{method}` (urlencoded and multipart, as PTB sends them) and
`/file/bot{token}/{path}` downloads, keeps the chats' messages, records every call for assertions,
and enforces the limits a real bot lives with: text 4096 and caption 1024 characters (UTF-16 units,
after HTML parsing, which is strict), photo 10 MB, width + height 10000 and ratio 20, albums of
2–10, "message is not modified", flood control (a leaky bucket per group, 20 a minute, and 30 a
second overall, answered with 429 `retry_after`), blocked users (403) and migrated groups.
Paid broadcasts (`allow_paid_broadcast`) pass the 30 a second on a lane of their own (1000 a
second), cost 0.1 Star a message from `stars_balance`, and are refused with a 400 when the bot
may not use them or lacks the Stars.
"""

from __future__ import annotations

import asyncio
import html
import io
import itertools
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from PIL import Image

from tests.fakes import LISTEN_BACKLOG, quick_form_headers

TEXT_LIMIT = 4096
CAPTION_LIMIT = 1024
PHOTO_BYTES = 10_000_000
DOCUMENT_BYTES = 50_000_000
DOWNLOAD_BYTES = 20_000_000
NOT_MODIFIED = (
    "Bad Request: message is not modified: specified new message content and reply markup are "
    "exactly the same as a current content and reply markup of the message"
)
# Methods that Telegram counts against its flood limits.
COUNTED = frozenset(
    {
        "sendMessage",
        "sendPhoto",
        "sendDocument",
        "sendMediaGroup",
        "editMessageText",
        "editMessageReplyMarkup",
        "editMessageCaption",
    }
)
JSON_FIELDS = frozenset(
    {
        "reply_markup",
        "reply_parameters",
        "media",
        "commands",
        "allowed_updates",
        "entities",
        "caption_entities",
        "scope",
        "link_preview_options",
    }
)
INT_FIELDS = frozenset(
    {"message_id", "message_thread_id", "offset", "limit", "timeout", "reply_to_message_id"}
)
HTML_TAGS = frozenset(
    {
        "b",
        "strong",
        "i",
        "em",
        "u",
        "ins",
        "s",
        "strike",
        "del",
        "a",
        "code",
        "pre",
        "tg-spoiler",
        "span",
        "blockquote",
        "tg-emoji",
    }
)
BOOL_FIELDS = frozenset(
    {
        "disable_notification",
        "protect_content",
        "show_alert",
        "drop_pending_updates",
        "has_spoiler",
        "allow_paid_broadcast",
    }
)
# Sends that may carry `allow_paid_broadcast` (Bot API 7.11); edits may not.
PAYABLE = frozenset({"sendMessage", "sendPhoto", "sendDocument", "sendMediaGroup"})
STARS_PER_PAID_MESSAGE = 0.1
_HTML_TOKEN = re.compile(
    r"<(/?)([A-Za-z][A-Za-z0-9-]*)([^<>]*)>|&(#\d+|#x[0-9A-Fa-f]+|[a-z]+);|[<&]"
)
_ENTITIES = {"lt": "<", "gt": ">", "amp": "&", "quot": '"'}


class ApiError(Exception):
    """A Bot API error answer: `{"ok": false, "error_code", "description", "parameters"}`."""

    def __init__(self, code: int, description: str, parameters: dict[str, Any] | None = None):
        super().__init__(description)
        self.code = code
        self.description = description
        self.parameters = parameters


def utf16_len(text: str) -> int:
    """Telegram measures text in UTF-16 code units."""
    return len(text.encode("utf-16-le")) // 2


def parse_html(text: str) -> str:
    """The visible text of Telegram HTML; ApiError 400 for anything Telegram would refuse."""
    out: list[str] = []
    stack: list[str] = []
    pos = 0
    for match in _HTML_TOKEN.finditer(text):
        out.append(text[pos : match.start()])
        pos = match.end()
        offset = len(text[: match.start()].encode())
        closing, tag, _attrs, entity = match.group(1), match.group(2), match.group(3), match[4]
        if tag is not None:
            name = tag.lower()
            if name not in HTML_TAGS:
                raise ApiError(
                    400,
                    f'Bad Request: can\'t parse entities: Unsupported start tag "{name}" '
                    f"at byte offset {offset}",
                )
            if closing:
                if not stack or stack[-1] != name:
                    raise ApiError(
                        400,
                        f"Bad Request: can't parse entities: Unexpected end tag at byte offset "
                        f"{offset}",
                    )
                stack.pop()
            else:
                stack.append(name)
        elif entity is not None:
            if entity.startswith("#"):
                out.append(html.unescape(f"&{entity};"))
            elif entity in _ENTITIES:
                out.append(_ENTITIES[entity])
            else:
                raise ApiError(
                    400,
                    f'Bad Request: can\'t parse entities: Unsupported HTML entity "&{entity};" '
                    f"at byte offset {offset}",
                )
        else:
            raise ApiError(
                400,
                "Bad Request: can't parse entities: Can't find end of the entity starting at "
                f"byte offset {offset}",
            )
    if stack:
        raise ApiError(400, f"Bad Request: can't parse entities: Can't find end tag of {stack[-1]}")
    out.append(text[pos:])
    return "".join(out)


@dataclass(frozen=True, slots=True)
class Upload:
    """A file part of a multipart call."""

    field: str
    filename: str
    data: bytes


@dataclass
class Call:
    """One Bot API call as the fake received it, with its outcome."""

    method: str
    params: dict[str, Any]
    files: dict[str, Upload]
    at: float
    error: ApiError | None = None
    result: Any = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def chat_id(self) -> int | str | None:
        chat: int | str | None = self.params.get("chat_id")
        return chat

    @property
    def text(self) -> str | None:
        """The visible text or caption (HTML parsed when parse_mode says so)."""
        raw = self.params.get("text", self.params.get("caption"))
        if raw is None:
            return None
        if self.params.get("parse_mode") == "HTML":
            try:
                return parse_html(raw)
            except ApiError:
                return raw
        return str(raw)

    def buttons(self) -> list[tuple[str, str]]:
        """(text, callback_data) of every inline button in the call's reply_markup."""
        markup = self.params.get("reply_markup") or {}
        rows = markup.get("inline_keyboard", [])
        return [(b["text"], b.get("callback_data", "")) for row in rows for b in row]


class Bucket:
    """A leaky bucket, as aiolimiter (and so PTB's AIORateLimiter) models a rate limit."""

    def __init__(self, capacity: float, period: float) -> None:
        self.capacity = capacity
        self.rate = capacity / period
        self.level = 0.0
        self.stamp = time.monotonic()

    def take(self) -> float | None:
        """Count one call; the seconds to wait instead when the bucket is full."""
        now = time.monotonic()
        self.level = max(0.0, self.level - (now - self.stamp) * self.rate)
        self.stamp = now
        if self.level + 1 > self.capacity + 1e-9:
            return (self.level + 1 - self.capacity) / self.rate
        self.level += 1
        return None


@dataclass
class Failure:
    """An injected error for matching calls: `times` in a row, or every `every`-th call."""

    method: str | None
    code: int
    description: str
    parameters: dict[str, Any] | None = None
    times: int = 1
    every: int = 0
    chat_id: int | None = None
    seen: int = 0


@dataclass
class FakeTelegram:
    """The fake Bot API server; `async with FakeTelegram() as tg:` starts it on 127.0.0.1:0."""

    token: str = "123456:TEST-token"
    bot_id: int = 123456
    username: str = "drawbot"
    group_limit: tuple[float, float] | None = (20, 60)
    overall_limit: tuple[float, float] | None = (30, 1)
    chat_limit: tuple[float, float] | None = None  # private chats; off unless a test sets it
    # Paid broadcasts: up to 1000 messages a second past the overall limit, 0.1 Star each from
    # the bot's balance (None: a balance that never runs out); False: the bot may not use them.
    paid_limit: tuple[float, float] | None = (1000, 1)
    paid_broadcasts: bool = True
    stars_balance: float | None = None
    paid_messages: int = 0
    calls: list[Call] = field(default_factory=list)
    blocked: set[int] = field(default_factory=set)
    migrated: dict[int, int] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    messages: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    callback_answers: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._updates: list[dict[str, Any]] = []
        self._update_ids = itertools.count(1)
        self._message_ids = itertools.count(100)
        self._file_ids = itertools.count(1)
        self._new_updates = asyncio.Event()
        self._buckets: dict[object, Bucket] = {}
        self._runner: web.AppRunner | None = None
        self._closing = False
        self.url = ""

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> FakeTelegram:
        quick_form_headers()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/bot{token}/{method}", self._api)
        app.router.add_get("/file/bot{token}/{path:.+}", self._download)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=LISTEN_BACKLOG)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self

    async def close(self) -> None:
        self._closing = True
        self._new_updates.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> FakeTelegram:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- what tests push in ---------------------------------------------------------------

    def push(self, update: dict[str, Any]) -> dict[str, Any]:
        update = {"update_id": next(self._update_ids), **update}
        self._updates.append(update)
        self._new_updates.set()
        return update

    def user(
        self, user_id: int = 42, lang: str | None = "en", name: str = "Alice"
    ) -> dict[str, Any]:
        user: dict[str, Any] = {"id": user_id, "is_bot": False, "first_name": name}
        if lang is not None:
            user["language_code"] = lang
        return user

    def chat(self, chat_id: int = 42, kind: str = "private", forum: bool = False) -> dict[str, Any]:
        chat: dict[str, Any] = {"id": chat_id, "type": kind}
        if kind != "private":
            chat["title"] = "A group"
        if forum:
            chat["is_forum"] = True
        return chat

    def message(
        self,
        text: str | None = None,
        *,
        user: dict[str, Any] | None = None,
        chat: dict[str, Any] | None = None,
        thread_id: int | None = None,
        reply_to: dict[str, Any] | None = None,
        photo: bytes | None = None,
        caption: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Push a user's message (a command gets its bot_command entity) and return it."""
        user = user or self.user()
        chat = chat or self.chat(user["id"])
        msg: dict[str, Any] = {
            "message_id": next(self._message_ids),
            "date": int(time.time()),
            "chat": chat,
            "from": user,
        }
        if thread_id is not None:
            msg["message_thread_id"] = thread_id
            msg["is_topic_message"] = True
        if reply_to is not None:
            msg["reply_to_message"] = reply_to
        if text is not None:
            msg["text"] = text
            entities = self._entities(text)
            if entities:
                msg["entities"] = entities
        if photo is not None:
            msg["photo"] = self.photo_sizes(photo)
        if caption is not None:
            msg["caption"] = caption
            entities = self._entities(caption)
            if entities:
                msg["caption_entities"] = entities
        msg.update(extra or {})
        self.messages[(chat["id"], msg["message_id"])] = msg
        self.push({"message": msg})
        return msg

    def callback(
        self, data: str, message: dict[str, Any], user: dict[str, Any] | None = None
    ) -> str:
        """Push a button press on `message`; returns the callback query id."""
        query_id = f"cbq{next(self._update_ids)}"
        self.push(
            {
                "callback_query": {
                    "id": query_id,
                    "from": user or self.user(),
                    "chat_instance": "ci1",
                    "data": data,
                    "message": message,
                }
            }
        )
        return query_id

    def add_file(self, data: bytes, name: str = "photo.jpg") -> dict[str, Any]:
        file_id = f"file{next(self._file_ids)}"
        self.files[file_id] = data
        return {"file_id": file_id, "file_unique_id": f"u{file_id}", "file_size": len(data)}

    def photo_sizes(self, data: bytes, file_size: int | None = None) -> list[dict[str, Any]]:
        """A `photo` array as Telegram sends it: a thumbnail and the full size, largest last."""
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
        thumb = {**self.add_file(data[:100]), "width": 90, "height": 90}
        full = {**self.add_file(data), "width": width, "height": height}
        if file_size is not None:
            full["file_size"] = file_size
        return [thumb, full]

    def _entities(self, text: str) -> list[dict[str, Any]]:
        entities = []
        for match in re.finditer(
            r"(?<!\S)(/[A-Za-z0-9_]+(?:@[A-Za-z0-9_]+)?|@[A-Za-z0-9_]{3,})", text
        ):
            kind = "bot_command" if match[0].startswith("/") else "mention"
            if kind == "bot_command" and match.start() != 0:
                continue
            prefix = text[: match.start()]
            entities.append(
                {"type": kind, "offset": utf16_len(prefix), "length": utf16_len(match[0])}
            )
        return entities

    # ---- what tests inject ----------------------------------------------------------------

    def fail(
        self,
        method: str | None,
        code: int = 429,
        description: str | None = None,
        *,
        retry_after: int | None = None,
        times: int = 1,
        every: int = 0,
        chat_id: int | None = None,
    ) -> None:
        """Answer matching calls with an error: the next `times`, or every `every`-th one."""
        params = None
        if code == 429:
            retry_after = retry_after or 1
            description = description or f"Too Many Requests: retry after {retry_after}"
            params = {"retry_after": retry_after}
        self.failures.append(
            Failure(method, code, description or "Bad Request", params, times, every, chat_id)
        )

    # ---- what tests read ------------------------------------------------------------------

    def sent(self, method: str | None = None, chat_id: int | None = None) -> list[Call]:
        """Successful calls, optionally of one method and chat."""
        return [
            c
            for c in self.calls
            if c.ok
            and (method is None or c.method == method)
            and (chat_id is None or c.chat_id == chat_id)
        ]

    def methods(self) -> list[str]:
        return [c.method for c in self.calls if c.method != "getUpdates"]

    async def wait_for(
        self, predicate: Callable[[Call], bool] | str, count: int = 1, within: float = 10.0
    ) -> list[Call]:
        """Poll the recorded calls until `count` successful ones match; fail after `within` s."""
        if isinstance(predicate, str):
            method = predicate

            def predicate(c: Call) -> bool:
                return c.method == method

        deadline = time.monotonic() + within
        while True:
            found = [c for c in self.calls if c.ok and predicate(c)]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                seen = [
                    (c.method, c.params.get("text"), c.error and c.error.description)
                    for c in self.calls
                    if c.method != "getUpdates"
                ]
                raise AssertionError(f"waited {within}s for {count} call(s); calls: {seen}")
            await asyncio.sleep(0.01)

    async def wait_text(self, needle: str, within: float = 10.0) -> Call:
        """The first sent or edited message whose visible text contains `needle`."""
        calls = await self.wait_for(lambda c: needle in (c.text or ""), within=within)
        return calls[0]

    # ---- the server -----------------------------------------------------------------------

    async def _download(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["token"] != self.token:
            raise web.HTTPNotFound()
        file_id = request.match_info["path"].rsplit("/", 1)[-1].split(".")[0]
        if file_id not in self.files:
            raise web.HTTPNotFound()
        return web.Response(body=self.files[file_id])

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        params, files = await self._read(request)
        call = Call(method, params, files, time.monotonic())
        if method != "getUpdates":
            self.calls.append(call)
        try:
            if request.match_info["token"] != self.token:
                raise ApiError(401, "Unauthorized")
            self._check_failures(call)
            handler = getattr(self, f"_m_{method}", None)
            if handler is None:
                raise ApiError(404, "Not Found")
            paid = self._check_flood(call) if method in COUNTED else 0
            result = await handler(params, files)
            if paid:  # charged only for a message that went
                self.paid_messages += paid
                if self.stars_balance is not None:
                    self.stars_balance -= paid * STARS_PER_PAID_MESSAGE
        except ApiError as exc:
            call.error = exc
            body: dict[str, Any] = {
                "ok": False,
                "error_code": exc.code,
                "description": exc.description,
            }
            if exc.parameters:
                body["parameters"] = exc.parameters
            return web.json_response(body, status=exc.code)
        call.result = result
        return web.json_response({"ok": True, "result": result})

    async def _read(self, request: web.Request) -> tuple[dict[str, Any], dict[str, Upload]]:
        params: dict[str, Any] = {}
        files: dict[str, Upload] = {}
        if request.content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
            form = await request.post()
            for key, value in form.items():
                if isinstance(value, web.FileField):
                    files[key] = Upload(key, value.filename, value.file.read())
                else:
                    params[key] = _decode(key, str(value))
        elif request.can_read_body:
            params = {k: v for k, v in (await request.json()).items()}
        return params, files

    def _check_failures(self, call: Call) -> None:
        for failure in list(self.failures):
            if failure.method not in (None, call.method):
                continue
            if failure.chat_id is not None and failure.chat_id != call.chat_id:
                continue
            failure.seen += 1
            if failure.every:
                if failure.seen % failure.every:
                    continue
            else:
                failure.times -= 1
                if failure.times <= 0:
                    self.failures.remove(failure)
            raise ApiError(failure.code, failure.description, failure.parameters)
        chat = call.chat_id
        if isinstance(chat, int) and chat in self.blocked:
            raise ApiError(403, "Forbidden: bot was blocked by the user")
        if isinstance(chat, int) and chat in self.migrated:
            raise ApiError(
                400,
                "Bad Request: group chat was upgraded to a supergroup chat",
                {"migrate_to_chat_id": self.migrated[chat]},
            )

    def _check_flood(self, call: Call) -> int:
        """Count the call against the flood limits; the paid messages it will cost if it goes."""
        chat = call.chat_id
        paid = call.method in PAYABLE and call.params.get("allow_paid_broadcast") is True
        messages = 1
        if paid:
            media = call.params.get("media")
            messages = len(media) if isinstance(media, list) and media else 1
            stars = messages * STARS_PER_PAID_MESSAGE
            if not self.paid_broadcasts:
                raise ApiError(400, "Bad Request: paid broadcasts are not enabled for the bot")
            if self.stars_balance is not None and self.stars_balance < stars - 1e-9:
                raise ApiError(400, "Bad Request: not enough Telegram Stars for a paid broadcast")
        overall = ("*paid", self.paid_limit) if paid else ("*", self.overall_limit)
        checks: list[tuple[object, tuple[float, float] | None]] = [overall]
        if isinstance(chat, int) and chat < 0:
            checks.append((chat, self.group_limit))
        elif chat is not None:
            checks.append((chat, self.chat_limit))
        for key, limit in checks:
            if limit is None:
                continue
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = Bucket(*limit)
            wait = bucket.take()
            if wait is not None:
                retry = max(1, math.ceil(wait))
                raise ApiError(
                    429, f"Too Many Requests: retry after {retry}", {"retry_after": retry}
                )
        return messages if paid else 0

    # ---- methods --------------------------------------------------------------------------

    def _me(self) -> dict[str, Any]:
        return {
            "id": self.bot_id,
            "is_bot": True,
            "first_name": "Drawbridge",
            "username": self.username,
            "can_join_groups": True,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
        }

    async def _m_getMe(self, p: dict[str, Any], f: dict[str, Upload]) -> Any:
        return self._me()

    async def _m_deleteWebhook(self, p: dict[str, Any], f: dict[str, Upload]) -> Any:
        return True

    async def _m_setWebhook(self, p: dict[str, Any], f: dict[str, Upload]) -> Any:
        if not str(p.get("url", "")).startswith("https://"):
            raise ApiError(400, "Bad Request: bad webhook: HTTPS url must be provided for webhook")
        return True

    async def _m_setMyCommands(self, p: dict[str, Any], f: dict[str, Upload]) -> Any:
        commands = p.get("commands") or []
        if not 1 <= len(commands) <= 100:
            raise ApiError(400, "Bad Request: BOT_COMMANDS_TOO_MUCH")
        for cmd in commands:
            if not re.fullmatch(r"[a-z0-9_]{1,32}", cmd.get("command", "")):
                raise ApiError(400, "Bad Request: BOT_COMMAND_INVALID")
            if not 1 <= len(cmd.get("description", "")) <= 256:
                raise ApiError(400, "Bad Request: BOT_COMMAND_DESCRIPTION_INVALID")
        return True

    async def _m_getUpdates(self, p: dict[str, Any], f: dict[str, Upload]) -> Any:
        offset = int(p.get("offset") or 0)
        if offset:
            self._updates = [u for u in self._updates if u["update_id"] >= offset]
        timeout = float(p.get("timeout") or 0)
        deadline = time.monotonic() + timeout
        while not self._updates and timeout > 0 and not self._closing:
            self._new_updates.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                await asyncio.wait_for(self._new_updates.wait(), left)
            except TimeoutError:
                break
        return list(self._updates[:100])

    async def _m_sendChatAction(self, p: dict[str, Any], f: dict[str, Upload]) -> Any:
        if p.get("action") not in {
            "typing",
            "upload_photo",
            "upload_document",
            "record_video",
            "upload_video",
            "choose_sticker",
            "find_location",
        }:
            raise ApiError(400, "Bad Request: wrong parameter action in request")
        self._chat_of(p)
        return True

    async def _m_answerCallbackQuery(self, p: dict[str, Any], f: dict[str, Upload]) -> Any:
        query_id = str(p.get("callback_query_id"))
        if query_id in self.callback_answers:
            raise ApiError(
                400,
                "Bad Request: query is too old and response timeout expired or query ID is invalid",
            )
        if len(str(p.get("text") or "")) > 200:
            raise ApiError(400, "Bad Request: MESSAGE_TOO_LONG")
        self.callback_answers[query_id] = p
        return True

    async def _m_getFile(self, p: dict[str, Any], f: dict[str, Upload]) -> Any:
        file_id = str(p.get("file_id"))
        if file_id not in self.files:
            raise ApiError(400, "Bad Request: invalid file_id")
        size = len(self.files[file_id])
        if size > DOWNLOAD_BYTES:
            raise ApiError(400, "Bad Request: file is too big")
        return {
            "file_id": file_id,
            "file_unique_id": f"u{file_id}",
            "file_size": size,
            "file_path": f"photos/{file_id}.jpg",
        }

    async def _m_sendMessage(self, p: dict[str, Any], f: dict[str, Upload]) -> Any:
        text = self._visible(p, "text")
        if not text.strip():
            raise ApiError(400, "Bad Request: message text is empty")
        if utf16_len(text) > TEXT_LIMIT:
            raise ApiError(400, "Bad Request: message is too long")
        return self._store(p, {"text": text})

    async def _m_sendPhoto(self, p: dict[str, Any], f: dict[str, Upload]) -> Any:
        caption = self._caption(p)
        upload = self._upload(f, p, "photo")
        photo = self._check_photo(upload.data)
        return self._store(p, {"photo": photo, **caption})

    async def _m_sendDocument(self, p: dict[str, Any], f: dict[str, Upload]) -> Any:
        caption = self._caption(p)
        upload = self._upload(f, p, "document")
        if len(upload.data) > DOCUMENT_BYTES:
            raise ApiError(400, "Bad Request: file is too big")
        doc = {**self.add_file(upload.data), "file_name": upload.filename}
        return self._store(p, {"document": doc, **caption})

    async def _m_sendMediaGroup(self, p: dict[str, Any], f: dict[str, Upload]) -> Any:
        media = p.get("media") or []
        if not 2 <= len(media) <= 10:
            raise ApiError(400, "Bad Request: wrong number of media in the album (2-10)")
        kinds = {m.get("type") for m in media}
        if len(kinds) > 1 and "document" in kinds:
            raise ApiError(400, "Bad Request: documents can't be mixed with other media types")
        self._chat_of(p)
        self._check_reply(p)
        group_id = f"album{next(self._file_ids)}"
        contents = []
        for item in media:
            ref = str(item.get("media", ""))
            name = ref.removeprefix("attach://")
            if not ref.startswith("attach://") or name not in f:
                raise ApiError(400, "Bad Request: wrong file identifier/HTTP URL specified")
            caption = self._caption(item)
            data = f[name].data
            if item.get("type") == "photo":
                content: dict[str, Any] = {"photo": self._check_photo(data)}
            else:
                if len(data) > DOCUMENT_BYTES:
                    raise ApiError(400, "Bad Request: file is too big")
                content = {"document": {**self.add_file(data), "file_name": f[name].filename}}
            contents.append({**content, **caption, "media_group_id": group_id})
        return [self._store(p, content) for content in contents]

    async def _m_editMessageText(self, p: dict[str, Any], f: dict[str, Upload]) -> Any:
        msg = self._find(p, "message to edit not found")
        if "text" not in msg:
            raise ApiError(400, "Bad Request: there is no text in the message to edit")
        text = self._visible(p, "text")
        if not text.strip():
            raise ApiError(400, "Bad Request: message text is empty")
        if utf16_len(text) > TEXT_LIMIT:
            raise ApiError(400, "Bad Request: MESSAGE_TOO_LONG")
        markup = p.get("reply_markup")
        if msg["text"] == text and msg.get("reply_markup") == markup:
            raise ApiError(400, NOT_MODIFIED)
        msg["text"] = text
        msg["edit_date"] = int(time.time())
        _set_markup(msg, markup)
        return msg

    async def _m_editMessageReplyMarkup(self, p: dict[str, Any], f: dict[str, Upload]) -> Any:
        msg = self._find(p, "message to edit not found")
        markup = p.get("reply_markup")
        if msg.get("reply_markup") == markup:
            raise ApiError(400, NOT_MODIFIED)
        _set_markup(msg, markup)
        return msg

    async def _m_deleteMessage(self, p: dict[str, Any], f: dict[str, Upload]) -> Any:
        msg = self._find(p, "message to delete not found")
        msg["deleted"] = True
        return True

    # ---- helpers --------------------------------------------------------------------------

    def _chat_of(self, p: dict[str, Any]) -> int:
        chat = p.get("chat_id")
        if not isinstance(chat, int):
            raise ApiError(400, "Bad Request: chat not found")
        return chat

    def _visible(self, p: dict[str, Any], key: str) -> str:
        raw = str(p.get(key) or "")
        return parse_html(raw) if p.get("parse_mode") == "HTML" else raw

    def _caption(self, p: dict[str, Any]) -> dict[str, Any]:
        if p.get("caption") is None:
            return {}
        caption = self._visible(p, "caption")
        if utf16_len(caption) > CAPTION_LIMIT:
            raise ApiError(400, "Bad Request: message caption is too long")
        return {"caption": caption}

    def _upload(self, f: dict[str, Upload], p: dict[str, Any], name: str) -> Upload:
        if name in f:
            return f[name]
        ref = p.get(name)
        if isinstance(ref, str) and ref in self.files:
            return Upload(name, ref, self.files[ref])
        raise ApiError(400, "Bad Request: wrong file identifier/HTTP URL specified")

    def _check_photo(self, data: bytes) -> list[dict[str, Any]]:
        if len(data) > PHOTO_BYTES:
            raise ApiError(400, "Bad Request: PHOTO_SAVE_FILE_INVALID")
        try:
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
        except Exception as exc:
            raise ApiError(400, "Bad Request: IMAGE_PROCESS_FAILED") from exc
        if width + height > 10_000 or max(width / height, height / width) > 20:
            raise ApiError(400, "Bad Request: PHOTO_INVALID_DIMENSIONS")
        return [{**self.add_file(data), "width": width, "height": height}]

    def _check_reply(self, p: dict[str, Any]) -> dict[str, Any] | None:
        reply = p.get("reply_parameters")
        if not reply:
            return None
        chat = self._chat_of(p)
        target = self.messages.get((chat, int(reply["message_id"])))
        if target is None or target.get("deleted"):
            if reply.get("allow_sending_without_reply"):
                return None
            raise ApiError(400, "Bad Request: message to be replied not found")
        return target

    def _find(self, p: dict[str, Any], missing: str) -> dict[str, Any]:
        chat = self._chat_of(p)
        msg = self.messages.get((chat, int(p.get("message_id") or 0)))
        if msg is None or msg.get("deleted"):
            raise ApiError(400, f"Bad Request: {missing}")
        return msg

    def _store(self, p: dict[str, Any], content: dict[str, Any]) -> dict[str, Any]:
        chat = self._chat_of(p)
        replied = self._check_reply(p)
        msg: dict[str, Any] = {
            "message_id": next(self._message_ids),
            "date": int(time.time()),
            "chat": {"id": chat, "type": "private" if chat > 0 else "supergroup"},
            "from": self._me(),
            **content,
        }
        thread = p.get("message_thread_id")
        if thread is not None:
            msg["message_thread_id"] = thread
            msg["is_topic_message"] = True
        if replied is not None:
            msg["reply_to_message"] = {k: v for k, v in replied.items() if k != "reply_to_message"}
        _set_markup(msg, p.get("reply_markup"))
        self.messages[(chat, msg["message_id"])] = msg
        return msg


def _set_markup(msg: dict[str, Any], markup: Any) -> None:
    if markup and markup.get("inline_keyboard"):
        msg["reply_markup"] = markup
    else:
        msg.pop("reply_markup", None)


def _decode(key: str, value: str) -> Any:
    """Undo PTB's encoding: every non-str parameter was sent through json.dumps."""
    if key in JSON_FIELDS:
        return json.loads(value)
    if key == "chat_id" or key in INT_FIELDS:
        try:
            return int(value)
        except ValueError:
            return value
    if key in BOOL_FIELDS and value in ("true", "false"):
        return value == "true"
    return value
