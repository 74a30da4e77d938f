"""`drawbridge generate`: a batch of prompts through the same engine, with a progress bar."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import os
import re
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from adapters.batch_adapter import BatchAdapter
from bot.app import open_core
from bot.commands import ParsedPrompt, parse_command, parse_prompt, parse_ratio
from bot.engine import Engine
from bot.errors import QueueFull, SettingsError, UserError
from bot.jobs import BATCH_PLATFORM, JobStatus, Request, Target, UserRef
from bot.locks import holding_batch
from bot.logs import setup_logging
from bot.settings import Settings
from bot.texts import render_error, t

_LINE_END = re.compile(r"\r\n|\r|\n")


def read_prompts(args: argparse.Namespace) -> list[tuple[int, str]]:
    """(line number, prompt): the prompt argument, then the file's lines by their own numbers.

    Blank lines and `#` comments are skipped but still counted, so a failure's "line 7" and an
    image's `007-` are the file's line 7. The prompt argument is line 1 alone, line 0 before a
    file.
    """
    prompts: list[tuple[int, str]] = []
    if args.prompt:
        prompts.append((0 if args.file else 1, args.prompt))
    if args.file:
        data = args.file.read_bytes()
        try:
            # utf-8-sig: a file saved by Windows Notepad starts with a BOM, not whitespace.
            # Lines end at \n, \r\n or \r only: `splitlines` also splits at U+2028, form
            # feeds and the like, which made one prompt two paid jobs and shifted every line
            # number after it (the prompt's cleaning makes them spaces).
            lines = _LINE_END.split(data.decode("utf-8-sig"))
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise SettingsError(
                f"--file {args.file}: line {line} is not UTF-8 text; save the file as UTF-8"
            ) from None
        prompts.extend(
            (n, line.strip())
            for n, line in enumerate(lines, start=1)
            if line.strip() and not line.lstrip().startswith("#")
        )
    return prompts


def flag_defaults(args: argparse.Namespace) -> list[str]:
    """The --ar, --n and --seed flags as chat options, normalised and checked as the chat does."""
    words: list[str] = []
    if args.aspect_ratio is not None:
        words += ["--ar", parse_ratio(args.aspect_ratio)]  # `16x9` → `16:9`, as in a chat
    if args.n is not None:
        words += ["--n", str(args.n)]
    if args.seed is not None:
        words += ["--seed", str(args.seed)]
    parse_prompt(" ".join([*words, "flags"]))  # a bad flag is one error up front, not one a line
    return words


def parse_line(
    text: str, defaults: list[str], args: argparse.Namespace, max_chars: int
) -> ParsedPrompt:
    """One line's prompt and options; the flags are defaults, so each option the line gives wins."""
    # A line copied from a chat (`/imagine a cat`, `/img …`): the command is not part of the
    # prompt that is paid for.
    command = parse_command(text)
    if command is not None and command.name == "imagine":
        text = command.args
    # The parser reports `n=1` whether or not a line said `--n 1`, so the flags go in front of the
    # line's own words: the parser keeps an option's last value, and the line's come last.
    parsed = parse_prompt(" ".join([*defaults, text]), max_chars=max_chars)
    options = parsed.options
    if options.size is None and args.size is not None:
        options = replace(options, size=args.size)
    return ParsedPrompt(parsed.prompt, options, parsed.model or args.model)


def echo(text: str) -> Text:
    """A failure line for the console, the user's text in it shown literally (no markup, no emoji)."""
    return Text.assemble(("✗", "red"), " ", text)


def out_problem(out: Path) -> str | None:
    """Why --out cannot take the image files (None if it can), without making it yet: it
    is made when the first image arrives, so a run that makes none leaves nothing behind."""
    place = out
    while not place.exists():
        if place.parent == place:
            return "no such place"
        place = place.parent
    if not place.is_dir():
        return "not a directory" if place == out else f"{place} is not a directory"
    if not os.access(place, os.W_OK | os.X_OK):
        return "not writable" if place == out else f"{place} is not writable"
    return None


async def run_batch(settings: Settings, args: argparse.Namespace) -> int:
    """Submit every prompt (the engine's queue bound is the back-pressure), wait, summarise."""
    # The progress bar and per-line failures; soft wrap: a long reason stays one line in a log.
    console = Console(stderr=True, soft_wrap=True)
    report = Console(highlight=False)  # the summary, for scripts reading stdout
    setup_logging("WARNING", settings.log_format, settings.secret_values())
    prompts = read_prompts(args)
    if not prompts:
        console.print("drawbridge generate: give a prompt or --file with one prompt a line")
        return 2
    try:
        defaults = flag_defaults(args)
    except UserError as exc:
        console.print(Text(f"drawbridge generate: {render_error('en', exc)}"), highlight=False)
        return 2
    why = out_problem(args.out)  # before any job is paid for
    if why is not None:
        console.print(Text(f"drawbridge generate: --out {args.out}: {why}"), highlight=False)
        return 2
    try:
        user = UserRef("cli", getpass.getuser())
    except Exception:
        user = UserRef("cli", "local")
    # The batch CLI is the operator's own tool: no per-user quota or pending bound applies to it.
    overrides = {
        "admin_ids": settings.admin_ids | {str(user)},
        "max_pending_per_user": settings.queue_max,
    }
    started = time.monotonic()
    stopped: int | None = None  # jobs cancelled by a Ctrl-C, once one came
    # A bot that starts meanwhile leaves this batch's jobs to it (`bot.locks`).
    with holding_batch(settings.data_dir):
        async with open_core(settings, **overrides) as core:
            engine = core.engine
            with Progress(
                TextColumn("[bold]generating"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
            ) as progress:
                task = progress.add_task("generate", total=len(prompts))
                jobs: list[str] = []
                last_line = max(line_no for line_no, _ in prompts)
                adapter = BatchAdapter(args.out, progress, task, last_line)
                engine.register(adapter)
                await engine.start(resume=False)
                try:
                    await _submit_all(
                        engine, adapter, progress, task, prompts, defaults, args, user, jobs
                    )
                    await engine.run_until_idle()
                except asyncio.CancelledError:  # Ctrl-C: the runner cancels the main task once
                    current = asyncio.current_task()
                    if current is None or current.uncancel() > 0:
                        raise  # cancelled for another reason
                    stopped = await _stop(engine, user, settings.shutdown_grace)
            result = adapter.result
            # What the ledger charged, even for a job whose files could not be copied to --out.
            rows = [await engine.store.get_job(job_id) for job_id in jobs]
            result.cost_usd = sum(row.cost_usd for row in rows if row is not None)
    seconds = time.monotonic() - started
    report.print(
        t(
            "en",
            "batch.summary",
            images=len(result.files),
            failures=len(result.failures),
            cost=f"${result.cost_usd:.4f}",
            seconds=f"{seconds:.1f}",
        )
    )
    if result.files:
        report.print(Text(f"images in {args.out}/"))
    if stopped is not None:
        report.print(t("en", "batch.interrupted", cancelled=stopped))
        return 130
    return 1 if result.failures else 0


async def _stop(engine: Engine, user: UserRef, grace: float) -> int:
    """Ctrl-C: what is queued is cancelled; what is generating gets `grace` to finish, then is
    cancelled too (no later batch resumes a batch's jobs, and what they held would keep
    holding the budget). Cancelled jobs are not charged. How many were cancelled."""
    cancelled = 0

    async def cancel(job_ids: list[str]) -> None:
        nonlocal cancelled
        for job_id in job_ids:
            with contextlib.suppress(UserError):  # ended meanwhile, or finishing
                await engine.cancel(user, job_id)
                cancelled += 1

    await cancel([j.id for j in engine.active_jobs(user) if j.status is JobStatus.QUEUED])
    try:
        async with asyncio.timeout(grace):
            await engine.run_until_idle()
    except TimeoutError:
        await cancel([j.id for j in engine.active_jobs(user)])
        await engine.run_until_idle()
    return cancelled


async def _submit_all(
    engine: Engine,
    adapter: BatchAdapter,
    progress: Progress,
    task: TaskID,
    prompts: list[tuple[int, str]],
    defaults: list[str],
    args: argparse.Namespace,
    user: UserRef,
    jobs: list[str],
) -> None:
    """Submit every line (waiting while the queue is full); a refused one is reported by line."""
    for line_no, text in prompts:
        try:
            parsed = parse_line(text, defaults, args, engine.config.max_prompt_chars)
            request = Request(
                user=user,
                target=Target(BATCH_PLATFORM, chat_id=str(line_no)),
                prompt=parsed.prompt,
                options=parsed.options,
                model=parsed.model,
            )
            while True:
                try:
                    jobs.append((await engine.submit(request)).job_id)
                    break
                except QueueFull:
                    await asyncio.sleep(0.05)  # the queue is the back-pressure
        except UserError as exc:
            reason = render_error("en", exc)
            adapter.result.failures.append((f"line {line_no}", reason))
            progress.console.print(echo(f"line {line_no}: {reason}"), highlight=False)
            progress.advance(task)
