"""Compare: two open Runs side by side — uniform results, per-layer sensitivity, frontiers.

Layers are matched by name; layers only one Run has are listed, not dropped.
Open two Runs with ``quantlens dashboard RUN_A RUN_B`` (or a folder / bundle in the sidebar / Export page).
"""
from __future__ import annotations

import html
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from analysis.api import POLICY_FORMATS, match_layers
from dashboard import state
from dashboard.components import EMPTY, fmt_metric, metric_label
from dashboard.data import Loaded, frontier_frame, open_run, stamp_of
from dashboard.ui.charts import LABELLED_ROWS, short_names

COLORS = ("#4C78A8", "#E45756")


def _label(path: str) -> str:
    lo = open_run(path)
    return f"{lo.name} — {Path(path).name}" if isinstance(lo, Loaded) else f"⚠ {Path(path).name} (cannot open)"


def _pick(dirs: list[str]) -> tuple[str, str]:
    active = min(int(st.session_state.get(state.ACTIVE, 0)), len(dirs) - 1)
    other = next(i for i in range(len(dirs)) if i != active)
    labels = {i: _label(p) for i, p in enumerate(dirs)}
    a, b = st.columns(2)
    ia = a.selectbox("Run A", list(labels), index=active, format_func=labels.get, key=state.COMPARE_A)
    ib = b.selectbox("Run B", list(labels), index=other, format_func=labels.get, key=state.COMPARE_B)
    return dirs[ia], dirs[ib]


def _format_order(fmt: str) -> tuple[int, str]:
    return (POLICY_FORMATS.index(fmt) if fmt in POLICY_FORMATS else len(POLICY_FORMATS), fmt)


def _uniform(lo: Loaded) -> pd.DataFrame:
    m = lo.run.meta
    rows = [("fp32", m["baseline"]["metric"], m["baseline"].get("bytes", m["model"].get("fp32_bytes")))]
    uni = m.get("uniform") or {}
    rows += [(f"all-{f}", uni[f].get("metric"), uni[f].get("bytes")) for f in sorted(uni, key=_format_order)]
    return pd.DataFrame(rows, columns=["policy", "metric", "bytes"]).set_index("policy")


def _uniform_table(a: Loaded, b: Loaded) -> pd.DataFrame:
    ua, ub = _uniform(a), _uniform(b)
    t = ua.add_suffix(" A").join(ub.add_suffix(" B"), how="outer").reindex(list(dict.fromkeys([*ua.index, *ub.index])))
    return pd.DataFrame({"policy": t.index,
                         f"{metric_label(a)} A": [fmt_metric(x, a) for x in t["metric A"]],
                         f"{metric_label(b)} B": [fmt_metric(x, b) for x in t["metric B"]],
                         "size A (MB)": t["bytes A"] / 1e6, "size B (MB)": t["bytes B"] / 1e6})


def _loss_name(lo: Loaded) -> str:
    return str(lo.run.meta["metric"].get("loss") or "loss")


def _same_scale(a: Loaded, b: Loaded, what: str) -> bool:
    """Whether both Runs' ``what`` ("metric" or "loss") can share an axis: same name and direction."""
    ma, mb = a.run.meta["metric"], b.run.meta["metric"]
    key = "name" if what == "metric" else "loss"
    return ma.get(key) == mb.get(key) and bool(ma.get("higher_is_better")) == bool(mb.get("higher_is_better"))


def _sensitivity_chart(table: pd.DataFrame, fmt: str, a: Loaded, b: Loaded) -> go.Figure:
    """Loss change per layer in both Runs as horizontal bars; one panel per Run when their losses differ."""
    both = table[table["in"] == "both"]
    full = [html.escape(str(n)) for n in both["layer"]]  # plotly reads tags in text
    ticks = [html.escape(n) for n in short_names([str(n) for n in both["layer"]])]
    shared = _same_scale(a, b, "loss")
    fig = make_subplots(rows=1, cols=1 if shared else 2, shared_yaxes=True, horizontal_spacing=0.04)
    y = list(range(len(both)))
    for k, (tag, lo, color) in enumerate(zip("AB", (a, b), COLORS)):
        col = f"Δloss {fmt} {tag}"
        if col in both:
            fig.add_bar(x=both[col], y=y, orientation="h", name=f"Run {tag}", marker_color=color, customdata=full,
                        hovertemplate="%{customdata}: %{x:.4g}<extra>Run " + tag + "</extra>",
                        row=1, col=1 if shared else k + 1)
        if not shared:
            fig.update_xaxes(title_text=f"Run {tag}: Δ {_loss_name(lo)}", row=1, col=k + 1)
    if shared:
        fig.update_xaxes(title_text=f"Δ {_loss_name(a)}")
    labelled = len(y) <= LABELLED_ROWS
    fig.update_yaxes(autorange="reversed", tickmode="array" if labelled else "auto",
                     tickvals=y if labelled else None, ticktext=ticks if labelled else None, showticklabels=labelled,
                     automargin=True, row=1, col=1)
    fig.update_layout(barmode="group", height=int(min(max(140 + 18 * len(y), 280), 1600)),
                      margin=dict(l=10, r=10, t=70, b=10),
                      title=f"Loss change with only that layer at {fmt.upper()} (layers in both Runs, Run A's order)",
                      legend=dict(orientation="h", y=1, yanchor="bottom", x=1, xanchor="right"))
    return fig


def _frontier_chart(a: Loaded, b: Loaded) -> go.Figure:
    """Size vs metric for both Runs: one panel when they measure one metric, else one panel per Run, each
    with its own metric on its axis."""
    shared = _same_scale(a, b, "metric")
    fig = make_subplots(rows=1, cols=1 if shared else 2, horizontal_spacing=0.08)
    for k, (tag, lo, color) in enumerate((("A", a, COLORS[0]), ("B", b, COLORS[1]))):
        at = dict(row=1, col=1 if shared else k + 1)
        fr = frontier_frame(lo.path, stamp_of(lo.path))
        fig.add_scatter(x=fr["bytes"] / 1e6, y=fr["metric"], mode="lines+markers", name=f"Run {tag} frontier (projected)",
                        line=dict(color=color, shape="hv"), **at)
        pol = lo.run.policies
        fig.add_scatter(x=pol["bytes"] / 1e6, y=pol["metric"], mode="markers", name=f"Run {tag} measured",
                        marker=dict(color=color, size=9, symbol="circle-open"), hovertext=[html.escape(str(n)) for n in pol["name"]],
                        hovertemplate="%{hovertext}: %{x:.3f} MB, %{y:.4f}<extra>Run " + tag + "</extra>", **at)
        fig.update_xaxes(title_text="size (MB)", **at)
        fig.update_yaxes(title_text=metric_label(a) if shared else f"Run {tag}: {metric_label(lo)}", **at)
    fig.update_layout(height=380, margin=dict(l=10, r=10, t=70, b=10),
                      title="Size vs metric: Pareto frontiers" + ("" if shared else " (two metrics: one panel each)"),
                      legend=dict(orientation="h", y=1, yanchor="bottom", x=1, xanchor="right"))
    return fig


def _names(names: list[str], limit: int = 20) -> str:
    return ", ".join(f"`{n}`" for n in names[:limit]) + (f" … and {len(names) - limit} more" if len(names) > limit else "")


def render() -> None:
    """The Compare page (registered in dashboard/pages.py)."""
    st.title("Compare Runs")
    dirs = state.run_dirs()
    if len(dirs) < 2:
        st.info("Open a second Run to compare: `quantlens dashboard RUN_A RUN_B`, a folder in the sidebar, "
                "or a bundle on the Export & share page.")
        st.stop()
    pa, pb = _pick(dirs)
    a, b = open_run(pa), open_run(pb)
    for tag, lo in (("A", a), ("B", b)):
        if not isinstance(lo, Loaded):
            st.error(f"Run {tag} cannot be opened: {lo}")
            st.stop()
    if pa == pb:
        st.warning("Run A and Run B are the same Run.")
    cols = st.columns(2)
    for col, tag, lo in ((cols[0], "A", a), (cols[1], "B", b)):
        m = lo.run.meta
        col.markdown(f"**Run {tag}** · {lo.name} · {len(lo.projector.names)} layers · status **{lo.run.status}**"
                     + (" · *synthetic*" if lo.synthetic else ""))
        col.caption(f"model sha256 `{lo.run.model_sha256[:12]}…` · task {m.get('data', {}).get('task')} · "
                    f"metric {metric_label(lo)} · formats {', '.join(lo.run.formats)}")
    if not _same_scale(a, b, "metric"):
        st.warning(f"Run A measures {metric_label(a)}, Run B {metric_label(b)}: their metrics are not on one "
                   "scale, so the charts draw each Run in its own panel.")
    st.subheader("Uniform formats (measured)")
    st.dataframe(_uniform_table(a, b), hide_index=True, width="stretch", placeholder=EMPTY,
                 column_config={c: st.column_config.NumberColumn(format="%.3f") for c in ("size A (MB)", "size B (MB)")})

    st.subheader("Per-layer sensitivity")
    match = match_layers(a.run, b.run)
    table, only_a, only_b, common = match.table, match.only_a, match.only_b, match.both
    st.caption(f"{common} layer(s) in both Runs, matched by name.")
    if only_a:
        st.caption(f"Only in Run A ({len(only_a)}): {_names(only_a)}")
    if only_b:
        st.caption(f"Only in Run B ({len(only_b)}): {_names(only_b)}")
    formats = [f for f in POLICY_FORMATS[1:] if f"Δloss {f} A" in table or f"Δloss {f} B" in table]
    if common and formats:
        fmt = st.radio("Format", formats, horizontal=True, key=state.COMPARE_FMT)
        st.plotly_chart(_sensitivity_chart(table, fmt, a, b), key=state.COMPARE_SENS)
    st.dataframe(table, hide_index=True, width="stretch", height=min(400, 36 + 35 * len(table)), placeholder=EMPTY)

    st.subheader("Frontiers")
    st.plotly_chart(_frontier_chart(a, b), key=state.COMPARE_FRONTIER)
