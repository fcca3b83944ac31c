"""Library chatter goes to a log file; the console keeps QuantLens' own lines, bars and results.

Inside :func:`library_log` a verb's libraries write to a log instead of the terminal:

* Python warnings (``warnings.warn``: torch, transformers, onnx, scipy) and log records of any logger
  that reaches the root logger (warning and above);
* log handlers that print to stderr themselves (transformers installs one): what a ``logging`` handler
  writes to ``sys.stderr`` is sent to the log;
* onnxruntime's native log (its C++ logger, through ``onnxruntime.set_default_logger_callback``);
* where ``sys.stdout`` / ``sys.stderr`` are the process's own terminal streams, whatever native code
  prints to file descriptors 1 and 2 (a solver's banner), and worker processes started meanwhile.

At the end a non-empty log is appended to ``<run>/quantlens.log`` (``LOG_NAME``), or stays in the
temporary folder when there is no Run folder to take it; :attr:`LibraryLog.path` says where.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import tempfile
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

LOG_NAME = "quantlens.log"
_ORT_LEVELS = {0: logging.DEBUG, 1: logging.INFO, 2: logging.WARNING, 3: logging.ERROR, 4: logging.CRITICAL}
_EMITS = {logging.StreamHandler.emit.__code__}  # a write from these is a log record, not our own line


class LibraryLog:
    """Where the chatter of one verb went: ``path`` is None while running and when nothing was written."""

    def __init__(self) -> None:
        self.path: Path | None = None


class _Stderr:
    """``sys.stderr`` during a verb: our own writes reach the console, log handlers' writes the log."""

    def __init__(self, console, log) -> None:
        self._console, self._log = console, log

    def write(self, s: str) -> int:
        caller = sys._getframe(1).f_code
        return (self._log if caller in _EMITS else self._console).write(s)

    def flush(self) -> None:
        self._console.flush()
        self._log.flush()

    def __getattr__(self, name):  # fileno, isatty, encoding ... as the console's
        return getattr(self._console, name)


def _is_terminal_stream(name: str, fd: int) -> bool:
    stream = getattr(sys, name)
    try:
        return stream is getattr(sys, f"__{name}__") and stream.fileno() == fd
    except (AttributeError, OSError, ValueError):
        return False


@contextlib.contextmanager
def _native_to(log_fd: int) -> Iterator[None]:
    """File descriptors 1 and 2 write to the log; ``sys.stdout``/``sys.stderr`` to copies of the terminal's."""
    swapped = []
    try:
        for name, fd in (("stdout", 1), ("stderr", 2)):
            if not _is_terminal_stream(name, fd):
                continue  # already redirected in Python (a test's capture, a notebook): leave the descriptors be
            old = getattr(sys, name)
            old.flush()
            console = os.fdopen(os.dup(fd), "w", encoding=old.encoding, errors="backslashreplace", buffering=1)
            os.dup2(log_fd, fd)
            setattr(sys, name, console)
            swapped.append((name, fd, old, console))
        yield
    finally:
        for name, fd, old, console in reversed(swapped):
            console.flush()
            os.dup2(console.fileno(), fd)
            setattr(sys, name, old)
            console.close()


def _ort_to_logging() -> bool:
    """onnxruntime's native log as records of the ``onnxruntime`` logger; False where it is not installed."""
    if importlib.util.find_spec("onnxruntime") is None:
        return False
    import onnxruntime as ort

    logger = logging.getLogger("onnxruntime")

    def forward(severity, category, logid, code_location, message) -> None:
        logger.log(_ORT_LEVELS.get(int(severity), logging.WARNING), "%s [%s] %s", logid or category, code_location, message)

    ort.set_default_logger_callback(forward, 2)
    return True


def _settle(tmp: Path, run_dir: Path | None, verb: str) -> Path | None:
    """The log's final place: appended to the Run's, else left where it is; None (and removed) if empty."""
    if tmp.stat().st_size == 0:
        tmp.unlink()
        return None
    if run_dir is not None and (run_dir / "run.json").is_file():
        target = run_dir / LOG_NAME
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        try:
            with target.open("a", encoding="utf-8", errors="backslashreplace") as f:
                f.write(f"== quantlens {verb}, {stamp} ==\n")
                f.write(tmp.read_text(encoding="utf-8", errors="backslashreplace"))
        except OSError:
            return tmp  # a Run folder we may not write to: the log stays in the temporary folder
        tmp.unlink()
        return target
    return tmp


@contextlib.contextmanager
def library_log(verb: str, run_dir: str | os.PathLike | None = None) -> Iterator[LibraryLog]:
    """Send library chatter to a log while the block runs (module docstring); the log's path is set on exit.

    Args:
        verb: the command's name, written as the header of its part of the log.
        run_dir: the Run folder whose ``quantlens.log`` takes the log (if it holds a Run by the end).
    """
    fd, name = tempfile.mkstemp(prefix="quantlens-", suffix=".log")
    tmp = Path(name)
    stream = os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace", buffering=1)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    showwarning = warnings.showwarning
    warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: stream.write(
        warnings.formatwarning(message, category, filename, lineno, line))
    ort_forwarded = _ort_to_logging()
    log = LibraryLog()
    stderr = sys.stderr
    try:
        with _native_to(stream.fileno()):
            wrapped = _Stderr(sys.stderr, stream)
            sys.stderr = wrapped
            try:
                yield log
            finally:
                wrapped.flush()
                sys.stderr = wrapped._console
    finally:
        sys.stderr = stderr
        if ort_forwarded:
            import onnxruntime as ort

            ort.set_default_logger_callback(None)
        warnings.showwarning = showwarning
        root.removeHandler(handler)
        stream.close()
        log.path = _settle(tmp, Path(run_dir) if run_dir is not None else None, verb)
