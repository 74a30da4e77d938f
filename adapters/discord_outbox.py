"""Everything drawbridge posts or edits on Discord for a job: its status message and its result.

A status message is the interaction's deferred response (`w:<id>`, edited with the interaction
token) or, when there is no live token, a channel message (`c:<id>`, edited with the bot token);
the ref is recorded on the job so a restarted bot edits the same message. Edits are coalesced by
a `StatusBoard`. Results go as the interaction's followup while the token lives, else to the
channel with a mention, else (no permission there) to the user's DMs. A `/show` re-post goes
as followups of the `/show` interaction, and touches no status message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import discord

from adapters.discord_parts import (
    DEFAULT_FILE_LIMIT,
    Inter,
    InteractionMeta,
    Upload,
    batches,
    button_view,
    channel_gone,
    escape_text,
    fit_all,
    human_bytes,
    not_permitted,
    refused_for_now,
    retry_wait,
    token_gone,
    unreachable,
)
from adapters.status_board import StatusBoard
from bot.adapter import StatusKind, StatusUpdate, ended_without_result
from bot.commands import shorten
from bot.engine import Engine
from bot.errors import DeliveryError
from bot.jobs import Job, JobStatus, StoredImage, Target
from bot.texts import queued_text, t

log = logging.getLogger("drawbridge.discord")


CAPTION_PROMPT_MAX = 1500  # characters of the escaped prompt in a result's caption (limit 2000)
FINAL_TRIES = 3  # a job's final status edit, refused for now (`refused_for_now`)
SETTLE_WAITS = (0.5, 1.0)  # seconds before the deferred response's edit is tried again


def escaped_prompt(prompt: str, limit: int) -> str:
    """The prompt with Discord's markdown escaped, cut so that the escaped text fits `limit`.

    Escaping can double a prompt's length (`**` → `\\*\\*`), so it is cut before, by what
    the last try overshot; cutting after could split an escape.
    """
    cut = limit
    while True:
        text = escape_text(shorten(prompt, cut))
        if len(text) <= limit or cut <= 1:
            return text
        cut -= len(text) - limit


@dataclass(frozen=True, slots=True)
class _Message:
    """One message of a result; files are made fresh for each send (discord.py closes them)."""

    uploads: list[Upload]
    content: str
    view: discord.ui.View | None

    def files(self) -> list[discord.File]:
        return [u.file() for u in self.uploads]


@dataclass(frozen=True, slots=True)
class _Status:
    """A status message's next content: the text, its buttons, and the job it belongs to."""

    job: Job
    text: str
    buttons: str | None  # "cancel", "reroll" or None
    final: bool = False  # the message will not change again
    quiet: bool = False  # worth an edit, not a new message (the result already said it)


@dataclass(slots=True)
class Repost:
    """A `/show` under way: its interaction, the asker's language, what its response now says."""

    interaction: Inter
    lang: str
    shown: str | None = None


class DiscordOutbox:
    """Status edits and deliveries for the Discord adapter; `bind` it to a logged-in client."""

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Callable[[], float],
        edit_interval: float,
        first_edit_delay: float,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.client: discord.Client | None = None
        self._board: StatusBoard[_Status] = StatusBoard(
            self._send_status, edit_interval, first_edit_delay
        )
        self._live: dict[str, Inter] = {}  # job id → the interaction that asked, this process
        self._status_refs: dict[str, str] = {}  # job id → "w:<id>" or "c:<id>"
        self._dead: set[str] = set()  # jobs whose interaction token Discord refused
        self._edited: set[str] = set()  # jobs whose deferred response this process has edited
        self._queued: dict[str, int] = {}  # job id → the queue position last shown
        self._reposts: dict[str, Repost] = {}  # interaction id → a /show under way

    def bind(self, client: discord.Client) -> None:
        self.client = client

    async def close(self) -> None:
        """Let pending status edits go out (final ones at once) while the client is still open."""
        await self._board.close()

    async def track(self, job_id: str, interaction: Inter, acked: int | None) -> None:
        """Remember the job's status message, then show its queue position there."""
        if acked is not None:
            self._live[job_id] = interaction
            if acked:
                await self._remember(job_id, f"w:{acked}")
        job = self.engine.active_job(job_id)  # looked up after the await: it may have started
        if job is None or job.status is not JobStatus.QUEUED:
            return  # already started (its own status is on the way) or already over
        position = self.engine.position(job_id) or 1
        self._queued[job_id] = position
        self._board.push(job_id, self._queued_status(job, position))

    def _queued_status(self, job: Job, position: int) -> _Status:
        text = queued_text(job.lang, job.id, position, job.model, job.n_images, job.reserved_usd)
        return _Status(job, text, "cancel")

    async def _remember(self, job_id: str, ref: str) -> None:
        self._status_refs[job_id] = ref
        await self.engine.attach_status_message(job_id, ref)

    async def refresh_positions(self, interval: float) -> None:
        """Move each waiting job's shown position as the queue drains (coalesced like all edits)."""
        while True:
            await asyncio.sleep(interval)
            for job_id, shown in list(self._queued.items()):
                if job_id not in self._live:
                    continue  # a channel message: its edits spend the channel's budget
                job = self.engine.active_job(job_id)
                if job is None or job.status is not JobStatus.QUEUED:
                    self._queued.pop(job_id, None)
                    continue
                position = self.engine.position(job_id)
                if position and position != shown:
                    self._queued[job_id] = position
                    self._board.push(job_id, self._queued_status(job, position))

    async def status(self, job: Job, update: StatusUpdate) -> None:
        """Queue an edit of the job's status message and return at once."""
        self._queued.pop(job.id, None)
        kind = update.kind
        buttons = None
        if kind in (StatusKind.QUEUED, StatusKind.STARTED, StatusKind.PROGRESS):
            buttons = "cancel"
        elif ended_without_result(job, update):
            buttons = "reroll"
        status = _Status(job, update.text, buttons, final=kind.final)
        self._board.push(job.id, status, final=status.final)

    async def _send_status(self, job_id: str, status: _Status) -> None:
        """Edit the status message wherever it lives; a final state ends the job's bookkeeping.

        A final state refused for now (a 429 discord.py does not wait out, Cloudflare's; a
        5xx) is tried again, `FINAL_TRIES` times in all: posted anew at the first refusal, the
        reply said "Generating… ✖" for good beside a second message saying done.
        """
        job = status.job
        view = button_view(status.buttons, job.id, job.lang)
        meta = InteractionMeta.load(job.target.meta)
        posting = False

        async def once() -> None:
            nonlocal posting
            posting = False
            ref = self._status_refs.get(job_id) or job.status_message_id
            if meta is not None and self._token_alive(job_id, meta):
                try:
                    if await self._edit_via_token(job_id, meta, ref, status.text, view):
                        return
                except discord.HTTPException as exc:
                    if not token_gone(exc):
                        raise
                    self._dead.add(job_id)
            in_channel = ref is not None and (ref.startswith("c:") or status.final)
            if in_channel and ref and await self._edit_in_channel(job, ref, status.text, view):
                return
            if ref is None or (status.final and not status.quiet):
                # No message of ours to edit (Discord refused the ack, or the token died):
                # the channel hears it, with a mention. Progress on a dead token just waits.
                posting = True
                await self._post_status(job, status.text, view)

        try:
            for attempt in range(1, FINAL_TRIES + 1):
                try:
                    await once()
                    return
                except discord.HTTPException as exc:
                    if status.final and attempt < FINAL_TRIES and refused_for_now(exc):
                        await asyncio.sleep(retry_wait(exc, attempt))
                        continue
                    self._log_http("status of job " + job_id, job.target.chat_id, exc)
                    if status.final and not status.quiet:
                        await self._tell_anyway(job, status.text, view, exc, edited=not posting)
                    return
        finally:
            if status.final:
                self._forget(job_id)
                # Sent, or every way tried: only a crash (or a stop cutting the send off)
                # before here makes a restart tell it again.
                task = asyncio.current_task()
                if task is None or not task.cancelling():
                    self.engine.job_told(job_id)

    async def _edit_in_channel(
        self, job: Job, ref: str, content: str, view: discord.ui.View | None
    ) -> bool:
        """Edit with the bot token: our channel message, or (once its token is gone) the
        interaction's response, which the bot authored and may still edit in a guild channel.
        A failure on the latter is expected (DMs, no access) and returns False."""
        message = self._channel(job.target.chat_id).get_partial_message(int(ref[2:]))
        try:
            await message.edit(content=content, view=view)
        except discord.HTTPException:
            if ref.startswith("c:"):
                raise
            return False
        return True

    async def _tell_anyway(
        self,
        job: Job,
        text: str,
        view: discord.ui.View | None,
        exc: discord.HTTPException,
        *,
        edited: bool,
    ) -> None:
        """A job's outcome whose message failed: an edit that failed (the status message was
        deleted, 10008, or will take no more edits, 30046) is posted anew in the channel; a
        channel that refuses us is told by DM."""
        if edited and not unreachable(exc):
            try:
                await self._post_status(job, text, view)
                return
            except discord.HTTPException as again:
                self._log_http("outcome of job " + job.id, job.target.chat_id, again)
                exc = again
        if unreachable(exc):
            await self._tell_by_dm(job, text, gone=channel_gone(exc))

    async def _tell_by_dm(self, job: Job, text: str, *, gone: bool = False) -> None:
        """The channel refused us (50013) or is gone (10003): the user hears the outcome in
        their DMs, if they may."""
        try:
            dm = await self._require().create_dm(discord.Object(int(job.user.user_id)))
            key = "discord.channel_gone" if gone else "discord.no_permission"
            note = t(job.lang, key, channel=job.target.chat_id)
            await dm.send(f"{text}\n{note}")
        except discord.HTTPException as exc:
            log.warning("discord: job=%s outcome not shown anywhere (%s)", job.id, exc.code)

    async def _edit_via_token(
        self,
        job_id: str,
        meta: InteractionMeta,
        ref: str | None,
        content: str,
        view: discord.ui.View | None,
    ) -> bool:
        """Edit the interaction's response: through the interaction while this process holds it,
        else (after a restart) as the interaction webhook's message. False if neither can."""
        interaction = self._live.get(job_id)
        if interaction is not None:
            message = await interaction.edit_original_response(content=content, view=view)
            self._edited.add(job_id)
            if ref is None:
                await self._remember(job_id, f"w:{message.id}")
            return True
        if ref is not None and ref.startswith("w:"):
            await self._webhook(meta).edit_message(int(ref[2:]), content=content, view=view)
            return True
        return False

    async def _post_status(self, job: Job, content: str, view: discord.ui.View | None) -> None:
        message = await self._channel(job.target.chat_id).send(
            f"<@{job.user.user_id}> {content}",
            view=view or discord.utils.MISSING,
            allowed_mentions=_mention(job),
        )
        await self._remember(job.id, f"c:{message.id}")

    def _forget(self, job_id: str) -> None:
        self._live.pop(job_id, None)
        self._edited.discard(job_id)
        self._status_refs.pop(job_id, None)
        self._dead.discard(job_id)
        self._queued.pop(job_id, None)

    def _token_alive(self, job_id: str, meta: InteractionMeta) -> bool:
        return job_id not in self._dead and meta.token_alive(self.clock())

    @contextlib.contextmanager
    def reposting(self, interaction: Inter, lang: str) -> Iterator[Repost]:
        """While it lasts, a delivery whose target is `interaction` is a `/show` re-post."""
        repost = Repost(interaction, lang)
        self._reposts[str(interaction.id)] = repost
        try:
            yield repost
        finally:
            self._reposts.pop(str(interaction.id), None)

    async def deliver(self, job: Job, images: Sequence[StoredImage]) -> str:
        """Post the images (≤ 10 a message, each within the upload limit) with a 🔄 button.

        As the interaction's followup while its token lives; else, or when Discord says the
        token is gone, in the channel with a mention; if the bot may not post there, by DM.
        """
        meta = InteractionMeta.load(job.target.meta)
        if meta is not None and (repost := self._reposts.get(meta.interaction_id)) is not None:
            return await self._repost(job, images, meta, repost)
        limit = meta.size_limit if meta is not None else DEFAULT_FILE_LIMIT
        posted: list[str] = []
        quiet = False
        if meta is not None and self._token_alive(job.id, meta):
            uploads = await self._uploads(job, images, limit)
            webhook = self._webhook(meta)
            try:
                if not await self._settle_response(job, meta):
                    # Still "thinking…": a followup would become the response itself, and the
                    # "done" edit would then take its caption and 🔄. The channel gets it.
                    raise _Unsettled()
                for message in self._messages(job, uploads, limit):
                    sent = await webhook.send(
                        message.content,
                        files=message.files(),
                        view=message.view or discord.utils.MISSING,
                        wait=True,
                    )
                    posted.append(str(sent.id))
            except _Unsettled:
                pass
            except discord.HTTPException as exc:
                if posted or not (token_gone(exc) or channel_gone(exc)):
                    raise _delivery_error(exc) from None
                self._dead.add(job.id)
                if channel_gone(exc):  # deleted while the job ran: the user's DMs get it
                    self._log_http("result of job " + job.id, job.target.chat_id, exc)
                    limit = min(limit, DEFAULT_FILE_LIMIT)
                    uploads = await self._uploads(job, images, limit)
                    posted = await self._post_to_dm(job, uploads, limit, gone=True)
                    quiet = True  # the DM is the news: no "done" to a channel that is gone
                else:
                    log.info(
                        "discord: job=%s token gone (%s): posting to the channel", job.id, exc.code
                    )
        if not posted:
            posted = await self._post_in_channel(job, images, limit)
            quiet = True  # the mention on the result is the news; "done" is only an edit
        self.show_delivered(job, quiet=quiet)
        return ",".join(posted)

    def show_delivered(self, job: Job, *, quiet: bool = True) -> None:
        """The job's status message says "done" (after its result, or again after a restart);
        `quiet`: an edit that fails is not posted anew (the result carried the news)."""
        text = t(job.lang, "status.delivered", job=job.id)
        self._board.push(job.id, _Status(job, text, None, final=True, quiet=quiet), final=True)

    async def _settle_response(self, job: Job, meta: InteractionMeta) -> bool:
        """A job done before its status reached the deferred response ("thinking…", the first
        edit waits a moment; or a restart cut the edits off): edit that response first, since
        Discord turns the first followup after a defer into the response itself, and the
        "done" edit would then overwrite the result's caption and its 🔄 button. After a
        restart this process cannot know whether it was edited: once more does no harm.

        False when every try failed (a 429 discord.py does not wait out, a 5xx): the result
        must not go as a followup then. A token Discord no longer takes is left to the
        followup, which finds the same and goes to the channel."""
        if job.id in self._edited:
            return True
        content = t(job.lang, "status.started", model=job.model, job=job.id)
        for wait in (*SETTLE_WAITS, None):
            interaction = self._live.get(job.id)
            ref = self._status_refs.get(job.id) or job.status_message_id
            try:
                if interaction is not None:
                    await interaction.edit_original_response(content=content)
                elif ref is not None and ref.startswith("w:") and ref[2:].isdigit():
                    await self._webhook(meta).edit_message(int(ref[2:]), content=content)
                else:
                    return True
                self._edited.add(job.id)
                return True
            except discord.HTTPException as exc:
                if token_gone(exc) or unreachable(exc):
                    return True
                log.info("discord: job=%s response not settled before its result (%s)", job.id, exc)
                if wait is None:
                    return False
                await asyncio.sleep(wait)
        return False

    async def _repost(
        self, job: Job, images: Sequence[StoredImage], meta: InteractionMeta, repost: Repost
    ) -> str:
        """`/show`: the images again, in the asker's language, as public followups of the
        ephemeral `/show` response. That response is edited first: Discord turns the first
        followup after a defer into the (ephemeral) response itself."""
        job = replace(job, lang=repost.lang)
        uploads = await self._uploads(job, images, meta.size_limit)
        text = t(repost.lang, "show.done", job=job.id, n=len(images))
        posted: list[str] = []
        try:
            await repost.interaction.edit_original_response(content=text)
            repost.shown = text
            for message in self._messages(job, uploads, meta.size_limit):
                sent = await repost.interaction.followup.send(
                    message.content,
                    files=message.files(),
                    view=message.view or discord.utils.MISSING,
                    wait=True,
                )
                posted.append(str(sent.id))
        except discord.HTTPException as exc:
            raise _delivery_error(exc) from None
        return ",".join(posted)

    async def _uploads(self, job: Job, images: Sequence[StoredImage], limit: int) -> list[Upload]:
        def load() -> list[Upload]:
            items = [
                (image.path.read_bytes(), image.mime, f"{job.id}-{image.index + 1}")
                for image in images
            ]
            return fit_all(items, limit)

        return await asyncio.to_thread(load)

    def _messages(
        self, job: Job, uploads: list[Upload], limit: int, *, mention: bool = False
    ) -> list[_Message]:
        """Each message of a result: the caption on the first, 🔄 on the last."""
        prompt = escaped_prompt(job.prompt, CAPTION_PROMPT_MAX)
        if job.options.seed is not None:
            caption = t(
                job.lang,
                "caption",
                prompt=prompt,
                model=job.model,
                seed=job.options.seed,
                job=job.id,
            )
        else:
            caption = t(job.lang, "caption.random", prompt=prompt, model=job.model, job=job.id)
        if any(u.shrunk for u in uploads):
            caption += "\n" + t(job.lang, "discord.scaled", limit=human_bytes(limit))
        if mention:
            caption = f"<@{job.user.user_id}> {caption}"
        groups = batches(uploads)
        last = len(groups) - 1
        return [
            _Message(
                uploads=group,
                content=caption if i == 0 else "",
                view=button_view("reroll", job.id, job.lang) if i == last else None,
            )
            for i, group in enumerate(groups)
        ]

    async def _post_in_channel(
        self, job: Job, images: Sequence[StoredImage], limit: int
    ) -> list[str]:
        """The result as a channel message, within the guild's upload limit (a boosted guild's
        is raised for a bot's uploads too; the interaction said what it is), else the default
        10 MiB. Refused as too large at the guild's limit (413), it goes at the default; the
        DMs, where the channel is closed to us, take the default only."""
        if job.target.guild_id is None:
            limit = min(limit, DEFAULT_FILE_LIMIT)
        while True:
            uploads = await self._uploads(job, images, limit)
            try:
                return await self._post_to_channel(job, uploads, limit)
            except _TooLarge:
                limit = DEFAULT_FILE_LIMIT
            except _ChannelClosed as closed:
                if limit > DEFAULT_FILE_LIMIT:
                    uploads = await self._uploads(job, images, DEFAULT_FILE_LIMIT)
                return await self._post_to_dm(
                    job, uploads, DEFAULT_FILE_LIMIT, gone=channel_gone(closed.exc)
                )

    async def _post_to_channel(self, job: Job, uploads: list[Upload], limit: int) -> list[str]:
        channel = self._channel(job.target.chat_id)
        posted: list[str] = []
        try:
            for message in self._messages(job, uploads, limit, mention=True):
                sent = await channel.send(
                    message.content,
                    files=message.files(),
                    view=message.view or discord.utils.MISSING,
                    allowed_mentions=_mention(job),
                )
                posted.append(str(sent.id))
            return posted
        except discord.HTTPException as exc:
            if not posted and exc.status == 413 and limit > DEFAULT_FILE_LIMIT:
                raise _TooLarge() from None
            if not unreachable(exc) or posted:
                raise _delivery_error(exc) from None
            self._log_http("result of job " + job.id, job.target.chat_id, exc)
            raise _ChannelClosed(exc) from None

    async def _post_to_dm(
        self, job: Job, uploads: list[Upload], limit: int, *, gone: bool = False
    ) -> list[str]:
        client = self._require()
        key = "discord.moved_from_gone" if gone else "discord.moved_to_dm"
        note = t(job.lang, key, channel=job.target.chat_id)
        posted = []
        try:
            dm = await client.create_dm(discord.Object(int(job.user.user_id)))
            for i, message in enumerate(self._messages(job, uploads, limit)):
                sent = await dm.send(
                    f"{note}\n{message.content}" if i == 0 else message.content,
                    files=message.files(),
                    view=message.view or discord.utils.MISSING,
                )
                posted.append(f"dm:{sent.id}")
        except discord.HTTPException as exc:
            raise DeliveryError(
                f"discord: neither channel {job.target.chat_id} nor the user's DMs take the "
                f"result ({exc.status} {exc.code})",
                permanent=True,
            ) from None
        return posted

    async def notify(self, target: Target, text: str) -> None:
        try:
            if target.meta == "dm":  # chat_id is a user id: an admin alert
                dm = await self._require().create_dm(discord.Object(int(target.chat_id)))
                await dm.send(text[:2000])
                return
            await self._channel(target.chat_id).send(text[:2000])
        except discord.HTTPException as exc:
            raise _delivery_error(exc) from None

    def _require(self) -> discord.Client:
        if self.client is None:
            raise RuntimeError("DiscordOutbox.bind() was not called")
        return self.client

    def _webhook(self, meta: InteractionMeta) -> discord.Webhook:
        client = self._require()
        if meta.token is None:
            raise RuntimeError("no interaction token")
        return discord.Webhook.partial(int(meta.application_id), meta.token, client=client)

    def _channel(self, chat_id: str) -> discord.PartialMessageable:
        client = self._require()
        return client.get_partial_messageable(int(chat_id))

    def _log_http(self, what: str, channel_id: str, exc: discord.HTTPException) -> None:
        if not_permitted(exc):
            log.error(
                "discord: missing permissions in channel %s (code %s) for the %s: give the bot "
                "View Channel, Send Messages and Attach Files there",
                channel_id,
                exc.code,
                what,
            )
        else:
            log.warning("discord: %s not shown (%s %s)", what, exc.status, exc.code)


class _Unsettled(Exception):
    """The deferred response could not be edited before the result: it goes to the channel."""


def _mention(job: Job) -> discord.AllowedMentions:
    return discord.AllowedMentions(users=[discord.Object(int(job.user.user_id))])


class _TooLarge(Exception):
    """A channel refused an upload within the guild's limit as too large (413)."""


class _ChannelClosed(Exception):
    """The channel will not take the result (`unreachable`): the DMs are the way."""

    def __init__(self, exc: discord.HTTPException) -> None:
        super().__init__(str(exc))
        self.exc = exc


def _delivery_error(exc: discord.HTTPException) -> DeliveryError:
    permanent = exc.status in (400, 403, 404, 413) or not_permitted(exc)
    return DeliveryError(f"discord said {exc.status} (code {exc.code})", permanent=permanent)
