"""Overview: provenance, the measured baseline and uniform formats, and where the current policy lands."""
from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dashboard import state
from dashboard.components import (EMPTY, fmt_mb, fmt_metric, fmt_ms, headline, latency_unit, metric_label,
                                  projection_kind, require_run)
from dashboard.data import Loaded
from dashboard.progress import measured_layers
from dashboard.ui.charts import metric_figure


def _text(v: object) -> str:
    """A provenance value as text: a field the Run does not fill reads as a dash, not "None"."""
    return EMPTY if v is None or v == "" else str(v)


def _metric_text(lo: Loaded, metric: dict) -> str:
    direction = "higher is better" if metric.get("higher_is_better") else "lower is better"
    label, name = metric_label(lo), str(metric.get("name"))
    what = f"{label}: {metric['description']}" if metric.get("description") else label
    return what + (f" (stored as {name}; {direction})" if name != label else f" ({direction})")


def _provenance(lo: Loaded) -> None:
    meta = lo.run.meta
    model, data, metric = meta.get("model", {}), meta.get("data", {}), meta.get("metric", {})
    a, b = st.columns(2)
    with a:
        st.markdown("**Model**")
        st.table(pd.DataFrame({"": ["name", "kind", "source", "sha256", "parameters", "FP32 size",
                                    "outside quantizable layers"],
                               "value": [_text(model.get("name")), _text(model.get("kind")), _text(model.get("source")),
                                         _text(model.get("sha256")), f"{int(model.get('params', 0)):,}",
                                         fmt_mb(float(model.get("fp32_bytes", 0))),
                                         fmt_mb(float(model.get("other_bytes", 0)))]}).set_index(""))
    with b:
        st.markdown("**Data and metric**")
        st.table(pd.DataFrame({"": ["task", "source", "sha256", "calibration samples", "evaluation samples",
                                    "metric", "loss"],
                               "value": [_text(data.get("task")), _text(data.get("source")), _text(data.get("sha256")),
                                         _text(data.get("n_calib")), _text(data.get("n_eval")),
                                         _metric_text(lo, metric), _text(metric.get("loss"))]}
                              ).set_index(""))
    _what_was_judged(model, metric)
    sweep = meta.get("sweep", {})
    st.caption(f"Run created {meta.get('created', '?')} · sweep: {sweep.get('jobs', '?')} jobs, "
               f"{sweep.get('path', '?')}, {float(sweep.get('seconds', 0) or 0):.1f} s · observer "
               f"{meta.get('observer', '?')} · seed {meta.get('seed', '?')}")


def _what_was_judged(model: dict, metric: dict) -> None:
    """Which outputs the metric compared, why this metric, and the layers the Run does not cover."""
    outs = (model.get("outputs") or {}).get("outputs") or []
    if outs:
        compared = [o for o in outs if o.get("compared")]
        shown = ", ".join(f"{o['name']} ({', '.join(map(str, o['shape']))})" for o in compared)
        st.caption(f"Compared: {shown} — {model['outputs'].get('elements_per_sample', '?')} values per sample"
                   + (f"; {len(outs) - len(compared)} other output(s) not compared" if len(outs) > len(compared) else ""))
        for note in (model.get("outputs") or {}).get("notes") or []:
            st.caption(f"Outputs: {note}")
    if metric.get("chosen_because"):
        st.caption(f"Metric: {metric['chosen_because']}")
    missing = model.get("not_analysed") or []
    if missing:
        st.warning(f"{len(missing)} layer(s) are not analysed and stay FP32 in every projection: "
                   + "; ".join(f"{m['layer']} ({m['reason']})" for m in missing[:8]) + (" …" if len(missing) > 8 else ""))


def _measured_table(lo: Loaded) -> pd.DataFrame:
    meta = lo.run.meta
    base = float(meta["baseline"]["metric"])
    pol = lo.run.policies
    rows = []
    for r in pol.itertuples(index=False):
        if not math.isfinite(r.metric):
            continue
        rows.append({"policy": r.name, "kind": r.kind, metric_label(lo): fmt_metric(r.metric, lo),
                     "vs FP32": fmt_metric(r.metric - base, lo, signed=True), "loss": round(float(r.loss), 4),
                     "size": fmt_mb(float(r.bytes)), "× smaller": round(lo.projector.fp32_bytes / float(r.bytes), 2),
                     f"latency ({latency_unit(lo)})": fmt_ms(r.latency_ms) if math.isfinite(r.latency_ms)
                     else "not measured",
                     "measured on": r.measured_on})
    return pd.DataFrame(rows)


def _scatter(lo: Loaded, p) -> go.Figure:
    return metric_figure(lo, p, "size",
                         title="Size vs metric: measured policies and the current policy (projected ± band)")


def _partial_note(lo: Loaded) -> str:
    """What a projection from an unfinished sweep stands on: the layers measured so far."""
    measured, n = measured_layers(lo)
    whole = int(lo.run.policies["metric"].map(math.isfinite).sum())
    return (f"Partial: {measured} of {n} layers measured so far (in one format or more). Layers not measured stay "
            f"FP32 in every policy (the Layers table marks them), and the error band rests on the {whole} "
            f"whole-model polic{'y' if whole == 1 else 'ies'} measured so far.")


def render() -> None:
    """The Overview page (registered in dashboard/pages.py)."""
    lo = require_run()
    st.title(f"Overview — {lo.name}")
    _provenance(lo)

    st.subheader("Measured whole-model policies: the FP32 baseline, uniform formats and others")
    table = _measured_table(lo)
    st.dataframe(table, hide_index=True, width="stretch", placeholder=EMPTY)
    for fmt, u in (lo.run.meta.get("uniform") or {}).items():
        skipped = u.get("skipped_layers") or []
        if skipped:
            st.caption(f"Uniform {fmt.upper()} kept {len(skipped)} layer(s) at FP32 that cannot take it: "
                       + ", ".join(skipped[:10]) + (" …" if len(skipped) > 10 else ""))

    st.subheader("Current policy (projected)" if lo.run.status == "complete" else
                 "Current policy (projected from a partial Run)")
    if lo.run.status != "complete":
        st.caption(_partial_note(lo))
    codes = state.codes(lo)
    proj = lo.projector.project(codes)
    headline(lo, proj, codes)
    st.plotly_chart(_scatter(lo, proj), width="stretch")

    with st.expander("How the projection is computed and how far off it was", expanded=False):
        if getattr(lo.projector, "calibration", None) is not None:
            st.markdown(f"**{projection_kind(lo)}** {lo.projector.band_method}. Size is exact (bytes per layer "
                        "and format).")
        else:
            st.markdown(
                "**Projection v1.** Loss = baseline loss + the sum of the measured single-layer loss changes of "
                "the quantized layers. The metric comes from that loss through a monotone (isotonic) map fitted "
                f"through {len(lo.projector.pts_loss)} measured (loss, metric) points: the baseline, every "
                "single-layer job and every measured whole-model policy. Size is exact (bytes per layer and "
                f"format). **Band:** {lo.projector.band_method}.")
        val = lo.projector.validations
        if val:
            st.dataframe(pd.DataFrame([{"policy": v.name, "measured": fmt_metric(v.measured_metric, lo),
                                        "projected": fmt_metric(v.projected_metric, lo),
                                        "error": fmt_metric(v.error, lo, signed=True),
                                        "own point held out": "yes" if v.held_out else "no"} for v in val]),
                         hide_index=True, placeholder=EMPTY)
