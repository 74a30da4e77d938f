"""`drawbridge generate`: a batch of prompts through the same engine, with a progress bar."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from adapters.batch_adapter import BatchAdapter
from bot.app import open_core
from bot.commands import parse_prompt
from bot.errors import QueueFull, UserError
from bot.jobs import Options, Request, Target, UserRef
from bot.logs import setup_logging
from bot.settings import Settings
from bot.texts import render_error, t


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts: list[str] = []
    if args.prompt:
        prompts.append(args.prompt)
    if args.file:
        lines = args.file.read_text(encoding="utf-8").splitlines()
        prompts.extend(line.strip() for line in lines if line.strip() and not line.startswith("#"))
    return prompts


async def run_batch(settings: Settings, args: argparse.Namespace) -> int:
    """Submit every prompt (the engine's queue bound is the back-pressure), wait, summarise."""
    console = Console(stderr=True)  # the progress bar and per-line failures
    report = Console(highlight=False)  # the summary, for scripts reading stdout
    setup_logging("WARNING", settings.log_format, settings.secret_values())
    prompts = read_prompts(args)
    if not prompts:
        console.print("drawbridge generate: give a prompt or --file with one prompt a line")
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
            adapter = BatchAdapter(args.out, progress, task)
            engine.register(adapter)
            await engine.start(resume=False)
            for line_no, text in enumerate(prompts, start=1):
                try:
                    parsed = parse_prompt(text, max_chars=engine.config.max_prompt_chars)
                    options = Options(
                        aspect_ratio=parsed.options.aspect_ratio or args.aspect_ratio,
                        n=args.n
                        if args.n is not None and parsed.options.n == 1
                        else parsed.options.n,
                        size=parsed.options.size or args.size,
                        seed=parsed.options.seed if parsed.options.seed is not None else args.seed,
                    )
                    request = Request(
                        user=user,
                        target=Target("cli", chat_id=str(line_no)),
                        prompt=parsed.prompt,
                        options=options,
                        model=parsed.model or args.model,
                    )
                    while True:
                        try:
                            await engine.submit(request)
                            break
                        except QueueFull:
                            await asyncio.sleep(0.05)  # the queue is the back-pressure
                except UserError as exc:
                    reason = render_error("en", exc)
                    adapter.result.failures.append((f"line {line_no}", reason))
                    progress.console.print(
                        f"[red]✗[/red] line {line_no}: {reason}", highlight=False
                    )
                    progress.advance(task)
            await engine.run_until_idle()
        result = adapter.result
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
        report.print(f"images in {args.out}/")
    return 1 if result.failures else 0
