"""Verify: build the current policy as a real quantized ONNX model and measure it in onnxruntime, in the background.

``analysis.runtime.verify.verify_policy`` runs in a thread (``dashboard.jobs``); a fragment polls it while it
runs, so the rest of the page (and every toggle) stays as fast as without it. The measured row lands
in the Run's policies table on disk; the Run's cache key follows the file, so every chart reloads it.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import streamlit as st

from analysis.api import Projector
from dashboard import state
from dashboard.components import EMPTY, fmt_band, fmt_latency, fmt_mb, fmt_metric, fmt_ms, latency_unit, metric_label
from dashboard.data import Loaded, open_run, verify_blocker, verify_jobs

POLL_S = 0.5


def measured_rows(lo: Loaded, codes: np.ndarray) -> pd.DataFrame:
    """Rows of the Run's policies table that measured exactly this policy (any kind, baseline included)."""
    index = {n: i for i, n in enumerate(lo.projector.names)}
    pol = lo.run.policies
    keep = [i for i, lj in enumerate(pol["layers_json"])
            if (c := Projector.codes_of(lj, index)) is not None and np.array_equal(c, codes)]
    return pol.iloc[keep]


def _comparison(lo: Loaded, codes: np.ndarray) -> None:
    p = lo.projector.project(codes)
    metric, latency = metric_label(lo), f"latency ({latency_unit(lo)})"
    rows = [{"": "projected (now)", metric: f"{fmt_metric(p.metric, lo)} ({fmt_band(p.band, lo)})",
             "size": fmt_mb(p.bytes), latency: "not measured" if p.latency_ms is None else fmt_ms(p.latency_ms),
             "measured on": "projection from the per-layer measurements", "|measured − projected|": ""}]
    for r in measured_rows(lo, codes).itertuples(index=False):
        err = abs(float(r.metric) - p.metric)
        inside = "" if p.band is None else (" — inside the band" if err <= p.band + 1e-12 else " — outside the band")
        rows.append({"": f"measured: {r.name}", metric: fmt_metric(float(r.metric), lo),
                     "size": fmt_mb(float(r.bytes)),
                     latency: fmt_ms(r.latency_ms) if math.isfinite(r.latency_ms) else "not measured",
                     "measured on": str(r.measured_on),
                     "|measured − projected|": fmt_metric(err, lo, signed=True).lstrip("+") + inside})
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", placeholder=EMPTY)
    if len(rows) == 1:
        st.caption("No measurement of exactly this policy yet.")


SLOWER = 1.05  # measured latency over FP32's (same run) above which a verified policy is called slower


def slower_note(result: dict) -> str | None:
    """A warning when the verified model ran slower than FP32 in the same measurement, else None."""
    q, fp32 = float(result.get("latency_ms", math.nan)), float(result.get("fp32_latency_ms", math.nan))
    if not (math.isfinite(q) and math.isfinite(fp32) and fp32 > 0 and q > fp32 * SLOWER):
        return None
    return (f"Measured **{q / fp32:.1f}× slower than FP32** ({fmt_ms(q)} vs {fmt_ms(fp32)} ms, same machine, same "
            "run): this policy saves size, not time. The kernels its layers got on this CPU are in the expander "
            "below; keeping those layers at FP32 or searching with a latency budget trades size back for speed.")


def _job_panel(path: str) -> None:
    job = verify_jobs().get(path)
    if job is None:
        return
    mine = job.id in st.session_state.get(state.VERIFY_OWN, ())
    if not job.done:
        steps = " → ".join(job.steps) or "starting"
        who = "" if mine else " (started in another session)"
        st.info(f"Verifying in onnxruntime{who}… {job.seconds:.0f} s · {steps}", icon=":material/hourglass_top:")
        return
    if st.session_state.get(state.VERIFY_WATCH) == job.id:  # it ended while this session watched: redraw everything once
        del st.session_state[state.VERIFY_WATCH]
        st.rerun()
    if not mine:  # another session's verify: its measurement is in the Run's table below, its banner is not ours
        return
    if job.error:
        st.error(f"Verify failed after {job.seconds:.1f} s: {job.error}")
        return
    r = job.result or {}
    lo = open_run(path)
    same = isinstance(lo, Loaded) and np.array_equal(job.codes, state.codes(lo))
    st.success(f"Verified in {job.seconds:.1f} s as **{r.get('name')}**: measured "
               f"{fmt_metric(float(r['metric']), lo) if isinstance(lo, Loaded) else r['metric']} on "
               f"{r.get('measured_on')}; ONNX file {fmt_mb(float(r.get('file_bytes', 0)))}; latency "
               f"{fmt_latency(float(r.get('latency_ms', float('nan'))), lo) if isinstance(lo, Loaded) else EMPTY} "
               f"(FP32 {fmt_ms(float(r.get('fp32_latency_ms', float('nan'))))} ms in the same run)."
               + ("" if same else " That was another policy than the current one."))
    slower = slower_note(r)
    if slower:
        st.warning(slower, icon=":material/speed:")
    kernels = r.get("kernels") or {}
    if kernels or r.get("notes"):
        with st.expander("Kernels and notes of the verified model", expanded=False):
            if kernels:
                st.dataframe(pd.DataFrame({"layer": list(kernels), "kernel": list(kernels.values())}), hide_index=True,
                             placeholder=EMPTY)
            for n in r.get("notes") or []:
                st.caption(n)


def render(lo: Loaded) -> None:
    """The Verify section: the button (or why it is off), the running job, and measured beside projected."""
    st.subheader("Verify (measure in onnxruntime)")
    codes = state.codes(lo)
    jobs = verify_jobs()
    job = jobs.get(lo.path)
    running = job is not None and not job.done
    reason = verify_blocker(lo)
    clicked = st.button("Verify (measure in onnxruntime)", key=state.VERIFY, icon=":material/verified:",
                        disabled=reason is not None or running,
                        help=reason or "Builds the current policy as a quantized ONNX model, measures its metric on "
                                       "the task's evaluation data and its latency, and stores the result in the Run.")
    if reason is not None:
        st.info(f"Verify is off: {reason}", icon=":material/block:")
    if clicked and reason is None and not running:
        try:
            job = jobs.start(lo.path, codes, state.policy(lo))
        except RuntimeError as e:
            st.warning(str(e))
        else:
            st.session_state[state.VERIFY_OWN] = (*st.session_state.get(state.VERIFY_OWN, ()), job.id)
        running = job is not None and not job.done
    if running:
        st.session_state[state.VERIFY_WATCH] = job.id
    st.fragment(_job_panel, run_every=POLL_S if running else None)(lo.path)
    _comparison(lo, codes)
