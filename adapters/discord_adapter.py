"""The Discord adapter: slash commands and buttons in, through discord.py, to the engine.

Every interaction is acknowledged (deferred) before any other I/O, well inside Discord's three
seconds. A job's status lives in the deferred response, edited in place (coalesced); its images
come as a followup. Interaction tokens last 15 minutes, so each job keeps what it needs of its
interaction in `Target.meta`; a job that ends later, after a restart, or whose acknowledgement
Discord refused (10062) is answered in the channel instead, mentioning its user (see
`adapters.discord_outbox`).
"""

from __future__ import annotations

import asyncio
import gzip
import io
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine, Sequence
from typing import Any

import aiohttp
import discord
import yarl
from discord import app_commands

from adapters.discord_commands import add_commands
from adapters.discord_outbox import DiscordOutbox
from adapters.discord_parts import (
    ALREADY_ACKNOWLEDGED,
    CancelButton,
    DrawbridgeClient,
    DrawbridgeTree,
    Given,
    Inter,
    InteractionMeta,
    RerollButton,
    TextsTranslator,
    escape_text,
    fit_lines,
    human_bytes,
)
from bot.adapter import StatusUpdate
from bot.chat import Chat, Reply
from bot.commands import parse_prompt
from bot.engine import Engine
from bot.errors import DeliveryError, InvalidRequest, SettingsError, UserError
from bot.jobs import Job, Request, StoredImage, Target, UserRef
from bot.texts import pick_lang, render_error, t
from bot.validate import MAX_REFERENCE_BYTES

log = logging.getLogger("drawbridge.discord")

DEFAULT_API_URL = "https://discord.com/api/v10"
DEFAULT_GATEWAY_URL = "wss://gateway.discord.gg/"
GATEWAY_RETRY_MAX = 60.0  # seconds between tries at a gateway that is not reachable
LOGIN_TIMEOUT = 10.0  # seconds for Discord's REST API to answer the login at start
REFERENCE_TYPES = ("image/png", "image/jpeg", "image/webp")
REFERENCE_FETCH_TIMEOUT = 30.0  # seconds for an attachment's bytes from Discord's CDN


class DiscordAdapter:
    """Discord through discord.py: one client, one command tree, the engine's Adapter protocol.

    `api_url` and `gateway_url` point the client at a REST or gateway proxy (or a test server).
    discord.py reads both from class attributes, so they are set at `open` and restored at
    `close`; one process runs one Discord client.
    """

    platform = "discord"
    confirms_told = True  # the outbox says when a job's outcome is out (`DiscordOutbox`)

    def __init__(
        self,
        engine: Engine,
        token: str,
        api_url: str = DEFAULT_API_URL,
        gateway_url: str = DEFAULT_GATEWAY_URL,
        guild_ids: Collection[int] = (),
        *,
        clock: Callable[[], float] = time.time,
        edit_interval: float = 1.0,
        first_edit_delay: float = 0.3,
        position_interval: float = 5.0,
        guild_ready_timeout: float = 2.0,
        max_reference_bytes: int = MAX_REFERENCE_BYTES,
    ) -> None:
        self.engine = engine
        self.chat = Chat(engine, echo=escape_text)
        self._token = token
        self.api_url = api_url.rstrip("/")
        self.gateway_url = gateway_url
        self.guild_ids = tuple(sorted(guild_ids))  # parsed and checked by the settings
        self.position_interval = position_interval
        self.guild_ready_timeout = guild_ready_timeout
        self.max_reference_bytes = max_reference_bytes
        self.reference_timeout = REFERENCE_FETCH_TIMEOUT
        self.outbox = DiscordOutbox(
            engine, clock=clock, edit_interval=edit_interval, first_edit_delay=first_edit_delay
        )
        self.client: DrawbridgeClient | None = None
        self.tree: app_commands.CommandTree[DrawbridgeClient] | None = None
        self._accepting = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._saved: tuple[str, yarl.URL] | None = None
        # Set when Discord will not have the bot any more (a gateway that refused the token):
        # the process stops with `failure` rather than run on serving nobody (`bot.cli`).
        self.failed = asyncio.Event()
        self.failure = ""

    # ---- lifecycle (bot.app.Service) -------------------------------------------------------

    async def open(self) -> None:
        """Log in over REST (able to deliver from here on), and register with the engine."""
        self._point_at_endpoints()
        client = DrawbridgeClient(
            self,
            # Interactions need no intents; GUILDS (not privileged) keeps channels resolvable.
            intents=discord.Intents(guilds=True),
            allowed_mentions=discord.AllowedMentions.none(),
            guild_ready_timeout=self.guild_ready_timeout,
            gateway=None if self.gateway_url == DEFAULT_GATEWAY_URL else yarl.URL(self.gateway_url),
        )
        tree: app_commands.CommandTree[DrawbridgeClient] = DrawbridgeTree(client)
        tree.error(self._on_tree_error)
        await tree.set_translator(TextsTranslator())
        add_commands(tree, self)
        client.add_dynamic_items(RerollButton, CancelButton)
        self.client, self.tree = client, tree
        self.outbox.bind(client)
        try:
            async with asyncio.timeout(LOGIN_TIMEOUT):  # (discord.py waits for ever)
                await client.login(self._token)
        except BaseException as exc:
            await client.close()
            self._restore_endpoints()
            if isinstance(exc, discord.LoginFailure):
                raise SettingsError("DISCORD_BOT_TOKEN: Discord rejected the token") from None
            if isinstance(exc, (discord.HTTPException, aiohttp.ClientError, OSError, TimeoutError)):
                why: object = exc
                if isinstance(exc, discord.HTTPException):
                    why = f"HTTP {exc.status}"
                elif isinstance(exc, TimeoutError):
                    why = f"no answer within {LOGIN_TIMEOUT:g} s"
                raise SettingsError(
                    f"DISCORD_API_URL: Discord's API at {self.api_url} did not answer the login "
                    f"({why})"
                ) from None
            raise
        self.engine.register(self)

    async def start(self) -> None:
        """Sync the commands (globally and to the configured guilds) and connect the gateway."""
        client, tree = self._require()
        try:
            await tree.sync()
            for guild_id in self.guild_ids:
                guild = discord.Object(guild_id)
                tree.copy_global_to(guild=guild)
                await tree.sync(guild=guild)
        except discord.HTTPException as exc:
            log.error("discord: could not sync the slash commands (%s %s)", exc.status, exc.text)
        self._accepting = True
        self._spawn(self._connect(client), "discord-gateway")
        self._spawn(self.outbox.refresh_positions(self.position_interval), "discord-positions")

    async def stop_intake(self) -> None:
        """New commands are answered "restarting"; deliveries and status edits go on."""
        self._accepting = False

    def healthy(self) -> bool:
        """For /healthz: connected to the gateway and ready. (`is_ready` stays true while
        discord.py reconnects, for as long as that takes: the socket says whether it is up.)"""
        client = self.client
        if client is None or not client.is_ready() or client.is_closed():
            return False
        ws = client.ws
        return ws is not None and ws.open

    async def close(self) -> None:
        await self.outbox.close()
        if self.client is not None:
            await self.client.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._restore_endpoints()

    def _point_at_endpoints(self) -> None:
        self._saved = (discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
        discord.http.Route.BASE = self.api_url
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self.gateway_url)

    def _restore_endpoints(self) -> None:
        if self._saved is None:
            return
        base, gateway = self._saved
        if self.api_url == discord.http.Route.BASE:
            discord.http.Route.BASE = base
        if yarl.URL(self.gateway_url) == discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY:
            discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = gateway
        self._saved = None

    async def _connect(self, client: DrawbridgeClient) -> None:
        """The gateway, reconnecting as discord.py does; a refusal for good (the token, the
        intents, a close code it will not retry) stops the bot. What else ends its loop (a
        first connect that fails ends it with an AttributeError of its own) is tried again
        here, the waits doubling up to GATEWAY_RETRY_MAX: the gateway away at start must not
        stop Telegram too, and /healthz says Discord is unwell meanwhile."""
        delay = 1.0
        while not await self._connect_once(client):
            log.warning("discord: the gateway is not reachable; trying again in %.0f s", delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, GATEWAY_RETRY_MAX)

    async def _connect_once(self, client: DrawbridgeClient) -> bool:
        """One run of discord.py's connect loop; False if it should be run again."""
        try:
            await client.connect(reconnect=True)
        except discord.PrivilegedIntentsRequired:
            self._fail("the Discord gateway asks for privileged intents; drawbridge needs none")
        except discord.LoginFailure:
            self._fail("DISCORD_BOT_TOKEN: the Discord gateway rejected the token")
        except discord.ConnectionClosed as exc:  # discord.py closed the client: it will not retry
            if exc.code == 4004:
                self._fail("DISCORD_BOT_TOKEN: the Discord gateway rejected the token (4004)")
            else:
                self._fail(f"the Discord gateway closed the connection for good ({exc.code})")
        except Exception as exc:
            if not client.is_closed():
                log.info("discord: the gateway connection ended (%s: %s)", type(exc).__name__, exc)
                return False
        return True

    def _fail(self, why: str) -> None:
        log.error("discord: %s", why)
        self.failure = why
        self.failed.set()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _require(self) -> tuple[DrawbridgeClient, app_commands.CommandTree[DrawbridgeClient]]:
        if self.client is None or self.tree is None:
            raise RuntimeError("DiscordAdapter.open() was not called")
        return self.client, self.tree

    # ---- interactions ---------------------------------------------------------------------

    async def _defer(self, interaction: Inter, *, ephemeral: bool) -> int | None:
        """Acknowledge at once; the id of the response message (0 if unknown), None if refused."""
        try:
            response = await interaction.response.defer(ephemeral=ephemeral, thinking=True)
        except discord.HTTPException as exc:
            if exc.code == ALREADY_ACKNOWLEDGED:
                return 0
            log.warning(
                "discord: interaction %s could not be acknowledged (%s %s); a job it asked "
                "for is answered in the channel",
                interaction.id,
                exc.status,
                exc.code,
            )
            return None
        return (response.message_id if response is not None else None) or 0

    async def ephemeral(
        self, interaction: Inter, answer: Callable[[UserRef, str], Awaitable[str]]
    ) -> None:
        """Defer (only the user sees it), compute the answer, edit it in.

        An ack Discord refused (it came too late) still does what was asked (a /cancel, a
        /grant): the user saw "did not respond", not a refusal, and may not try again. Only the
        answer, which was for their eyes, is not shown.
        """
        acked = await self._defer(interaction, ephemeral=True)
        lang = _lang(interaction)
        try:
            self.chat.admit(_user(interaction), self._target(interaction, acked))
            reply = await answer(_user(interaction), lang)
        except UserError as exc:
            reply = _error(lang, exc)
        if acked is None:
            log.info("discord: interaction %s done, its answer not shown (no ack)", interaction.id)
            return
        await self._edit_original(interaction, reply)

    async def _edit_original(self, interaction: Inter, content: str) -> None:
        try:
            await interaction.edit_original_response(content=fit_lines(content))
        except discord.HTTPException as exc:
            log.warning("discord: answer to interaction %s not shown (%s)", interaction.id, exc)

    async def _refuse(self, interaction: Inter, acked: int | None, text: str) -> None:
        """Say why the /imagine was refused, in the deferred reply itself.

        The reply was deferred publicly (the job's status lives there), and Discord cannot
        make it private afterwards: a first "ephemeral" followup would only replace the
        placeholder in public, and deleting the placeholder then would hide the answer.
        """
        if acked is None:  # Discord refused the ack (it came too late): no reply to edit
            await self._refuse_in_channel(interaction, text)
            return
        try:
            await interaction.edit_original_response(content=text[:2000])
        except discord.HTTPException as exc:
            log.warning("discord: refusal for interaction %s not shown (%s)", interaction.id, exc)

    async def _refuse_in_channel(self, interaction: Inter, text: str) -> None:
        """The refusal as a message in the channel, mentioning the user (and nobody else), as a
        job whose ack came too late is served: else they see only "did not respond"."""
        if self.client is None or interaction.channel_id is None:
            return
        user = interaction.user.id
        try:
            await self.client.get_partial_messageable(interaction.channel_id).send(
                f"<@{user}> {text}"[:2000],
                allowed_mentions=discord.AllowedMentions(users=[discord.Object(user)]),
            )
        except discord.HTTPException as exc:
            log.warning("discord: refusal for interaction %s not shown (%s)", interaction.id, exc)

    async def imagine(
        self,
        interaction: Inter,
        prompt: str,
        given: Given,
        model: str | None,
        image: discord.Attachment | None,
    ) -> None:
        acked = await self._defer(interaction, ephemeral=False)
        lang = _lang(interaction)
        try:
            if not self._accepting:
                raise UserError("error.shutting_down")
            self.chat.admit(_user(interaction), self._target(interaction, acked))  # before a fetch
            # `a fox --ar 16:9 --n 2`, as typed in Telegram (and Midjourney): the words' options
            # count too; the command's own options, where given, win.
            typed = parse_prompt(prompt, max_chars=self.engine.config.max_prompt_chars)
            options = given.over(typed.options)
            if image is not None:  # one the model would refuse is not fetched first
                self.engine.refuse_references(model or typed.model, 1)
            refs = (await self._reference(image),) if image is not None else ()
            request = Request(
                user=_user(interaction),
                target=self._target(interaction, acked),
                prompt=typed.prompt,
                options=options,
                model=model or typed.model,
                reference_images=refs,
                lang=lang,
            )
            ticket = await self.engine.submit(request)
        except UserError as exc:
            await self._refuse(interaction, acked, _error(lang, exc))
            return
        await self.outbox.track(ticket.job_id, interaction, acked)

    async def _reference(self, image: discord.Attachment) -> bytes:
        """The attachment's bytes, only for an image of an accepted type within the size cap."""
        ctype = (image.content_type or "").split(";")[0].strip().lower()
        if ctype not in REFERENCE_TYPES:
            raise InvalidRequest("error.reference_unreadable")
        if image.size > self.max_reference_bytes:
            raise InvalidRequest(
                "error.reference_too_big", max_mb=self.max_reference_bytes // 1_000_000
            )
        try:
            async with asyncio.timeout(self.reference_timeout):  # not aiohttp's five minutes
                data = await image.read()
        except (discord.HTTPException, aiohttp.ClientError, TimeoutError):  # (cut off midway)
            raise InvalidRequest("error.reference_unreadable") from None
        if len(data) > self.max_reference_bytes:
            raise InvalidRequest(
                "error.reference_too_big", max_mb=self.max_reference_bytes // 1_000_000
            )
        return data

    def place(self, interaction: Inter) -> Target:
        """Where `interaction` came from (its chat or guild), for what holds there."""
        return self._target(interaction, None)

    def _target(self, interaction: Inter, acked: int | None) -> Target:
        meta = InteractionMeta(
            application_id=str(interaction.application_id),
            token=interaction.token if acked is not None else None,
            created_at=interaction.created_at.timestamp(),
            size_limit=interaction.filesize_limit,
            interaction_id=str(interaction.id),
        )
        channel = interaction.channel
        return Target(
            platform=self.platform,
            chat_id=str(interaction.channel_id or 0),
            thread_id=str(channel.id) if isinstance(channel, discord.Thread) else None,
            guild_id=str(interaction.guild_id) if interaction.guild_id else None,
            meta=meta.dump(),
        )

    async def _on_tree_error(self, interaction: Inter, error: app_commands.AppCommandError) -> None:
        log.error("discord: command failed", exc_info=error)
        text = t(_lang(interaction), "error.generic")
        if interaction.response.is_done():
            await self._edit_original(interaction, text)
            return
        # Failed before the command ran (a command this version does not have, an option
        # missing): answer all the same, or Discord shows "The application did not respond".
        try:
            await interaction.response.send_message(text, ephemeral=True)
        except discord.HTTPException as exc:
            log.warning("discord: interaction %s not answered (%s)", interaction.id, exc)

    # ---- the operator's commands, and /show ---------------------------------------------------

    async def admin(self, interaction: Inter, name: str, args: str = "") -> None:
        """`/stats`, `/grant`, … through `Chat.admin` (which refuses non-admins), ephemerally;
        `args` are the command's words as the text syntax has them."""
        acked = await self._defer(interaction, ephemeral=True)
        if acked is None:
            return
        lang = _lang(interaction)
        target = self._target(interaction, acked)  # /policy's scope: this guild, else this chat
        try:
            reply = await self.chat.admin(_user(interaction), target, name, args, lang)
        except UserError as exc:
            reply = Reply(_error(lang, exc), error=True)
        await self._edit_original(interaction, reply.text)
        if reply.document is not None:
            await self._send_document(interaction, lang, *reply.document)

    async def _send_document(
        self, interaction: Inter, lang: str, filename: str, data: bytes
    ) -> None:
        """A file only the caller sees. The deferred response was edited first, so Discord makes
        this followup a message of its own (the first followup after a defer would replace the
        response instead); gzipped when it would not fit the upload limit."""
        size, limit = len(data), interaction.filesize_limit
        if size > limit:
            data, filename = await asyncio.to_thread(gzip.compress, data), filename + ".gz"
        if len(data) > limit:
            text = t(lang, "discord.export_too_big", size=human_bytes(size))
            await self._edit_original(interaction, text)
            return
        try:
            file = discord.File(io.BytesIO(data), filename=filename)
            await interaction.followup.send(file=file, ephemeral=True)
        except discord.HTTPException as exc:
            log.warning(
                "discord: %s for interaction %s not sent (%s)", filename, interaction.id, exc
            )
            await self._edit_original(interaction, t(lang, "error.generic"))

    async def show(self, interaction: Inter, job: str) -> None:
        """`/show job:`: the engine re-posts the job's stored images here through `deliver`,
        as followups of this interaction; the ephemeral response says so."""
        acked = await self._defer(interaction, ephemeral=True)
        if acked is None:
            return
        lang = _lang(interaction)
        target = self._target(interaction, acked)
        with self.outbox.reposting(interaction, lang) as repost:
            try:
                self.chat.admit(_user(interaction), target)
                reply = await self.chat.show(_user(interaction), target, job, lang)
            except UserError as exc:
                reply = _error(lang, exc)
            except (DeliveryError, TimeoutError) as exc:
                log.warning("discord: /show %s not posted (%s)", job, exc)
                reply = t(lang, "error.generic")
        if reply != repost.shown:  # the outbox showed it before posting, as Discord needs
            await self._edit_original(interaction, reply)

    # ---- buttons (adapters.discord_parts.ButtonHandler) ------------------------------------

    async def on_reroll(self, interaction: Inter, job_id: str) -> None:
        """🔄: the same request again, as a new job with its own status message."""
        acked = await self._defer(interaction, ephemeral=False)
        lang = _lang(interaction)
        try:
            if not self._accepting:
                raise UserError("error.shutting_down")
            target = self._target(interaction, acked)
            ticket = await self.engine.reroll(_user(interaction), job_id, target, lang)
        except UserError as exc:
            await self._refuse(interaction, acked, _error(lang, exc))
            return
        await self.outbox.track(ticket.job_id, interaction, acked)

    async def on_unknown_button(self, interaction: Inter) -> None:
        try:
            await interaction.response.send_message(
                t(_lang(interaction), "discord.button_gone"), ephemeral=True
            )
        except discord.HTTPException as exc:
            log.info("discord: button press %s not answered (%s)", interaction.id, exc)

    async def on_cancel(self, interaction: Inter, job_id: str) -> None:
        """✖: cancel the job (only its owner may); the job's status message says so itself
        (so a press whose ack came too late still cancels, as `ephemeral` does)."""

        async def answer(user: UserRef, lang: str) -> str:
            job = await self.engine.cancel(user, job_id)
            return t(lang, "cancel.done", job=job.id)

        await self.ephemeral(interaction, answer)

    # ---- the engine's side (bot.adapter.Adapter) --------------------------------------------

    async def deliver(self, job: Job, images: Sequence[StoredImage]) -> str:
        return await self.outbox.deliver(job, images)

    async def status(self, job: Job, update: StatusUpdate) -> None:
        await self.outbox.status(job, update)

    def show_delivered(self, job: Job) -> None:
        self.outbox.show_delivered(job)

    async def notify(self, target: Target, text: str) -> None:
        await self.outbox.notify(target, text)


def _error(lang: str, exc: UserError) -> str:
    """A refusal as Discord shows it: what the user typed in it (a model, a job id) literally,
    the catalog's own words (`--n takes …`) as written."""
    return render_error(lang, exc, escape=escape_text)


def _lang(interaction: Inter) -> str:
    return pick_lang(interaction.locale.value)


def _user(interaction: Inter) -> UserRef:
    return UserRef("discord", str(interaction.user.id))
