"""The batch CLI's side of the engine: copies each job's images to --out and moves a progress bar."""

from __future__ import annotations

import itertools
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.progress import Progress, TaskID
from rich.text import Text

from bot.adapter import StatusUpdate
from bot.jobs import Job, StoredImage, Target


@dataclass
class BatchResult:
    """What one batch run produced."""

    files: list[Path] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    cost_usd: float = 0.0


class BatchAdapter:
    """Platform `cli`: a job's target chat is its line number in the batch."""

    platform = "cli"

    def __init__(self, out_dir: Path, progress: Progress, task: TaskID, last_line: int = 1) -> None:
        self.out_dir = out_dir
        self.progress = progress
        self.task = task
        self.result = BatchResult()
        # File names start with the line number, as wide as the last one's (at least 3), so
        # that they sort in line order: `0999-` before `1000-`.
        self.width = max(3, len(str(last_line)))

    async def deliver(self, job: Job, images: Sequence[StoredImage]) -> str:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{int(job.target.chat_id):0{self.width}d}-{slug(job.prompt)}"
        names = []
        for image in images:
            suffix = f"-{image.index + 1}" if len(images) > 1 else ""
            dest = copy_new(image.path, self.out_dir, f"{stem}{suffix}", image.path.suffix)
            self.result.files.append(dest)
            names.append(dest.name)
        self.result.cost_usd += job.cost_usd
        self.progress.advance(self.task)
        return ",".join(names)

    async def status(self, job: Job, update: StatusUpdate) -> None:
        if update.kind.final:
            self.result.failures.append((job.id, update.text))
            # The text carries the prompt's words or a provider's message: never read as markup.
            line = Text.assemble(("✗", "red"), f" line {job.target.chat_id}: ", update.text)
            self.progress.console.print(line, highlight=False)
            self.progress.advance(self.task)

    async def notify(self, target: Target, text: str) -> None:
        self.progress.console.print(Text(text), highlight=False)


def copy_new(source: Path, folder: Path, name: str, ext: str) -> Path:
    """Copy `source` to `folder/name.ext`, or to `name.2.ext`, `name.3.ext`… when that is taken:
    an earlier run's images in the same folder are kept, not replaced."""
    for i in itertools.count(1):
        dest = folder / (f"{name}{ext}" if i == 1 else f"{name}.{i}{ext}")
        try:
            with source.open("rb") as src, dest.open("xb") as out:
                shutil.copyfileobj(src, out)
        except FileExistsError:
            continue
        return dest
    raise AssertionError("unreachable")


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe short form of a prompt."""
    words = re.sub(r"[^\w]+", "-", text.lower(), flags=re.UNICODE).strip("-")
    return words[:limit].rstrip("-") or "image"
