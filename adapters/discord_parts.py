"""Discord pieces the adapter is built from: the job's interaction record, persistent buttons,
command-text localisation, Discord's error codes, escaping what users typed, and images shrunk to
an upload limit."""

from __future__ import annotations

import io
import json
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import discord
import yarl
from discord import app_commands
from PIL import Image

from bot.errors import DeliveryError
from bot.images import extension_for
from bot.jobs import Options
from bot.providers.http import parse_retry_after
from bot.texts import pick_lang, t

Inter = discord.Interaction[discord.Client]

TOKEN_TTL = 15 * 60.0  # an interaction token answers followups and edits for 15 minutes
RETRY_WAIT_MAX = 10.0  # seconds: the longest wait before trying a refused final edit again
TOKEN_MARGIN = 60.0  # stop trusting it a minute early: an upload can take that long
DEFAULT_FILE_LIMIT = 10 * 1024 * 1024  # discord.utils.DEFAULT_FILE_SIZE_LIMIT_BYTES
FILES_PER_MESSAGE = 10

# Discord's JSON error codes the adapter acts on.
UNKNOWN_CHANNEL = 10003
UNKNOWN_WEBHOOK = 10015
UNKNOWN_INTERACTION = 10062
ALREADY_ACKNOWLEDGED = 40060
MISSING_ACCESS = 50001
MISSING_PERMISSIONS = 50013
INVALID_WEBHOOK_TOKEN = 50027
THREAD_ARCHIVED = 50083  # "Operation cannot be performed on an archived thread"
THREAD_LOCKED = 160005


# What Discord's markdown reads anywhere in a line: emphasis, spoilers and code; `[` opens a
# masked link (`]`, `(` and `)` are inert without it); `<` opens `<@id>`, `<@&id>`, `<#id>`,
# `<t:0:R>`, `</cmd:id>` and `<:emoji:id>` (`:` is inert without it); `#` and `>` make headings,
# subtext and quotes.
_MARKUP = re.compile(r"[\\*_~|`\[<>#]")
# What it reads only at the start of a line: a list item, `- x` or `1. x`.
_LIST_ITEM = re.compile(r"^(\s*)(-|\d+\.)(?=\s)", re.MULTILINE)


def escape_text(text: str) -> str:
    """`text` as a user typed it, never read as markup: each markdown character backslash-escaped
    on its own, and a list marker wherever `text` could start a line (Discord hides a backslash
    before punctuation). Not discord.py's `escape_markdown`: its masked-link pattern is greedy,
    so a second `[label](url)` stays a live link, and it leaves mentions and timestamps alone.
    The result can be twice as long as `text`."""
    escaped = _MARKUP.sub(lambda m: "\\" + m[0], text)
    return _LIST_ITEM.sub(lambda m: m[1] + m[2][:-1] + "\\" + m[2][-1], escaped)


def token_gone(exc: discord.HTTPException) -> bool:
    """Discord no longer knows this interaction token (too late, expired, or never acknowledged)."""
    return exc.code in (UNKNOWN_WEBHOOK, UNKNOWN_INTERACTION, INVALID_WEBHOOK_TOKEN)


def not_permitted(exc: discord.HTTPException) -> bool:
    return exc.code in (MISSING_ACCESS, MISSING_PERMISSIONS) or exc.status == 403


def channel_gone(exc: discord.HTTPException) -> bool:
    """The channel was deleted (10003), or is a thread archived or locked (a moderator's
    doing, not undone by waiting): the user can only be reached in their DMs."""
    return exc.code in (UNKNOWN_CHANNEL, THREAD_ARCHIVED, THREAD_LOCKED)


def fit_lines(answer: str, limit: int = 2000) -> str:
    """Whole lines of `answer` within Discord's message limit, "…" saying there is more."""
    if len(answer) <= limit:
        return answer
    cut = answer[: limit - 2]
    head, newline, _ = cut.rpartition("\n")
    return (head if newline else cut[:-1]) + "\n…"


def refused_for_now(exc: discord.HTTPException) -> bool:
    """A refusal that waiting may undo: a 429 that discord.py did not wait out itself (a
    Cloudflare one, without `Via`, or past its own tries), or Discord's 5xx."""
    return exc.status == 429 or exc.status >= 500


def retry_wait(exc: discord.HTTPException, attempt: int) -> float:
    """Seconds before try `attempt + 1`: the response's Retry-After, else 1, 2, 4 …; at most
    RETRY_WAIT_MAX (a ban of an hour is not waited out for one edit)."""
    wait = parse_retry_after(getattr(exc.response, "headers", None) or {})
    if wait is None:
        wait = float(2 ** (attempt - 1))
    return min(max(wait, 0.1), RETRY_WAIT_MAX)


def unreachable(exc: discord.HTTPException) -> bool:
    """The channel will not take a message from us, now or later: the DMs are the way."""
    return not_permitted(exc) or channel_gone(exc)


@dataclass(frozen=True, slots=True)
class Given:
    """The /imagine command's own options, each None where the user left it out."""

    aspect_ratio: str | None = None
    count: int | None = None
    size: str | None = None
    seed: int | None = None

    def over(self, typed: Options) -> Options:
        """These over the options typed in the prompt (`a fox --ar 16:9`): the command's win."""
        return Options(
            aspect_ratio=self.aspect_ratio or typed.aspect_ratio,
            n=typed.n if self.count is None else self.count,
            size=self.size or typed.size,
            seed=typed.seed if self.seed is None else self.seed,
        )


@dataclass(frozen=True, slots=True)
class InteractionMeta:
    """What a job keeps of the interaction that asked for it, in `Target.meta` (JSON).

    With it a restarted bot can still edit the status message and post the followup while the
    token lives, and knows when to fall back to a channel post. `token` is None when Discord
    refused the acknowledgement (10062): then every answer goes to the channel.
    """

    application_id: str
    token: str | None
    created_at: float
    size_limit: int
    interaction_id: str = ""

    def dump(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def load(cls, text: str | None) -> InteractionMeta | None:
        if not text:
            return None
        try:
            data = json.loads(text)
            return cls(
                application_id=str(data["application_id"]),
                token=data.get("token"),
                created_at=float(data["created_at"]),
                size_limit=int(data.get("size_limit") or DEFAULT_FILE_LIMIT),
                interaction_id=str(data.get("interaction_id", "")),
            )
        except (ValueError, KeyError, TypeError):
            return None

    def token_alive(self, now: float) -> bool:
        return self.token is not None and now < self.created_at + TOKEN_TTL - TOKEN_MARGIN


# ---- buttons ---------------------------------------------------------------------------------


class ButtonHandler(Protocol):
    """What the buttons call; the Discord adapter implements it."""

    async def on_reroll(self, interaction: Inter, job_id: str) -> None: ...

    async def on_cancel(self, interaction: Inter, job_id: str) -> None: ...

    async def on_unknown_button(self, interaction: Inter) -> None: ...


SEEN_INTERACTIONS = 4096  # interaction ids remembered, to drop an event delivered twice


class DrawbridgeClient(discord.Client):
    """A `discord.Client` that knows its adapter, so persistent buttons can reach it."""

    def __init__(
        self, handler: ButtonHandler, *, gateway: yarl.URL | None = None, **options: Any
    ) -> None:
        super().__init__(**options)
        self.handler = handler
        self._seen: OrderedDict[int, None] = OrderedDict()
        if gateway is not None:
            # Behind a gateway proxy (DISCORD_GATEWAY_URL), come back through it after a drop:
            # discord.py resumes at READY's `resume_gateway_url`, Discord's own address, around
            # the proxy (where the network reaches Discord only through it: never back). Its
            # socket takes that address just before it hands READY to this parser.
            parsers = self._connection.parsers
            parse_ready = parsers["READY"]

            def ready(data: Any) -> None:
                if self.ws is not None:
                    self.ws.gateway = gateway
                parse_ready(data)

            parsers["READY"] = ready

    def first_time(self, interaction: Inter) -> bool:
        """False for an interaction this process has had before: the gateway can deliver an
        event again (a replay around a reconnect), and acting on it twice would run a second
        job, and bill it, for one command or one press. (Its second ack would only get 40060.)
        """
        if interaction.id in self._seen:
            return False
        self._seen[interaction.id] = None
        if len(self._seen) > SEEN_INTERACTIONS:
            self._seen.popitem(last=False)
        return True

    async def on_interaction(self, interaction: Inter) -> None:
        """A button none of ours matches (one another version of the bot posted, say) is still
        answered: discord.py drops it, and the user would see "This interaction failed"."""
        if interaction.type is not discord.InteractionType.component:
            return
        data: dict[str, Any] = dict(interaction.data or {})
        custom_id = str(data.get("custom_id", ""))
        ours = any(p.fullmatch(custom_id) for p in (REROLL_ID, CANCEL_ID))
        if not ours and self.first_time(interaction):
            await self.handler.on_unknown_button(interaction)


def _client(interaction: Inter) -> DrawbridgeClient:
    client = interaction.client
    if not isinstance(client, DrawbridgeClient):
        raise TypeError("drawbridge buttons need a DrawbridgeClient")
    return client


def _handler(interaction: Inter) -> ButtonHandler:
    return _client(interaction).handler


class DrawbridgeTree(app_commands.CommandTree[DrawbridgeClient]):
    """The slash commands, each interaction acted on once (`DrawbridgeClient.first_time`)."""

    async def interaction_check(self, interaction: discord.Interaction[DrawbridgeClient]) -> bool:
        return self.client.first_time(interaction)


class _Once:
    """For a persistent button: its press is acted on once (`DrawbridgeClient.first_time`)."""

    async def interaction_check(self, interaction: Inter, /) -> bool:
        return _client(interaction).first_time(interaction)


JOB_ID = r"(?P<job>[a-z0-9]{1,32})"
REROLL_ID = re.compile(rf"drawbridge:reroll:{JOB_ID}")
CANCEL_ID = re.compile(rf"drawbridge:cancel:{JOB_ID}")


class RerollButton(
    _Once,
    discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]],
    template=REROLL_ID,
):
    """🔄 on a result: the same prompt and options again. Its custom id carries the job id,
    and the class is registered at start, so it works on messages posted before a restart."""

    def __init__(self, job_id: str, label: str = "🔄 Reroll") -> None:
        super().__init__(
            discord.ui.Button(
                label=label,
                style=discord.ButtonStyle.secondary,
                custom_id=f"drawbridge:reroll:{job_id}",
            )
        )
        self.job_id = job_id

    @classmethod
    async def from_custom_id(
        cls, interaction: Inter, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> RerollButton:
        return cls(match["job"])

    async def callback(self, interaction: Inter) -> None:
        await _handler(interaction).on_reroll(interaction, self.job_id)


class CancelButton(
    _Once,
    discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]],
    template=CANCEL_ID,
):
    """✖ on a status message while the job is queued or running."""

    def __init__(self, job_id: str, label: str = "✖ Cancel") -> None:
        super().__init__(
            discord.ui.Button(
                label=label,
                style=discord.ButtonStyle.danger,
                custom_id=f"drawbridge:cancel:{job_id}",
            )
        )
        self.job_id = job_id

    @classmethod
    async def from_custom_id(
        cls, interaction: Inter, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> CancelButton:
        return cls(match["job"])

    async def callback(self, interaction: Inter) -> None:
        await _handler(interaction).on_cancel(interaction, self.job_id)


def button_view(kind: str | None, job_id: str, lang: str) -> discord.ui.View | None:
    """The components for a message: `reroll`, `cancel`, or none."""
    if kind is None:
        return None
    view = discord.ui.View(timeout=None)
    if kind == "reroll":
        view.add_item(RerollButton(job_id, t(lang, "button.reroll")))
    elif kind == "cancel":
        view.add_item(CancelButton(job_id, t(lang, "button.cancel")))
    return view


# ---- command texts ---------------------------------------------------------------------------


def text(key: str) -> app_commands.locale_str:
    """A command or option description: English on the wire, localised through `TextsTranslator`."""
    return app_commands.locale_str(t("en", key), key=key)


class TextsTranslator(app_commands.Translator):
    """Gives Discord the Chinese descriptions for zh-CN and zh-TW from `bot.texts`."""

    async def translate(
        self,
        string: app_commands.locale_str,
        locale: discord.Locale,
        context: app_commands.TranslationContextTypes,
    ) -> str | None:
        key = string.extras.get("key")
        lang = pick_lang(locale.value)
        if not isinstance(key, str) or lang == "en":
            return None
        return t(lang, key)


# ---- images ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Upload:
    """One file ready to post, and whether it had to be shrunk to fit."""

    data: bytes
    filename: str
    shrunk: bool

    def file(self) -> discord.File:
        return discord.File(io.BytesIO(self.data), filename=self.filename)


def fit(data: bytes, mime: str, limit: int, stem: str) -> Upload:
    """`data` as it is when it fits `limit`; else re-encoded as JPEG, then scaled down until it fits."""
    if len(data) <= limit:
        return Upload(data, stem + extension_for(mime), False)
    with Image.open(io.BytesIO(data)) as img:
        frame = _rgb(img)
    size = len(data)
    for _ in range(12):
        for quality in (90, 80, 70):
            buf = io.BytesIO()
            frame.save(buf, "JPEG", quality=quality, optimize=True)
            size = buf.tell()
            if size <= limit:
                return Upload(buf.getvalue(), stem + ".jpg", True)
        # Bytes scale roughly with pixel count: aim a little under the limit.
        factor = max(0.3, min(0.9, (limit / size) ** 0.5 * 0.95))
        width, height = int(frame.width * factor), int(frame.height * factor)
        if width < 16 or height < 16:
            break
        frame = frame.resize((width, height), Image.Resampling.LANCZOS)
    raise DeliveryError(f"an image cannot be made smaller than {limit} bytes", permanent=True)


def _rgb(img: Image.Image) -> Image.Image:
    """The image as 8-bit RGB for a JPEG: 16-bit grey scaled (a plain convert clips it to white),
    transparency laid on white (not on whatever colour the clear pixels hold, often black)."""
    if img.mode.startswith("I"):  # I;16, I;16B, I: 16 or 32-bit grey
        img = img.convert("I").point(lambda v: v / 256).convert("L")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return img.convert("RGB")


def fit_all(images: Sequence[tuple[bytes, str, str]], limit: int) -> list[Upload]:
    """Every (data, mime, stem) fitted to `limit`; run in a worker thread (Pillow is CPU work)."""
    return [fit(data, mime, limit, stem) for data, mime, stem in images]


def batches(uploads: Sequence[Upload]) -> list[list[Upload]]:
    """At most ten files a message."""
    return [
        list(uploads[i : i + FILES_PER_MESSAGE]) for i in range(0, len(uploads), FILES_PER_MESSAGE)
    ]


def human_bytes(n: int) -> str:
    """`10 MB`, `7.5 MB`, `20 KB`: an upload limit as people read it."""
    mb = n / (1024 * 1024)
    if mb >= 1:
        return f"{mb:.0f} MB" if mb == int(mb) else f"{mb:.1f} MB"
    return f"{n / 1024:.0f} KB" if n >= 1024 else f"{n} B"
