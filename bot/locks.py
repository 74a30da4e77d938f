"""Who else runs on a data dir: one bot at a time, and `drawbridge generate` beside it.

A bot takes the data dir's lock for itself (two engines on one queue would run each job twice).
A batch takes a shared lock of its own while it runs, so that a bot starting meanwhile leaves the
batch's queued and running jobs to it instead of resuming them too (and paying for them twice);
a batch's jobs that no live batch holds are a dead batch's, and the bot finishes them.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bot.errors import SettingsError

BOT_LOCK = "drawbridge.lock"
BATCH_LOCK = "drawbridge-batch.lock"


@contextmanager
def exclusive(data_dir: Path) -> Iterator[None]:
    """Hold the data dir for this bot; `SettingsError` if another one holds it."""
    fd = os.open(data_dir / BOT_LOCK, os.O_CREAT | os.O_RDONLY, 0o644)  # (as holding_batch)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SettingsError(
                f"DRAWBRIDGE_DATA_DIR: another drawbridge is already running on {data_dir}"
            ) from None
        yield
    finally:
        os.close(fd)  # (and with it the lock)


@contextmanager
def holding_batch(data_dir: Path) -> Iterator[None]:
    """Mark a batch as running on `data_dir` while the block runs (batches share the mark)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    # Read-only is enough for flock, and the file may be another user's (a `sudo` batch).
    fd = os.open(data_dir / BATCH_LOCK, os.O_CREAT | os.O_RDONLY, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def batch_running(data_dir: Path) -> bool:
    """Whether a `drawbridge generate` holds `data_dir` now."""
    try:
        fd = os.open(data_dir / BATCH_LOCK, os.O_RDONLY)
    except OSError:  # none yet (or unreadable: then no batch could be told apart either)
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
