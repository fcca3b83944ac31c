"""Session state keys, the current policy per Run, and the URL glue.

Every ``st.session_state`` key of the dashboard, widget keys included, is defined here and only
here; pages use these names (tests and the benchmark address widgets by the same strings).

The current policy is one int8 code per layer in execution order (``fp32=0, int8=1, int4=2,
int8-dyn=3``), one array per open Run, kept under ``codes_key`` and nowhere else. Everything the
pages show of it (the Layers table, the headline, the address, the policy file, the report) is
derived from it on every rerun, and everything that changes it (a click in the Layers table, a bulk
action, a search, a policy file, a link) goes through :func:`set_codes`, which also makes each change one
undo step and keeps the policies tried in this session (:mod:`dashboard.history`); :func:`undo` and
:func:`redo` walk those steps.

The address mirrors it on every page (``?run=<run id>&p=<token>``, see :func:`run_id` and
``analysis.store.policy.encode_codes``): the query string is read once, when a session opens, and
written on every rerun after that, so it is always a link that restores the exact policy.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import streamlit as st

from analysis.api import Policy, PolicyError, decode_url_token, encode_codes, policy_from_codes, run_writer
from dashboard import history
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
VERIFY_OWN = "ql.verify_own"  # ids of the verify jobs this session started: only their outcome is shown here
FRAGMENT_MS = "ql.fragment_ms"  # last Layers fragment render time on the server, for the benchmark
WATCHED = "ql.watched"  # {Run path: True}: Runs seen being analysed in this session (dashboard/progress.py)
QP_RUN, QP_POLICY = "run", "p"

# --- widget keys, by page
OPEN_FORM, RUN_PICK = "ql.open_form", "ql.run_pick"  # sidebar
FILTER_TEXT, FILTER_TYPES, SORT = "ql.filter_text", "ql.filter_types", "ql.sort"  # Layers
COLUMNS = "ql.columns"
FORMAT_CLICK = "ql.format_click"  # the table's format buttons: {"row", "label"} of the click, during its rerun
UNDO, REDO = "ql.undo", "ql.redo"
BULK_OPEN = "ql.bulk_open"
HISTORY_OPEN, HISTORY_A, HISTORY_B = "ql.history_open", "ql.history_a", "ql.history_b"  # Layers: policies tried
HISTORY_BACK = "ql.history_back"
BULK_SCOPE, BULK_FMT, BULK_SET = "ql.bulk_scope", "ql.bulk_fmt", "ql.bulk_set"
BULK_N, BULK_REST, BULK_TOPN, BULK_RESET = "ql.bulk_n", "ql.bulk_rest", "ql.bulk_topn", "ql.bulk_reset"
BARS_ORDER, BARS_FMT, BARS_LOG = "ql.bars_order", "ql.bars_fmt", "ql.bars_log"  # and bars_top_key
SENS_CHART = "ql.sens_chart"
SENS_FIG = "ql.sens_fig"  # (arguments, figure) of the Layers page's sensitivity chart last built
SEARCH_FORM = "ql.search_form"  # Search
SEARCH_SIZE, SEARCH_LATENCY, SEARCH_DROP = "ql.s_size", "ql.s_latency", "ql.s_drop"
SEARCH_MINIMIZE, SEARCH_GROUPS, FRONTIER_GO = "ql.s_minimize", "ql.s_groups", "ql.frontier_go"
SEARCH_SLOWER = "ql.s_slower"
ACT_LAYER, ACT_LOG = "ql.act_layer", "ql.act_log"  # Activations
ACT_CHANNEL_SORT = "ql.act_channel_sort"  # Activations: per-channel chart sorted by range
ACT_CHANNEL_CHART = "ql.act_channel_chart"
POLICY_UPLOAD, DOWNLOAD_POLICY, VERIFY = "ql.policy_upload", "ql.download", "ql.verify"  # Export & share
DOWNLOAD_REPORT, DOWNLOAD_BUNDLE, BUNDLE_UPLOAD = "ql.download_report", "ql.download_bundle", "ql.bundle_upload"
COMPARE_A, COMPARE_B, COMPARE_FMT = "ql.compare_a", "ql.compare_b", "ql.compare_fmt"  # Compare
COMPARE_SENS, COMPARE_FRONTIER = "ql.compare_sens", "ql.compare_frontier"
MODEL_FMT, MODEL_DRAW, MODEL_BLOCK = "ql.model_fmt", "ql.model_draw", "ql.model_block"  # Model
MODEL_CLICKS = "ql.model_clicks"  # clicks handled so far: part of the charts' keys, so each click starts unselected
MODEL_ROWS = "ql.model_rows"  # {chart: {trace: rows}} of the figures last drawn, for the click callbacks
MODEL_LAYOUT = "ql.model_layout"  # (Run path, Run object, layout): the layout of the Run last drawn


def search_chart_key(axis: str) -> str:
    return f"ql.search_chart_{axis}"


def bars_top_key(path: str) -> str:
    """The sensitivity chart's top-N box, per Run: its bounds and default depend on the Run's layer count."""
    return f"ql.bars_top::{path}"


def hist_key(tensor: str) -> str:
    return f"ql.hist_{tensor}"


def model_chart_key(chart: str) -> str:
    """Key of a Model view chart (``layers`` or ``blocks``): a new one after each handled click, so a plotly
    selection (which persists across reruns) never toggles twice and a second click on one layer counts."""
    return f"ql.model_chart_{chart}::{st.session_state.get(MODEL_CLICKS, 0)}"


def set_selected_key(fmt: str) -> str:
    """The Layers page's button that sets the selected rows to ``fmt``."""
    return f"ql.set_selected_{fmt}"


def history_name_key(path: str, number: int) -> str:
    """The name box of policy ``number`` among those tried on this Run (Layers page)."""
    return f"ql.history_name::{path}::{number}"


def watch_button_key(path: str) -> str:
    """The "Open" button of a Run being analysed (dashboard/progress.py)."""
    return f"ql.watch_open::{path}"


# --- per Run
def codes_key(path: str) -> str:
    return f"ql.codes::{path}"


def table_key(path: str) -> str:
    """The Layers table of this Run: its row selection (positions in the rows it shows)."""
    return f"ql.table::{path}"


def view_key(path: str) -> str:
    """(signature, layer indices, frame) of the rows the Layers table shows for this Run, in its order."""
    return f"ql.view::{path}"


def timeline_key(path: str) -> str:
    """Undo and redo steps of this Run's policy (a :class:`dashboard.history.Timeline`)."""
    return f"ql.timeline::{path}"


def tried_key(path: str) -> str:
    """Policies tried on this Run in this session (a tuple of :class:`dashboard.history.Tried`, oldest first)."""
    return f"ql.tried::{path}"


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


def pick_run() -> None:
    """The sidebar's Run box changed (a callback: it runs before the script, so the whole run sees the pick)."""
    st.session_state[ACTIVE] = int(st.session_state[RUN_PICK])


def notice(msg: str) -> None:
    st.session_state.setdefault(NOTICES, []).append(msg)


def show_notices() -> None:
    for msg in st.session_state.pop(NOTICES, []):
        st.warning(msg)


def run_id(loaded: Loaded) -> str:
    """A name for the Run that holds on any server: its model's hash and when it was created.

    Not its position among the open Runs, which depends on how the server was started. A Run without
    a creation time (older folders) is named by its folder instead.

    Example: ``276a4cb83a5c-20261202001500``.
    """
    stamp = re.sub(r"[^0-9]", "", str(loaded.run.meta.get("created") or ""))[:14]
    tail = stamp or re.sub(r"[^A-Za-z0-9_-]", "_", Path(loaded.path).name)
    return f"{loaded.run.model_sha256[:12]}-{tail}"


def _open_runs() -> list[tuple[int, Loaded]]:
    return [(i, lo) for i, p in enumerate(run_dirs()) if isinstance(lo := open_run(p), Loaded)]


def _run_of_link(name: str | None, token: str | None) -> tuple[int | None, str]:
    """(index of the open Run a link names, a note when that is a guess).

    By the Run's id; an old link by position (``run=0``) by the first open Run its policy fits, that
    position first; a Run that is not open here by the first open Run its policy fits, with a note.
    """
    runs = _open_runs()
    if name:
        by_id = [i for i, lo in runs if run_id(lo) == name]
        if by_id:
            return by_id[0], ""
    fits = []
    for i, lo in runs if token else []:
        try:
            decode_url_token(token, lo.run)
        except PolicyError:
            continue
        fits.append(i)
    if name and name.isdigit():
        pos = int(name)
        if pos in fits or (not token and pos < len(run_dirs())):
            return pos, ""
    if not name:
        return (fits[0] if fits else None), ""
    if fits:
        return fits[0], ("" if name.isdigit() else f"The link names Run {name!r}, which is not open here; "
                         f"showing {Path(run_dirs()[fits[0]]).name}, an open Run of the same model.")
    return None, f"The link names Run {name!r}, which is not open here; showing the first open Run."


def _restore_from_url() -> None:
    """First render of a session: open the Run and the policy the address names."""
    st.session_state[URL_DONE] = True
    qp = st.query_params
    name, token = qp.get(QP_RUN), qp.get(QP_POLICY)
    if not name and not token:
        if ACTIVE not in st.session_state:
            st.session_state[ACTIVE] = default_index()
        return
    idx, note = _run_of_link(name, token)
    if note:
        notice(note)
    if idx is not None:
        st.session_state[ACTIVE] = idx
    loaded = active()
    if not token or not isinstance(loaded, Loaded):
        return
    try:
        m = decode_url_token(token, loaded.run)
    except PolicyError as e:
        notice(f"The policy in the link was not applied: {e}")
        return
    set_codes(loaded, m.codes)
    for msg in m.messages():
        notice(msg)


def default_index() -> int:
    """The Run a session opens on when its address names none: the first complete Run no process is still
    writing (``quantlens demo`` lists MiniLM first: it opens once its background analysis is done, digits
    until then), else the first that opens, else the first."""
    dirs = run_dirs()
    opened = [(i, lo) for i, p in enumerate(dirs) if isinstance(lo := open_run(p), Loaded)]
    done = [i for i, lo in opened if lo.run.status == "complete" and run_writer(lo.path) is None]
    return (done or [i for i, _ in opened] or [0])[0]


def active_index() -> int:
    """Index of the active Run in :func:`run_dirs` (0 when none is open)."""
    return min(max(int(st.session_state.get(ACTIVE, 0)), 0), max(len(run_dirs()) - 1, 0))


def active() -> Loaded | str | None:
    """The active Run, a message saying why it cannot be opened, or None when no Run is open."""
    dirs = run_dirs()
    if not dirs:
        return None
    return open_run(dirs[active_index()])


def init() -> None:
    """Call once per script run, before any page renders: the first run of a session reads the address,
    every run writes it (a sidebar link or Back leaves the address without the policy, or with an older one)."""
    if URL_DONE not in st.session_state:
        _restore_from_url()
    lo = active()
    if isinstance(lo, Loaded):
        sync_url(lo)


def codes(loaded: Loaded) -> np.ndarray:
    """The current policy of this Run in this session (read-only: change it with :func:`set_codes`)."""
    key = codes_key(loaded.path)
    c = st.session_state.get(key)
    if c is None or len(c) != len(loaded.projector.names):
        c = np.zeros(len(loaded.projector.names), dtype=np.int8)
        c.setflags(write=False)
        st.session_state[key] = c
    return c


def token(loaded: Loaded) -> str:
    """The current policy as a URL token."""
    return encode_codes(codes(loaded), loaded.run.model_sha256)


def policy(loaded: Loaded) -> Policy:
    """The current policy as a policy file holds it."""
    return policy_from_codes(loaded.run, codes(loaded))


def share_query(loaded: Loaded) -> str:
    return f"?{QP_RUN}={run_id(loaded)}&{QP_POLICY}={token(loaded)}"


def sync_url(loaded: Loaded) -> None:
    """Write the current policy of ``loaded`` into the address (only when it differs: each write is a message)."""
    want = {QP_RUN: run_id(loaded), QP_POLICY: token(loaded)}
    if any(st.query_params.get(k) != v for k, v in want.items()):
        st.query_params.update(want)


def set_codes(loaded: Loaded, new: np.ndarray, *, defer_url: bool = False) -> list[str]:
    """Make ``new`` the current policy (formats a layer cannot take fall back to fp32) and write the address.

    A change is one undo step and an entry in the policies tried. Returns one note per layer kept at fp32.
    ``defer_url``: the caller writes the address itself later in the run (:func:`sync_url`): the Layers
    table's callbacks do, so that the browser draws the new headline before it handles the new address.
    """
    clean, notes = loaded.projector.sanitize(np.asarray(new, dtype=np.int8))
    before = codes(loaded)
    if not np.array_equal(before, clean):
        st.session_state[timeline_key(loaded.path)] = history.record(timeline(loaded), before, clean)
        _put(loaded, clean, defer_url)
    return notes


def _put(loaded: Loaded, new: np.ndarray, defer_url: bool = False) -> None:
    """The one writer of the current policy: the codes, the policies tried, the address."""
    new = np.array(new, dtype=np.int8)
    new.setflags(write=False)
    key = tried_key(loaded.path)
    st.session_state[key] = history.remember(tried(loaded), new)
    st.session_state[codes_key(loaded.path)] = new
    if not defer_url:
        sync_url(loaded)


def timeline(loaded: Loaded) -> history.Timeline:
    return st.session_state.get(timeline_key(loaded.path)) or history.Timeline()


def tried(loaded: Loaded) -> tuple[history.Tried, ...]:
    """Policies tried on this Run in this session, oldest first; the current one (the first, if none yet) last."""
    key = tried_key(loaded.path)
    got = st.session_state.get(key)
    if not got:
        got = st.session_state[key] = history.remember((), codes(loaded))
    return got


def undo(loaded: Loaded, *, defer_url: bool = False) -> bool:
    """Back to the policy before the last change; False when there is none."""
    tl, back = history.undo(timeline(loaded), codes(loaded))
    if back is None:
        return False
    st.session_state[timeline_key(loaded.path)] = tl
    _put(loaded, back, defer_url)
    return True


def redo(loaded: Loaded, *, defer_url: bool = False) -> bool:
    """The change the last Undo took back, again; False when there is none."""
    tl, again = history.redo(timeline(loaded), codes(loaded))
    if again is None:
        return False
    st.session_state[timeline_key(loaded.path)] = tl
    _put(loaded, again, defer_url)
    return True


def rename_tried(loaded: Loaded, number: int, name: str) -> None:
    st.session_state[tried_key(loaded.path)] = history.rename(tried(loaded), number, name)
