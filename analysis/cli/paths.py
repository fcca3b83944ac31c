"""Files named on the command line, checked before any work: a folder where a file is expected, or a
file where a folder is expected on the way to an output, is one line naming the path and the flag."""
from __future__ import annotations

from pathlib import Path

from analysis.errors import InputError


class UsageError(InputError):
    """A bad command-line value."""


def input_file(path: str, what: str, flag: str = "") -> Path:
    """``path`` as a file to read; a folder there is refused (a missing file is left to the reader's own message)."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag + ' ' if flag else ''}{path}: is a folder, not {what}")
    return p


def output_file(path: str, flag: str) -> Path:
    """``path`` as a file to write: not a folder, and no file stands where one of its folders would go."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag} {path}: is a folder; give a file name")
    blocked_at(p.parent, flag, path)
    return p


def output_folder(path: str, flag: str) -> Path:
    """``path`` as a folder to create or fill: no file stands where one of its folders would go."""
    p = Path(path)
    blocked_at(p.parent, flag, path)
    return p


def blocked_at(folder: Path, flag: str, path: str) -> None:
    """Refuse when the nearest existing ancestor of ``folder`` (itself included) is a file."""
    for f in (folder, *folder.parents):
        if f.exists():
            if not f.is_dir():
                raise UsageError(f"{flag} {path}: {f} is a file, not a folder")
            return
