"""Pieces shared by the pages: the sidebar, the Run guard, headline numbers, number formats."""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import streamlit as st

from analysis.api import FORMAT_CODE, POLICY_FORMATS
from analysis.api import Projection, run_writer
from dashboard import progress, state
from dashboard.data import MB, Loaded, open_run


EMPTY = "—"  # a missing value, in every table (st.dataframe's ``placeholder``) and text
PCT_METRICS = ("accuracy", "agreement")  # fractions, shown in % and percentage points
METRIC_LABELS = {"agreement": "top-1 agreement", "cosine": "cosine similarity", "embedding": "cosine similarity",
                 "nmse": "NMSE"}  # what a reader calls the metric a Run stores by name; others keep their name


def metric_label(loaded: Loaded) -> str:
    """The Run's metric as the pages name it: ``embedding`` is a cosine similarity of embeddings to FP32."""
    name = str(loaded.run.meta["metric"].get("name"))
    return METRIC_LABELS.get(name, name)


def _pct(loaded: Loaded) -> bool:
    m = loaded.run.meta["metric"]
    return m.get("unit", "") in ("fraction", "") and m.get("name") in PCT_METRICS


def fmt_metric(x: float | None, loaded: Loaded, signed: bool = False) -> str:
    """A metric value (``signed``: a change) at the precision shown everywhere; what rounds to zero has no sign."""
    if x is None or not math.isfinite(x):
        return EMPTY
    value, digits, unit = (x * 100, 2, " pp" if signed else " %") if _pct(loaded) else (x, 4, "")
    text = f"{value:.{digits}f}"
    if float(text) == 0:
        text = f"{0:.{digits}f}"  # never "-0.0000"
    elif signed and value > 0:
        text = "+" + text
    return text + unit


def fmt_ms(ms: float | None) -> str:
    """Milliseconds to three significant digits, at least two decimals (1.25, 0.0412, 0.000430), never 0.00."""
    if ms is None or not math.isfinite(ms):
        return EMPTY
    if ms == 0:
        return "0"
    return f"{ms:.{max(2, min(8, 2 - math.floor(math.log10(abs(ms)))))}f}"


def ms_decimals(values: np.ndarray) -> int:
    """Decimals that show every nonzero value of a column of milliseconds with two significant digits."""
    v = np.abs(np.asarray(values, dtype=float))
    v = v[np.isfinite(v) & (v > 0)]
    return 2 if not len(v) else max(1, min(6, 1 - math.floor(math.log10(v.min()))))


def latency_unit(loaded: Loaded) -> str:
    """The unit of every latency of this Run, as measured (e.g. "ms per batch of 32")."""
    return str((loaded.run.meta.get("latency") or {}).get("unit") or "ms")


def fmt_latency(ms: float | None, loaded: Loaded) -> str:
    """A latency with the Run's unit, or "not measured"."""
    if ms is None or not math.isfinite(ms):
        return "not measured"
    return f"{fmt_ms(ms)} {latency_unit(loaded)}"


def fmt_band(band: float | None, loaded: Loaded) -> str:
    """'± x' for a metric error band, or a note that it is unknown."""
    if band is None:
        return "error unknown"
    return "± " + fmt_metric(band, loaded, signed=True).lstrip("+")


def fmt_mb(n: float) -> str:
    return f"{n / MB:,.3f} MB" if n < 10 * MB else f"{n / MB:,.1f} MB"


def sidebar() -> None:
    """Run picker (several open Runs), a box to open another Run folder, the Run's status."""
    dirs = state.run_dirs()
    with st.sidebar:
        st.markdown("### QuantLens")
        if dirs:
            labels = []
            for p in dirs:
                lo, busy = open_run(p), run_writer(p) is not None
                tail = " (being analysed)" if busy else ""
                labels.append(f"{lo.name} — {Path(p).name}{tail}" if isinstance(lo, Loaded)
                              else f"{Path(p).name}{tail}" if busy else f"⚠ {Path(p).name} (cannot open)")
            # keyed and set from the active Run on every run: an unkeyed box with index=active would be a new
            # widget whenever the active Run changed, and drop the next pick
            st.session_state[state.RUN_PICK] = min(int(st.session_state.get(state.ACTIVE, 0)), len(dirs) - 1)
            st.selectbox("Run", range(len(dirs)), key=state.RUN_PICK, format_func=lambda i: labels[i],
                         on_change=state.pick_run, help="Runs given on the command line or opened below.")
        with st.form(state.OPEN_FORM, clear_on_submit=True, border=False):
            folder = st.text_input("Open a Run folder", placeholder="/path/to/run")
            if st.form_submit_button("Open") and folder.strip():
                state.add_run_dir(folder.strip())
                st.rerun()
        lo = state.active()
        if isinstance(lo, Loaded):
            prog = lo.run.meta.get("progress") if lo.run.status != "complete" else None
            jobs = f" ({prog.get('done')}/{prog.get('total')} jobs)" if isinstance(prog, dict) else ""
            st.caption(f"Model sha256 `{lo.run.model_sha256[:12]}…` · {len(lo.projector.names)} layers · "
                       f"status **{lo.run.status}**{jobs}")


def _age(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def partial_banner(lo: Loaded) -> None:
    """A Run whose sweep has not finished: how far it got, when it last wrote, and how to finish it."""
    meta = lo.run.meta
    prog = meta.get("progress") if isinstance(meta.get("progress"), dict) else {}
    done, total = prog.get("done"), prog.get("total")
    if isinstance(done, int) and isinstance(total, int) and total > 0:
        where = f"**{done} of {total}** sweep jobs finished ({done / total:.0%})"
    else:
        where = "the sweep did not record its progress"
    try:
        age = f"; it last wrote {_age(max(time.time() - (Path(lo.path) / 'run.json').stat().st_mtime, 0))} ago"
    except OSError:
        age = ""
    model, task = meta.get("model", {}).get("name", "MODEL"), meta.get("data", {}).get("spec") or "TASK"
    st.warning(f"This Run is **{lo.run.status}**: {where}{age}. The sweep may still be running (reload the page to "
               f"see more), or it stopped: finish it with `quantlens analyze {model} --task {task} --out "
               f"{lo.path} --resume` and the options it was started with. Layers the sweep has not reached are "
               "marked NOT MEASURED YET in the Layers table and stay FP32: an empty sensitivity is unknown, not "
               "safe.", icon=":material/hourglass_empty:")


def require_run() -> Loaded:
    """The active Run, or a message on the page and a stop."""
    lo = state.active()
    if progress.watch():  # the active Run is being analysed and not written yet: its box is the page
        st.stop()
    if lo is None:
        st.info("No Run is open. Start with `quantlens dashboard RUN_DIR` (a folder written by "
                "`quantlens analyze`), or type a Run folder in the sidebar.")
        st.stop()
    if isinstance(lo, str):
        st.error(f"This Run cannot be opened: {lo}")
        st.caption("A Run is a folder written by `quantlens analyze` with run.json and six Parquet tables.")
        st.stop()
    if lo.synthetic:
        st.info("**Synthetic Run** — generated numbers for testing the dashboard; nothing here was measured.",
                icon=":material/science:")
    if lo.run.status != "complete" and run_writer(lo.path) is not None:  # its box above says how far it is
        st.caption("Partial Run: layers not measured yet are marked NOT MEASURED YET in the Layers table and stay "
                   "FP32; every projection covers the layers measured so far.")
    elif lo.run.status != "complete":
        partial_banner(lo)
    state.show_notices()
    return lo


def penalty_name(loaded: Loaded) -> str:
    """What the per-layer sensitivity measures: the penalty the projection sums."""
    cal = loaded.projector.calibration
    if cal is not None and cal.kind == "kl":
        return "KL divergence to FP32 outputs"
    if cal is not None:
        return f"{loaded.run.meta['metric'].get('loss', 'loss')} increase"
    return f"Δ {loaded.run.meta['metric'].get('loss', 'loss')}"


def projection_kind(loaded: Loaded) -> str:
    """One sentence naming the projection the Run supports."""
    if getattr(loaded.projector, "calibration", None) is not None:
        return ("Projection v2, calibrated on the measured mixed policies: per-layer penalties summed, scaled by a "
                "measured interaction factor and mapped to the metric.")
    return ("Projection v1: additive in the measured per-layer loss changes, mapped to the metric through the "
            "measured (loss, metric) points.")


def _resolution(loaded: Loaded) -> str:
    n = loaded.run.meta.get("data", {}).get("n_eval")
    if _pct(loaded) and isinstance(n, int) and n > 0:
        return f"Measured on {n} samples: one sample moves it by {fmt_metric(1 / n, loaded, signed=True).lstrip('+')}."
    return ""


def headline(loaded: Loaded, p: Projection, codes: np.ndarray) -> None:
    """Projected metric (± band), size and × vs FP32, latency when measured."""
    meta = loaded.run.meta
    base = float(meta["baseline"]["metric"])
    # a wrapping row of metrics as wide as their text: four fixed columns cut labels and values at 1024 px
    row = st.container(horizontal=True, wrap=True, gap="large")
    c = [row] * 4
    change = p.metric - base
    change = 0.0 if abs(change) < 1e-9 else change  # float noise around the anchored baseline
    c[0].metric(f"Projected {metric_label(loaded)} ({fmt_band(p.band, loaded)})", fmt_metric(p.metric, loaded),
                delta=fmt_metric(change, loaded, signed=True) + " vs FP32",
                delta_color="normal" if loaded.run.higher_is_better else "inverse",
                delta_arrow="auto" if change else "off",
                help=projection_kind(loaded) + " ± is the largest leave-one-out error on the measured "
                     "whole-model policies (the Overview lists them). " + _resolution(loaded)
                     + (" Beyond the measured loss range: extrapolated." if p.extrapolated else ""), width="content")
    c[1].metric("Projected size", fmt_mb(p.bytes), delta=f"{p.size_ratio:.2f}× smaller than FP32 · {p.bytes:,} B",
                delta_color="off", delta_arrow="off",
                help="Exact: sum of per-layer bytes (weights, scales, zero points, bias) "
                                        "plus the parameters outside quantizable layers.", width="content")
    if p.latency_ms is not None:
        lat, unit = meta.get("latency") or {}, latency_unit(loaded)
        per = unit.removeprefix("ms").strip()  # "per batch of 32": the value itself reads in ms
        fp32_ms = float(lat.get("fp32_ms", p.latency_ms))
        c[2].metric("Projected latency", f"{fmt_ms(p.latency_ms)} ms",
                    delta=" · ".join(x for x in (per, f"FP32 {fmt_ms(fp32_ms)} ms") if x),
                    delta_color="off", delta_arrow="off",
                    help=f"Measured FP32 end-to-end latency ({unit}, {lat.get('provider', '')} "
                         f"onnxruntime {lat.get('onnxruntime', '')}, {lat.get('threads', '?')} thread(s)) plus the "
                         "measured per-layer latency changes of the quantized layers. Timing on a shared machine "
                         f"varies: FP32 spread (IQR) {fmt_ms(float(lat.get('fp32_spread_ms', float('nan'))))} ms.",
                    width="content")
    else:
        c[2].metric("Latency", "not measured", help="This Run holds no per-layer latency measurement.", width="content")
    counts = np.bincount(np.asarray(codes, dtype=np.intp), minlength=len(POLICY_FORMATS))
    c[3].metric("Layers quantized", f"{int(counts[1:].sum())} / {len(codes)}",
                delta=" · ".join(f"{f.upper()} {int(counts[FORMAT_CODE[f]])}" for f in loaded.projector.formats),
                delta_color="off", delta_arrow="off", width="content")
    notes = []
    nearest = getattr(p, "nearest", "")
    if nearest:
        share = getattr(p, "distance", 0.0)
        notes.append(f"Closest measured policy: **{nearest}** (differs in {share:.0%} of layers).")
    if p.extrapolated:
        notes.append("⚠ Beyond every measured point: the metric is extrapolated.")
    if notes:
        st.caption(" ".join(notes))
