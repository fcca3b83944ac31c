"""The per-output-channel weight-range chart (pure plotly: no Streamlit, testable on its own).

Top panel: each output channel's weight range as a vertical min..max bar, the per-tensor INT8 range
(±the tensor's |max|) as a dashed band and, faintly, the per-tensor INT8 grid (one line per step; zoom in to
tell them apart). Bottom panel: how many INT8 steps each channel's range spans with one per-tensor step
versus its own per-channel step (what the engine's ``int8`` uses). Channels whose |max| is more than
``OUTLIER_RATIO`` times the median channel's are drawn red: they set the per-tensor step and leave the
others few codes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.api import OUTLIER_RATIO

NORMAL, OUTLIER, GRID = "#7F7F7F", "#D62728", "#4C78A8"


@dataclass(frozen=True)
class ChannelSummary:
    """What the caption says about one layer's channels."""

    channels: int  # output channels (a summarised row counts as many as it covers)
    rows: int  # bars drawn
    tensor_step: float  # the per-tensor INT8 step: the tensor's |max| / qmax
    median_span_tensor: float  # steps the median channel's range spans at the per-tensor step
    median_span_channel: float  # ... at its own per-channel step
    outliers: int  # channels (rows) above OUTLIER_RATIO x the median |max|
    summarised: bool  # rows of a very wide layer each summarise several channels


def channel_frame(rows: pd.DataFrame, qmax: int, step_column: str | None) -> pd.DataFrame:
    """``rows`` (one layer of the ``channels`` table, channel order) with the chart's derived columns: the
    per-channel step (the Run's ``step_column`` when it holds one, else |max| / ``qmax``, the engine's
    symmetric per-channel rule), the steps each range spans per tensor and per channel, and the outlier flag."""
    df = rows.sort_values("channel", kind="stable").reset_index(drop=True).copy()
    absmax = df["absmax"].to_numpy(dtype=float)
    step = df[step_column].to_numpy(dtype=float) if step_column and step_column in df else absmax / qmax
    tensor_step = float(absmax.max()) / qmax if len(df) else float("nan")
    width = (df["max"] - df["min"]).to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        df["step"] = step
        df["span_tensor"] = width / tensor_step if tensor_step > 0 else 0.0
        df["span_channel"] = np.where(step > 0, width / step, 0.0)
    median = float(np.median(absmax)) if len(df) else 0.0
    df["outlier"] = absmax > OUTLIER_RATIO * median if median > 0 else absmax > 0
    df["label"] = [f"{c}" if n == 1 else f"{c}–{c + n - 1} ({n} channels)"
                   for c, n in zip(df["channel"].astype(int), df["n_channels"].astype(int))]
    df.attrs["tensor_step"] = tensor_step
    return df


def channel_summary(df: pd.DataFrame) -> ChannelSummary:
    """The caption's numbers, from ``channel_frame``'s output."""
    return ChannelSummary(channels=int(df["n_channels"].sum()), rows=len(df), tensor_step=df.attrs["tensor_step"],
                          median_span_tensor=float(np.median(df["span_tensor"])) if len(df) else 0.0,
                          median_span_channel=float(np.median(df["span_channel"])) if len(df) else 0.0,
                          outliers=int(df["outlier"].sum()), summarised=bool((df["n_channels"] > 1).any()))


def channel_figure(df: pd.DataFrame, qmax: int, *, sort_by_range: bool = False, fmt: str = "INT8") -> go.Figure:
    """The two-panel chart of ``channel_frame``'s output; ``sort_by_range`` puts the widest channels first."""
    if sort_by_range:
        df = df.assign(_w=df["max"] - df["min"]).sort_values("_w", ascending=False, kind="stable")
    # plotly centres a bar on its x: a row summarising channels c..c+n-1 sits at their middle, so it covers them
    x = (np.arange(len(df)) if sort_by_range
         else df["channel"].to_numpy(dtype=float) + (df["n_channels"].to_numpy(dtype=float) - 1) / 2)
    widths = np.ones(len(df)) * 0.8 if sort_by_range else df["n_channels"].to_numpy() * 0.8
    t_step = df.attrs["tensor_step"]
    t_max = t_step * qmax
    custom = np.stack([df["label"], df["min"], df["max"], df["step"], df["span_tensor"], df["span_channel"]], axis=1)
    hover = ("channel %{customdata[0]}<br>min %{customdata[1]:.4g} · max %{customdata[2]:.4g}"
             f"<br>{fmt} step per channel %{{customdata[3]:.3g}} (per tensor {t_step:.3g})"
             "<br>spans %{customdata[4]:.1f} per-tensor steps, %{customdata[5]:.0f} per-channel<extra></extra>")
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.06, row_heights=[0.64, 0.36])
    lo_x, hi_x = (float(np.min(x - widths / 2)) - 0.5, float(np.max(x + widths / 2)) + 0.5) if len(x) else (0.0, 1.0)
    levels = np.arange(-qmax, qmax + 1) * t_step
    gx = np.tile([lo_x, hi_x, np.nan], len(levels))
    gy = np.repeat(levels, 3)
    gy[2::3] = np.nan
    fig.add_scatter(x=gx, y=gy, mode="lines", line=dict(color=GRID, width=0.5), opacity=0.25, hoverinfo="skip",
                    name=f"per-tensor {fmt} grid ({2 * qmax + 1} levels, step {t_step:.3g})", row=1, col=1)
    out = df["outlier"].to_numpy()
    groups = [(~out, NORMAL, "channel range (min..max)", "steps spanned, one per-tensor step"),
              (out, OUTLIER, f"outlier channel (|max| > {OUTLIER_RATIO:g}× median)", None)]
    for m, color, name, span_name in groups:
        if not m.any():
            continue
        group = "outlier" if color == OUTLIER else "channel"
        fig.add_bar(x=x[m], y=(df["max"] - df["min"]).to_numpy()[m], base=df["min"].to_numpy()[m], width=widths[m],
                    marker_color=color, customdata=custom[m], hovertemplate=hover, name=name, legendgroup=group,
                    row=1, col=1)
        fig.add_bar(x=x[m], y=df["span_tensor"].to_numpy()[m], width=widths[m], marker_color=color,
                    customdata=custom[m], hovertemplate=hover, name=span_name or name, legendgroup=group,
                    showlegend=span_name is not None, row=2, col=1)
    fig.add_scatter(x=[lo_x, hi_x, None, lo_x, hi_x], y=[t_max, t_max, None, -t_max, -t_max], mode="lines",
                    line=dict(color=GRID, dash="dash", width=1.5), hoverinfo="skip",
                    name=f"per-tensor {fmt} range ±{t_max:.3g}", row=1, col=1)
    fig.add_scatter(x=x, y=df["span_channel"].to_numpy(), mode="markers", customdata=custom, hovertemplate=hover,
                    marker=dict(color=GRID, size=4, symbol="line-ew-open", line=dict(width=2, color=GRID)),
                    name="steps spanned, per-channel step", row=2, col=1)
    x_title = "output channels, widest range first (rank)" if sort_by_range else "output channel"
    fig.update_xaxes(title_text=x_title, row=2, col=1)
    fig.update_yaxes(title_text="weight value (FP32)", row=1, col=1)
    fig.update_yaxes(title_text=f"{fmt} steps spanned", rangemode="tozero", row=2, col=1)
    fig.update_layout(height=580, margin=dict(l=10, r=10, t=30, b=90), bargap=0, barmode="overlay", showlegend=True,
                      title=dict(text=f"Weight range per output channel ({int(df['n_channels'].sum()):,} channels)",
                                 font=dict(size=14)),
                      legend=dict(orientation="h", yref="container", y=0, yanchor="bottom", x=0, xanchor="left",
                                  traceorder="normal"),  # one flowing row, not a block per legend group
                      hovermode="closest")
    return fig
