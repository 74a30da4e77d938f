"""The chat text syntax, platform-free: a message in, the reply text out (adapters add the transport)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from bot.commands import parse_command, parse_job_ref, parse_prompt, readable, shorten
from bot.engine import Engine
from bot.errors import InvalidRequest, NotAllowed, UserError
from bot.jobs import PLATFORMS, Request, Target, Ticket, UserRef
from bot.operator import MAX_COUNT, parse_policy_changes
from bot.quota import days_before
from bot.stats import period, render_period
from bot.texts import ECHO_MAX, money, plain, queued_text, render_error, t

COMMANDS = ("imagine", "usage", "jobs", "cancel", "models", "settings", "help", "start")
USER_COMMANDS = ("link", "history", "show")
ADMIN_COMMANDS = ("stats", "grant", "ban", "unban", "policy", "export")


@dataclass(frozen=True, slots=True)
class Reply:
    """What to answer: the text, and the ticket when a job was queued."""

    text: str
    ticket: Ticket | None = None
    error: bool = False
    document: tuple[str, bytes] | None = None  # (file name, bytes) to send as a file


class Chat:
    """Turns `/imagine …`, `/usage`, `/jobs`, `/cancel`, `/models`, `/help` into engine calls."""

    def __init__(self, engine: Engine, echo: Callable[[str], str] = plain) -> None:
        """`echo` escapes for the platform's markup what a user typed (a prompt, a name) where an
        answer repeats it; ids the parser has checked (`_member`, job ids) need none."""
        self.engine = engine
        self.echo = echo

    @property
    def platforms(self) -> frozenset[str]:
        """The platforms a user id in an admin command may name."""
        return PLATFORMS | frozenset(self.engine.adapters)

    async def handle(
        self,
        user: UserRef,
        target: Target,
        text: str,
        *,
        lang: str = "en",
        private: bool = True,
        bot_username: str | None = None,
        reference_images: tuple[bytes, ...] = (),
    ) -> Reply | None:
        """Answer one message; `None` when it is not for the bot (plain text in a group)."""
        text = readable(text)
        command = parse_command(text, bot_username)
        if command is None:
            if not private:
                return None
            return await self.imagine(user, target, text, lang, reference_images)
        try:
            self.admit(user, target)
            match command.name:
                case "imagine":
                    return await self.imagine(user, target, command.args, lang, reference_images)
                case "usage":
                    return Reply(await self.usage_text(user, lang))
                case "jobs":
                    return Reply(await self.jobs_text(user, lang))
                case "cancel":
                    job = await self.engine.cancel(user, parse_job_ref(command.args))
                    return Reply(t(lang, "cancel.done", job=job.id))
                case "models":
                    return Reply(self.models_text(lang, user, target))
                case "settings":
                    model = self.engine.default_model
                    return Reply(t(lang, "settings.summary", model=model, lang=lang))
                case "help":
                    return Reply(t(lang, "help"))
                case "start":
                    return Reply(t(lang, "start") + "\n\n" + t(lang, "help"))
                case "link":
                    if not private and not command.args.strip():
                        # The code joins whoever sends it back to this account (its quota, its
                        # history, an admin's rights): it is never shown in a group.
                        return Reply(t(lang, "link.private_only"), error=True)
                    return Reply(await self.link(user, command.args, lang, target))
                case "history":
                    return Reply(await self.jobs_text(user, lang, limit=25))
                case "show":
                    return Reply(await self.show(user, target, command.args, lang))
                case name if name in ADMIN_COMMANDS:
                    return await self.admin(user, target, name, command.args, lang)
                case _:
                    name = self.echo(shorten(command.name, ECHO_MAX))
                    return Reply(t(lang, "error.unknown_command", command=name), error=True)
        except UserError as exc:
            return Reply(render_error(lang, exc, self.echo), error=True)

    def admit(self, user: UserRef, target: Target) -> None:
        """Raise `NotAllowed` unless `ALLOWED_IDS` serves this user, chat or guild (or is unset).

        Every command checks it, not only /imagine: a private bot answers strangers with one
        short refusal, and shows them nothing of its models, limits or anyone's jobs.
        """
        if not self.engine.allowed(str(user), target):
            raise NotAllowed()

    async def imagine(
        self,
        user: UserRef,
        target: Target,
        args: str,
        lang: str,
        reference_images: tuple[bytes, ...] = (),
    ) -> Reply:
        try:
            parsed = parse_prompt(args, max_chars=self.engine.config.max_prompt_chars)
            ticket = await self.engine.submit(
                Request(
                    user=user,
                    target=target,
                    prompt=parsed.prompt,
                    options=parsed.options,
                    model=parsed.model,
                    reference_images=reference_images,
                    lang=lang,
                )
            )
        except UserError as exc:
            return Reply(render_error(lang, exc, self.echo), error=True)
        if ticket.cached_from is not None:
            return Reply(t(lang, "status.cached", job=ticket.job_id), ticket=ticket)
        text = queued_text(
            lang, ticket.job_id, ticket.position, ticket.model, ticket.n_images, ticket.reserved_usd
        )
        return Reply(text, ticket=ticket)

    async def usage_text(self, user: UserRef, lang: str) -> str:
        u = await self.engine.usage(user)
        unlimited = t(lang, "usage.unlimited")
        return t(
            lang,
            "usage.summary",
            images=u.images,
            image_limit=unlimited if u.exempt or not u.image_limit else u.image_limit,
            spend=money(u.usd),
            spend_limit=unlimited if u.exempt or not u.usd_limit else money(u.usd_limit),
            jobs=u.active_jobs,
        )

    async def jobs_text(self, user: UserRef, lang: str, limit: int = 10) -> str:
        jobs = await self.engine.jobs(user, limit)
        if not jobs:
            return t(lang, "jobs.empty")
        lines = [t(lang, "jobs.header")]
        for job in jobs:
            lines.append(
                t(
                    lang,
                    "jobs.line",
                    job=job.id,
                    status=t(lang, f"jobstatus.{job.status.value}"),
                    model=job.model,
                    prompt=self.echo(shorten(job.prompt, 40)),
                )
            )
        return "\n".join(lines)

    def models_text(
        self, lang: str, user: UserRef | None = None, target: Target | None = None
    ) -> str:
        """The models one can use here: served by a provider, and allowed here
        (`allowed_models`)."""
        engine = self.engine
        allowed = self.allowed_models(user, target)
        lines = [t(lang, "models.header")]
        for spec in engine.catalog:
            if engine.router.available(spec) and (not allowed or spec.name in allowed):
                lines.append(
                    t(
                        lang,
                        "models.line",
                        name=spec.name,
                        price=money(spec.price_for(spec.default_size)),
                        ratios=" ".join(spec.aspect_ratios),
                    )
                )
        return "\n".join(lines)

    def allowed_models(self, user: UserRef | None, target: Target | None) -> tuple[str, ...]:
        """The models the /policy of `target` names (none: any), for anyone but an admin, who
        skips policies."""
        engine = self.engine
        if target is None or (user is not None and engine.is_admin(user)):
            return ()
        return engine.operator.policy(target).models

    # ---- identity, history ------------------------------------------------------------------

    async def link(self, user: UserRef, args: str, lang: str, target: Target | None = None) -> str:
        code = args.strip()
        if not code:
            code = await self.engine.new_link_code(user)
            return t(lang, "link.code", code=code, minutes=10)
        account = await self.engine.link(user, code, target)
        return t(lang, "link.done", account=account)

    async def show(self, user: UserRef, target: Target, args: str, lang: str) -> str:
        job_id = parse_job_ref(args)
        if job_id is None:
            return t(lang, "error.show_needs_job")
        count = await self.engine.show(user, job_id, target)
        return t(lang, "show.done", job=job_id, n=count)

    # ---- admins -------------------------------------------------------------------------------

    async def admin(self, user: UserRef, target: Target, name: str, args: str, lang: str) -> Reply:
        if not self.engine.is_admin(user):
            return Reply(t(lang, "error.admin_only"), error=True)
        engine = self.engine
        words = args.split()
        now = engine.clock()
        actor = str(user)
        source = (user, target)  # the message: a restart's replay of it changes nothing again
        match name:
            case "stats":
                return Reply(await self.stats_text(lang))
            case "export":
                data = await engine.usage_csv()
                return Reply(t(lang, "export.done"), document=("drawbridge-usage.csv", data))
            case "grant":
                member = _member(words[0], user, self.platforms) if len(words) == 2 else None
                count = words[1] if len(words) == 2 else ""
                if member is None or not _COUNT.fullmatch(count) or not 0 < int(count) <= MAX_COUNT:
                    return Reply(t(lang, "error.grant_syntax"), error=True)
                account = engine.operator.account_of(member)
                day = engine.quotas.today()
                await engine.apply(
                    engine.operator.grant(account, day, int(words[1]), actor, now), source
                )
                return Reply(t(lang, "grant.done", user=member, images=int(words[1])))
            case "ban" | "unban":
                member = _member(words[0], user, self.platforms) if len(words) == 1 else None
                if member is None:
                    return Reply(t(lang, "error.ban_syntax", command=name), error=True)
                if name == "ban" and engine.is_admin(member):  # admins skip bans: say so
                    return Reply(t(lang, "error.ban_admin", user=member), error=True)
                if name == "ban":
                    await engine.apply(engine.operator.ban(member, actor, now), source)
                    await engine.cancel_banned()  # their jobs in the queue or generating
                else:
                    await engine.apply(engine.operator.unban(member, actor, now), source)
                return Reply(t(lang, f"{name}.done", user=member))
            case _:  # policy
                policy = engine.operator.policy(target)
                if words:
                    policy = parse_policy_changes(policy, words)
                    unknown = [m for m in policy.models if engine.catalog.get(m) is None]
                    if unknown:  # a typo would refuse every request in the chat
                        raise InvalidRequest("error.unknown_model", model=", ".join(unknown))
                    await engine.apply(engine.operator.set_policy(policy, actor, now), source)
                scope, rules = self.echo(policy.scope), self.echo(policy.describe())
                return Reply(t(lang, "policy.show", scope=scope, policy=rules))

    async def stats_text(self, lang: str) -> str:
        engine = self.engine
        today = engine.quotas.today()
        week = days_before(today, 6)
        parts = [
            render_period(await period(engine.store, t(lang, "stats.today"), today), lang),
            render_period(await period(engine.store, t(lang, "stats.week"), week), lang),
            t(lang, "stats.queue", queued=engine.queue_depth, running=engine.in_flight),
        ]
        return "\n".join(parts)


_COUNT = re.compile(r"[0-9]{1,7}")  # ASCII digits: "²".isdigit() is true, int("²") fails
_MEMBER = re.compile(r"(?:([a-z]+):)?([A-Za-z0-9_.-]{1,64})")


# Telegram and Discord know users by number (a Telegram chat identity's is negative): on them a
# name (`@alice`) names nobody, and a /grant or /ban "done" for it would reach no one.
_NUMERIC_IDS = {"telegram": re.compile(r"-?[0-9]{1,20}"), "discord": re.compile(r"[0-9]{1,20}")}


def _member(arg: str, caller: UserRef, platforms: frozenset[str]) -> str | None:
    """`telegram:123` as given, a bare id on the caller's platform; None for anything that
    could never name a user (`telegram:`, `telegarm:1`, `:5`). A name where the platform
    has numbers (`@alice` on Telegram) is refused with a hint where to find the number."""
    match = _MEMBER.fullmatch(arg.strip().lstrip("@"))
    if match is None:
        return None
    platform = match[1] or caller.platform
    if platform not in platforms:
        return None
    numeric = _NUMERIC_IDS.get(platform)
    if numeric is not None and not numeric.fullmatch(match[2]):
        raise InvalidRequest("error.member_by_number", platform=platform)
    return f"{platform}:{match[2]}"
