"""Where the benches make their data dirs: a fresh one per run, all removed when the process ends.

By default under the working directory, where a real `./data` would live. `DRAWBRIDGE_BENCH_DIR`
moves them, to tell the engine from the disk (`memory_root`: tmpfs, where a file costs ~12 µs).

The dirs are removed at exit, not after each run: on an ext4 file system without a journal (this
project's VM's), allocating an inode skips every inode of its group deleted within the last 1–6
minutes (`recently_deleted()` in the kernel's fs/ext4/ialloc.c, read off the inode table block by
block), so right after one run removed its 10,000 image files, creating a file in the next cost
0.3–0.9 ms of kernel CPU instead of ~20 µs (`perf`: 70 % of `open(O_CREAT)` in that scan). A
bench started within minutes of another one's exit still pays it: `create_cost` measures it, and
`bench.engine` and `bench.profile_engine` print it beside their disk figures.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bot.image_files import FOLDERS, write_files

BENCH_DIR_ENV = "DRAWBRIDGE_BENCH_DIR"

# Kept alive to the end of the process, when their finalizers remove them.
_LEFT: list[tempfile.TemporaryDirectory[str]] = []


def bench_root() -> Path:
    """The folder the benches' data dirs go in."""
    return Path(os.environ.get(BENCH_DIR_ENV) or Path.cwd())


@contextmanager
def scratch_dir(root: Path | None = None) -> Iterator[str]:
    """A fresh data dir for one run, under `root` or `bench_root()`; removed at exit."""
    tmp = tempfile.TemporaryDirectory(prefix=".bench-", dir=root or bench_root())
    _LEFT.append(tmp)
    yield tmp.name


def memory_root() -> Path | None:
    """A tmpfs folder (files cost ~nothing there), to tell the engine from the disk; or None."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else None


def create_cost(
    root: Path | None = None, count: int = 2000, size: int = 3000
) -> tuple[float, float]:
    """µs of wall and of CPU to create one small file in a fresh data dir, on one thread: what
    the file system charges the image-file threads for each image (`bot.image_files`)."""
    data = os.urandom(size)
    with scratch_dir(root) as tmp:
        folders = [Path(tmp) / c for c in FOLDERS]
        for folder in folders:
            folder.mkdir()
        items = [(folders[i % len(folders)] / f"probe{i}.png", data) for i in range(count)]
        t0, c0 = time.perf_counter(), time.thread_time()
        write_files(items)
        wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
    return wall / count * 1e6, cpu / count * 1e6
