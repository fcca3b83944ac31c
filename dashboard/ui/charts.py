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
UNIFORM_MARKERS = {"all-int8": dict(symbol="square", color="#4C78A8"), "all-int4": dict(symbol="triangle-up",
                                                                                     color="#F58518"),
                   "all-int8-dyn": dict(symbol="pentagon", color="#54A24B")}
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
    # the current policy first, so that a measured point where it stands (FP32 at start) is drawn over it
    x_now = p.bytes / MB if axis == "size" else p.latency_ms
    if x_now is not None:
        err = dict(type="data", array=[p.band], visible=True, thickness=2, width=8) if p.band is not None else None
        fig.add_scatter(x=[x_now], y=[p.metric], mode="markers", name="current policy (projected)",
                        error_y=err, marker=dict(size=14, symbol="diamond", color="#E45756"),
                        hovertemplate="current policy<br>%{x" + xf + "} · %{y:.4f}<extra>projected</extra>")
        ys.append(p.metric)
    pts, _ = measured_points(lo, axis)
    # no text beside the points: names of nearby points (all-int8, all-int4, verified ones) overlapped; the
    # baseline and each uniform format get a legend entry and a marker of their own, the rest name on hover
    for kind, (name, marker) in KINDS.items():
        sub = pts[pts["drawn_as"] == kind]
        if not len(sub):
            continue
        own = kind in ("baseline", "uniform")
        groups = [(f"{n} (measured)", sub[sub["name"] == n]) for n in sub["name"]] if own else [(name, sub)]
        for entry, g in groups:
            mk = {**marker, **(UNIFORM_MARKERS.get(str(g["name"].iloc[0]), {}) if own else {})}
            fig.add_scatter(x=g[col].to_numpy(dtype=float) / scale, y=g["metric"], mode="markers", name=entry,
                            marker=mk, hovertext=[html.escape(f"{n} — {m}") for n, m in zip(g["name"], g["measured_on"])],
                            hovertemplate="%{hovertext}<br>%{x" + xf + "} · %{y:.4f}<extra>measured</extra>")
        ys += sub["metric"].astype(float).tolist()
    band = p.band or 0.0
    ys = [y for y in ys if math.isfinite(y)] or [p.metric]
    lo_y, hi_y = min(ys) - band, max(ys) + band
    pad = max((hi_y - lo_y) * 0.15, abs(hi_y) * 0.005, 1e-6)  # a flat set of points still gets a visible axis
    pct = meta["metric"].get("name") in PCT_METRICS
    name = metric_label(lo)
    fig.update_layout(height=420, margin=dict(l=10, r=10, t=40, b=10),
                      xaxis_title=f"latency ({latency_unit(lo)})" if axis == "latency" else label,
                      yaxis=dict(title=name, range=[lo_y - pad, hi_y + pad], tickformat=".2%" if pct else None),
                      # under the axis title in the figure's own space: at y=-0.2 of the plot it covered the title
                      legend=dict(orientation="h", yref="container", y=0, yanchor="bottom"),
                      title=title or f"{label.split(' ')[0].capitalize()} vs {name}")
    return fig


# --- per-layer sensitivity: horizontal bars, one row per layer, readable from a dozen layers to thousands
SENS_COLORS = {"int8": "#4C78A8", "int4": "#E45756", "int8-dyn": "#54A24B"}
BAR_ORDERS = ("most sensitive first", "execution order")
LABELLED_ROWS = 150  # above this many rows a tick per layer cannot be read: hover names them instead
SHORT_NAME = 28  # characters of a layer name on the axis


def short_names(names: list[str], width: int = SHORT_NAME) -> list[str]:
    """Axis labels for layer names of at most ``width`` characters where it can be done.

    The dotted prefix every name shares is dropped; when a name is still longer than ``width``, the inner
    parts longer than four letters (not numbers, not the last part) of every name over ``width // 2`` are
    cut to three, so that one block's layers read alike; a name still too long keeps its end after "…".
    A short form that two names would share falls back to the full names.

    Example:
        >>> short_names(["encoder.layer.0.attention.self.query", "pooler.dense"])
        ['enc.lay.0.att.self.query', 'pooler.dense']
    """
    parts = [str(n).split(".") for n in names]
    common = 0
    if len(parts) > 1:
        for group in zip(*(p[:-1] for p in parts)):  # never drop a name's last part
            if len(set(group)) > 1:
                break
            common += 1
    while common and any(p[common].isdigit() for p in parts):  # "features.0", not a bare "0"
        common -= 1
    parts = [p[common:] for p in parts]
    if any(len(".".join(p)) > width for p in parts):
        parts = [[q[:3] if i < len(p) - 1 and len(q) > 4 and not q.isdigit() else q for i, q in enumerate(p)]
                 if len(".".join(p)) > width // 2 else p for p in parts]
    out = [s if len(s) <= width else "…" + s[-(width - 1):] for s in (".".join(p) for p in parts)]
    seen: dict[str, int] = {}
    for s in out:
        seen[s] = seen.get(s, 0) + 1
    return [s if seen[s] == 1 else str(n) for s, n in zip(out, names)]


def sensitivity_rows(layers: pd.DataFrame, rank_fmt: str, order: str = BAR_ORDERS[0],
                     top: int | None = None) -> np.ndarray:
    """Row positions of ``layers`` the chart draws, top to bottom: the ``top`` most sensitive at ``rank_fmt``
    (all when None), most sensitive first or in execution order. Unmeasured layers rank last."""
    if order not in BAR_ORDERS:
        raise KeyError(f"unknown order {order!r}; known: {', '.join(BAR_ORDERS)}")
    col = f"sensitivity {rank_fmt}"
    sens = layers[col].to_numpy(dtype=float) if col in layers else np.full(len(layers), np.nan)
    ranked = np.argsort(np.where(np.isfinite(sens), -sens, np.inf), kind="stable")
    keep = ranked[: top if top is not None else len(ranked)]
    return keep if order == BAR_ORDERS[0] else np.sort(keep)


def sensitivity_figure(layers: pd.DataFrame, formats: list[str], penalty: str, rank_fmt: str,
                       order: str = BAR_ORDERS[0], top: int | None = None, log_x: bool = False) -> go.Figure:
    """Sensitivity with only that layer quantized, one horizontal bar per layer and format.

    Short names on the axis, the full name, its execution position and the value on hover; a log axis on
    request (a layer at exactly zero has no bar there). Height grows with the rows drawn, up to a cap.
    """
    rows = sensitivity_rows(layers, rank_fmt, order, top)
    names = layers["layer"].astype(str).to_numpy()[rows]
    full = [html.escape(n) for n in names]  # plotly renders some tags in hover and tick text
    ticks = [html.escape(s) for s in short_names(list(names))]
    y = np.arange(len(rows))
    fmts = [f for f in formats if f"sensitivity {f}" in layers]
    fig = go.Figure()
    for fmt in fmts:
        v = layers[f"sensitivity {fmt}"].to_numpy(dtype=float)[rows]
        fig.add_bar(x=v, y=y, orientation="h", name=fmt.upper(), marker_color=SENS_COLORS.get(fmt),
                    customdata=np.stack([np.array(full, dtype=object), rows + 1], axis=1),
                    hovertemplate="%{customdata[0]} (layer %{customdata[1]}): %{x:.4g}<extra>" + fmt.upper()
                                  + "</extra>")
    labelled = len(rows) <= LABELLED_ROWS
    row_px = 4 + 6 * max(len(fmts), 1) if labelled else 2
    height = int(min(max(120 + row_px * len(rows), 260), 1600))
    what = "all" if len(rows) == len(layers) else f"the {len(rows)} most sensitive at {rank_fmt.upper()} of"
    fig.update_layout(
        barmode="group", bargap=0.25, height=height,
        margin=dict(l=10, r=10, t=125, b=10),
        title=dict(text=f"Sensitivity: only that layer quantized<br><sub>{what} {len(layers)} layers · {order}</sub>",
                   font=dict(size=15), y=1, yref="container", yanchor="top", pad=dict(t=12)),
        xaxis=dict(title=f"{penalty} (measured{', log scale' if log_x else ''})", type="log" if log_x else "linear",
                   side="top", exponentformat="power" if log_x else "SI"),
        yaxis=dict(title=None, autorange="reversed", automargin=True,
                   tickmode="array" if labelled else "auto", tickvals=y.tolist() if labelled else None,
                   ticktext=ticks if labelled else None, showticklabels=labelled),
        # its own line under the title: at 1024 px a title and a legend on one line overlap
        legend=dict(orientation="h", y=1 - 58 / height, yref="container", yanchor="top", x=0, xanchor="left"))
    return fig
