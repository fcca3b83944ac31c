"""Layers: every layer with its measured sensitivity and a format selector; live projected numbers."""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import streamlit as st

from analysis.api import FORMAT_CODE, POLICY_FORMATS, fp32_for_most_sensitive, layers_of_type, with_format
from dashboard import state
from dashboard.components import EMPTY, headline, latency_unit, ms_decimals, penalty_name, require_run
from dashboard.data import Loaded
from dashboard.ui.charts import BAR_ORDERS, sensitivity_figure, sensitivity_rows

SORTS = {
    "execution order": None,
    "most sensitive at INT4": ("sensitivity int4", False),
    "most sensitive at INT8": ("sensitivity int8", False),
    "most sensitive at INT8-DYN": ("sensitivity int8-dyn", False),
    "largest (parameters)": ("params", False),
    "name": ("layer", True),
}
FMT_LABELS = np.array(POLICY_FORMATS, dtype=object)
LAYER_PX, FORMAT_PX, ROW_PX = 240, 90, 35
ALL, SHOWN = "all", "shown"  # bulk scopes besides a layer type; a type is chosen as ("type", name)
ALL_BARS = 60  # up to this many layers the chart shows every one by default; above, the most sensitive
TOP_DEFAULT = 30
COLUMN_SETS = ("key columns", "all measurements")  # key: fits a 1400 px window with the sidebar open
NOTE_PX = 150


def _columns(view: pd.DataFrame, which: str) -> list[str] | None:
    """Columns the table shows: the key ones (name, format, type, size, metric change per format, note), or all."""
    if which == COLUMN_SETS[1]:
        return None
    return ["layer", "format", "type", "params", *(c for c in view.columns if c.startswith("Δmetric")), "note"]


def _build_view(lo: Loaded, codes: np.ndarray, text: str, types: list[str], sort: str) -> pd.DataFrame:
    base = lo.layers
    mask = np.ones(len(base), dtype=bool)
    if text:
        mask &= base["layer"].str.contains(text, case=False, regex=False).to_numpy()
    if types:
        mask &= base["type"].isin(types).to_numpy()
    view = base[mask]
    spec = SORTS.get(sort)
    if spec and spec[0] in view:
        view = view.sort_values(spec[0], ascending=spec[1], na_position="last", kind="stable")
    view = view.copy()
    view.insert(1, "format", FMT_LABELS[codes[view.index.to_numpy()]])
    return view


def _table_codes(lo: Loaded, codes: np.ndarray) -> np.ndarray | None:
    """The policy the table shows, when it differs from ``codes``; None when it does not (or is being rebuilt).

    The editor reports its whole delta against the rows it was given (``edited_rows``), and drops an edit
    that brings a cell back to the value it was given. So the table's policy is those rows' formats with
    the delta on top, recomputed on every run: never edits applied one by one to the current policy,
    where a dropped edit would leave its format behind. Formats a layer cannot take are refused with a
    notice, and the table is rebuilt so that the cell shows what the layer kept.
    """
    stored = st.session_state.get(state.view_key(lo.path))
    epoch = st.session_state.get(state.epoch_key(lo.path), 0)
    if stored is None or stored[0][0] != epoch:  # the policy changed elsewhere: the table is rebuilt from it
        return None
    view = stored[1]
    key = state.editor_key(lo.path)
    if key not in st.session_state:  # the editor's state went (another page or Run was shown)
        if not np.array_equal(codes[view.index.to_numpy()], _view_codes(view)):
            state.bump_epoch(lo)  # it would show the rows it was given, not the policy: rebuild it
        return None
    edits = (st.session_state.get(key) or {}).get("edited_rows") or {}
    table = codes.copy()
    table[view.index.to_numpy()] = _view_codes(view)
    rejected = []
    for pos, change in edits.items():
        fmt = change.get("format") if isinstance(change, dict) else None
        pos = int(pos)
        if fmt is None or not 0 <= pos < len(view):
            continue
        i = int(view.index[pos])
        code = FORMAT_CODE.get(fmt)
        if code is None or not lo.projector.allowed[i, code]:
            why = ("unknown format" if code is None
                   else lo.projector.reasons.get((i, code), "not measured in this Run"))
            rejected.append(f"{lo.projector.names[i]} cannot be {fmt} ({why}); kept at {POLICY_FORMATS[table[i]]}.")
            continue
        table[i] = code
    if rejected:
        for msg in rejected:
            state.notice(msg)
        state.bump_epoch(lo)
    return None if np.array_equal(table, codes) else table


def _view_codes(view: pd.DataFrame) -> np.ndarray:
    """Format codes of the rows the table was given (its ``format`` column)."""
    return np.array([FORMAT_CODE[f] for f in view["format"]], dtype=np.int8)


def _scope_label(scope: tuple[str, ...]) -> str:
    return {ALL: "all layers", SHOWN: "shown layers (filter)"}.get(scope[0]) or f"all {scope[1]} layers"


def _bulk_actions(lo: Loaded, codes: np.ndarray, shown: np.ndarray) -> np.ndarray | None:
    """Bulk controls (all rendered on every run, so none loses its state); new codes when one was used."""
    fmts = ["fp32", *lo.run.formats]
    new = None
    with st.expander("Bulk actions", expanded=False):
        a, b, c = st.columns([3, 2, 2], vertical_alignment="bottom")
        scopes = [(ALL,), (SHOWN,), *(("type", t) for t in lo.types)]
        scope = a.selectbox("Layers", scopes, key=state.BULK_SCOPE, format_func=_scope_label)
        fmt = b.selectbox("Format", fmts, key=state.BULK_FMT, format_func=str.upper)
        if c.button("Set", key=state.BULK_SET, width="stretch"):
            if scope[0] == ALL:
                sel = np.ones(len(codes), dtype=bool)
            elif scope[0] == SHOWN:
                sel = shown
            else:
                sel = layers_of_type(lo.run, scope[1])
            new = with_format(codes, sel, fmt)
        a, b, c = st.columns([3, 2, 2], vertical_alignment="bottom")
        n = a.number_input("Keep the N most sensitive layers at FP32", 0, len(codes), min(3, len(codes)),
                           key=state.BULK_N)
        rest = b.selectbox("…and the rest at", lo.run.formats, key=state.BULK_REST, format_func=str.upper)
        if c.button("Apply", key=state.BULK_TOPN, width="stretch"):
            # ranked by the projection's own per-layer penalty; layers that cannot take the format stay FP32
            new = fp32_for_most_sensitive(lo.projector, int(n), rest)
        if st.button("Reset all to FP32", key=state.BULK_RESET):
            new = np.zeros(len(codes), dtype=np.int8)
    return new


@st.fragment
def policy_editor() -> None:
    t0 = time.perf_counter()
    lo = state.active()
    if not isinstance(lo, Loaded):
        return
    codes = state.codes(lo)
    table = _table_codes(lo, codes)
    if table is not None:
        state.set_codes(lo, table, rebuild_table=False)
        codes = state.codes(lo)
    top = st.container()
    f1, f2, f3, f4 = st.columns([3, 3, 3, 2])
    text = f1.text_input("Filter by name", key=state.FILTER_TEXT, placeholder="e.g. fc, conv, blocks.3")
    types = f2.multiselect("Layer types", lo.types, key=state.FILTER_TYPES)
    sort = f3.selectbox("Sort", list(SORTS), key=state.SORT)
    which = f4.selectbox("Columns", COLUMN_SETS, key=state.COLUMNS,
                         help="Key columns fit the window; all measurements adds loss change, sensitivity, SQNR, "
                              "size and latency per format (scroll sideways).")
    stored = st.session_state.get(state.view_key(lo.path))
    shown = stored[1].index.to_numpy() if stored is not None else np.arange(len(codes))
    new = _bulk_actions(lo, codes, shown)
    if new is not None:
        for msg in state.set_codes(lo, new):
            state.notice(msg)
        codes = state.codes(lo)
    sig = (st.session_state.get(state.epoch_key(lo.path), 0), text, tuple(types), sort)
    if stored is None or stored[0] != sig:
        if stored is not None and stored[0][0] == sig[0]:
            state.bump_epoch(lo)  # a new filter or sort: rebuild the table under a fresh editor key
            sig = (sig[0] + 1, *sig[1:])
        st.session_state[state.view_key(lo.path)] = (sig, _build_view(lo, codes, text, list(types), sort))
    view = st.session_state[state.view_key(lo.path)][1]
    with top:
        state.show_notices()
        headline(lo, lo.projector.project(codes), codes)
    # fixed widths for the pinned columns: the format cell sits at a known place in the grid
    cfg = {"layer": st.column_config.TextColumn("layer", width=LAYER_PX, pinned=True),
           "format": st.column_config.SelectboxColumn("format", options=["fp32", *lo.run.formats], required=True,
                                                      help="FP32 or a format the Run measured", width=FORMAT_PX,
                                                      pinned=True),
           "params": st.column_config.NumberColumn("params", format="localized"),
           "MACs": st.column_config.NumberColumn("MACs", format="compact", help="multiply-accumulates per sample"),
           "note": st.column_config.TextColumn("note", width=NOTE_PX if which == COLUMN_SETS[0] else "large")}
    for col in view.columns:
        if col.startswith(("Δmetric", "Δloss")):
            cfg[col] = st.column_config.NumberColumn(col, format="%.4f", help="measured: only this layer quantized")
        elif col.startswith("sensitivity"):
            cfg[col] = st.column_config.NumberColumn(col, format="%.2e", help=(
                "measured with only this layer quantized: the per-layer penalty the projection sums "
                "(KL divergence to the FP32 outputs, or the loss increase); never negative"))
        elif col.startswith("ms "):  # per-layer times can be a few µs: as many decimals as the column needs
            cfg[col] = st.column_config.NumberColumn(col, format=f"%.{ms_decimals(view[col].to_numpy())}f", help=(
                f"measured latency of this layer at {col[3:].upper()}, {latency_unit(lo)}: its FP32 kernel time "
                "plus the measured change with only this layer quantized"))
        elif col.startswith(("SQNR", "KB")):
            cfg[col] = st.column_config.NumberColumn(col, format="%.1f")
    st.caption(f"{len(view)} of {len(codes)} layers shown. Change a layer's **format** cell; the numbers above "
               "follow. Δ columns are measured with only that layer quantized.")
    st.data_editor(view, key=state.editor_key(lo.path), hide_index=True, column_config=cfg, row_height=ROW_PX,
                   column_order=_columns(view, which),
                   height=min(420, ROW_PX * (len(view) + 1) + 3),
                   disabled=[c for c in view.columns if c != "format"], width="stretch", placeholder=EMPTY)
    st.session_state[state.FRAGMENT_MS] = (time.perf_counter() - t0) * 1e3


def render() -> None:
    """The Layers page (registered in dashboard/pages.py)."""
    lo = require_run()
    st.title("Layers")
    policy_editor()
    sensitivity_chart(lo)


def sensitivity_chart(lo: Loaded) -> None:
    """Per-layer sensitivity as horizontal bars, with its order, top-N, ranking format and scale."""
    fmts = [f for f in lo.run.formats if f"sensitivity {f}" in lo.layers]
    if not fmts:
        st.caption("No per-layer sensitivity in this Run yet.")
        return
    n = len(lo.layers)
    a, b, c, d = st.columns([3, 2, 2, 2], vertical_alignment="bottom")
    order = a.radio("Bars", BAR_ORDERS, horizontal=True, key=state.BARS_ORDER)
    rank = b.selectbox("Rank by", fmts, index=fmts.index("int4") if "int4" in fmts else len(fmts) - 1,
                       key=state.BARS_FMT, format_func=str.upper, help="Which format's sensitivity picks the top N "
                       "and orders the bars.")
    top = c.number_input("Show the top N (0 = all)", 0, n, 0 if n <= ALL_BARS else TOP_DEFAULT, step=5,
                         key=state.bars_top_key(lo.path), help=f"The N layers most sensitive at the ranking format; {n} in all.")
    log_x = d.toggle("log scale", value=False, key=state.BARS_LOG)
    fig = sensitivity_figure(lo.layers, fmts, penalty_name(lo), rank, order, int(top) or None, log_x)
    st.plotly_chart(fig, width="stretch", key=state.SENS_CHART)
    notes = ["Hover a bar for the layer's full name; layers that do not reach the output have zero change by "
             "construction (the table's note says so)."]
    if log_x:
        rows = sensitivity_rows(lo.layers, rank, order, int(top) or None)
        v = lo.layers[[f"sensitivity {f}" for f in fmts]].to_numpy(dtype=float)[rows]
        zero = int((np.isfinite(v) & (v <= 0)).any(axis=1).sum())
        if zero:
            notes.append(f"{zero} layer(s) at exactly zero have no bar on a log scale.")
    st.caption(" ".join(notes))
