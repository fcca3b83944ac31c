"""Model: the layers drawn as the model's structure, coloured by measured sensitivity; a click cycles a
layer's format (fp32 -> the Run's formats -> fp32) and the projected numbers follow.

Runs of more than ``DETAIL_MAX`` layers open on their blocks (one mark each, coloured by the most sensitive
layer); a click on a block draws it, with its neighbours, layer by layer below.
"""
from __future__ import annotations

import numpy as np
import streamlit as st

from analysis.api import FORMAT_CODE, POLICY_FORMATS
from dashboard import state
from dashboard.components import headline, penalty_name, require_run
from dashboard.data import Loaded
from dashboard.ui.model_chart import LayerData, blocks_figure, clicked_rows, layers_figure
from dashboard.ui.model_layout import ModelLayout, band_window, model_layout

DETAIL_MAX = 150  # up to this many layers every layer is drawn at once; above, the blocks come first
EVERY_LAYER, BLOCKS = "every layer", "blocks"
BLOCK_COLUMNS = 16


def cycled(lo: Loaded, codes: np.ndarray, i: int) -> np.ndarray:
    """``codes`` with layer ``i`` at its next format: fp32, then each of the Run's formats it can take, then fp32."""
    allowed = lo.projector.allowed[i]
    order = [0, *(FORMAT_CODE[f] for f in lo.run.formats if f in FORMAT_CODE and allowed[FORMAT_CODE[f]])]
    cur = int(codes[i])
    new = codes.copy()
    new[i] = order[(order.index(cur) + 1) % len(order)] if cur in order else 0
    return new


def layout_of(lo: Loaded) -> ModelLayout:
    """The Run's layout, computed once per Run version in this session (it costs ~50 ms at 1,000 layers)."""
    held = st.session_state.get(state.MODEL_LAYOUT)
    if held is not None and held[0] == lo.path and held[1] is lo.run:  # the Run object itself: a re-read is another
        return held[2]
    names = list(lo.projector.names)
    groups = None
    if "input_group" in lo.run.layers.columns:
        groups = lo.run.layers.set_index("name").reindex(names)["input_group"].astype(str).tolist()
    lay = model_layout(names, lo.run.fed_by(), groups)
    st.session_state[state.MODEL_LAYOUT] = (lo.path, lo.run, lay)
    return lay


def layer_data(lo: Loaded, fmt: str) -> LayerData:
    t = lo.layers
    return LayerData(types=t["type"].to_numpy(), params=t["params"].to_numpy(),
                     penalty=t[f"sensitivity {fmt}"].to_numpy(dtype=float),
                     deltas={f: t[f"Δmetric {f}"].to_numpy(dtype=float) for f in lo.run.formats
                             if f"Δmetric {f}" in t},
                     formats=list(POLICY_FORMATS))


def _clicked(chart: str) -> list[int]:
    event = st.session_state.get(state.model_chart_key(chart)) or {}
    points = (event.get("selection") or {}).get("points") or []
    return clicked_rows(points, (st.session_state.get(state.MODEL_ROWS) or {}).get(chart, {}))


def _on_layer_click() -> None:
    """A layer was clicked (a callback: it runs once per click, before the rerun that draws the result)."""
    rows, lo = _clicked("layers"), state.active()
    if rows and isinstance(lo, Loaded):
        for msg in state.set_codes(lo, cycled(lo, state.codes(lo), rows[0])):
            state.notice(msg)
    st.session_state[state.MODEL_CLICKS] = st.session_state.get(state.MODEL_CLICKS, 0) + 1


def _on_block_click() -> None:
    rows = _clicked("blocks")
    if rows:
        st.session_state[state.MODEL_BLOCK] = rows[0]
    st.session_state[state.MODEL_CLICKS] = st.session_state.get(state.MODEL_CLICKS, 0) + 1


def _chart(chart: str, drawn, on_click) -> None:
    rows = st.session_state.setdefault(state.MODEL_ROWS, {})
    rows[chart] = drawn.rows
    st.plotly_chart(drawn.fig, width="stretch", key=state.model_chart_key(chart), on_select=on_click,
                    selection_mode="points", config={"scrollZoom": True, "displaylogo": False})


def _structure_note(lo: Loaded, lay: ModelLayout) -> str:
    meta = lo.run.meta.get("structure") or {}
    if lay.has_dataflow:
        return (f"Structure from the {meta.get('source', 'Run')}: each layer is fed by the layers whose outputs reach "
                "its input through non-layer operations; dotted arcs skip levels (residual branches).")
    why = meta.get("reason") or "this Run was written before QuantLens recorded which layers feed which"
    return (f"**No dataflow in this Run** ({why}): layers are drawn in execution order, grouped into blocks by "
            "their names; layers that read one tensor sit side by side. No edges are drawn.")


@st.fragment
def model_view() -> None:
    lo = state.active()
    if not isinstance(lo, Loaded):
        return
    codes = state.codes(lo)
    lay = layout_of(lo)
    top = st.container()
    fmts = [f for f in lo.run.formats if f"sensitivity {f}" in lo.layers]
    if not fmts:
        with top:
            headline(lo, lo.projector.project(codes), codes)
        st.caption("No per-layer sensitivity in this Run yet.")
        return
    a, b = st.columns([2, 3], vertical_alignment="bottom")
    fmt = a.selectbox("Colour by measured sensitivity at", fmts, index=fmts.index("int4") if "int4" in fmts else 0,
                      key=state.MODEL_FMT, format_func=str.upper)
    big = len(codes) > DETAIL_MAX
    draw = b.radio("Draw", (BLOCKS, EVERY_LAYER), horizontal=True, key=state.MODEL_DRAW,
                   help=f"{len(codes):,} layers in {len(lay.bands)} blocks: the blocks overview, or every layer "
                        "at once (zoom with the mouse wheel, drag to pan)") if big else EVERY_LAYER
    with top:
        state.show_notices()
        headline(lo, lo.projector.project(codes), codes)
    data, title = layer_data(lo, fmt), penalty_name(lo)
    st.caption("Click a layer to cycle its format: FP32 → " + " → ".join(f.upper() for f in lo.run.formats)
               + " → FP32. Colour: the measured sensitivity with only that layer quantized (grey: not measured at "
               "this format); shape and label: its current format. Hover for the full name and every measurement.")
    if draw == BLOCKS:
        if int(st.session_state.get(state.MODEL_BLOCK, 0)) >= len(lay.bands):
            st.session_state[state.MODEL_BLOCK] = 0  # another Run was open before
        picked = int(st.session_state.get(state.MODEL_BLOCK, 0))
        _chart("blocks", blocks_figure(lay, data, codes, title, columns=BLOCK_COLUMNS, picked=picked), _on_block_click)
        st.selectbox("Block drawn below with its neighbours (or click one above)", range(len(lay.bands)),
                     key=state.MODEL_BLOCK, format_func=lambda b: f"{b + 1}. {lay.bands[b].block or '(top level)'} "
                                                                  f"({len(lay.bands[b].rows)} layers)")
        _chart("layers", layers_figure(lay, data, codes, title, band_window(lay, picked - 1, picked + 1)),
               _on_layer_click)
    else:
        _chart("layers", layers_figure(lay, data, codes, title, labels=len(codes) <= 400), _on_layer_click)
    st.caption(_structure_note(lo, lay))


def render() -> None:
    """The Model page (registered in dashboard/pages.py)."""
    require_run()
    st.title("Model")
    model_view()
