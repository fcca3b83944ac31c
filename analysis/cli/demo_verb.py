"""``quantlens demo``: the bundled demos, analysed when missing, and the dashboard on them.

Without a name the dashboard opens at once: the digits CNN is analysed first (seconds), the
MiniLM sentence-embedding model (where layer choices move the metric) in a background process
while the server runs. The dashboard shows that Run filling in and opens on it once it is done.
Stopping the server (Ctrl+C, SIGTERM, SIGHUP when the terminal closes) stops the background sweep the way
Ctrl+C stops ``quantlens analyze``: finished jobs are on disk and the next ``quantlens demo`` resumes it. A
demo killed outright (SIGKILL) cannot: its background sweep notices within a second and stops the same way.

One process writes a demo Run at a time (``analysis.store.writer``): a second ``quantlens demo``
started meanwhile serves the same folders and shows the first one's progress.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from analysis.cli.paths import UsageError

DEMOS = {"digits": ("demo:digits", "digits"), "minilm": ("demo:minilm", "minilm")}  # Run name -> model, task
# Per-layer latency comes from one profiled run per format (not 72 single-layer models): MiniLM's takes
# about a third of its sweep's time, so both demos measure it
DEMO_LATENCY = {"digits": True, "minilm": True}
# MiniLM is all Linear layers: it measures dynamic INT8 too, the format onnxruntime runs fastest on CPUs
DEMO_FORMATS = {"digits": ("int8", "int4"), "minilm": ("int8", "int4", "int8-dyn")}
BACKGROUND = "minilm"  # the demo `quantlens demo` analyses while the dashboard already serves digits
STOP_SECONDS = 30.0  # a stopped background sweep finishes the batch it is on; after this it is killed
PARENT_ENV = "QUANTLENS_DEMO_PARENT"  # the pid of the demo that started a background sweep, which watches it
PARENT_POLL_SECONDS = 1.0
# what the dashboard opens first: the first Run in this list that is complete and not being written
SERVED = ("minilm", "digits")


def log_of(name: str, runs: Path) -> Path:
    """Where a background analysis writes its console lines: beside the Run, whose folder is created
    only once the model is loaded and calibrated (library messages go into the Run's quantlens.log)."""
    return runs / f"{name}.demo.log"


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="analyse the bundled demo models (if not done yet) and serve the dashboard on them",
                       description="Without a name: the digits CNN is analysed first if missing and the dashboard "
                                   "opens on it, while the MiniLM sentence-embedding model is analysed in the "
                                   "background (it takes minutes; the dashboard shows it filling in and opens on it "
                                   "when done). Stopping the server stops that analysis; the next "
                                   "`quantlens demo` resumes it. 'digits', 'minilm' or 'all' analyse in the "
                                   "foreground with a progress bar (an interrupted Run resumes).")
    p.add_argument("which", nargs="?", choices=("digits", "minilm", "all"), default=None,
                   help="digits (a CNN on 8x8 digits), minilm (all-MiniLM-L6-v2 sentence embeddings) or all")
    p.add_argument("--runs", default="runs", help="folder for demo Runs (default: runs)")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--no-serve", action="store_true",
                   help="only make sure the demo Runs exist and print their summaries (without a name: digits only)")
    p.add_argument("--in-background", action="store_true", help=argparse.SUPPRESS)  # the background process


def finished(run, name: str) -> bool:
    """The demo Run holds everything the demo measures: the sweep, latency, the runtime check."""
    meta = run.meta
    return (meta.get("status") == "complete" and (not DEMO_LATENCY[name] or "latency" in meta)
            and "runtime_check" in meta)


def demo_run(name: str, runs: Path, *, wait: float = 600.0, progress: bool = True):
    """The demo's Run under ``runs``: found, resumed (or its latency and runtime check finished) if it was
    interrupted, or analysed now. Another process analysing it is waited for up to ``wait`` s.

    Raises:
        RunBusy: another process is still writing it after ``wait`` s.
    """
    from analysis.api import analyze
    from analysis.engine.allocator import keep_freed_memory
    from analysis.store.run import RunError, load_run
    from analysis.store.writer import hold_writer, run_writer

    keep_freed_memory()
    model, task = DEMOS[name]
    out = runs / name
    other = run_writer(out) if wait else None
    if other:
        print(f"waiting for process {other['pid']} ({other.get('what', '?')}), which is analysing {out} ...",
              file=sys.stderr, flush=True)
    with hold_writer(out, f"quantlens demo {name}", wait=wait):
        try:
            run = load_run(out)
        except RunError:
            run = None
        if run is not None and finished(run, name):
            print(f"demo Run found at {out}")
            return run
        if run is not None:
            print(f"resuming the interrupted {model} Run at {out} ...", file=sys.stderr, flush=True)
            return analyze(model, task, out, threads=1, resume=True, latency=DEMO_LATENCY[name],
                           formats=run.formats, progress=progress)
        print(f"analysing {model} into {out} ...", file=sys.stderr, flush=True)
        return analyze(model, task, out, threads=1, overwrite=out.exists(), latency=DEMO_LATENCY[name],
                       formats=DEMO_FORMATS[name], progress=progress)


def is_finished(name: str, runs: Path) -> bool:
    from analysis.store.run import RunError, load_run

    try:
        return finished(load_run(runs / name), name)
    except RunError:
        return False


def start_background(name: str, runs: Path) -> subprocess.Popen:
    """Analyse the demo ``name`` into ``runs`` in a new process (its own session: a Ctrl+C in this terminal
    reaches it only through :func:`stop_background`), its console lines appended to :func:`log_of`. It stops
    by itself, as :func:`stop_background` stops it, once this process is gone (killed without a chance to)."""
    runs.mkdir(parents=True, exist_ok=True)
    with open(log_of(name, runs), "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "analysis.cli.main", "demo", name, "--runs", str(runs),
                                 "--no-serve", "--in-background"],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", PARENT_ENV: str(os.getpid())},
                                start_new_session=True)


def stop_background(proc: subprocess.Popen, timeout: float = STOP_SECONDS) -> int:
    """Stop a background analysis as Ctrl+C stops ``quantlens analyze`` (finished jobs stay on disk, the Run
    resumes); killed if it has not stopped within ``timeout`` s (files are whole or absent even then)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _interrupt_on(*signums: int) -> dict:
    """From now on these signals stop this process as Ctrl+C does (``finally`` blocks run); returns the
    handlers they replace (none off the main thread, where Python cannot set them)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, _interrupt) for s in signums}


def _watch_parent(parent: int, every: float = PARENT_POLL_SECONDS) -> None:
    """Stop this background process as :func:`stop_background` would (SIGTERM to itself) once the process that
    started it is gone: a demo killed outright (SIGKILL, a crash) must not leave its sweep running unseen."""
    def watch():
        while os.getppid() == parent:
            time.sleep(every)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


def _background(name: str, runs: Path) -> int:
    """The background process: the demo Run analysed or resumed, or nothing when another process has it."""
    from analysis.cli.library_log import library_log
    from analysis.store.writer import RunBusy

    signal.signal(signal.SIGTERM, _interrupt)  # the server stopped: the same clean stop as Ctrl+C
    signal.signal(signal.SIGHUP, _interrupt)
    parent = os.environ.get(PARENT_ENV, "")
    if parent.isdigit():
        _watch_parent(int(parent))
    try:
        with library_log("demo", runs / name) as log:
            demo_run(name, runs, wait=0, progress=False)
    except RunBusy as e:
        print(f"quantlens demo: {e}; the dashboard shows its progress", flush=True)
        return 0
    except KeyboardInterrupt:
        print("quantlens demo: stopped; finished jobs are saved and the next `quantlens demo` resumes", flush=True)
        return 130
    print(f"quantlens demo: {name} done" + (f" (library messages: {log.path})" if log.path else ""), flush=True)
    return 0


def _say_when_done(proc: subprocess.Popen, runs: Path) -> None:
    """One line in the terminal when the background analysis ends on its own (not stopped by us)."""
    code, log = proc.wait(), log_of(BACKGROUND, runs)
    if code == 0 and is_finished(BACKGROUND, runs):
        print("the MiniLM Run is complete: a new dashboard session opens on it", file=sys.stderr, flush=True)
    elif code == 0:  # another quantlens demo holds it
        print(f"another process is analysing MiniLM (see {log}); the dashboard shows its progress", file=sys.stderr,
              flush=True)
    elif code not in (130, -signal.SIGTERM, -signal.SIGKILL):
        print(f"the background MiniLM analysis failed (exit code {code}); see {log}", file=sys.stderr, flush=True)


def cmd_demo(args) -> int:
    from analysis.cli.main import summary

    runs = Path(args.runs)
    if args.in_background:
        if args.which not in DEMOS:
            raise UsageError("--in-background: name one demo")
        return _background(args.which, runs)
    if args.which is not None:
        names = list(DEMOS) if args.which == "all" else [args.which]
    else:  # fast first start: digits now; MiniLM when done, else (serving) in the background
        names = ["digits"] + ([BACKGROUND] if is_finished(BACKGROUND, runs) else [])
    done = []
    for name in names:
        run = demo_run(name, runs)
        print(summary(run))
        done.append(name)
    background = args.which is None and BACKGROUND not in names
    if args.no_serve:
        if background:
            print(f"the MiniLM sentence-embedding demo is not computed yet (or was interrupted): `quantlens demo` "
                  f"analyses it in the background while serving, `quantlens demo {BACKGROUND}` in the foreground "
                  "(minutes: 26 measured on 2 busy cores, see the README)", file=sys.stderr)
        return 0
    from dashboard.serve import serve

    proc = None
    # SIGTERM and SIGHUP (the terminal closed) stop the demo as Ctrl+C does, from before the background sweep
    # starts: the finally below then stops it (their default action would end this process without it)
    previous = _interrupt_on(signal.SIGTERM, signal.SIGHUP)
    try:
        if background:
            proc = start_background(BACKGROUND, runs)
            threading.Thread(target=_say_when_done, args=(proc, runs), daemon=True).start()
            print("analysing MiniLM (all-MiniLM-L6-v2 sentence embeddings) in the background, log "
                  f"{log_of(BACKGROUND, runs)}: the dashboard shows it filling in and opens on it when done. "
                  "Stopping the server stops it; the next `quantlens demo` resumes it.", file=sys.stderr, flush=True)
            done.append(BACKGROUND)
        return serve([str(runs / n) for n in SERVED if n in done], port=args.port)
    finally:
        for signum in previous:  # a second signal must not cut the stop short
            signal.signal(signum, signal.SIG_IGN)
        try:
            if proc is not None:
                stop_background(proc)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
