"""Image files under the data dir: folders made once, files written whole, old ones removed."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

# Job ids are lowercase base32: one folder per first character.
FOLDERS = "abcdefghijklmnopqrstuvwxyz234567"


def unlink_all(paths: Iterable[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def older_than(paths: Iterable[Path], before: float) -> list[Path]:
    """Those of `paths` last written before `before` (a Unix time); gone ones are left out."""
    old = []
    for path in paths:
        try:
            if path.stat().st_mtime < before:
                old.append(path)
        except FileNotFoundError:
            continue
    return old


def list_files(folder: Path) -> list[str]:
    """The names of the files in `folder` (none if it is not there)."""
    try:
        with os.scandir(folder) as entries:
            return [entry.name for entry in entries if entry.is_file()]
    except FileNotFoundError:
        return []


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


def image_folders(data_dir: Path) -> list[Path]:
    """The folders the store writes images into (results and reference photos)."""
    images = data_dir / "images"
    return [images, data_dir / "refs", *(images / c for c in FOLDERS)]


def make_dirs(data_dir: Path) -> None:
    for folder in (data_dir, *image_folders(data_dir)):
        folder.mkdir(parents=True, exist_ok=True)
