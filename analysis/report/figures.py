"""The report's figures as plain plotly JSON (data + layout), drawn by the page itself.

Plain dicts rather than ``plotly.graph_objects``: no template is serialised into each
figure, which keeps the report small. Plotly reads a small HTML subset in text, so every
Run string goes through ``html.escape`` here (plotly turns the entities back into text).
"""
from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING

import numpy as np

from analysis.store.channels import OUTLIER_RATIO, read_channels
from analysis.store.policy import POLICY_FORMATS

if TYPE_CHECKING:  # pragma: no cover
    from analysis.report.content import ReportContent

COLORS = {"int8": "#4C78A8", "int4": "#E45756", "fp32": "#72B7B2", "int8-dyn": "#54A24B"}
FONT = {"family": "system-ui, sans-serif", "size": 12, "color": "#1F2430"}


def _t(x) -> str:
    return html.escape(str(x), quote=True)


def _f(x) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def _layout(title: str, height: int, **kw) -> dict:
    return {"title": {"text": _t(title), "font": {"size": 14}, "x": 0.01, "xanchor": "left"}, "height": height,
            "font": FONT, "margin": {"l": 70, "r": 20, "t": 70, "b": 50}, "paper_bgcolor": "#fff", "plot_bgcolor": "#fff",
            "legend": {"orientation": "h", "y": 1.0, "yanchor": "bottom", "x": 1, "xanchor": "right"}, **kw}


def _axis(title: str, **kw) -> dict:
    return {"title": {"text": _t(title)}, "gridcolor": "#eceef2", "zerolinecolor": "#c9ced8", **kw}


def _padded_range(values: list) -> list[float] | None:
    """An explicit axis range when every value is (nearly) the same: plotly's autorange zooms into float noise."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v or max(v) - min(v) > 1e-6 * max(1.0, abs(max(v))):
        return None
    pad = 0.01 * max(abs(max(v)), 1e-3)
    return [min(v) - pad, max(v) + pad]


def _y(x) -> float | None:
    """A metric for a chart: finite, and rounded past float noise (projections of one value differ in the 16th digit)."""
    return round(float(x), 12) if x is not None and math.isfinite(float(x)) else None


def _tickformat(run) -> str:
    return ".2%" if run.meta["metric"].get("name") in ("accuracy", "agreement") else ".4~g"


def sensitivity_figure(c: "ReportContent") -> dict:
    run, names = c.run, c.projector.names
    sens = run.sensitivity
    x = list(range(len(names)))
    labels = [_t(n) for n in names]
    data = []
    for fmt in run.formats:
        s = sens[sens["format"] == fmt].set_index("layer").reindex(names)["loss_delta"]
        data.append({"type": "bar", "name": fmt.upper(), "x": x, "y": [_f(v) for v in s], "marker": {"color": COLORS.get(fmt)},
                     "hovertext": labels, "hovertemplate": "%{hovertext}: %{y:.4g}<extra>" + fmt.upper() + "</extra>"})
    small = len(names) <= 60
    xaxis = _axis("layer (execution order)", **({"tickmode": "array", "tickvals": x, "ticktext": labels} if small else {}))
    return {"data": data, "layout": _layout("Loss change with only that layer quantized (measured)", 340, barmode="group",
                                            xaxis=xaxis, yaxis=_axis(f"Δ {run.meta['metric'].get('loss', 'loss')}"))}


def _mix(codes) -> str:
    counts = np.bincount(np.asarray(codes, dtype=np.intp), minlength=len(POLICY_FORMATS))
    return " · ".join(f"{POLICY_FORMATS[i].upper()} {int(counts[i])}" for i in range(len(counts)) if counts[i] or i == 0)


def frontier_figure(c: "ReportContent") -> tuple[dict, int]:
    """Projected frontier, measured policies and their projections, chosen and current point.

    Returns the figure and the index of the "current policy" trace the page moves on a toggle.
    """
    run, p = c.run, c.projector
    metric = run.meta["metric"]["name"]
    data = []
    if c.frontier:
        data.append({"type": "scatter", "mode": "lines+markers", "name": "frontier (projected)",
                     "x": [r.projection.bytes / 1e6 for r in c.frontier], "y": [_y(r.projection.metric) for r in c.frontier],
                     "line": {"color": "#8C96A8", "shape": "hv"}, "marker": {"size": 6},
                     "hovertext": [_mix(r.codes) for r in c.frontier],
                     "hovertemplate": "%{hovertext}<br>%{x:.3f} MB, %{y:.4f}<extra>projected</extra>"})
    pol = run.policies
    meas = pol[np.isfinite(pol["metric"].astype(float))]
    data.append({"type": "scatter", "mode": "markers", "name": "measured", "x": (meas["bytes"] / 1e6).tolist(),
                 "y": [_y(v) for v in meas["metric"]], "marker": {"size": 9, "color": "#1F2430"},
                 "hovertext": [_t(n) for n in meas["name"]],
                 "hovertemplate": "%{hovertext}<br>%{x:.3f} MB, %{y:.4f}<extra>measured</extra>"})
    sizes = dict(zip(pol["name"].astype(str), pol["bytes"]))
    vals = [v for v in p.validations if v.name in sizes]
    if vals:
        data.append({"type": "scatter", "mode": "markers", "name": "measured policies, projected",
                     "x": [sizes[v.name] / 1e6 for v in vals], "y": [_y(v.projected_metric) for v in vals],
                     "marker": {"size": 9, "symbol": "circle-open", "color": "#1F2430"},
                     "hovertext": [_t(v.name) for v in vals],
                     "hovertemplate": "%{hovertext}<br>%{x:.3f} MB, %{y:.4f}<extra>projected</extra>"})
    data.append({"type": "scatter", "mode": "markers", "name": "chosen policy (projected)",
                 "x": [c.projection.bytes / 1e6], "y": [_y(c.projection.metric)],
                 "marker": {"size": 16, "symbol": "star", "color": "#F2A900"}, "hovertemplate": "chosen<extra></extra>"})
    data.append({"type": "scatter", "mode": "markers", "name": "policy shown (projected)",
                 "x": [c.projection.bytes / 1e6], "y": [_y(c.projection.metric)],
                 "marker": {"size": 11, "symbol": "diamond", "color": COLORS["int4"]},
                 "hovertemplate": "policy shown: %{x:.3f} MB, %{y:.4f}<extra></extra>"})
    yr = _padded_range([y for t in data for y in t["y"]])
    fig = {"data": data, "layout": _layout(f"Size vs {metric}", 400, xaxis=_axis("size (MB)"),
                                           yaxis=_axis(metric, tickformat=_tickformat(run), **({"range": yr} if yr else {})))}
    return fig, len(data) - 1


def histogram_figure(c: "ReportContent", layer: str) -> dict:
    """Weight and input histograms of one layer, with the INT8 clip range where calibrated."""
    run = c.run
    h = run.histograms[run.histograms["layer"] == layer]
    clip = run.clipping[(run.clipping["layer"] == layer) & (run.clipping["format"] == "int8")]
    data, shapes, layout = [], [], {}
    tensors = [t for t in ("weight", "input") if (h["tensor"] == t).any()]
    for k, tensor in enumerate(tensors, start=1):
        r = h[h["tensor"] == tensor].iloc[0]
        counts = np.asarray(r["counts"], dtype=float)
        width = (float(r["hi"]) - float(r["lo"])) / max(len(counts), 1)
        centers = (float(r["lo"]) + width * (np.arange(len(counts)) + 0.5)).tolist()
        ax = "" if k == 1 else str(k)
        data.append({"type": "bar", "name": tensor, "x": centers, "y": counts.tolist(), "xaxis": f"x{ax}",
                     "yaxis": f"y{ax}", "marker": {"color": COLORS["int8"] if tensor == "weight" else COLORS["fp32"]},
                     "width": width, "showlegend": False, "hovertemplate": "%{x:.4g}: %{y}<extra>" + tensor + "</extra>"})
        layout[f"xaxis{ax}"] = _axis(f"{tensor} value")
        layout[f"yaxis{ax}"] = _axis("count" if k == 1 else "", type="log")
        cr = clip[clip["tensor"] == tensor]
        for v in (cr[["clip_lo", "clip_hi"]].to_numpy().ravel().tolist() if len(cr) else []):
            if math.isfinite(v):
                shapes.append({"type": "line", "xref": f"x{ax}", "yref": f"y{ax} domain", "x0": v, "x1": v, "y0": 0,
                               "y1": 1, "line": {"dash": "dot", "color": COLORS["int4"], "width": 1}})
    return {"data": data, "layout": _layout(f"{layer}: weight and input (dotted: INT8 clip range)", 260, shapes=shapes,
                                            grid={"rows": 1, "columns": max(len(tensors), 1), "pattern": "independent"},
                                            **layout)}


def _g4(values: np.ndarray) -> list[float]:
    """Values to 4 significant digits: what a chart can show, at a third of the JSON."""
    return [float(f"{v:.4g}") for v in values]


def channel_range_figure(c: "ReportContent", layer: str) -> dict | None:
    """Each output channel's weight range (min..max bars) against the per-tensor INT8 range (dashed), outlier
    channels red; None when the Run holds no per-channel statistics for ``layer``."""
    rows = read_channels(c.run.path, layer)
    if rows is None or not len(rows):
        return None
    spec = c.run.meta.get("format_specs", {}).get("int8", {}).get("weight") or {"bits": 8}
    qmax = 2 ** (int(spec["bits"]) - 1) - 1
    absmax = rows["absmax"].to_numpy(dtype=float)
    top, median = float(absmax.max()), float(np.median(absmax))
    outlier = absmax > OUTLIER_RATIO * median if median > 0 else absmax > 0
    span = ((rows["max"] - rows["min"]).to_numpy(dtype=float) / (top / qmax)) if top > 0 else np.zeros(len(rows))
    labels = [str(ch) if n == 1 else f"{ch}–{ch + n - 1}" for ch, n in zip(rows["channel"], rows["n_channels"])]
    data = []
    for mask, color, name in ((~outlier, "#8C96A8", "channel range"),
                              (outlier, COLORS["int4"], f"|max| > {OUTLIER_RATIO:g}× median")):
        if mask.any():
            n = rows["n_channels"].to_numpy()[mask]
            # a bar is centred on its x: a row summarising n channels sits at their middle
            mid = rows["channel"].to_numpy(dtype=float)[mask] + (n - 1) / 2
            data.append({"type": "bar", "name": name, "x": [float(v) if v % 1 else int(v) for v in mid],
                         "base": _g4(rows["min"].to_numpy(dtype=float)[mask]),
                         "y": _g4((rows["max"] - rows["min"]).to_numpy(dtype=float)[mask]),
                         "width": 0.8 if (n == 1).all() else (n * 0.8).tolist(), "marker": {"color": color},
                         "customdata": [[lab, float(f"{v:.1f}")] for lab, v in zip(np.asarray(labels)[mask], span[mask])],
                         "hovertemplate": "channel %{customdata[0]}: %{base:.4g} .. %{y:.4g} wide<br>"
                                          "%{customdata[1]} per-tensor INT8 steps<extra></extra>"})
    shapes = [{"type": "line", "xref": "x domain", "x0": 0, "x1": 1, "yref": "y", "y0": v, "y1": v,
               "line": {"dash": "dash", "color": COLORS["int8"], "width": 1}} for v in (top, -top)]
    layout = _layout(f"{layer}: weight range per output channel", 260, shapes=shapes, barmode="overlay", bargap=0,
                     xaxis=_axis("output channel"), yaxis=_axis("weight value"))
    layout["title"]["text"] += ("<br><sup>" + _t(f"dashed: per-tensor INT8 range; the median channel spans "
                                                 f"{np.median(span):.0f} of its {2 * qmax} steps") + "</sup>")
    return {"data": data, "layout": layout}


def validation_figure(c: "ReportContent") -> dict:
    vals, metric = c.projector.validations, c.run.meta["metric"]["name"]
    xs = [_y(v.measured_metric) for v in vals] + [_y(v.projected_metric) for v in vals]
    xs = [x for x in xs if x is not None]
    lo, hi = _padded_range(xs) or ((min(xs), max(xs)) if xs else (0.0, 1.0))
    lo, hi = lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)
    data = [{"type": "scatter", "mode": "lines", "name": "projected = measured", "x": [lo, hi], "y": [lo, hi],
             "line": {"dash": "dash", "color": "#8C96A8"}, "hoverinfo": "skip"},
            {"type": "scatter", "mode": "markers", "name": "measured policy", "x": [_y(v.measured_metric) for v in vals],
             "y": [_y(v.projected_metric) for v in vals], "hovertext": [_t(v.name) for v in vals],
             "marker": {"size": 9, "color": COLORS["int8"]},
             "hovertemplate": "%{hovertext}<br>measured %{x:.4f}, projected %{y:.4f}<extra></extra>"}]
    tf = _tickformat(c.run)
    return {"data": data, "layout": _layout("Projected vs measured (whole-model policies)", 320,
                                            xaxis=_axis(f"measured {metric}", tickformat=tf, range=[lo, hi]),
                                            yaxis=_axis(f"projected {metric}", tickformat=tf, range=[lo, hi]))}


def figures(c: "ReportContent", hist_layers: list[str]) -> tuple[dict[str, dict], int]:
    """Figures by the id of the element that shows them, and the index of the frontier's movable trace."""
    front, current = frontier_figure(c)
    out = {"fig-sensitivity": sensitivity_figure(c), "fig-frontier": front, "fig-validation": validation_figure(c)}
    for i, layer in enumerate(hist_layers):
        out[f"fig-hist-{i}"] = histogram_figure(c, layer)
        if (chan := channel_range_figure(c, layer)) is not None:
            out[f"fig-chan-{i}"] = chan
    return out, current
