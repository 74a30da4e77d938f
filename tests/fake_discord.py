"""A loopback Discord: the gateway websocket and the REST routes discord.py uses, with Discord's rules.

One aiohttp app serves both. The gateway speaks JSON in TEXT frames (HELLO, IDENTIFY → READY,
heartbeat → ACK, RESUME → RESUMED) and dispatches the INTERACTION_CREATE events a test injects.
REST records every call and enforces what Discord enforces and discord.py trips over:

- the initial interaction callback within `deadline` seconds of the event (3 s), or 404 10062;
  a second callback is 400 40060; a dead or unknown token is 404 10015 on the webhook routes, an
  expired one (`expire`) 401 50027;
- request bodies as `application/json` or `multipart/form-data`, and responses with a
  `Content-Type` of exactly `application/json` (discord.py decodes nothing else);
- at most 10 files a message, each within the interaction's `attachment_size_limit` (413 40005);
- 429s with a `Via` header and a JSON `retry_after`, injected with `rate_limit`;
- 403 50013 for channels in `forbidden_channels`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from tests.fakes import LISTEN_BACKLOG, quick_form_headers

DISCORD_EPOCH_MS = 1_420_070_400_000
MiB = 1024 * 1024
JSON = "application/json"

APP_ID = "1100000000000000001"
BOT_ID = "1100000000000000001"
GUILD_ID = "1200000000000000001"
CHANNEL_ID = "1300000000000000001"
USER = {"id": "1400000000000000001", "username": "alice", "discriminator": "0", "avatar": None}


@dataclass
class FilePart:
    """One uploaded file of a multipart request."""

    field: str
    filename: str
    content_type: str
    data: bytes


@dataclass
class Call:
    """One REST request as the fake saw it, and what it answered."""

    method: str
    path: str
    query: dict[str, str]
    content_type: str
    json: Any = None
    files: list[FilePart] = field(default_factory=list)
    status: int = 0
    at: float = 0.0
    resolved_original: bool = False  # a first followup that became the deferred reply

    @property
    def payload(self) -> Any:
        """The JSON body, or the `payload_json` part of a multipart body."""
        return self.json


@dataclass
class FakeInteraction:
    """An interaction the fake dispatched, and what the bot did with it."""

    id: str
    token: str
    type: int
    payload: dict[str, Any]
    dispatched_at: float
    deadline: float
    limit: int
    acked_at: float | None = None
    ack_type: int | None = None
    late: bool = False
    expired: bool = False
    ephemeral: bool = False
    original_id: str | None = None
    choices: list[dict[str, Any]] | None = None

    @property
    def ack_delay(self) -> float | None:
        return None if self.acked_at is None else self.acked_at - self.dispatched_at


class HTTPError(Exception):
    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class _Limit:
    method: str
    pattern: re.Pattern[str]
    count: int
    retry_after: float
    via: bool
    is_global: bool


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    # Exactly `application/json`: `web.json_response` adds a charset that discord.py rejects.
    return web.Response(
        status=status,
        body=json.dumps(data).encode(),
        headers={"Content-Type": JSON, **(headers or {})},
    )


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())


class FakeDiscord:
    """The fake; `await start()`, then point the adapter at `api_url` and `gateway_url`."""

    def __init__(
        self,
        *,
        token: str = "bot-token",
        deadline: float = 3.0,
        attachment_size_limit: int = 10 * MiB,
        channel_file_limit: int = 10 * MiB,
    ) -> None:
        self.token = token
        self.deadline = deadline
        self.attachment_size_limit = attachment_size_limit
        self.channel_file_limit = channel_file_limit
        self.app_id = APP_ID
        self.bot_user = {
            "id": BOT_ID,
            "username": "drawbridge",
            "discriminator": "0",
            "avatar": None,
            "bot": True,
        }
        self.calls: list[Call] = []
        self.messages: dict[str, dict[str, Any]] = {}
        self.interactions: dict[str, FakeInteraction] = {}
        self.commands: dict[str | None, list[dict[str, Any]]] = {}
        self.forbidden_channels: set[str] = set()
        self.attachments: dict[str, bytes] = {}
        self.fetched: list[str] = []  # attachment ids, each time the CDN served one
        self.identify: dict[str, Any] | None = None
        self.gateway_ops: list[int] = []
        self.gateway_query: dict[str, str] = {}
        self.dm_channels: dict[str, str] = {}
        self._limits: list[_Limit] = []
        self._sockets: list[web.WebSocketResponse] = []
        self._seq = 0
        self._ids = itertools.count(1)
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        quick_form_headers()
        app = web.Application(client_max_size=200 * MiB)
        app.router.add_get("/gw/", self._gateway)
        app.router.add_get("/attachments/{id}/{name}", self._attachment)
        app.router.add_route("*", "/api/v10/{tail:.*}", self._rest)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=LISTEN_BACKLOG)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def close(self) -> None:
        for ws in list(self._sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def drop(self, code: int = 4000) -> None:
        """Close every gateway connection as Discord does before asking for a RESUME."""
        for ws in list(self._sockets):
            await ws.close(code=code)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gw/"

    # ---- what tests use -------------------------------------------------------------------

    def snowflake(self) -> str:
        ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
        return str((ms << 22) | (next(self._ids) & 0x3FFFFF))

    async def wait_for(self, predicate: Callable[[], Any], within: float = 5.0) -> Any:
        """Wait until `predicate()` is truthy (re-checked after every request); return its value."""
        async with asyncio.timeout(within):
            async with self._changed:
                while not (value := predicate()):
                    await self._changed.wait()
                return value

    async def _touch(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_identified(self, within: float = 5.0) -> None:
        await self.wait_for(lambda: self.identify is not None and self._sockets, within)

    def calls_to(self, method: str, pattern: str) -> list[Call]:
        rx = re.compile(pattern)
        return [c for c in self.calls if c.method == method and rx.search(c.path)]

    def rate_limit(
        self,
        method: str,
        pattern: str,
        *,
        retry_after: float = 0.2,
        count: int = 1,
        via: bool = True,
        is_global: bool = False,
    ) -> None:
        """Answer the next `count` matching requests with 429 (with `Via` unless told otherwise)."""
        self._limits.append(_Limit(method, re.compile(pattern), count, retry_after, via, is_global))

    def expire(self, token: str | None = None) -> None:
        """Let one interaction token (or all of them) pass its 15 minutes."""
        for inter in self.interactions.values():
            if token is None or inter.token == token:
                inter.expired = True

    def add_attachment(
        self, data: bytes, filename: str = "ref.png", content_type: str | None = "image/png"
    ) -> dict[str, Any]:
        """Store an upload as Discord's CDN would; the dict is what `resolved.attachments` holds."""
        aid = self.snowflake()
        self.attachments[aid] = data
        url = f"{self.url}/attachments/{aid}/{filename}"
        att: dict[str, Any] = {
            "id": aid,
            "filename": filename,
            "size": len(data),
            "url": url,
            "proxy_url": url,
        }
        if content_type is not None:
            att["content_type"] = content_type
        return att

    def guild_channel(
        self, channel_id: str = CHANNEL_ID, guild_id: str = GUILD_ID
    ) -> dict[str, Any]:
        return {
            "id": channel_id,
            "type": 0,
            "guild_id": guild_id,
            "name": "general",
            "position": 0,
            "permission_overwrites": [],
            "nsfw": False,
            "parent_id": None,
        }

    def thread_channel(
        self, thread_id: str, parent_id: str = CHANNEL_ID, guild_id: str = GUILD_ID
    ) -> dict[str, Any]:
        return {
            "id": thread_id,
            "type": 11,
            "guild_id": guild_id,
            "parent_id": parent_id,
            "owner_id": USER["id"],
            "name": "a thread",
            "message_count": 0,
            "member_count": 1,
            "thread_metadata": {
                "archived": False,
                "auto_archive_duration": 1440,
                "archive_timestamp": _now_iso(),
                "locked": False,
            },
        }

    def dm_channel(self, channel_id: str, user: dict[str, Any] = USER) -> dict[str, Any]:
        return {"id": channel_id, "type": 1, "recipients": [user]}

    def command_id(self, name: str) -> str:
        for cmds in self.commands.values():
            for cmd in cmds:
                if cmd["name"] == name:
                    return str(cmd["id"])
        return self.snowflake()

    async def slash(
        self,
        name: str,
        options: dict[str, Any] | None = None,
        *,
        user: dict[str, Any] = USER,
        channel: dict[str, Any] | None = None,
        locale: str = "en-US",
        attachments: dict[str, dict[str, Any]] | None = None,
        deadline: float | None = None,
        limit: int | None = None,
        focused: str | None = None,
    ) -> FakeInteraction:
        """Dispatch `/name` (an autocomplete when `focused` names the option being typed)."""
        opts = []
        for key, value in (options or {}).items():
            if isinstance(value, dict) and "filename" in value:
                opt: dict[str, Any] = {"name": key, "type": 11, "value": value["id"]}
            else:
                kind = 4 if isinstance(value, int) and not isinstance(value, bool) else 3
                opt = {"name": key, "type": kind, "value": value}
            if key == focused:
                opt["focused"] = True
            opts.append(opt)
        data: dict[str, Any] = {
            "id": self.command_id(name),
            "name": name,
            "type": 1,
            "options": opts,
        }
        if attachments:
            data["resolved"] = {"attachments": attachments}
        elif any(isinstance(v, dict) for v in (options or {}).values()):
            data["resolved"] = {
                "attachments": {v["id"]: v for v in (options or {}).values() if isinstance(v, dict)}
            }
        kind = 4 if focused is not None else 2
        return await self.interact(
            kind, data, user=user, channel=channel, locale=locale, deadline=deadline, limit=limit
        )

    async def press(
        self,
        message_id: str,
        custom_id: str,
        *,
        user: dict[str, Any] = USER,
        locale: str = "en-US",
        deadline: float | None = None,
    ) -> FakeInteraction:
        """Click the button `custom_id` on a message the bot posted."""
        message = self.messages[message_id]
        ids = [
            c.get("custom_id")
            for row in message.get("components", [])
            for c in row.get("components", [])
        ]
        assert custom_id in ids, f"{custom_id} is not on message {message_id}: {ids}"
        channel = self._channel_payload(message["channel_id"])
        return await self.interact(
            3,
            {"custom_id": custom_id, "component_type": 2},
            user=user,
            channel=channel,
            locale=locale,
            message=message,
            deadline=deadline,
        )

    async def interact(
        self,
        kind: int,
        data: dict[str, Any],
        *,
        user: dict[str, Any] = USER,
        channel: dict[str, Any] | None = None,
        locale: str = "en-US",
        message: dict[str, Any] | None = None,
        deadline: float | None = None,
        limit: int | None = None,
    ) -> FakeInteraction:
        """Dispatch an INTERACTION_CREATE of type `kind` over every open gateway connection."""
        channel = channel or self.guild_channel()
        iid = self.snowflake()
        token = f"itok-{iid}"
        limit = self.attachment_size_limit if limit is None else limit
        payload: dict[str, Any] = {
            "id": iid,
            "application_id": self.app_id,
            "type": kind,
            "token": token,
            "version": 1,
            "data": data,
            "locale": locale,
            "attachment_size_limit": limit,
            "channel_id": channel["id"],
            "channel": channel,
            "app_permissions": "2251799813685247",
            "entitlements": [],
        }
        guild_id = channel.get("guild_id")
        if guild_id:
            payload["guild_id"] = guild_id
            payload["guild_locale"] = "en-US"
            payload["member"] = {
                "user": user,
                "roles": [],
                "joined_at": _now_iso(),
                "deaf": False,
                "mute": False,
                "flags": 0,
                "permissions": "2251799813685247",
            }
            payload["context"] = 0
            payload["authorizing_integration_owners"] = {"0": guild_id}
        else:
            payload["user"] = user
            payload["context"] = 1
            payload["authorizing_integration_owners"] = {"0": "0"}
        if message is not None:
            payload["message"] = message
        inter = FakeInteraction(
            id=iid,
            token=token,
            type=kind,
            payload=payload,
            dispatched_at=time.monotonic(),
            deadline=self.deadline if deadline is None else deadline,
            limit=limit,
        )
        self.interactions[iid] = inter
        await self.dispatch("INTERACTION_CREATE", payload)
        return inter

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        for ws in list(self._sockets):
            self._seq += 1
            await ws.send_str(json.dumps({"op": 0, "t": event, "s": self._seq, "d": data}))

    def followups(self, token: str) -> list[Call]:
        return [
            c
            for c in self.calls_to("POST", rf"^/webhooks/\d+/{re.escape(token)}$")
            if c.status == 200
        ]

    def channel_posts(self, channel_id: str = CHANNEL_ID) -> list[Call]:
        return [
            c
            for c in self.calls_to("POST", rf"^/channels/{channel_id}/messages$")
            if c.status == 200
        ]

    def original(self, inter: FakeInteraction) -> dict[str, Any]:
        assert inter.original_id is not None, "the interaction has no response message"
        return self.messages[inter.original_id]

    # ---- gateway --------------------------------------------------------------------------

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        await self._gateway_opening()
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.gateway_query = dict(request.query)
        self._sockets.append(ws)
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": 41250}}))
        try:
            async for msg in ws:
                if msg.type is not WSMsgType.TEXT:
                    continue
                frame = json.loads(msg.data)
                op = frame.get("op")
                self.gateway_ops.append(op)
                if op == 1:
                    await ws.send_str(json.dumps({"op": 11}))
                elif op == 2:
                    await self._identify(ws, frame["d"])
                elif op == 6:
                    await self._resume(ws, frame["d"])
                await self._touch()
        finally:
            self._sockets.remove(ws)
            await self._gateway_closed(ws)
        return ws

    async def _gateway_opening(self) -> None:
        """Before a gateway connection is taken (a subclass may hold it)."""

    async def _gateway_closed(self, ws: web.WebSocketResponse) -> None:
        """After a gateway connection ended."""

    async def _identify(self, ws: web.WebSocketResponse, data: dict[str, Any]) -> None:
        self.identify = data
        self._seq += 1
        await ws.send_str(
            json.dumps({"op": 0, "t": "READY", "s": self._seq, "d": self._ready_payload()})
        )

    def _ready_payload(self, session_id: str = "fake-session") -> dict[str, Any]:
        return {
            "v": 10,
            "user": self.bot_user,
            "guilds": [],
            "session_id": session_id,
            "resume_gateway_url": self.gateway_url,
            "application": {"id": self.app_id, "flags": 0},
        }

    async def _resume(self, ws: web.WebSocketResponse, data: dict[str, Any]) -> None:
        self._seq += 1
        await ws.send_str(json.dumps({"op": 0, "t": "RESUMED", "s": self._seq, "d": {}}))

    async def _attachment(self, request: web.Request) -> web.Response:
        data = self.attachments.get(request.match_info["id"])
        self.fetched.append(request.match_info["id"])
        if data is None:
            return web.Response(status=404)
        return web.Response(body=data, content_type="application/octet-stream")

    # ---- REST -----------------------------------------------------------------------------

    async def _rest(self, request: web.Request) -> web.Response:
        path = "/" + request.match_info["tail"]
        call = Call(
            method=request.method,
            path=path,
            query=dict(request.query),
            content_type=request.headers.get("Content-Type", ""),
            at=time.monotonic(),
        )
        self.calls.append(call)
        try:
            limited = self._limited(request.method, path)
            if limited is not None:
                call.status = 429
                headers = {"Via": "1.1 google"} if limited.via else {}
                body = {
                    "message": "You are being rate limited.",
                    "retry_after": limited.retry_after,
                    "global": limited.is_global,
                }
                return _json(body, 429, headers)
            await self._read_body(request, call)
            status, body = await self._route(request, path, call)
            call.status = status
            if status == 204:
                return web.Response(status=204)
            return _json(body, status)
        except HTTPError as exc:
            call.status = exc.status
            return _json({"code": exc.code, "message": exc.message}, exc.status)
        finally:
            await self._touch()

    def _limited(self, method: str, path: str) -> _Limit | None:
        for limit in self._limits:
            if limit.count > 0 and limit.method == method and limit.pattern.search(path):
                limit.count -= 1
                return limit
        return None

    async def _read_body(self, request: web.Request, call: Call) -> None:
        if not request.can_read_body:
            return
        ctype = call.content_type
        if ctype.startswith("multipart/form-data"):
            reader = await request.multipart()
            async for part in reader:
                if part.name == "payload_json":
                    call.json = json.loads(await part.text())
                else:
                    call.files.append(
                        FilePart(
                            field=part.name or "",
                            filename=part.filename or "",
                            content_type=part.headers.get("Content-Type", ""),
                            data=bytes(await part.read()),
                        )
                    )
        elif ctype == JSON:
            call.json = json.loads(await request.read())
        else:
            raise HTTPError(
                400, 50109, f"The request body is not valid JSON (Content-Type {ctype!r})"
            )

    def _check_bot_auth(self, request: web.Request) -> None:
        if request.headers.get("Authorization") != f"Bot {self.token}":
            raise HTTPError(401, 0, "401: Unauthorized")

    async def _route(self, request: web.Request, path: str, call: Call) -> tuple[int, Any]:
        method = request.method
        app = re.escape(self.app_id)
        if path == "/users/@me" and method == "GET":
            self._check_bot_auth(request)
            return 200, self.bot_user
        if path == "/oauth2/applications/@me" and method == "GET":
            self._check_bot_auth(request)
            return 200, {
                "id": self.app_id,
                "name": "drawbridge",
                "description": "",
                "icon": None,
                "bot_public": True,
                "bot_require_code_grant": False,
                "verify_key": "0" * 64,
                "owner": USER,
                "flags": 0,
            }
        if path == "/gateway/bot" and method == "GET":
            self._check_bot_auth(request)
            return 200, {
                "url": self.gateway_url,
                "shards": 1,
                "session_start_limit": {
                    "total": 1000,
                    "remaining": 999,
                    "reset_after": 0,
                    "max_concurrency": 1,
                },
            }
        if m := re.fullmatch(rf"/applications/{app}(?:/guilds/(\d+))?/commands", path):
            self._check_bot_auth(request)
            if method == "PUT":
                synced = []
                for cmd in call.json or []:
                    synced.append(
                        {
                            "id": self.snowflake(),
                            "application_id": self.app_id,
                            "version": self.snowflake(),
                            "type": 1,
                            "description": "",
                            **cmd,
                            **({"guild_id": m[1]} if m[1] else {}),
                        }
                    )
                self.commands[m[1]] = synced
                return 200, synced
            return 200, self.commands.get(m[1], [])
        if m := re.fullmatch(r"/interactions/(\d+)/([^/]+)/callback", path):
            return self._callback(m[1], m[2], call)
        if m := re.fullmatch(rf"/webhooks/{app}/([^/]+)", path):
            if method != "POST":
                raise HTTPError(405, 0, "405: Method Not Allowed")
            inter = self._live(m[1])
            original = self.messages.get(inter.original_id or "")
            if inter.ack_type == 5 and original is not None and original.get("flags", 0) & 128:
                # Discord: a followup sent while the deferred reply still shows "thinking"
                # resolves that reply instead, and its own ephemeral flag is ignored
                # (discord-api-docs #2742, #3466).
                assert inter.original_id is not None
                call.resolved_original = True
                return 200, self._edit_message(inter.original_id, call, inter.limit)
            channel_id = self._channel_of(inter)
            return 200, self._new_message(
                channel_id, call.json or {}, call.files, inter.limit, webhook=True
            )
        if m := re.fullmatch(rf"/webhooks/{app}/([^/]+)/messages/(@original|\d+)", path):
            inter = self._live(m[1])
            mid = inter.original_id if m[2] == "@original" else m[2]
            if mid is None or mid not in self.messages:
                raise HTTPError(404, 10008, "Unknown Message")
            if method == "GET":
                return 200, self.messages[mid]
            if method == "PATCH":
                return 200, self._edit_message(mid, call, inter.limit)
            if method == "DELETE":
                self.messages.pop(mid)
                return 204, None
        if m := re.fullmatch(r"/channels/(\d+)/messages(?:/(\d+))?", path):
            self._check_bot_auth(request)
            channel_id, mid = m[1], m[2]
            if channel_id in self.forbidden_channels:
                raise HTTPError(403, 50013, "Missing Permissions")
            if method == "POST" and mid is None:
                return 200, self._new_message(
                    channel_id, call.json or {}, call.files, self.channel_file_limit
                )
            if method == "PATCH" and mid in self.messages:
                return 200, self._edit_message(mid, call, self.channel_file_limit)
            raise HTTPError(404, 10008, "Unknown Message")
        if path == "/users/@me/channels" and method == "POST":
            self._check_bot_auth(request)
            user_id = str((call.json or {}).get("recipient_id"))
            channel_id = self.dm_channels.setdefault(user_id, self.snowflake())
            user = {**USER, "id": user_id}
            return 200, self.dm_channel(channel_id, user)
        raise HTTPError(404, 0, f"404: Not Found ({method} {path})")

    # ---- interactions and messages --------------------------------------------------------

    def _callback(self, iid: str, token: str, call: Call) -> tuple[int, Any]:
        inter = self.interactions.get(iid)
        if inter is None or inter.token != token:
            raise HTTPError(404, 10062, "Unknown interaction")
        if inter.acked_at is not None:
            raise HTTPError(400, 40060, "Interaction has already been acknowledged.")
        now = time.monotonic()
        if now - inter.dispatched_at > inter.deadline:
            inter.late = True
            raise HTTPError(404, 10062, "Unknown interaction")
        body = call.json or {}
        kind = body.get("type")
        data = body.get("data") or {}
        inter.acked_at, inter.ack_type = now, kind
        inter.ephemeral = bool(int(data.get("flags", 0) or 0) & 64)
        response: dict[str, Any] = {"id": iid, "type": inter.type}
        resource: dict[str, Any] = {"type": kind}
        if kind in (4, 5):
            flags = int(data.get("flags", 0) or 0) | (128 if kind == 5 else 0)
            message = self._new_message(
                self._channel_of(inter), data, [], inter.limit, webhook=True
            )
            message["flags"] = flags
            message["interaction_metadata"] = {"id": iid, "type": inter.type, "user": USER}
            inter.original_id = message["id"]
            response.update(
                response_message_id=message["id"],
                response_message_loading=kind == 5,
                response_message_ephemeral=bool(flags & 64),
            )
            if kind == 4:
                resource["message"] = message
        elif kind in (6, 7):
            message = inter.payload.get("message")
            if message is not None:
                inter.original_id = message["id"]
                if kind == 7:
                    self._apply_edit(self.messages[message["id"]], data, [], inter.limit)
        elif kind == 8:
            inter.choices = list(data.get("choices", []))
        return 200, {"interaction": response, "resource": resource}

    def _live(self, token: str) -> FakeInteraction:
        inter = next((i for i in self.interactions.values() if i.token == token), None)
        if inter is None or inter.late or inter.acked_at is None:
            raise HTTPError(404, 10015, "Unknown Webhook")
        if inter.expired:
            raise HTTPError(401, 50027, "Invalid Webhook Token")
        return inter

    def _channel_of(self, inter: FakeInteraction) -> str:
        return str(inter.payload["channel_id"])

    def _channel_payload(self, channel_id: str) -> dict[str, Any]:
        for inter in self.interactions.values():
            if inter.payload["channel_id"] == channel_id:
                return dict(inter.payload["channel"])
        if channel_id in self.dm_channels.values():
            return self.dm_channel(channel_id)
        return self.guild_channel(channel_id)

    def _new_message(
        self,
        channel_id: str,
        data: dict[str, Any],
        files: list[FilePart],
        limit: int,
        *,
        webhook: bool = False,
    ) -> dict[str, Any]:
        mid = self.snowflake()
        message: dict[str, Any] = {
            "id": mid,
            "channel_id": channel_id,
            "type": 20 if webhook else 0,
            "author": self.bot_user,
            "content": "",
            "timestamp": _now_iso(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [],
            "embeds": [],
            "components": [],
            "pinned": False,
            "flags": int(data.get("flags", 0) or 0),
        }
        if webhook:
            message["webhook_id"] = self.app_id
            message["application_id"] = self.app_id
        self._apply_edit(message, data, files, limit)
        self.messages[mid] = message
        return message

    def _edit_message(self, mid: str, call: Call, limit: int) -> dict[str, Any]:
        message = self.messages[mid]
        self._apply_edit(message, call.json or {}, call.files, limit)
        message["edited_timestamp"] = _now_iso()
        message["flags"] = int(message.get("flags", 0)) & ~128  # no longer loading
        return message

    def _apply_edit(
        self, message: dict[str, Any], data: dict[str, Any], files: list[FilePart], limit: int
    ) -> None:
        if len(files) > 10:
            raise HTTPError(400, 50035, "Invalid Form Body: at most 10 files")
        for part in files:
            if len(part.data) > limit:
                raise HTTPError(413, 40005, "Request entity too large")
        if "content" in data:
            message["content"] = data["content"] or ""
        if "components" in data:
            message["components"] = data["components"] or []
        if "allowed_mentions" in data:
            message["allowed_mentions"] = data["allowed_mentions"]
        if "attachments" in data or files:
            kept = {str(a.get("id")) for a in data.get("attachments", []) if "filename" not in a}
            attachments = [a for a in message["attachments"] if a["id"] in kept]
            for index, part in enumerate(files):
                aid = self.snowflake()
                self.attachments[aid] = part.data
                url = f"{self.url}/attachments/{aid}/{part.filename}"
                attachments.append(
                    {
                        "id": aid,
                        "filename": part.filename,
                        "size": len(part.data),
                        "url": url,
                        "proxy_url": url,
                        "index": index,
                    }
                )
            message["attachments"] = attachments
        mention = re.findall(r"<@!?(\d+)>", message["content"])
        message["mentions"] = [{**USER, "id": uid} for uid in mention]
