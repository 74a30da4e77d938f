"""The batch CLI's adapter: what a failed job and a notice print, markup in them shown as typed."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from adapters.batch_adapter import BatchAdapter
from bot.adapter import StatusKind, StatusUpdate
from bot.jobs import Job, JobStatus, Options, Target, UserRef

HOSTILE = "⚠ Failed: [/x] [bold]loud[/bold] [link=x]here :smile: · job ab12 · not charged"


def job(prompt: str) -> Job:
    return Job(
        id="ab12", user=UserRef("cli", "me"), target=Target("cli", chat_id="1"), prompt=prompt,
        model="demo", provider="demo", options=Options(), status=JobStatus.FAILED, lang="en",
        day="d", created_at=0.0,
    )  # fmt: skip


async def test_failure_and_notice_texts_are_printed_literally(tmp_path: Path) -> None:
    screen = io.StringIO()
    console = Console(file=screen, width=200, color_system=None)
    with Progress(console=console, auto_refresh=False) as progress:
        task = progress.add_task("generate", total=1)
        adapter = BatchAdapter(tmp_path / "out", progress, task)
        await adapter.status(job("[/x]"), StatusUpdate(StatusKind.STARTED, "[/x] started"))
        await adapter.status(job("[/x]"), StatusUpdate(StatusKind.FAILED, HOSTILE))
        await adapter.notify(Target("cli", chat_id="1"), "note [/x] [bold]b :smile:")
        assert progress.tasks[0].completed == 1
    lines = screen.getvalue().splitlines()
    assert f"✗ line 1: {HOSTILE}" in lines  # the job's line in the prompts file
    assert "note [/x] [bold]b :smile:" in lines
    assert not any("started" in line for line in lines)  # only a final status is printed
    assert adapter.result.failures == [("ab12", HOSTILE)]
