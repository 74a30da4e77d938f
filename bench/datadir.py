"""Where the benches make their data dirs: a fresh one per run, removed afterwards.

By default under the working directory, where a real `./data` would live. `DRAWBRIDGE_BENCH_DIR`
moves them, to tell the engine from the disk: on the project's VM, creating a small file on its
ext4 disk costs 0.2–1 ms of kernel CPU (it varies by the minute), on tmpfs (`/dev/shm`) ~12 µs,
and at a thousand images a second that is what `bench.engine` measures on the disk
(`bench.profile_engine` prints the cost where it runs).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

BENCH_DIR_ENV = "DRAWBRIDGE_BENCH_DIR"


def bench_root() -> Path:
    """The folder the benches' data dirs go in."""
    return Path(os.environ.get(BENCH_DIR_ENV) or Path.cwd())


def scratch_dir(root: Path | None = None) -> tempfile.TemporaryDirectory[str]:
    """A fresh data dir for one run, under `root` or `bench_root()`."""
    return tempfile.TemporaryDirectory(prefix=".bench-", dir=root or bench_root())


def memory_root() -> Path | None:
    """A tmpfs folder (files cost ~nothing there), to tell the engine from the disk; or None."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else None
