"""Which process is writing a Run now: one sweep per Run folder, and a note readers can see.

Every sweep (``analysis.engine.analyze.sweep_to_run``, and ``analysis.api.analyze`` through its latency
and runtime check) holds :func:`hold_writer` for its whole length; the demo holds it around its own
checks too, and the engine's sweep inside goes on under that hold (``join``). The lock lives beside the
Run (``.NAME.writer.lock``), not in it: the folder does not exist until the sweep has loaded the model
and calibrated, and a new Run must be created in an absent or empty folder. Beside it,
``.NAME.writer.json`` says who writes and since when; :func:`run_writer` reads it for the dashboard
("being analysed, k of n layers, ETA"). The note is removed when the writer ends; one left by a killed
process names a process that is gone and so reads as no writer.

Example:
    >>> with hold_writer("runs/minilm", "quantlens demo"):
    ...     analyze("demo:minilm", "minilm", "runs/minilm")
"""
from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from analysis.errors import InputError
from analysis.store.atomic import write_text_atomic
from analysis.store.run import _pid_alive

MAX_NOTE_BYTES = 64 << 10


class RunBusy(InputError):
    """Another live process is writing this Run; the message names it."""


def _beside(path: Path, suffix: str) -> Path:
    return path.parent / f".{path.name}.writer.{suffix}"


def run_writer(path: str | os.PathLike) -> dict | None:
    """The note of the live process writing the Run at ``path`` (``pid``, ``what``, ``started`` in Unix
    seconds, ``done_before``: jobs the Run held when it started), or None when none is."""
    note = _beside(Path(os.path.abspath(path)), "json")
    try:
        if note.stat().st_size > MAX_NOTE_BYTES:
            return None
        info = json.loads(note.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    pid = info.get("pid") if isinstance(info, dict) else None
    if not isinstance(pid, int) or not 0 < pid < 1 << 31 or not _pid_alive(pid):
        return None
    return info


def _jobs_done(path: Path) -> int:
    try:
        progress = json.loads((path / "run.json").read_text(encoding="utf-8")).get("progress") or {}
        return int(progress.get("done", 0))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 0


# Run path -> [thread, note, depth] while this process holds the Run's writer lock (see ``join``)
_HELD: dict[Path, list] = {}
_HELD_GUARD = threading.Lock()


@contextmanager
def hold_writer(path: str | os.PathLike, what: str, *, wait: float = 0.0, join: bool = False) -> Iterator[dict]:
    """Be the one process writing the Run at ``path`` for the block (waiting up to ``wait`` s for another).

    With ``join``, a block inside one that already holds the Run in this thread goes on under that hold
    (the engine takes the lock on every sweep; the demo holds it around its own checks and the sweep).

    Raises:
        RunBusy: another process holds it (the message names the Run, the process's pid and what it runs).
    """
    path = Path(os.path.abspath(path))
    with _HELD_GUARD:
        held = _HELD.get(path) if join else None
        if held is not None and held[0] == threading.get_ident():
            held[2] += 1
        else:
            held = None
    if held is not None:
        try:
            yield held[1]
        finally:
            with _HELD_GUARD:
                held[2] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(_beside(path, "lock"), thread_local=False)
    try:
        lock.acquire(timeout=wait)
    except Timeout:
        other = run_writer(path) or {}
        who = f"process {other['pid']} ({other.get('what', '?')})" if other else "another process"
        raise RunBusy(f"{path}: {who} is writing this Run; wait for it or stop it") from None
    note = _beside(path, "json")
    info = {"pid": os.getpid(), "what": what, "started": time.time(), "done_before": _jobs_done(path)}
    try:
        write_text_atomic(note, json.dumps(info) + "\n")
        with _HELD_GUARD:
            _HELD[path] = [threading.get_ident(), info, 1]
        yield info
    finally:
        with _HELD_GUARD:
            _HELD.pop(path, None)
        note.unlink(missing_ok=True)
        # no empty lock file left beside the user's Run: removed while still held, so a process that opens
        # it after this creates a fresh one (one that opened the old file in this instant could lock it
        # beside a newcomer: a window of microseconds, with sweeps that take minutes to start)
        try:
            _beside(path, "lock").unlink(missing_ok=True)
        except OSError:
            pass
        lock.release()
