"""Layers: every layer with its measured sensitivity, its format a click away, and live projected numbers.

The table is a read-only ``st.dataframe`` drawn from the current policy on every rerun: its format column is a
button column (a click moves the layer one format along its cycle), its rows are selected with their boxes or
Shift+Space, and buttons with keys set the selected rows. Every change goes through ``state.set_codes`` in a
callback, so it is one undo step and the fragment draws the new headline first.
"""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import streamlit as st

from analysis.api import FORMAT_CODE, POLICY_FORMATS, fp32_for_most_sensitive, layers_of_type, with_format
from dashboard import state
from dashboard.components import EMPTY, headline, latency_unit, ms_decimals, penalty_name, require_run
from dashboard.data import Loaded
from dashboard.history import next_code
from dashboard.ui.charts import BAR_ORDERS, sensitivity_figure, sensitivity_rows
from dashboard.ui.history import history_panel

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
SHORTCUTS = {"fp32": "F", "int8": "8", "int4": "4", "int8-dyn": "D"}  # keys that set the selected rows


def marker_px(n_rows: int) -> int:
    """Width of the grid's row-selection column (glide-data-grid's default for ``n_rows`` rows)."""
    return 48 if n_rows > 10_000 else 44 if n_rows > 1000 else 36 if n_rows > 100 else 32


def _columns(view: pd.DataFrame, which: str) -> list[str] | None:
    """Columns the table shows: the key ones (name, format, type, size, metric change per format, note), or all."""
    if which == COLUMN_SETS[1]:
        return None
    return ["layer", "format", "type", "params", *(c for c in view.columns if c.startswith("Δmetric")), "note"]


def _layer_view(lo: Loaded, text: str, types: list[str], sort: str) -> np.ndarray:
    """Indices of the layers the table shows, in its order (execution order unless sorted)."""
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
    return view.index.to_numpy()


def _view(lo: Loaded, text: str, types: list[str], sort: str, which: str) -> tuple[np.ndarray, pd.DataFrame]:
    """(layer indices, frame of the shown columns) of the table, built when its filter, sort or columns change.

    When the rows change, the row selection moves with its layers (the table reports positions).
    """
    sig = (text, tuple(types), sort, which)
    stored = st.session_state.get(state.view_key(lo.path))
    if stored is not None and stored[0] == sig:
        return stored[1], stored[2]
    idx = _layer_view(lo, text, types, sort)
    cols = _columns(lo.layers, which) or [c for c in lo.layers.columns if c != "format"]
    frame = lo.layers.loc[idx, [c for c in cols if c != "format"]].reset_index(drop=True)
    if stored is not None and not np.array_equal(stored[1], idx):
        chosen = set(_selected(lo, stored[1]).tolist())
        st.session_state[state.table_key(lo.path)] = {"selection": {"rows": [
            p for p, i in enumerate(idx.tolist()) if i in chosen]}}
    st.session_state[state.view_key(lo.path)] = (sig, idx, frame)
    return idx, frame


def _selected(lo: Loaded, idx: np.ndarray) -> np.ndarray:
    """Layer indices of the rows selected in the table (``idx``: the layers it shows, in its order)."""
    got = st.session_state.get(state.table_key(lo.path)) or {}
    rows = (got.get("selection") or {}).get("rows") or []
    return np.array([idx[r] for r in rows if 0 <= r < len(idx)], dtype=np.intp)


def _shown(lo: Loaded) -> np.ndarray:
    stored = st.session_state.get(state.view_key(lo.path))
    return stored[1] if stored is not None else np.arange(len(lo.projector.names))


def _cycle_clicked(path: str) -> None:
    """A click on a format cell (a callback: it runs before the fragment, so the whole rerun sees the change)."""
    lo = state.active()
    click = st.session_state.get(state.FORMAT_CLICK)
    if not isinstance(lo, Loaded) or lo.path != path or not click:
        return
    shown = _shown(lo)
    row = int(click["row"])
    if not 0 <= row < len(shown):
        return
    i = int(shown[row])
    codes = state.codes(lo)
    order = [FORMAT_CODE[f] for f in lo.run.formats if f in FORMAT_CODE]
    nxt = next_code(lo.projector.allowed[i], order, int(codes[i]))
    if nxt == codes[i]:
        why = "; ".join(dict.fromkeys(lo.projector.reasons.get((i, c), "not measured") for c in order))
        state.notice(f"{lo.projector.names[i]} stays FP32: no other format was measured for it ({why}).")
        return
    new = codes.copy()
    new[i] = nxt
    state.set_codes(lo, new, defer_url=True)


def _set_selected(path: str, fmt: str) -> None:
    lo = state.active()
    if not isinstance(lo, Loaded) or lo.path != path:
        return
    sel = _selected(lo, _shown(lo))
    if len(sel):  # layers that cannot take ``fmt`` stay fp32, each with a note
        for msg in state.set_codes(lo, with_format(state.codes(lo), sel, fmt), defer_url=True):
            state.notice(msg)


def _undo(path: str, back: bool) -> None:
    lo = state.active()
    if isinstance(lo, Loaded) and lo.path == path:
        state.undo(lo, defer_url=True) if back else state.redo(lo, defer_url=True)


def _edit_bar(lo: Loaded, n_selected: int) -> None:
    """Undo / Redo, and one button per format that sets every selected row to it (each with its key)."""
    tl = state.timeline(lo)
    bar = st.container(horizontal=True, vertical_alignment="center", gap="small")
    bar.button("↶ Undo", key=state.UNDO, shortcut="Ctrl+Z", disabled=not tl.can_undo,
               on_click=_undo, args=(lo.path, True), help=f"{len(tl.past)} step(s) back")
    bar.button("↷ Redo", key=state.REDO, shortcut="Ctrl+Shift+Z", disabled=not tl.can_redo,
               on_click=_undo, args=(lo.path, False), help=f"{len(tl.future)} step(s) forward")
    bar.markdown(f"Set the **{n_selected} selected** to" if n_selected else "Select rows, then set them to",
                 width="content")
    for fmt in ["fp32", *lo.run.formats]:
        bar.button(f"{fmt.upper()} ({n_selected})", key=state.set_selected_key(fmt), disabled=not n_selected,
                   shortcut=SHORTCUTS.get(fmt), on_click=_set_selected, args=(lo.path, fmt),
                   help=f"Set the {n_selected} selected layer(s) to {fmt}; layers that cannot take it stay FP32.")


def _scope_label(scope: tuple[str, ...]) -> str:
    return {ALL: "all layers", SHOWN: "shown layers (filter)"}.get(scope[0]) or f"all {scope[1]} layers"


def _bulk(path: str, action: str) -> None:
    """A bulk button (a callback: the change lands before the fragment draws the headline)."""
    lo = state.active()
    if not isinstance(lo, Loaded) or lo.path != path:
        return
    codes, ss = state.codes(lo), st.session_state
    if action == "set":
        scope = ss.get(state.BULK_SCOPE) or (ALL,)
        sel = (np.ones(len(codes), dtype=bool) if scope[0] == ALL else _shown(lo) if scope[0] == SHOWN
               else layers_of_type(lo.run, scope[1]))
        new = with_format(codes, sel, ss.get(state.BULK_FMT) or "fp32")
    elif action == "topn":  # ranked by the projection's own per-layer penalty; layers that cannot take it stay FP32
        new = fp32_for_most_sensitive(lo.projector, int(ss.get(state.BULK_N) or 0),
                                      ss.get(state.BULK_REST) or lo.run.formats[0])
    else:
        new = np.zeros(len(codes), dtype=np.int8)
    for msg in state.set_codes(lo, new, defer_url=True):
        state.notice(msg)


def _bulk_actions(lo: Loaded) -> None:
    """Bulk controls, drawn only while their box is open (a closed box costs a toggle nothing)."""
    box = st.expander("Bulk actions: by layer type, the N most sensitive, reset", key=state.BULK_OPEN,
                      on_change="rerun")
    if not box.open:
        return
    n = len(lo.projector.names)
    with box:
        a, b, c = st.columns([3, 2, 2], vertical_alignment="bottom")
        scopes = [(ALL,), (SHOWN,), *(("type", t) for t in lo.types)]
        a.selectbox("Layers", scopes, key=state.BULK_SCOPE, format_func=_scope_label)
        b.selectbox("Format", ["fp32", *lo.run.formats], key=state.BULK_FMT, format_func=str.upper)
        c.button("Set", key=state.BULK_SET, width="stretch", on_click=_bulk, args=(lo.path, "set"))
        a, b, c = st.columns([3, 2, 2], vertical_alignment="bottom")
        a.number_input("Keep the N most sensitive layers at FP32", 0, n, min(3, n), key=state.BULK_N)
        b.selectbox("…and the rest at", lo.run.formats, key=state.BULK_REST, format_func=str.upper)
        c.button("Apply", key=state.BULK_TOPN, width="stretch", on_click=_bulk, args=(lo.path, "topn"))
        st.button("Reset all to FP32", key=state.BULK_RESET, on_click=_bulk, args=(lo.path, "reset"))


def _column_config(lo: Loaded, frame: pd.DataFrame, which: str) -> dict:
    # fixed widths for the pinned columns: the format cell sits at a known place in the grid
    cycle = " → ".join(["fp32", *lo.run.formats, "fp32"])
    cfg = {"layer": st.column_config.TextColumn("layer", width=LAYER_PX, pinned=True),
           "format": st.column_config.ButtonColumn("format", width=FORMAT_PX, pinned=True, key=state.FORMAT_CLICK,
                                                   on_click=_cycle_clicked, args=(lo.path,),
                                                   help=f"Click to cycle: {cycle} (formats a layer was not "
                                                        "measured in are skipped)"),
           "params": st.column_config.NumberColumn("params", format="localized"),
           "MACs": st.column_config.NumberColumn("MACs", format="compact", help="multiply-accumulates per sample"),
           "note": st.column_config.TextColumn("note", width=NOTE_PX if which == COLUMN_SETS[0] else "large")}
    for col in frame.columns:
        if col.startswith(("Δmetric", "Δloss")):
            cfg[col] = st.column_config.NumberColumn(col, format="%.4f", help="measured: only this layer quantized")
        elif col.startswith("sensitivity"):
            cfg[col] = st.column_config.NumberColumn(col, format="%.2e", help=(
                "measured with only this layer quantized: the per-layer penalty the projection sums "
                "(KL divergence to the FP32 outputs, or the loss increase); never negative"))
        elif col.startswith("ms "):  # per-layer times can be a few µs: as many decimals as the column needs
            cfg[col] = st.column_config.NumberColumn(col, format=f"%.{ms_decimals(frame[col].to_numpy())}f", help=(
                f"measured latency of this layer at {col[3:].upper()}, {latency_unit(lo)}: its FP32 kernel time "
                "plus the measured change with only this layer quantized"))
        elif col.startswith(("SQNR", "KB")):
            cfg[col] = st.column_config.NumberColumn(col, format="%.1f")
    return cfg


@st.fragment
def policy_editor() -> None:
    """Headline, edit bar, filters, the layer table and the policies tried: a click reruns only this.

    Every change arrives through a callback, before this runs, so the headline is drawn first: it is what
    a reader waits for after a click, and the browser shows it while the rest of the fragment is still sent.
    """
    t0 = time.perf_counter()
    lo = state.active()
    if not isinstance(lo, Loaded):
        return
    codes = state.codes(lo)
    state.show_notices()
    headline(lo, lo.projector.project(codes), codes)
    bar = st.container()
    f1, f2, f3, f4 = st.columns([3, 3, 3, 2])
    text = f1.text_input("Filter by name", key=state.FILTER_TEXT, placeholder="e.g. fc, conv, blocks.3")
    types = f2.multiselect("Layer types", lo.types, key=state.FILTER_TYPES)
    sort = f3.selectbox("Sort", list(SORTS), key=state.SORT)
    which = f4.selectbox("Columns", COLUMN_SETS, key=state.COLUMNS,
                         help="Key columns fit the window; all measurements adds loss change, sensitivity, SQNR, "
                              "size and latency per format (scroll sideways).")
    idx, frame = _view(lo, text, list(types), sort, which)
    with bar:
        _edit_bar(lo, len(_selected(lo, idx)))
    _bulk_actions(lo)
    keys = " · ".join(f"**{k}** {f.upper()}" for f, k in SHORTCUTS.items() if f == "fp32" or f in lo.run.formats)
    st.caption(f"{len(idx)} of {len(codes)} layers shown. **Click a format** to cycle it; the numbers above follow. "
               "Select rows with their boxes (Shift+click: a range) or from the keyboard: **arrows** move, "
               f"**Shift+Space** selects the row; then {keys} set the selected rows, **Ctrl+Z** / "
               "**Ctrl+Shift+Z** undo and redo. Δ columns are measured with only that layer quantized.")
    table = frame.copy()
    table.insert(1, "format", FMT_LABELS[codes[idx]])
    st.dataframe(table, key=state.table_key(lo.path), on_select="rerun", selection_mode="multi-row",
                 hide_index=True, column_config=_column_config(lo, frame, which), row_height=ROW_PX,
                 column_order=_columns(lo.layers, which), height=min(420, ROW_PX * (len(idx) + 1) + 3),
                 width="stretch", placeholder=EMPTY)
    history_panel(lo)
    state.sync_url(lo)  # the callbacks left the address to now: the browser has the headline and table first
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
                         key=state.bars_top_key(lo.path),
                         help=f"The N layers most sensitive at the ranking format; {n} in all.")
    log_x = d.toggle("log scale", value=False, key=state.BARS_LOG)
    args = (lo.path, id(lo.layers), tuple(fmts), rank, order, int(top) or None, log_x)
    memo = st.session_state.get(state.SENS_FIG)
    if memo is None or memo[0] != args:  # built once per choice: a rerun of the page draws the same figure
        memo = st.session_state[state.SENS_FIG] = (args, sensitivity_figure(
            lo.layers, fmts, penalty_name(lo), rank, order, int(top) or None, log_x))
    st.plotly_chart(memo[1], width="stretch", key=state.SENS_CHART)
    notes = ["Hover a bar for the layer's full name; layers that do not reach the output have zero change by "
             "construction (the table's note says so)."]
    if log_x:
        rows = sensitivity_rows(lo.layers, rank, order, int(top) or None)
        v = lo.layers[[f"sensitivity {f}" for f in fmts]].to_numpy(dtype=float)[rows]
        zero = int((np.isfinite(v) & (v <= 0)).any(axis=1).sum())
        if zero:
            notes.append(f"{zero} layer(s) at exactly zero have no bar on a log scale.")
    st.caption(" ".join(notes))
