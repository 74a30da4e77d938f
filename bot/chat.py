"""The chat text syntax, platform-free: a message in, the reply text out (adapters add the transport)."""

from __future__ import annotations

from dataclasses import dataclass

from bot.commands import parse_command, parse_job_ref, parse_prompt, shorten
from bot.engine import Engine
from bot.errors import UserError
from bot.jobs import Request, Target, Ticket, UserRef
from bot.texts import render_error, t

COMMANDS = ("imagine", "usage", "jobs", "cancel", "models", "settings", "help", "start")


@dataclass(frozen=True, slots=True)
class Reply:
    """What to answer: the text, and the ticket when a job was queued."""

    text: str
    ticket: Ticket | None = None
    error: bool = False


class Chat:
    """Turns `/imagine …`, `/usage`, `/jobs`, `/cancel`, `/models`, `/help` into engine calls."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

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
        command = parse_command(text, bot_username)
        if command is None:
            if not private:
                return None
            return await self.imagine(user, target, text, lang, reference_images)
        try:
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
                    return Reply(self.models_text(lang))
                case "settings":
                    model = self.engine.default_model
                    return Reply(t(lang, "settings.summary", model=model, lang=lang))
                case "help":
                    return Reply(t(lang, "help"))
                case "start":
                    return Reply(t(lang, "start") + "\n\n" + t(lang, "help"))
                case _:
                    return Reply(t(lang, "error.unknown_command", command=command.name), error=True)
        except UserError as exc:
            return Reply(render_error(lang, exc), error=True)

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
            return Reply(render_error(lang, exc), error=True)
        text = t(
            lang,
            "status.queued",
            job=ticket.job_id,
            position=ticket.position,
            model=ticket.model,
            n=ticket.n_images,
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
            spend=f"${u.usd:.2f}",
            spend_limit=unlimited if u.exempt or not u.usd_limit else f"${u.usd_limit:.2f}",
            jobs=u.active_jobs,
        )

    async def jobs_text(self, user: UserRef, lang: str) -> str:
        jobs = await self.engine.jobs(user, 10)
        if not jobs:
            return t(lang, "jobs.empty")
        lines = [t(lang, "jobs.header")]
        for job in jobs:
            lines.append(
                t(
                    lang,
                    "jobs.line",
                    job=job.id,
                    status=job.status.value,
                    model=job.model,
                    prompt=shorten(job.prompt, 40),
                )
            )
        return "\n".join(lines)

    def models_text(self, lang: str) -> str:
        lines = [t(lang, "models.header")]
        for spec in self.engine.catalog:
            if self.engine.router.available(spec):
                lines.append(
                    t(
                        lang,
                        "models.line",
                        name=spec.name,
                        price=f"${spec.price_for(spec.default_size):.3f}",
                        ratios=" ".join(spec.aspect_ratios),
                    )
                )
        return "\n".join(lines)
