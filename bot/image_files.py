"""Image files under the data dir: folders made once, files written whole, old ones removed."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from functools import partial
from pathlib import Path

# Job ids are lowercase base32: one folder per first character.
FOLDERS = "abcdefghijklmnopqrstuvwxyz234567"


def unlink_all(paths: Iterable[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def write_files(items: Sequence[tuple[Path, bytes]]) -> None:
    """Write image files before their rows are committed.

    A crash mid-write leaves a file no row points at (the job runs again and rewrites it), so
    no temp-file-and-rename dance is needed: the row, committed after this returns, is the mark
    that the file is whole.
    """
    for path, data in items:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            fd = os.open(path, flags, 0o644)
        except FileNotFoundError:  # the first file in its folder (Store.open made the usual ones)
            os.makedirs(path.parent, exist_ok=True)
            fd = os.open(path, flags, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)


def make_dirs(data_dir: Path) -> None:
    folders = [data_dir, data_dir / "images", data_dir / "refs"]
    folders += [data_dir / "images" / c for c in FOLDERS]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)


Files = Sequence[tuple[Path, bytes]]


def _write_batch(units: Sequence[Files]) -> list[OSError | None]:
    """Write each unit's files; a unit that fails fails alone."""
    errors: list[OSError | None] = []
    for files in units:
        try:
            write_files(files)
        except OSError as exc:
            errors.append(exc)
        else:
            errors.append(None)
    return errors


class FileWriter:
    """Image files written on a small thread pool, many jobs' files to one thread hop.

    Handing a job's files to a thread and hearing back costs the event loop a pool submit and a
    self-pipe wakeup: py-spy on `bench.engine` put those hops at a third of the loop. So the
    writes asked for in one turn of the loop go to a thread together, and while every worker
    is busy they gather for the next free one; one job alone still goes at once.
    """

    def __init__(self, workers: int) -> None:
        self._workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="image-files")
        self._pending: list[tuple[Files, asyncio.Future[None]]] = []
        self._busy = 0
        self._flush_soon = False

    async def write(self, files: Files) -> None:
        """Return once `files` are written whole, or raise the `OSError` that stopped them."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._pending.append((files, done))
        if not self._flush_soon:
            self._flush_soon = True
            loop.call_soon(self._flush)
        await done

    def _flush(self) -> None:
        self._flush_soon = False
        if not self._pending or self._busy >= self._workers:
            return  # a worker's end flushes what waits
        batch, self._pending = self._pending, []
        self._busy += 1
        job = self._pool.submit(_write_batch, [files for files, _ in batch])
        loop = asyncio.get_running_loop()
        job.add_done_callback(partial(self._wake, loop, batch))

    def _wake(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[tuple[Files, asyncio.Future[None]]],
        job: Future[list[OSError | None]],
    ) -> None:
        with suppress(RuntimeError):  # the loop closed while the files were written
            loop.call_soon_threadsafe(self._finished, batch, job)

    def _finished(
        self, batch: list[tuple[Files, asyncio.Future[None]]], job: Future[list[OSError | None]]
    ) -> None:
        self._busy -= 1
        try:
            errors = job.result()
        except BaseException as exc:  # the pool shut down, or a bug: every unit hears it
            errors = [OSError(str(exc)) for _ in batch]
        for (_, done), error in zip(batch, errors, strict=True):
            if done.done():
                continue  # its caller was cancelled: the files are written anyway
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)
        self._flush()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
