"""Session state keys, the current policy per Run, and the URL glue.

Every ``st.session_state`` key of the dashboard, widget keys included, is defined here and only
here; pages use these names (tests and the benchmark address widgets by the same strings).

The policy being edited lives in ``st.session_state`` as one int8 code per layer in
execution order (``fp32=0, int8=1, int4=2, int8-dyn=3``), one array per open Run. The query string
mirrors it (``?run=<index>&p=<token>``, see ``analysis.store.policy.encode_codes``), so the
address bar is always a link that restores the exact policy.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import streamlit as st

from analysis.api import PolicyError, decode_url_token, encode_codes
from dashboard.data import Loaded, open_run

# --- session data
RUN_DIRS = "ql.run_dirs"  # list[str]: the Runs this session can show
ACTIVE = "ql.active"  # int: index into RUN_DIRS
NOTICES = "ql.notices"  # list[str]: messages for the next page render (bad URL, rejected edits ...)
URL_DONE = "ql.url_restored"
SEARCH_LAST = "ql.search_last"  # (Run path, message kind, text): the outcome of the last search, shown after it
POLICY_SEEN = "ql.upload_seen"  # file id of the policy file last applied: a rerun does not apply it again
BUNDLE_SEEN = "ql.bundle_seen"  # file id of the Run bundle last opened
VERIFY_WATCH = "ql.verify_watch"  # id of a job this session saw running: when it ends, the whole page reruns once
FRAGMENT_MS = "ql.fragment_ms"  # last Layers fragment render time on the server, for the benchmark
QP_RUN, QP_POLICY = "run", "p"

# --- widget keys, by page
OPEN_FORM = "ql.open_form"  # sidebar
FILTER_TEXT, FILTER_TYPES, SORT = "ql.filter_text", "ql.filter_types", "ql.sort"  # Layers
BULK_SCOPE, BULK_FMT, BULK_SET = "ql.bulk_scope", "ql.bulk_fmt", "ql.bulk_set"
BULK_N, BULK_REST, BULK_TOPN, BULK_RESET = "ql.bulk_n", "ql.bulk_rest", "ql.bulk_topn", "ql.bulk_reset"
SEARCH_FORM = "ql.search_form"  # Search
SEARCH_SIZE, SEARCH_LATENCY, SEARCH_DROP = "ql.s_size", "ql.s_latency", "ql.s_drop"
SEARCH_MINIMIZE, SEARCH_GROUPS, FRONTIER_GO = "ql.s_minimize", "ql.s_groups", "ql.frontier_go"
ACT_LAYER, ACT_LOG = "ql.act_layer", "ql.act_log"  # Activations
POLICY_UPLOAD, DOWNLOAD_POLICY, VERIFY = "ql.policy_upload", "ql.download", "ql.verify"  # Export & share
DOWNLOAD_REPORT, DOWNLOAD_BUNDLE, BUNDLE_UPLOAD = "ql.download_report", "ql.download_bundle", "ql.bundle_upload"
COMPARE_A, COMPARE_B, COMPARE_FMT = "ql.compare_a", "ql.compare_b", "ql.compare_fmt"  # Compare
COMPARE_SENS, COMPARE_FRONTIER = "ql.compare_sens", "ql.compare_frontier"


def search_chart_key(axis: str) -> str:
    return f"ql.search_chart_{axis}"


def hist_key(tensor: str) -> str:
    return f"ql.hist_{tensor}"


# --- per Run
def codes_key(path: str) -> str:
    return f"ql.codes::{path}"


def epoch_key(path: str) -> str:
    return f"ql.epoch::{path}"


def editor_key(path: str) -> str:
    """Key of the layer table's data editor for this Run; changes whenever the table is rebuilt."""
    return f"ql.editor::{path}::{st.session_state.get(epoch_key(path), 0)}"


def view_key(path: str) -> str:
    """(signature, frame) of the layer table the editor shows for this Run: rows are matched to layers by it."""
    return f"ql.view::{path}"


def frontier_key(path: str) -> str:
    """True once the Pareto frontier of this Run was asked for (it is computed on demand)."""
    return f"ql.frontier_on::{path}"


def run_dirs() -> list[str]:
    """Open Runs: set by a test in session state, else the script's command-line arguments."""
    if RUN_DIRS not in st.session_state:
        st.session_state[RUN_DIRS] = [str(Path(p).resolve()) for p in sys.argv[1:]]
    return st.session_state[RUN_DIRS]


def add_run_dir(path: str) -> int:
    dirs = run_dirs()
    p = str(Path(path).expanduser().resolve())
    if p not in dirs:
        dirs.append(p)
    st.session_state[ACTIVE] = dirs.index(p)
    return st.session_state[ACTIVE]


def notice(msg: str) -> None:
    st.session_state.setdefault(NOTICES, []).append(msg)


def show_notices() -> None:
    for msg in st.session_state.pop(NOTICES, []):
        st.warning(msg)


def _restore_from_url() -> None:
    """First render of a session: pick the Run and policy the query string names."""
    st.session_state[URL_DONE] = True
    qp = st.query_params
    dirs = run_dirs()
    if QP_RUN in qp:
        try:
            idx = int(qp[QP_RUN])
            if not 0 <= idx < len(dirs):
                raise ValueError
            st.session_state[ACTIVE] = idx
        except ValueError:
            notice(f"The link names Run {qp[QP_RUN]!r}, but {len(dirs)} Run(s) are open; showing the first.")
    token = qp.get(QP_POLICY)
    if not token:
        return
    loaded = active()
    if not isinstance(loaded, Loaded):
        return
    try:
        m = decode_url_token(token, loaded.run)
    except PolicyError as e:
        notice(f"The policy in the link was not applied: {e}")
        return
    set_codes(loaded, m.codes, update_url=False)
    for msg in m.messages():
        notice(msg)


def active() -> Loaded | str | None:
    """The active Run, a message saying why it cannot be opened, or None when no Run is open."""
    dirs = run_dirs()
    if not dirs:
        return None
    idx = min(max(int(st.session_state.get(ACTIVE, 0)), 0), len(dirs) - 1)
    return open_run(dirs[idx])


def init() -> None:
    """Call once per script run, before any page renders."""
    if URL_DONE not in st.session_state:
        _restore_from_url()


def codes(loaded: Loaded) -> np.ndarray:
    key = codes_key(loaded.path)
    c = st.session_state.get(key)
    if c is None or len(c) != len(loaded.projector.names):
        c = np.zeros(len(loaded.projector.names), dtype=np.int8)
        st.session_state[key] = c
    return c


def share_query(loaded: Loaded) -> str:
    idx = run_dirs().index(loaded.path) if loaded.path in run_dirs() else 0
    return f"?{QP_RUN}={idx}&{QP_POLICY}={encode_codes(codes(loaded), loaded.run.model_sha256)}"


def sync_url(loaded: Loaded) -> None:
    token = encode_codes(codes(loaded), loaded.run.model_sha256)
    idx = str(run_dirs().index(loaded.path)) if loaded.path in run_dirs() else "0"
    if st.query_params.get(QP_POLICY) != token or st.query_params.get(QP_RUN) != idx:
        st.query_params.update({QP_RUN: idx, QP_POLICY: token})


def set_codes(loaded: Loaded, new: np.ndarray, *, update_url: bool = True) -> list[str]:
    """Replace the policy (formats a layer cannot take fall back to fp32); rebuild the table.

    Returns one note per layer that was kept at fp32.
    """
    clean, notes = loaded.projector.sanitize(np.asarray(new, dtype=np.int8))
    st.session_state[codes_key(loaded.path)] = clean
    bump_epoch(loaded)
    if update_url:
        sync_url(loaded)
    return notes


def bump_epoch(loaded: Loaded) -> None:
    k = epoch_key(loaded.path)
    st.session_state[k] = st.session_state.get(k, 0) + 1
