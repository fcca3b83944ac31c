"""Export & share: the policy file, a link that restores the policy, loading a policy, open Runs,
the report, the Run as a bundle, and opening a teammate's bundle."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from analysis.api import FORMAT_CODE, POLICY_FORMATS, BundleError, PolicyError, from_json, match_policy
from dashboard import state
from dashboard.components import EMPTY, fmt_band, fmt_mb, fmt_metric, metric_label, require_run
from dashboard.data import Loaded, bundle_bytes, open_run, open_uploaded_bundle, report_html, stamp_of
from dashboard.ui import verify


def _share_url(lo: Loaded) -> str:
    base = st.context.url or ""
    for page in ("/export", "/overview", "/layers", "/search", "/activations", "/compare"):
        if base.endswith(page):
            base = base[: -len(page)]
    return f"{base.rstrip('/')}/layers{state.share_query(lo)}"


def _load_policy(lo: Loaded) -> None:
    up = st.file_uploader("Load a policy file (JSON) to restore a state", type=["json"], key=state.POLICY_UPLOAD)
    if up is None or st.session_state.get(state.POLICY_SEEN) == up.file_id:
        return
    st.session_state[state.POLICY_SEEN] = up.file_id
    try:
        policy = from_json(up.getvalue())
    except PolicyError as e:
        st.error(f"{up.name}: not applied — {e}")
        return
    m = match_policy(policy, lo.run)
    state.set_codes(lo, m.codes)
    if m.clean:
        st.success(f"{up.name}: applied to all {len(m.codes)} layers.")
    else:
        st.warning(f"{up.name}: applied {len(m.applied)} layer setting(s); see below for what did not match.")
        for msg in m.messages():
            st.warning(msg)


def _report_and_bundle(lo: Loaded) -> None:
    """The report, this Run as a bundle, and opening a teammate's bundle."""
    token, stamp, stem = state.token(lo), stamp_of(lo.path), Path(lo.path).name
    st.subheader("Report and Run bundle")
    left, right = st.columns(2)
    left.download_button("Download report (HTML)", data=lambda: report_html(lo.path, stamp, token),
                         file_name=f"report-{stem}.html", mime="text/html", key=state.DOWNLOAD_REPORT,
                         icon=":material/description:")
    left.caption("One file that opens offline in any browser, with the current policy as its chosen policy; "
                 "readers can toggle layers in it.")
    right.download_button("Download Run bundle (.qlrun)", data=lambda: bundle_bytes(lo.path, stamp),
                          file_name=f"{stem}.qlrun", mime="application/zip", key=state.DOWNLOAD_BUNDLE,
                          icon=":material/folder_zip:")
    right.caption("The Run's tables in one zip, without model weights: a teammate opens it below.")
    up = st.file_uploader("Open a Run bundle (.qlrun)", type=["qlrun"], key=state.BUNDLE_UPLOAD, max_upload_size=64)
    if up is not None and st.session_state.get(state.BUNDLE_SEEN) != up.file_id:
        st.session_state[state.BUNDLE_SEEN] = up.file_id
        try:
            state.add_run_dir(open_uploaded_bundle(up.getvalue(), up.name))
        except BundleError as e:
            st.error(f"{up.name}: not opened — {e}")
        else:
            st.rerun()


def render() -> None:
    """The Export & share page (registered in dashboard/pages.py)."""
    lo = require_run()
    st.title("Export & share")
    _load_policy(lo)
    codes, policy = state.codes(lo), state.policy(lo)
    proj = lo.projector.project(codes)
    counts = np.bincount(codes.astype(np.intp), minlength=len(POLICY_FORMATS))
    band = f" ({fmt_band(proj.band, lo)})"
    st.markdown(f"**Current policy:** " + ", ".join(f"{f.upper()} {int(counts[FORMAT_CODE[f]])}"
                                                      for f in lo.projector.formats)
                + f" · projected {metric_label(lo)} {fmt_metric(proj.metric, lo)}{band}"
                + f" · {fmt_mb(proj.bytes)} ({proj.size_ratio:.2f}× smaller than FP32)")
    verify.render(lo)

    st.subheader("Policy file")
    st.download_button("Download policy JSON", policy.to_json(), file_name=f"policy-{Path(lo.path).name}.json",
                       mime="application/json", key=state.DOWNLOAD_POLICY, type="primary")
    with st.expander("Preview", expanded=False):
        st.code(policy.to_json(), language="json")

    st.subheader("Share")
    st.caption("This link opens the Layers page with the exact policy on this Run (one 2-bit code per layer in "
               "the query string; the Run is named by its model hash and creation time, so the link works on any "
               "server that has it open). The address bar holds the same policy on every page.")
    st.code(_share_url(lo), language=None)

    st.subheader("Open Runs")
    rows = []
    for i, p in enumerate(state.run_dirs()):
        other = open_run(p)
        if isinstance(other, Loaded):
            rows.append({"#": i, "folder": p, "model": other.name, "layers": len(other.projector.names),
                         "status": other.run.status, "model sha256": other.run.model_sha256[:12] + "…"})
        else:
            rows.append({"#": i, "folder": p, "model": EMPTY, "layers": 0, "status": f"cannot open: {other}",
                         "model sha256": EMPTY})
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", placeholder=EMPTY)
    st.caption("Switch Runs in the sidebar; each Run keeps its own policy in this session.")
    _report_and_bundle(lo)
