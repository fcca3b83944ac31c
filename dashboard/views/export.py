"""Export & share page. A thin script: the page lives in dashboard/ui/export.py, compiled once on import."""
from pathlib import Path

import streamlit as st

from analysis.api import BundleError
from analysis.api import encode_codes
from dashboard import state
from dashboard.data import bundle_bytes, open_uploaded_bundle, report_html, stamp_of
from dashboard.ui.export import render

render()

# The report, this Run as a bundle, and opening a teammate's bundle.
BUNDLE_SEEN = "ql.bundle_seen"
lo = state.active()
token, stamp, stem = encode_codes(state.codes(lo), lo.run.model_sha256), stamp_of(lo.path), Path(lo.path).name
st.subheader("Report and Run bundle")
left, right = st.columns(2)
left.download_button("Download report (HTML)", data=lambda: report_html(lo.path, stamp, token),
                     file_name=f"report-{stem}.html", mime="text/html", key="ql.download_report",
                     icon=":material/description:")
left.caption("One file that opens offline in any browser, with the current policy as its chosen policy; "
             "readers can toggle layers in it.")
right.download_button("Download Run bundle (.qlrun)", data=lambda: bundle_bytes(lo.path, stamp),
                      file_name=f"{stem}.qlrun", mime="application/zip", key="ql.download_bundle",
                      icon=":material/folder_zip:")
right.caption("The Run's tables in one zip, without model weights: a teammate opens it below.")
up = st.file_uploader("Open a Run bundle (.qlrun)", type=["qlrun"], key="ql.bundle_upload", max_upload_size=64)
if up is not None and st.session_state.get(BUNDLE_SEEN) != up.file_id:
    st.session_state[BUNDLE_SEEN] = up.file_id
    try:
        state.add_run_dir(open_uploaded_bundle(up.getvalue(), up.name))
    except BundleError as e:
        st.error(f"{up.name}: not opened — {e}")
    else:
        st.rerun()
