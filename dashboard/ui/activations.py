"""Activations: a layer's weight and activation histograms with the INT8 / INT4 ranges and grids, and its
weights' range per output channel against the per-tensor and per-channel INT8 steps."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from analysis.api import channel_formats, get_format, step_column
from dashboard import state
from dashboard.components import EMPTY, require_run
from dashboard.data import Loaded, channel_rows
from dashboard.ui.channel_chart import OUTLIER_RATIO, channel_figure, channel_frame, channel_summary

COLORS = {"int8": "#4C78A8", "int4": "#E45756", "int8-dyn": "#54A24B"}
TENSORS = {"weight": "Weight", "input": "Input activation", "output": "Output activation"}


def _grid(fmt: str, tensor: str) -> tuple[int | None, str]:
    """(levels, what) of the format's grid on this tensor; levels None when the grid is not tensor-wide."""
    try:
        spec = get_format(fmt)
    except KeyError:
        return None, f"{fmt}: format unknown to this version; range only"
    if tensor == "weight" and spec.weight is not None:
        g = spec.weight.granularity
        if g.kind == "per_tensor":
            return 2 ** spec.weight.bits - (1 if spec.weight.symmetric else 0), "per-tensor grid"
        where = f"per group of {g.group_size}" if g.kind == "per_group" else "per output channel"
        return None, f"{fmt}: one {spec.weight.bits}-bit grid {where}; the tensor-wide range is drawn"
    if tensor == "input" and spec.activation is not None:
        return 2 ** spec.activation.bits, f"{fmt}: {spec.activation.bits}-bit per-tensor grid"
    return None, f"{fmt}: this tensor stays in floating point"


def _figure(lo: Loaded, layer: str, tensor: str, log_y: bool) -> tuple[go.Figure | None, list[str]]:
    """Histogram with each format's clip range as dashed lines and, where it is tensor-wide, its grid as a rug."""
    h = lo.hist.get((layer, tensor))
    if h is None:
        return None, []
    counts = np.asarray(h["counts"], dtype=float)
    edges = np.linspace(h["lo"], h["hi"], len(counts) + 1)
    top = float(counts.max()) if len(counts) and counts.max() > 0 else 1.0
    y0, y1 = (0.5, top * 2) if log_y else (0.0, top * 1.05)
    fig = go.Figure()
    fig.add_bar(x=(edges[:-1] + edges[1:]) / 2, y=counts, width=np.diff(edges), name="FP32 values",
                marker_color="#9A9A9A", hovertemplate="%{x:.4g}: %{y:,}<extra></extra>")
    notes, rug = [], False
    clip = lo.clip.get((layer, tensor))
    if clip is not None:
        for r in clip.itertuples(index=False):
            color = COLORS.get(r.format, "#333")
            lo_x, hi_x = float(r.clip_lo), float(r.clip_hi)
            fig.add_scatter(x=[lo_x, lo_x, None, hi_x, hi_x], y=[y0, y1, None, y0, y1], mode="lines",
                            name=f"{r.format.upper()} clip range", line=dict(color=color, dash="dash", width=2),
                            hovertemplate=f"{r.format.upper()} clip [{lo_x:.4g}, {hi_x:.4g}]<extra></extra>")
            levels, what = _grid(str(r.format), tensor)
            notes.append(what)
            if levels and math.isfinite(lo_x) and math.isfinite(hi_x) and hi_x > lo_x:
                rug = True
                fig.add_scatter(x=np.linspace(lo_x, hi_x, levels), y=np.zeros(levels), yaxis="y2", mode="markers",
                                name=f"{r.format.upper()} grid ({levels} levels)", hoverinfo="skip",
                                marker=dict(symbol="line-ns-open", size=10, color=color))
    # the x axis sits at the bottom of the whole plot, below the grid's rug (anchored to the histogram's own
    # axis, its tick labels were drawn over the rug); the legend gets its own line under the axis title
    fig.update_layout(height=360, margin=dict(l=10, r=10, t=40, b=50), bargap=0,
                      title=f"{TENSORS.get(tensor, tensor)} — {h['count']:,} values, mean {h['mean']:.4g}, "
                            f"std {h['std']:.4g}, |max| {h['absmax']:.4g}",
                      xaxis=dict(title=f"{TENSORS.get(tensor, tensor).lower()} value (FP32)", anchor="free",
                                 position=0),
                      yaxis=dict(type="log" if log_y else "linear", title="count",
                                 domain=[0.14, 1] if rug else [0, 1]),
                      yaxis2=dict(domain=[0, 0.08], showticklabels=False, showgrid=False, zeroline=False,
                                  range=[-1, 1], fixedrange=True),
                      legend=dict(orientation="h", yref="container", y=0, yanchor="bottom", x=0, xanchor="left"))
    return fig, notes


def _grid_format(lo: Loaded, rows: pd.DataFrame) -> tuple[str, int, str]:
    """(format, qmax, why not measured) of the INT8 grid drawn: the Run's first format with symmetric 8-bit
    per-channel weights whose step the table holds for this layer (why = ""), else the engine's ``int8`` with
    steps derived from |max| and the reason (the Run did not measure it, or skipped this layer at it)."""
    skipped = ""
    for fmt in [f for f in lo.run.formats if f in channel_formats(rows)]:
        try:
            w = get_format(fmt).weight
        except KeyError:
            continue
        if w is not None and w.bits == 8 and w.symmetric and w.granularity.kind == "per_channel":
            if rows[step_column(fmt)].notna().any():
                return fmt, 2 ** (w.bits - 1) - 1, ""
            skipped = skipped or fmt  # the layer stays FP32 at this format: its step column is empty
    qmax = 2 ** (get_format("int8").weight.bits - 1) - 1
    if skipped:
        return skipped, qmax, f"this layer is not quantized at {skipped} in this Run (it stays FP32 there)"
    return "int8", qmax, "this Run did not measure int8"


def _channels(lo: Loaded, layer: str) -> None:
    """Per-output-channel weight ranges with the INT8 grid, or why the Run has none."""
    rows = channel_rows(lo.path, layer)  # the chart's own title heads this part of the page
    if rows is None:
        st.caption("No weight range per output channel: this Run has no channels.parquet (Runs analysed before it "
                   "existed, and synthetic Runs); analyse the model again, or `quantlens analyze ... --resume`, "
                   "to get it.")
        return
    if isinstance(rows, str) or not len(rows):
        st.caption(rows if isinstance(rows, str) else f"The Run's channels table holds no row for {layer}.")
        return
    fmt, qmax, unmeasured = _grid_format(lo, rows)
    df = channel_frame(rows, qmax, None if unmeasured else step_column(fmt))
    s = channel_summary(df)
    sort = st.toggle("sort by range (widest first)", value=False, key=state.ACT_CHANNEL_SORT)
    st.plotly_chart(channel_figure(df, qmax, sort_by_range=sort, fmt=fmt.upper()), width="stretch",
                    key=state.ACT_CHANNEL_CHART)
    red = (f"{s.outliers} red channel(s) above {OUTLIER_RATIO:g}× the median |max| set" if s.outliers
           else "No channel stands out: the widest sets")
    per_channel = (f"(what this engine's {fmt} would do) would give it {s.median_span_channel:.0f}. Steps derived "
                   f"from |max| / {qmax}: {unmeasured}." if unmeasured else
                   f"(what this engine's {fmt} does) gives it {s.median_span_channel:.0f}.")
    st.caption(f"What to look for: {red} the per-tensor {fmt.upper()} step ({s.tensor_step:.3g}), at which the median "
               f"channel spans only {s.median_span_tensor:.0f} of {2 * qmax} steps; per-channel {fmt.upper()} "
               + per_channel
               + (" Layer wider than the table keeps: each bar summarises consecutive channels."
                  if s.summarised else ""))


def render() -> None:
    """The Activations page (registered in dashboard/pages.py)."""
    lo = require_run()
    st.title("Activations")
    names = lo.projector.names
    default = int(np.nanargmax(lo.layers["Δloss int4"].to_numpy())) if "Δloss int4" in lo.layers and \
        np.isfinite(lo.layers["Δloss int4"].to_numpy()).any() else 0
    c1, c2 = st.columns([4, 1], vertical_alignment="bottom")
    layer = c1.selectbox("Layer (execution order)", names, index=default, key=state.ACT_LAYER,
                         help="Defaults to the layer most sensitive at INT4.")
    log_y = c2.toggle("log counts", value=True, key=state.ACT_LOG)
    row = lo.layers.iloc[names.index(layer)]
    st.caption(f"{row['type']} · {int(row['params']):,} parameters · note: {row['note'] or EMPTY}")

    for tensor in TENSORS:
        fig, notes = _figure(lo, layer, tensor, log_y)
        if fig is None:
            st.caption(f"No {tensor} histogram in this Run for {layer}.")
            continue
        st.plotly_chart(fig, width="stretch", key=state.hist_key(tensor))
        if notes:
            st.caption(" · ".join(notes))

    _channels(lo, layer)

    clip = lo.run.clipping
    rows = clip[clip["layer"] == layer]
    if len(rows):
        st.subheader("Clipping and SQNR (measured on the calibration data)")
        st.dataframe(pd.DataFrame({"tensor": rows["tensor"], "format": rows["format"].str.upper(),
                                   "clip range": [f"[{a:.4g}, {b:.4g}]"
                                                  for a, b in zip(rows["clip_lo"], rows["clip_hi"])],
                                   "clipped %": rows["clipped_fraction"] * 100, "SQNR (dB)": rows["sqnr_db"]}),
                     hide_index=True, placeholder=EMPTY,
                     column_config={"clipped %": st.column_config.NumberColumn(format="%.3f"),
                                                     "SQNR (dB)": st.column_config.NumberColumn(format="%.1f")})
    else:
        st.caption("This Run holds no clipping measurement for this layer.")
