"""Search: the best policy under a budget (exact, ``analysis.project.search``), applied to the table; Pareto frontiers.

A page of its own rather than a panel on Layers: the Layers page is the toggle path, which must
stay cheap, while a search and a frontier (up to 40 exact solves) are occasional, heavier work.
"""
from __future__ import annotations

import numpy as np
import streamlit as st

from analysis.api import SearchError, best_policy
from dashboard import state
from dashboard.components import (PCT_METRICS, fmt_band, fmt_latency, fmt_mb, fmt_metric, fmt_ms, headline, latency_unit,
                                  metric_label, require_run)
from dashboard.data import MB, Loaded, coupled, frontier_frame, stamp_of
from dashboard.ui.charts import measured_points, metric_figure

def _pct(lo: Loaded) -> bool:
    return lo.run.meta["metric"].get("name") in PCT_METRICS


def _drop_label(lo: Loaded) -> str:
    name = metric_label(lo)
    if _pct(lo):
        return f"Max {name} drop from FP32 (percentage points; 1 = 0.01 {name})"
    worse = "drop" if lo.run.higher_is_better else "rise"
    return f"Max {name} {worse} from FP32 ({name} units)"


def _drop_text(lo: Loaded):
    """How search messages write a drop: in the unit the box takes (points for a fraction metric)."""
    if _pct(lo):
        return lambda d: f"{d * 100:.3g} points"
    return lambda d: f"{d:.4g}"


def _budget_form(lo: Loaded) -> None:
    pj = lo.projector
    smallest = pj.other_bytes + int(np.where(pj.allowed, pj.bytes, np.iinfo(np.int64).max).min(axis=1).sum())
    lat = lo.run.meta.get("latency") or {}
    groups = coupled(lo.path, stamp_of(lo.path))
    with st.form(state.SEARCH_FORM, border=True):
        st.markdown("**Budget** — fill in one or more. With a size or latency budget the search maximises the "
                    "projected metric; with only a max drop it minimises size (or latency).")
        a, b, c = st.columns(3)
        size = a.number_input("Max size (MB)", min_value=0.0, value=None, step=0.01, format="%.3f",
                              key=state.SEARCH_SIZE,
                              help=f"FP32 is {fmt_mb(pj.fp32_bytes)}; the smallest policy this Run allows is "
                                   f"{fmt_mb(smallest)}. 1 MB = 10^6 bytes.")
        latency = None
        if lo.has_latency:
            fp32_ms = float(lat.get("fp32_ms", float("nan")))
            digits = max(3, len(fmt_ms(fp32_ms).partition(".")[2]))  # a budget as fine as the latency is small
            latency = b.number_input(f"Max latency ({latency_unit(lo)})", min_value=0.0, value=None,
                                     step=10.0 ** (2 - digits), format=f"%.{digits}f", key=state.SEARCH_LATENCY,
                                     help=f"Projected from the measured per-layer latency; FP32 measured "
                                          f"{fmt_latency(fp32_ms, lo)}.")
        else:
            b.caption("Latency: not measured in this Run, so no latency budget.")
        drop = c.number_input(_drop_label(lo), min_value=0.0, value=None, step=0.1 if _pct(lo) else 0.001,
                              format="%.2f" if _pct(lo) else "%.4f", key=state.SEARCH_DROP)
        minimize, slower = "size", False
        if lo.has_latency:
            minimize = st.radio("With only a max drop, minimise", ["size", "latency"], horizontal=True,
                                key=state.SEARCH_MINIMIZE)
            slower = st.checkbox("Allow policies projected slower than FP32", value=False, key=state.SEARCH_SLOWER,
                                 help="Without a latency budget the search leaves them out (as `quantlens search` "
                                      "does unless --allow-slower): on some CPUs quantized kernels cost more than "
                                      "they save.")
        use_groups = True
        if groups:
            use_groups = st.checkbox(f"Layers that read one tensor share a format ({len(groups)} group(s))",
                                     value=True, key=state.SEARCH_GROUPS,
                                     help="A runtime quantizes a shared input once; `quantlens search` honours "
                                          "these groups unless told --no-groups.")
        go = st.form_submit_button("Find the best policy and apply it", type="primary")
    if not go:
        return
    if size is None and latency is None and drop is None:
        st.session_state[state.SEARCH_LAST] = (lo.path, "error",
                                               "Give a budget: a max size, a max latency or a max drop.")
        return
    try:
        res = best_policy(pj, max_bytes=None if size is None else size * MB, max_latency_ms=latency,
                          max_drop=None if drop is None else (drop / 100 if _pct(lo) else drop), minimize=minimize,
                          groups=groups if use_groups and groups else None, allow_slower=slower,
                          drop_text=_drop_text(lo))
    except SearchError as e:
        st.session_state[state.SEARCH_LAST] = (lo.path, "error", f"No policy found: {e}.")
        return
    notes = state.set_codes(lo, res.codes)
    pr = res.projection
    counts = np.bincount(res.codes.astype(np.intp), minlength=3)
    goal = {"metric": "best projected metric", "size": "smallest size", "latency": "lowest latency"}[res.objective]
    text = (f"Applied the policy with the {goal} under the budget: INT8 {int(counts[1])}, INT4 {int(counts[2])}, "
            f"FP32 {int(counts[0])} layers · projected {metric_label(lo)} {fmt_metric(pr.metric, lo)} "
            f"({fmt_band(pr.band, lo)}) · {fmt_mb(pr.bytes)}"
            + (f" · {fmt_latency(pr.latency_ms, lo)}" if pr.latency_ms is not None else "")
            + ". The Layers table and the link follow; verify it on Export & share.")
    st.session_state[state.SEARCH_LAST] = (lo.path, "success", text)
    if pr.extrapolated:
        state.notice("The suggested policy lies beyond every measured point: its metric is extrapolated. "
                     "Verify it before trusting the number.")
    for msg in [*res.notes, *notes]:
        state.notice(msg)


def _frontiers(lo: Loaded, codes: np.ndarray) -> None:
    st.subheader("Pareto frontiers")
    p = lo.projector.project(codes)
    on = bool(st.session_state.get(state.frontier_key(lo.path)))
    if not on:
        st.caption(f"The frontier takes up to 40 exact solves on {len(codes)} layers; it is computed on demand and "
                   "kept for this Run version. The measured points and the current policy are drawn already.")
        st.button("Compute the Pareto frontier", key=state.FRONTIER_GO, icon=":material/timeline:",
                  on_click=st.session_state.__setitem__, args=(state.frontier_key(lo.path), True))
    stamp = stamp_of(lo.path)
    axes = ["size", "latency"] if lo.has_latency else ["size"]
    for axis in axes:  # one chart per row: side by side, each is too narrow to read at 1024 px
        front = frontier_frame(lo.path, stamp, axis) if on else None
        with st.container():
            st.plotly_chart(metric_figure(lo, p, axis, front), key=state.search_chart_key(axis), width="stretch")
            _, missing = measured_points(lo, axis)
            if axis == "latency" and missing:
                st.caption(f"{missing} measured polic{'y has' if missing == 1 else 'ies have'} no measured "
                           "latency and are not drawn here.")
            if on and front is not None and not len(front):
                st.caption("No frontier: the search found no policy on this axis.")
    if not lo.has_latency:
        st.caption("No latency chart: this Run holds no measured latency (analyse without --no-latency).")
    st.caption("Frontier and diamond: projected (the diamond's bar is the projection's error band). Circles and "
               "stars: measured — fake-quant policies from the sweep, stars verified as real quantized models in "
               "onnxruntime.")


def render(layers_page=None) -> None:
    """The Search page (registered in dashboard/pages.py, which hands it the Layers page to link to)."""
    lo = require_run()
    st.title("Search")
    st.caption("The exact optimum of the projection (a mixed-integer program, as `quantlens search`): "
               "applied to the current policy, so the Layers table, the headline and the link follow.")
    _budget_form(lo)
    last = st.session_state.pop(state.SEARCH_LAST, None)
    if last and last[0] == lo.path:
        (st.error if last[1] == "error" else st.success)(last[2])
    state.show_notices()
    codes = state.codes(lo)
    headline(lo, lo.projector.project(codes), codes)
    if layers_page is not None:
        st.page_link(layers_page, label="See and edit it layer by layer", icon=":material/tune:")
    _frontiers(lo, codes)
