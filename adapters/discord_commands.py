"""The slash commands: `/imagine` with its options and autocompletes, the ephemeral ones, and the
operator's (admin) commands, whose logic lives in `bot.chat.Chat.admin`."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands

from adapters.discord_parts import DrawbridgeClient, Given, Inter, text
from bot.catalog import ModelSpec
from bot.commands import parse_job_ref, shorten
from bot.engine import Engine
from bot.jobs import JobStatus, UserRef
from bot.texts import money, pick_lang, t

if TYPE_CHECKING:
    from adapters.discord_adapter import DiscordAdapter

MAX_CHOICES = 25  # Discord's cap on choices and autocomplete results
AUTOCOMPLETE_WITHIN = 2.0  # seconds: an autocomplete answered after 3 s is dropped

log = logging.getLogger("drawbridge.discord")


def add_commands(tree: app_commands.CommandTree[DrawbridgeClient], adapter: DiscordAdapter) -> None:
    """Register every command on `tree`; handlers are closures over `adapter`."""
    engine, chat = adapter.engine, adapter.chat
    ratios: list[str] = []
    for spec in configured_models(engine):
        ratios.extend(r for r in spec.aspect_ratios if r not in ratios)
    ratio_choices = [app_commands.Choice(name=r, value=r) for r in ratios[:MAX_CHOICES]]

    @tree.command(name="imagine", description=text("discord.cmd.imagine"))
    @app_commands.describe(
        prompt=text("discord.opt.prompt"),
        aspect_ratio=text("discord.opt.aspect_ratio"),
        model=text("discord.opt.model"),
        count=text("discord.opt.count"),
        size=text("discord.opt.size"),
        seed=text("discord.opt.seed"),
        image=text("discord.opt.image"),
    )
    @app_commands.choices(aspect_ratio=ratio_choices)
    async def imagine(
        interaction: Inter,
        prompt: str,
        aspect_ratio: str | None = None,
        model: str | None = None,
        count: app_commands.Range[int, 1, 10] | None = None,
        size: str | None = None,
        seed: app_commands.Range[int, 0, 4294967295] | None = None,
        image: discord.Attachment | None = None,
    ) -> None:
        given = Given(aspect_ratio=aspect_ratio, count=count, size=size, seed=seed)
        await adapter.imagine(interaction, prompt, given, model, image)

    @imagine.autocomplete("model")
    async def model_choices(interaction: Inter, current: str) -> list[app_commands.Choice[str]]:
        user = UserRef("discord", str(interaction.user.id))
        allowed = adapter.chat.allowed_models(user, adapter.place(interaction))
        return models_matching(engine, current, allowed)

    @imagine.autocomplete("size")
    async def size_choices(interaction: Inter, current: str) -> list[app_commands.Choice[str]]:
        return sizes_matching(engine, interaction.namespace.model, current)

    @tree.command(name="usage", description=text("menu.usage"))
    async def usage(interaction: Inter) -> None:
        await adapter.ephemeral(interaction, chat.usage_text)

    @tree.command(name="jobs", description=text("menu.jobs"))
    async def jobs(interaction: Inter) -> None:
        await adapter.ephemeral(interaction, chat.jobs_text)  # the chat escapes the prompts

    @tree.command(name="cancel", description=text("menu.cancel"))
    @app_commands.describe(job=text("discord.opt.job"))
    async def cancel(interaction: Inter, job: str | None = None) -> None:
        async def answer(user: UserRef, lang: str) -> str:
            done = await engine.cancel(user, parse_job_ref(job or ""))
            return t(lang, "cancel.done", job=done.id)

        await adapter.ephemeral(interaction, answer)

    @cancel.autocomplete("job")
    async def job_choices(interaction: Inter, current: str) -> list[app_commands.Choice[str]]:
        user = UserRef("discord", str(interaction.user.id))
        lang = pick_lang(interaction.locale.value)
        return await active_jobs_matching(engine, user, current, lang)

    @tree.command(name="models", description=text("menu.models"))
    async def models(interaction: Inter) -> None:
        async def answer(user: UserRef, lang: str) -> str:
            return chat.models_text(lang, user, adapter.place(interaction))

        await adapter.ephemeral(interaction, answer)

    @tree.command(name="settings", description=text("menu.settings"))
    async def settings(interaction: Inter) -> None:
        async def answer(user: UserRef, lang: str) -> str:
            return t(lang, "settings.summary", model=engine.default_model, lang=lang)

        await adapter.ephemeral(interaction, answer)

    add_account_commands(tree, adapter)
    add_admin_commands(tree, adapter)


def add_account_commands(
    tree: app_commands.CommandTree[DrawbridgeClient], adapter: DiscordAdapter
) -> None:
    """Everyone's: `/link [code]`, `/history`, `/show job:`."""
    engine, chat = adapter.engine, adapter.chat

    @tree.command(name="link", description=text("discord.cmd.link"))
    @app_commands.describe(code=text("discord.opt.code"))
    async def link(interaction: Inter, code: str | None = None) -> None:
        async def answer(user: UserRef, lang: str) -> str:
            return await chat.link(user, code or "", lang)

        await adapter.ephemeral(interaction, answer)

    @tree.command(name="history", description=text("discord.cmd.history"))
    async def history(interaction: Inter) -> None:
        async def answer(user: UserRef, lang: str) -> str:
            return await chat.jobs_text(user, lang, limit=25)  # (fitted as every answer is)

        await adapter.ephemeral(interaction, answer)

    @tree.command(name="show", description=text("discord.cmd.show"))
    @app_commands.describe(job=text("discord.opt.show_job"))
    async def show(interaction: Inter, job: str) -> None:
        await adapter.show(interaction, job)

    @show.autocomplete("job")
    async def shown_job_choices(interaction: Inter, current: str) -> list[app_commands.Choice[str]]:
        user = UserRef("discord", str(interaction.user.id))
        return await finished_jobs_matching(engine, user, current)


def add_admin_commands(
    tree: app_commands.CommandTree[DrawbridgeClient], adapter: DiscordAdapter
) -> None:
    """`/stats`, `/grant`, `/ban`, `/unban`, `/policy`, `/export`: visible to all, and for
    ADMIN_IDS only; `Chat.admin` checks the caller and answers anyone else with a refusal."""

    @tree.command(name="stats", description=text("discord.cmd.stats"))
    async def stats(interaction: Inter) -> None:
        await adapter.admin(interaction, "stats")

    @tree.command(name="grant", description=text("discord.cmd.grant"))
    @app_commands.describe(user=text("discord.opt.user"), images=text("discord.opt.images"))
    async def grant(
        interaction: Inter,
        user: app_commands.Transform[str, MemberOption],
        images: app_commands.Range[int, 1, 1_000_000],
    ) -> None:
        await adapter.admin(interaction, "grant", f"{user} {images}")

    @tree.command(name="ban", description=text("discord.cmd.ban"))
    @app_commands.describe(user=text("discord.opt.user"))
    async def ban(interaction: Inter, user: app_commands.Transform[str, MemberOption]) -> None:
        await adapter.admin(interaction, "ban", user)

    @tree.command(name="unban", description=text("discord.cmd.unban"))
    @app_commands.describe(user=text("discord.opt.user"))
    async def unban(interaction: Inter, user: app_commands.Transform[str, MemberOption]) -> None:
        await adapter.admin(interaction, "unban", user)

    @tree.command(name="policy", description=text("discord.cmd.policy"))
    @app_commands.describe(
        models=text("discord.opt.models"),
        max_images=text("discord.opt.max_images"),
        daily_images=text("discord.opt.daily_images"),
        blocklist=text("discord.opt.blocklist"),
    )
    @app_commands.choices(blocklist=[app_commands.Choice(name=v, value=v) for v in ("on", "off")])
    async def policy(
        interaction: Inter,
        models: str | None = None,
        max_images: str | None = None,
        daily_images: str | None = None,
        blocklist: str | None = None,
    ) -> None:
        args = policy_args(
            models=models, max_images=max_images, daily_images=daily_images, blocklist=blocklist
        )
        await adapter.admin(interaction, "policy", args)

    @tree.command(name="export", description=text("discord.cmd.export"))
    async def export(interaction: Inter) -> None:
        await adapter.admin(interaction, "export")


MENTION = re.compile(r"<@!?(\d+)>")


def member_arg(value: object) -> str:
    """A user option as `Chat.admin` takes it: `discord:<id>` for a Discord user (resolved or
    not) or a bare id or mention; an id with its platform (`telegram:42`) as given."""
    if isinstance(value, discord.abc.Snowflake):  # User, Member, or an unresolved Object
        return f"discord:{value.id}"
    typed = "".join(str(value).split())
    if match := MENTION.fullmatch(typed):
        return f"discord:{match[1]}"
    return f"discord:{typed}" if typed.isdigit() else typed


class MemberOption(app_commands.Transformer[discord.Client]):
    """A Discord user option, handed over as `member_arg` makes it (never raises)."""

    @property
    def type(self) -> discord.AppCommandOptionType:
        return discord.AppCommandOptionType.user

    async def transform(self, interaction: Inter, value: Any, /) -> str:
        return member_arg(value)


def policy_args(**values: object) -> str:
    """The options given, as the `key=value` words of `/policy` (no spaces inside a value)."""
    return " ".join(
        f"{key}={''.join(str(value).split())}" for key, value in values.items() if value is not None
    )


def configured_models(engine: Engine) -> list[ModelSpec]:
    """The catalog's models whose provider this bot has a key for."""
    return [spec for spec in engine.catalog if spec.provider in engine.providers]


def models_matching(
    engine: Engine, current: str, allowed: tuple[str, ...] = ()
) -> list[app_commands.Choice[str]]:
    """The models to offer for `current`; `allowed`, the place's /policy models (if any)."""
    needle = current.strip().lower()
    choices = []
    for spec in configured_models(engine):
        if (needle and needle not in spec.name.lower()) or (allowed and spec.name not in allowed):
            continue
        label = f"{spec.name} · {money(spec.price_for(spec.default_size))}"
        if spec.description:
            label += f" · {spec.description}"
        choices.append(app_commands.Choice(name=label[:100], value=spec.name))
    return choices[:MAX_CHOICES]


def sizes_matching(engine: Engine, model: object, current: str) -> list[app_commands.Choice[str]]:
    """The sizes of the model chosen so far (the default model's when none is)."""
    name = model if isinstance(model, str) and model else engine.default_model
    spec = engine.catalog.get(name)
    sizes: list[str] = []
    for s in [spec] if spec is not None else configured_models(engine):
        sizes.extend(size for size in s.sizes if size not in sizes)
    needle = current.strip().lower()
    return [app_commands.Choice(name=s, value=s) for s in sizes if needle in s.lower()][
        :MAX_CHOICES
    ]


async def active_jobs_matching(
    engine: Engine, user: UserRef, current: str, lang: str = "en"
) -> list[app_commands.Choice[str]]:
    """The user's queued and running jobs, from memory: an autocomplete cannot be deferred,
    and Discord drops an answer after 3 s."""
    needle = current.strip().lower()
    choices = []
    for job in engine.active_jobs(user)[:MAX_CHOICES]:
        if needle in job.id:
            status = t(lang, f"jobstatus.{job.status.value}")
            label = f"{job.id} · {status} · {shorten(job.prompt, 60)}"
            choices.append(app_commands.Choice(name=label[:100], value=job.id))
    return choices


async def finished_jobs_matching(
    engine: Engine, user: UserRef, current: str
) -> list[app_commands.Choice[str]]:
    """The user's recent jobs that have images to show again; none if the database does not
    answer in time (an autocomplete cannot be deferred: Discord drops it after 3 s, and the
    user can still type the id)."""
    needle = current.strip().lstrip("#").lower()
    choices = []
    try:
        async with asyncio.timeout(AUTOCOMPLETE_WITHIN):
            recent = await engine.jobs(user, MAX_CHOICES)
    except TimeoutError:
        log.warning("discord: /show's job list took over %g s; offered none", AUTOCOMPLETE_WITHIN)
        return []
    for job in recent:
        if job.status is JobStatus.SUCCEEDED and needle in job.id:
            label = f"{job.id} · {job.model} · {shorten(job.prompt, 60)}"
            choices.append(app_commands.Choice(name=label[:100], value=job.id))
    return choices
