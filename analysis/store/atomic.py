"""Files that are either whole or absent, and a lock for read-modify-write of a Run's tables.

A file is written beside its destination under a temporary name (``.NAME.XXXX.tmp``), flushed
to disk and renamed over the destination; a rename within one folder is atomic on POSIX, so a
reader, or a process killed mid-write, never sees half a file. Temporary files of a killed
writer match ``.*.tmp`` and are safe to delete.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock

FILE_MODE = 0o644  # readable like any file the user writes (mkstemp alone gives 0o600)


@contextmanager
def atomic_path(out: str | os.PathLike, *, mode: int = FILE_MODE) -> Iterator[Path]:
    """A temporary path beside ``out`` to write to; on success it is fsynced and renamed to
    ``out``, on any error (or interrupt) removed and ``out`` left as it was."""
    out = Path(out)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(out: str | os.PathLike, text: str, *, errors: str = "strict") -> None:
    """``text`` as UTF-8 at ``out``, whole or not at all."""
    with atomic_path(out) as tmp:
        with open(tmp, "w", encoding="utf-8", errors=errors) as f:
            f.write(text)


@contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Exclusive advisory lock on ``folder`` (a ``.lock`` file in it), held for the block: two
    processes or threads that read, change and rewrite the same table take turns instead of
    losing a change. Re-entrant within a thread (one lock object per folder, counted per thread)."""
    with FileLock(Path(os.path.realpath(folder)) / ".lock", is_singleton=True):
        yield
