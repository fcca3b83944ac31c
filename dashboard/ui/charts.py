"""Metric vs size / latency charts: measured policies (by kind), the frontier and the current policy (projected)."""
from __future__ import annotations

import html
import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis.api import Projection
from dashboard.components import PCT_METRICS, latency_unit, metric_label
from dashboard.data import MB, Loaded

# measured rows of the policies table, by kind: how each is drawn and named
KINDS = {
    "baseline": ("FP32 (measured)", dict(symbol="circle", size=12, color="#333333")),
    "uniform": ("uniform formats (measured, fake-quant)", dict(symbol="circle", size=11, color="#4C78A8")),
    "random": ("random mixed policies (measured, fake-quant)", dict(symbol="circle", size=7, color="#9ecae9")),
    "verified": ("verified in onnxruntime (measured)", dict(symbol="star", size=15, color="#54A24B",
                                                            line=dict(width=1, color="#1b5e20"))),
    "other": ("other measured policies", dict(symbol="square", size=9, color="#B279A2")),
}
AXES = {"size": ("bytes", "size (MB)", MB), "latency": ("latency_ms", "latency (ms)", 1.0)}


def _kind(row_kind: str, measured_on: str) -> str:
    if row_kind in ("baseline", "uniform", "random"):
        return row_kind
    if row_kind in ("user", "search") or str(measured_on).startswith("onnxruntime"):
        return "verified"
    return "other"


def measured_points(lo: Loaded, axis: str = "size") -> tuple[pd.DataFrame, int]:
    """Measured policies with a finite metric and ``axis`` value, and how many lack that axis value."""
    col = AXES[axis][0]
    pol = lo.run.policies
    pol = pol[pol["metric"].notna()].copy()
    has = np.isfinite(pol[col].to_numpy(dtype=float))
    pol["drawn_as"] = [_kind(k, m) for k, m in zip(pol["kind"], pol["measured_on"])]
    return pol[has], int((~has).sum())


def metric_figure(lo: Loaded, p: Projection, axis: str = "size", front: pd.DataFrame | None = None,
                  title: str | None = None) -> go.Figure:
    """Metric vs ``axis``: the projected frontier (if given), measured points by kind, the current policy ± band."""
    col, label, scale = AXES[axis]
    meta = lo.run.meta
    xf = ":.3f" if axis == "size" else ":.3g"  # MB to the kB; latency to its own digits (it may be 0.0412 ms)
    fig = go.Figure()
    ys: list[float] = []
    if front is not None and len(front):
        x = front[col].to_numpy(dtype=float) / scale
        fig.add_scatter(x=x, y=front["metric"], mode="lines+markers", name="Pareto frontier (projected)",
                        line=dict(color="#9D755D", shape="hv", dash="dot"), marker=dict(size=5),
                        hovertemplate="%{x" + xf + "} · %{y:.4f}<extra>frontier (projected)</extra>")
        ys += front["metric"].astype(float).tolist()
    pts, _ = measured_points(lo, axis)
    for kind, (name, marker) in KINDS.items():
        sub = pts[pts["drawn_as"] == kind]
        if not len(sub):
            continue
        labels = [str(n) if kind in ("baseline", "uniform", "verified") else "" for n in sub["name"]]
        fig.add_scatter(x=sub[col].to_numpy(dtype=float) / scale, y=sub["metric"], mode="markers+text", name=name,
                        text=labels, textposition="top center", cliponaxis=False, marker=marker,
                        hovertext=[html.escape(f"{n} — {m}") for n, m in zip(sub["name"], sub["measured_on"])],
                        hovertemplate="%{hovertext}<br>%{x" + xf + "} · %{y:.4f}<extra>measured</extra>")
        ys += sub["metric"].astype(float).tolist()
    x_now = p.bytes / MB if axis == "size" else p.latency_ms
    if x_now is not None:
        err = dict(type="data", array=[p.band], visible=True, thickness=2, width=8) if p.band is not None else None
        fig.add_scatter(x=[x_now], y=[p.metric], mode="markers", name="current policy (projected)",
                        error_y=err, marker=dict(size=14, symbol="diamond", color="#E45756"),
                        hovertemplate="current policy<br>%{x" + xf + "} · %{y:.4f}<extra>projected</extra>")
        ys.append(p.metric)
    band = p.band or 0.0
    ys = [y for y in ys if math.isfinite(y)] or [p.metric]
    lo_y, hi_y = min(ys) - band, max(ys) + band
    pad = max((hi_y - lo_y) * 0.15, abs(hi_y) * 0.005, 1e-6)  # a flat set of points still gets a visible axis
    pct = meta["metric"].get("name") in PCT_METRICS
    name = metric_label(lo)
    fig.update_layout(height=420, margin=dict(l=10, r=10, t=40, b=10),
                      xaxis_title=f"latency ({latency_unit(lo)})" if axis == "latency" else label,
                      yaxis=dict(title=name, range=[lo_y - pad, hi_y + pad], tickformat=".2%" if pct else None),
                      legend=dict(orientation="h", y=-0.2),
                      title=title or f"{label.split(' ')[0].capitalize()} vs {name}")
    return fig
