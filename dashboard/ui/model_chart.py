"""The Model view's figures, pure (layout + measurements + current codes in, plotly figure out; no Streamlit).

``layers_figure``: layers as markers in their blocks (``model_layout``), coloured by the measured sensitivity
at one format (log scale), shaped and labelled by their current format, with the edges from the layers that
feed them: straight to the next level, arcs on the left for skips (residual branches).
``blocks_figure``: one mark per block in execution order (reading order, row by row), coloured by its most
sensitive layer: the overview of a model too large to read layer by layer.
Both return, per trace that holds layers or blocks, the row each point stands for, so a click maps back.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go

from dashboard.ui.model_layout import ModelLayout

SYMBOLS = {0: "circle", 1: "square", 2: "diamond", 3: "triangle-up"}  # by format code (fp32, int8, int4, int8-dyn)
COLORSCALE = "YlOrRd"
UNMEASURED = "#b0b0b0"
LEVEL_PX, MIN_PX, MAX_PX = 34, 320, 2400
ARC_POINTS = 12


@dataclass(frozen=True)
class LayerData:
    """What the figures show of each layer (execution order), independent of the layout."""

    types: np.ndarray
    params: np.ndarray
    penalty: np.ndarray  # the measured sensitivity at the chosen format; NaN where not measured / not allowed
    deltas: dict[str, np.ndarray]  # format -> measured metric change with only this layer quantized
    formats: list[str]  # format names by code (POLICY_FORMATS)


@dataclass
class Drawn:
    fig: go.Figure
    rows: dict[int, np.ndarray]  # trace index -> the row (layer, or band for blocks_figure) of each point


def log_colour(penalty: np.ndarray) -> tuple[np.ndarray, float, float]:
    """log10 of the penalties (zero and below at the floor: a decade below the smallest positive), and the range."""
    v = np.asarray(penalty, dtype=float)
    pos = v[np.isfinite(v) & (v > 0)]
    hi = float(np.log10(pos.max())) if len(pos) else 0.0
    lo = float(np.log10(pos.min())) - 1 if len(pos) else hi - 1
    lo = min(lo, hi - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.where(v > 0, np.log10(np.where(v > 0, v, 1.0)), lo)
    return np.where(np.isfinite(v), c, np.nan), lo, hi


def _colorbar(title: str, lo: float, hi: float) -> dict:
    decades = list(range(math.floor(lo), math.ceil(hi) + 1))
    return dict(title=dict(text=title, side="right"), tickvals=decades, ticktext=[f"1e{d}" for d in decades],
                len=0.6, thickness=14)


def _hover(data: LayerData, names: list[str], rows: np.ndarray, codes: np.ndarray, fed: list[str],
           penalty_title: str) -> list[str]:
    out = []
    for r, feeders in zip(rows, fed):
        d = " · ".join(f"{f.upper()} {v[r]:+.4f}" if np.isfinite(v[r]) else f"{f.upper()} —"
                       for f, v in data.deltas.items())
        p = data.penalty[r]
        lines = [f"<b>{html.escape(names[r])}</b>",
                 f"{html.escape(str(data.types[r]))} · {int(data.params[r]):,} params",
                 f"now <b>{data.formats[int(codes[r])].upper()}</b> (click to change)", f"Δmetric {d}",
                 f"{html.escape(penalty_title)}: {p:.3g}" if np.isfinite(p) else "not measured at this format"]
        if feeders:
            lines.append("fed by " + html.escape(feeders))
        out.append("<br>".join(lines))
    return out


def _edge_paths(lay: ModelLayout, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x, y) of straight edges and of skip arcs among the rows in ``keep``, NaN between paths."""
    inside = np.zeros(len(lay.names), dtype=bool)
    inside[keep] = True
    e = lay.edges
    if not len(e):
        empty = np.zeros(0)
        return empty, empty, empty, empty
    ok = inside[e[:, 0]] & inside[e[:, 1]]
    skip = lay.skip & ok
    near = ~lay.skip & ok
    s, d = e[near, 0], e[near, 1]
    nan = np.full(len(s), np.nan)
    sx = np.column_stack([lay.x[s], lay.x[d], nan]).ravel()
    sy = np.column_stack([lay.y[s], lay.y[d], nan]).ravel()
    s, d = e[skip, 0], e[skip, 1]
    span = np.abs(lay.y[s] - lay.y[d])
    x0, y0, x1, y1 = lay.x[s], lay.y[s], lay.x[d], lay.y[d]
    cx = np.minimum(x0, x1) - (0.9 + np.minimum(0.12 * span, 1.6))  # bulge left: the labels are on the right
    cy = (y0 + y1) / 2
    t = np.linspace(0, 1, ARC_POINTS)[None, :]
    ax = (1 - t) ** 2 * x0[:, None] + 2 * (1 - t) * t * cx[:, None] + t ** 2 * x1[:, None]
    ay = (1 - t) ** 2 * y0[:, None] + 2 * (1 - t) * t * cy[:, None] + t ** 2 * y1[:, None]
    gap = np.full((len(s), 1), np.nan)
    return sx, sy, np.hstack([ax, gap]).ravel(), np.hstack([ay, gap]).ravel()


def _band_shapes(lay: ModelLayout, bands: list[int], x_lo: float, x_hi: float):
    """Alternating band rectangles as two filled paths, and each band's label at its top right."""
    paths = (([], []), ([], []))
    lx, ly, lt = [], [], []
    for k, b in enumerate(bands):
        band = lay.bands[b]
        top, bot = band.y_top + 0.15, band.y_bottom - 0.15
        xs, ys = paths[k % 2]
        xs += [x_lo, x_hi, x_hi, x_lo, x_lo, np.nan]
        ys += [top, top, bot, bot, top, np.nan]
        lx.append(x_hi - 0.1)
        ly.append(top - 0.05)
        lt.append(html.escape(band.block or "(top level)"))
    arrays = tuple((np.array(xs, dtype=float), np.array(ys, dtype=float)) for xs, ys in paths)  # fast to validate
    return arrays, (np.array(lx), np.array(ly), np.array(lt, dtype=object))


def layers_figure(lay: ModelLayout, data: LayerData, codes: np.ndarray, penalty_title: str,
                  rows: np.ndarray | None = None, *, labels: bool = True) -> Drawn:
    """Layers ``rows`` (default: all) as the model's structure. See the module's docstring."""
    rows = np.arange(len(lay.names)) if rows is None else np.asarray(rows, dtype=np.int64)
    codes = np.asarray(codes)
    colour, lo, hi = log_colour(data.penalty)
    bands = sorted(set(lay.band[rows].tolist()))
    xs = lay.x[rows]
    x_lo = float(xs.min()) - 3.2 if len(rows) else -3.2
    x_hi = float(xs.max()) + 4.2 if len(rows) else 4.2
    traces: list = []
    (p0, p1), (lx, ly, lt) = _band_shapes(lay, bands, x_lo, x_hi)
    for (xb, yb), fill in ((p0, "rgba(76,120,168,0.07)"), (p1, "rgba(76,120,168,0.14)")):
        traces.append(go.Scatter(x=xb, y=yb, mode="lines", fill="toself", fillcolor=fill, line=dict(width=0),
                                 hoverinfo="skip", showlegend=False))
    traces.append(go.Scatter(x=lx, y=ly, mode="text", text=lt, textposition="bottom left", hoverinfo="skip",
                             textfont=dict(size=12, color="#44546a"), showlegend=False))
    sx, sy, ax, ay = _edge_paths(lay, rows)
    traces.append(go.Scatter(x=sx, y=sy, mode="lines", line=dict(color="#8c8c8c", width=1.2), hoverinfo="skip",
                             name="feeds the next level", showlegend=bool(len(sx))))
    traces.append(go.Scatter(x=ax, y=ay, mode="lines", line=dict(color="#4C78A8", width=1.6, dash="dot"),
                             hoverinfo="skip", name="skip / residual branch", showlegend=bool(len(ax))))
    fed_names = ([", ".join(lay.names[j] for j in lay.feeders(int(r))) for r in rows] if lay.has_dataflow
                 else [""] * len(rows))
    hover = np.array(_hover(data, lay.names, rows, codes, fed_names, penalty_title), dtype=object)
    text = np.array([f"\u2002{lay.labels[r]} · {data.formats[int(codes[r])].upper()}" for r in rows], dtype=object)
    measured = np.isfinite(colour[rows])
    out_rows = {}
    rc = codes[rows].astype(int)
    shown_scale = False
    for code in sorted(set(rc.tolist())):  # one trace per format and measured-or-not: scalar marker styles
        for is_measured in (True, False):
            sel = (rc == code) & (measured == is_measured)
            if not sel.any():
                continue
            part = rows[sel]
            marker = dict(size=17, symbol=SYMBOLS.get(code, "circle"),
                          line=dict(width=2.6 if code else 0.8, color="#1f1f1f" if code else "#7f7f7f"))
            if is_measured:
                marker.update(color=colour[part], colorscale=COLORSCALE, cmin=lo, cmax=hi, showscale=not shown_scale,
                              colorbar=_colorbar(penalty_title + " (log)", lo, hi))
                shown_scale = True
            else:
                marker.update(color=UNMEASURED)
            out_rows[len(traces)] = part
            traces.append(go.Scatter(x=lay.x[part], y=lay.y[part], mode="markers+text" if labels else "markers",
                                     text=text[sel], textposition="middle right",
                                     textfont=dict(size=12, color="#262730"),
                                     hovertext=hover[sel], hoverinfo="text", marker=marker, customdata=part,
                                     name=data.formats[code].upper() + ("" if is_measured else " (not measured here)"),
                                     showlegend=False))
    if (~measured).any():
        traces.append(go.Scatter(x=[None], y=[None], mode="markers", name="not measured at this format",
                                 marker=dict(symbol="circle", size=12, color=UNMEASURED)))
    for code, symbol in SYMBOLS.items():  # legend: which mark is which format
        if code < len(data.formats) and (code == 0 or data.formats[code] in data.deltas):
            traces.append(go.Scatter(x=[None], y=[None], mode="markers", name=data.formats[code].upper(),
                                     marker=dict(symbol=symbol, size=12, color="#ffffff",
                                                 line=dict(width=2.6 if code else 0.8,
                                                           color="#1f1f1f" if code else "#7f7f7f"))))
    ys = lay.y[rows]
    depth = (float(ys.max() - ys.min()) if len(rows) else 0) + 1.5
    fig = go.Figure(data=traces, layout=dict(
        height=int(min(MAX_PX, max(MIN_PX, depth * LEVEL_PX + 90))), margin=dict(l=10, r=10, t=30, b=10),
        xaxis=dict(visible=False, range=[x_lo, x_hi]),
        yaxis=dict(visible=False, range=[float(ys.min()) - 0.8, float(ys.max()) + 0.8] if len(rows) else [-1, 1]),
        legend=dict(orientation="h", yanchor="bottom", y=1.0, x=0, itemclick=False, itemdoubleclick=False),
        plot_bgcolor="white", hovermode="closest", dragmode="pan", clickmode="event+select"))
    return Drawn(fig, out_rows)


def block_summary(lay: ModelLayout, penalty: np.ndarray,
                  codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per band: its largest measured penalty (NaN: none measured), its most sensitive layer's row, quantized count."""
    nb = len(lay.bands)
    worst = np.full(nb, np.nan)
    arg = np.zeros(nb, dtype=np.int64)
    quant = np.zeros(nb, dtype=np.int64)
    for b, band in enumerate(lay.bands):
        v = penalty[band.rows]
        if np.isfinite(v).any():
            k = int(np.nanargmax(v))
            worst[b], arg[b] = v[k], band.rows[k]
        quant[b] = int((np.asarray(codes)[band.rows] > 0).sum())
    return worst, arg, quant


def blocks_figure(lay: ModelLayout, data: LayerData, codes: np.ndarray, penalty_title: str, *,
                  columns: int = 16, picked: int | None = None) -> Drawn:
    """One square per band in execution order, row by row: colour = its most sensitive layer (log scale), the
    number inside = its quantized layers, a thick outline = the band the layer view below shows."""
    worst, arg, quant = block_summary(lay, data.penalty, codes)
    nb = len(lay.bands)
    idx = np.arange(nb)
    gx, gy = idx % columns, -(idx // columns)
    colour, lo, hi = log_colour(worst)
    sizes = np.array([len(b.rows) for b in lay.bands])
    hover = [f"<b>{html.escape(b.block or '(top level)')}</b> · {len(b.rows)} layers, {quant[k]} quantized"
             + (f"<br>most sensitive: {html.escape(lay.names[arg[k]])} ({worst[k]:.3g})" if np.isfinite(worst[k]) else
                "<br>not measured at this format") + "<br>click to open it below"
             for k, b in enumerate(lay.bands)]
    line_w = np.where(idx == (picked if picked is not None else -1), 3.5, 0.8)
    measured = np.isfinite(colour)
    marker = dict(symbol="square", size=26, line=dict(width=line_w, color="#1f1f1f"),
                  color=np.where(measured, colour, lo), colorscale=COLORSCALE, cmin=lo, cmax=hi, showscale=True,
                  colorbar=_colorbar("most sensitive layer: " + penalty_title + " (log)", lo, hi))
    dark = measured & (colour > lo + 0.6 * (hi - lo))
    trace = go.Scatter(x=gx, y=gy, mode="markers+text", text=[f"{q}/{s}" for q, s in zip(quant, sizes)],
                       textfont=dict(size=9, color=np.where(dark, "#ffffff", "#111111")), hovertext=hover,
                       hoverinfo="text", marker=marker, customdata=idx, showlegend=False)
    n_rows = int(-gy.min()) + 1 if nb else 1
    firsts = [lay.bands[r * columns].block or "(top level)" for r in range(n_rows)]
    fig = go.Figure(data=[trace], layout=dict(
        height=int(min(MAX_PX, max(220, n_rows * 34 + 80))), margin=dict(l=10, r=10, t=10, b=10),
        xaxis=dict(visible=False, range=[-0.7, columns - 0.3]),
        yaxis=dict(tickvals=-np.arange(n_rows), ticktext=[html.escape(f) + " →" for f in firsts], showgrid=False,
                   zeroline=False, range=[-n_rows + 0.4, 0.6]),
        plot_bgcolor="white", hovermode="closest", dragmode="pan", clickmode="event+select"))
    return Drawn(fig, {0: idx})


def clicked_rows(points: list[dict], drawn_rows: dict[int, np.ndarray]) -> list[int]:
    """The rows (layers or bands) a plotly selection's points stand for, from their trace and point index."""
    out = []
    for p in points or []:
        trace, k = p.get("curve_number"), p.get("point_index", p.get("point_number"))
        if trace in drawn_rows and isinstance(k, int) and 0 <= k < len(drawn_rows[trace]):
            out.append(int(drawn_rows[trace][k]))
    return out
