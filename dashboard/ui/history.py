"""The policies tried in this session (Layers page): each with its projected numbers, a diff of any two, a way back.

The entries and their names live in session state (``state.tried``, fed by every ``state.set_codes``); this
module only shows them. The panel is drawn only while it is open, so a closed one costs a toggle nothing.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from analysis.api import POLICY_FORMATS
from dashboard import state
from dashboard.components import EMPTY, fmt_latency, fmt_mb, fmt_metric, fmt_ms, metric_label
from dashboard.data import Loaded
from dashboard.history import Tried, diff, find


def _numbers(lo: Loaded, entries: list[Tried]) -> pd.DataFrame:
    """One row per entry: its label and projected metric, size and latency (most recent first)."""
    current = state.codes(lo).tobytes()
    rows = []
    for t in reversed(entries):
        codes = t.codes
        p = lo.projector.project(codes)
        rows.append({"policy": t.label() + (" (current)" if t.key == current else ""),
                     "quantized": f"{int(np.count_nonzero(codes))} / {len(codes)}",
                     f"projected {metric_label(lo)}": fmt_metric(p.metric, lo),
                     "size": fmt_mb(p.bytes), "latency": fmt_latency(p.latency_ms, lo)})
    return pd.DataFrame(rows)


def _signed_ms(d: float) -> str:
    return f"{'+' if d > 0 else '-' if d < 0 else ''}{fmt_ms(abs(d))} ms"


def _go_back(path: str, number: int) -> None:
    lo = state.active()
    if isinstance(lo, Loaded) and lo.path == path and (t := find(state.tried(lo), number)) is not None:
        for msg in state.set_codes(lo, t.codes, defer_url=True):
            state.notice(msg)


def _rename(path: str, number: int) -> None:
    lo = state.active()
    if isinstance(lo, Loaded) and lo.path == path:
        state.rename_tried(lo, number, str(st.session_state.get(state.history_name_key(path, number), "")))


def _compare(lo: Loaded, entries: list[Tried]) -> None:
    """Two entries side by side: their numbers, the layers whose format differs, a button back to A, A's name."""
    numbers = [t.number for t in reversed(entries)]  # most recent first
    labels = {t.number: t.label() for t in entries}
    a_col, b_col = st.columns(2)
    a = a_col.selectbox("Policy A", numbers, index=min(1, len(numbers) - 1), key=state.HISTORY_A,
                        format_func=labels.get)
    b = b_col.selectbox("Policy B", numbers, index=0, key=state.HISTORY_B, format_func=labels.get)
    ta, tb = find(tuple(entries), a), find(tuple(entries), b)
    if ta is None or tb is None:
        return
    ca, cb = ta.codes, tb.codes
    pa, pb = lo.projector.project(ca), lo.projector.project(cb)
    st.dataframe(pd.DataFrame({
        "": ["A", "B", "B − A"],
        f"projected {metric_label(lo)}": [fmt_metric(pa.metric, lo), fmt_metric(pb.metric, lo),
                                           fmt_metric(pb.metric - pa.metric, lo, signed=True)],
        "size": [fmt_mb(pa.bytes), fmt_mb(pb.bytes), f"{pb.bytes - pa.bytes:+,} B"],
        "latency": [fmt_latency(pa.latency_ms, lo), fmt_latency(pb.latency_ms, lo),
                    EMPTY if pa.latency_ms is None or pb.latency_ms is None
                    else _signed_ms(pb.latency_ms - pa.latency_ms)]}), hide_index=True, placeholder=EMPTY)
    changed = diff(ca, cb)
    names = lo.projector.names
    if len(changed):
        st.caption(f"{len(changed)} layer(s) differ:")
        st.dataframe(pd.DataFrame({"layer": [names[i] for i in changed],
                                   "format A": [POLICY_FORMATS[ca[i]] for i in changed],
                                   "format B": [POLICY_FORMATS[cb[i]] for i in changed]}),
                     hide_index=True, height=min(320, 35 * (len(changed) + 1) + 3), placeholder=EMPTY)
    else:
        st.caption("A and B are the same policy.")
    c1, c2 = st.columns([1, 2], vertical_alignment="bottom")
    c1.button("Go back to A", key=state.HISTORY_BACK, on_click=_go_back, args=(lo.path, a),
              disabled=ta.key == state.codes(lo).tobytes(), help="Make policy A the current policy (one undo step).")
    name_key = state.history_name_key(lo.path, a)
    if name_key not in st.session_state:
        st.session_state[name_key] = ta.name
    c2.text_input("Name of A", key=name_key, on_change=_rename, args=(lo.path, a), max_chars=80,
                  placeholder=ta.label().split(" · ", 1)[1], help="Empty: named by its formats.")


def history_panel(lo: Loaded) -> None:
    """The policies tried on this Run in this session (the last 20 distinct ones), folded until opened."""
    entries = list(state.tried(lo))
    box = st.expander("Policies tried in this session", key=state.HISTORY_OPEN, on_change="rerun")
    if not box.open:
        return
    with box:
        st.caption(f"{len(entries)} distinct policies, most recent first (up to 20 are kept; named ones longest). "
                   "Every change is one undo step: a click, a bulk action, a search, a policy file or a link.")
        st.dataframe(_numbers(lo, entries), hide_index=True, placeholder=EMPTY,
                     height=min(320, 35 * (len(entries) + 1) + 3))
        if len(entries) > 1:
            _compare(lo, entries)
