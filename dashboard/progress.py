"""Runs being analysed while the dashboard serves them: how far each got, and a box that follows them.

``quantlens demo`` serves the MiniLM Run folder while a background process still writes it
(``analysis.store.writer`` notes which process writes a Run). The folder may not exist yet (model
loading, calibration), then holds a partial Run that gains layers every few seconds, then a complete
one whose latency and runtime check are measured last. :func:`watch` draws one box per such Run at
the top of every page and refreshes itself while any is being written: the page a user reads is
rerun when *its* Run changed on disk (so a partial Run fills in), never switched to another Run; a
Run that finishes while the user reads another one gets an "Open" button instead.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from analysis.api import run_writer
from dashboard import state
from dashboard.data import Loaded, open_run, stamp_of

REFRESH_S = 3.0  # how often a box of a Run being written looks at the folder again


@dataclass(frozen=True)
class Progress:
    """Where the analysis of the Run at ``path`` stands, read from the folder and its writer's note."""

    path: str
    name: str  # the model's name once the Run exists, else the folder's
    writer: dict | None  # the live process writing it (``analysis.store.writer.run_writer``), or None
    phase: str  # absent | starting | sweep | latency | verify | complete | partial (stopped)
    jobs: tuple[int, int] | None = None  # sweep jobs done, total
    layers: tuple[int, int] | None = None  # layers with every format measured, layers
    eta_s: float | None = None  # seconds the sweep still needs at its rate since the writer started

    @property
    def busy(self) -> bool:
        return self.writer is not None


def measured_layers(lo: Loaded) -> tuple[int, int]:
    """(layers measured in at least one format, layers): a sweep measures one format across the model, then
    the next, so "every format measured" would stay at 0 for half of it."""
    sens, names = lo.run.sensitivity, lo.projector.names
    status = sens[sens["layer"].isin(names)].groupby("layer")["status"]
    some = status.agg(lambda s: bool((~s.isin(("pending", "skipped"))).any() or not (s == "pending").any()))
    return int(some.sum()), len(names)


def run_progress(path: str) -> Progress:
    """How far the Run at ``path`` is (cheap: the tables come from the ``open_run`` cache)."""
    writer = run_writer(path)
    name = Path(path).name
    lo = open_run(path) if (Path(path) / "run.json").is_file() else None
    if not isinstance(lo, Loaded):
        return Progress(path, name, writer, "starting" if writer else "absent")
    meta = lo.run.meta
    prog = meta.get("progress") if isinstance(meta.get("progress"), dict) else {}
    done, total = prog.get("done"), prog.get("total")
    jobs = (done, total) if isinstance(done, int) and isinstance(total, int) else None
    layers = measured_layers(lo)
    if lo.run.status != "complete":
        phase = "sweep" if writer else "partial"
    elif writer and "latency" not in meta:
        phase = "latency"
    elif writer and "runtime_check" not in meta:
        phase = "verify"
    else:
        phase = "complete"
    eta = None
    if phase == "sweep" and jobs:
        ran, spent = jobs[0] - int(writer.get("done_before") or 0), time.time() - float(writer.get("started") or 0)
        if ran > 0 and spent > 0:
            eta = (jobs[1] - jobs[0]) * spent / ran
    return Progress(path, lo.name, writer, phase, jobs, layers, eta)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def progress_text(p: Progress) -> str:
    """One sentence: what is being done to the Run and how far it is."""
    who = f"**{p.name}** is being analysed"
    if p.phase == "starting":
        return f"{who}: loading the model and calibrating; its layers appear as they are measured."
    if p.phase == "sweep":
        k, n = p.layers or (0, 0)
        jobs = f" ({p.jobs[0]} of {p.jobs[1]} sweep jobs)" if p.jobs else ""
        eta = (f", about {_duration(p.eta_s)} left at the rate so far" if p.eta_s is not None
               else ", time left known after the first measurements")
        return f"{who}: **{k} of {n} layers** measured{jobs}{eta}; then latency and a runtime check."
    if p.phase == "latency":
        return f"{who}: every layer is measured; now timing them in onnxruntime."
    if p.phase == "verify":
        return f"{who}: every layer is measured and timed; now checking whole-model policies in onnxruntime."
    return f"**{p.name}**: {p.phase}."


def _open(i: int) -> None:
    st.session_state[state.ACTIVE] = i


def _box(i: int, p: Progress, active: bool) -> None:
    """One Run's box: its progress while written; once done, a rerun (the page shows it) or an Open button."""
    watched: dict = st.session_state.setdefault(state.WATCHED, {})
    if p.busy:
        watched[p.path] = True
        if active:
            st.info(progress_text(p) + " This page follows it: what is measured so far is below, marked partial.")
        else:
            st.info(progress_text(p) + " It opens here when done; you can look at it now, as it fills in.")
            st.button(f"Open {p.name} now (partial)", key=state.watch_button_key(p.path), on_click=_open, args=(i,))
        if p.jobs and p.jobs[1]:
            st.progress(min(p.jobs[0] / p.jobs[1], 1.0))
        return
    if p.path not in watched:
        return
    if active:  # it ended while shown: one rerun draws it without the progress box
        del watched[p.path]
        st.rerun(scope="app")
    if p.phase == "complete":
        st.success(f"**{p.name}** is analysed: every layer measured, timed and checked in onnxruntime. "
                   "It is where layer choices move the metric.")
        st.button(f"Open {p.name}", key=state.watch_button_key(p.path), type="primary", on_click=_open, args=(i,))
    else:
        st.warning(f"The analysis of **{p.name}** stopped ({p.phase}); `quantlens demo` resumes it.")
        del watched[p.path]


def _boxes(drawn: tuple[int, tuple]) -> None:
    """The boxes; ``drawn``: (index, files stamp) of the Run the page below was drawn from. The whole page is
    drawn again when that Run changed on disk (new measurements) or an Open button picked another (its callback
    runs in this fragment's rerun, which alone would leave the page as it was); asked on every tick until done."""
    dirs = state.run_dirs()
    active = state.active_index()
    if dirs and (active, stamp_of(dirs[active])) != drawn:
        st.rerun(scope="app")
    for i, path in enumerate(dirs):
        _box(i, run_progress(path), i == active)


def watch() -> bool:
    """Draw the boxes of Runs being analysed (refreshing every ``REFRESH_S`` s while any is); returns whether
    the active Run is being written or not there yet while it is (the page then has nothing else to show)."""
    dirs = state.run_dirs()
    busy = [run_writer(p) is not None for p in dirs]
    if not any(busy) and not st.session_state.get(state.WATCHED):
        return False
    i = state.active_index()
    st.fragment(_boxes, run_every=REFRESH_S if any(busy) else None)((i, stamp_of(dirs[i]) if dirs else ()))
    return bool(dirs) and busy[i] and not isinstance(open_run(dirs[i]), Loaded)
