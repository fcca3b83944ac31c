"""One current policy per session: the table, the headline, the link, the policy file and the report all show it.

The browser half of these journeys (real clicks in the table, real navigation, a reload) is in
tests/e2e/test_policy_journey.py.
"""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from analysis.store.policy import decode_url_token, encode_codes, policy_from_codes
from analysis.store.run import load_run, update_meta
from analysis.store.synthetic import synthetic_run
from apptest_support import PAGES, layer_table, set_format, switch_page
from dashboard import state
from dashboard.data import verify_jobs
from dashboard.jobs import VerifyJob


def size_bytes(at) -> int:
    m = next(m for m in at.metric if m.label == "Projected size")
    return int(re.search(r"([\d,]+) B", m.proto.delta).group(1).replace(",", ""))


def quantized(at) -> str:
    return next(m for m in at.metric if m.label == "Layers quantized").value


def qp(at, name: str) -> str:
    v = at.query_params[name]
    return v if isinstance(v, str) else v[0]


def navigate(at, url_path: str):
    """A click on a sidebar link: the browser asks for the page with an empty query string."""
    at.query_params.clear()
    return switch_page(at, url_path).run()


def policy_preview(at) -> dict:
    return json.loads(next(c.value for c in at.code if c.language == "json"))


def int4_row(run) -> int:
    s = run.sensitivity
    ok = set(s[(s.format == "int4") & (s.status == "ok")]["layer"])
    return next(i for i, n in enumerate(run.layer_names) if n in ok)


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_a_revert_in_the_table_brings_headline_link_and_file_back_to_fp32(app, syn_dir, fmt):
    run = load_run(syn_dir)
    fp32 = run.meta["model"]["fp32_bytes"]
    zeros = np.zeros(len(run.layer_names), dtype=np.int8)
    at = app([syn_dir], "layers")
    row = int4_row(run)
    at = set_format(at, row, fmt)
    assert quantized(at) == f"1 / {len(zeros)}" and size_bytes(at) < fp32
    at = set_format(at, row, "fp32")  # clicks on round the cycle, back to the format it had
    assert not at.exception
    assert layer_table(at).value["format"].tolist() == ["fp32"] * len(zeros)
    assert quantized(at) == f"0 / {len(zeros)}" and size_bytes(at) == fp32
    assert qp(at, "p") == encode_codes(zeros, run.model_sha256)
    navigate(at, "export")
    assert policy_preview(at) == json.loads(policy_from_codes(run, zeros).to_json())


def test_edits_on_two_rows_then_one_revert_keep_the_other(app, syn_dir):
    run = load_run(syn_dir)
    at = app([syn_dir], "layers")
    path = at.session_state[state.RUN_DIRS][0]
    for row in (3, 5):
        set_format(at, row, "int8")
    set_format(at, 3, "fp32")
    want = np.zeros(len(run.layer_names), dtype=np.int8)
    want[5] = 1
    assert at.session_state[state.codes_key(path)].tolist() == want.tolist()
    assert qp(at, "p") == encode_codes(want, run.model_sha256)


def test_the_table_follows_the_policy_after_another_run_was_shown(app, syn_dir, other_dir):
    """Coming back to a Run, its table shows the policy it had."""
    at = app([syn_dir, other_dir], "layers")
    p0 = at.session_state[state.RUN_DIRS][0]
    set_format(at, 3, "int8")
    at.sidebar.selectbox[0].set_value(1).run()
    at.sidebar.selectbox[0].set_value(0).run()
    assert not at.exception
    assert at.session_state[state.codes_key(p0)][3] == 1
    assert layer_table(at).value["format"].iloc[3] == "int8"
    assert quantized(at).startswith("1 /")


def test_every_pick_in_the_sidebar_run_box_takes(app, syn_dir, other_dir):
    """The box was a new widget whenever the active Run changed, so the pick after a switch was dropped."""
    at = app([syn_dir, other_dir], "layers")
    for pick in (1, 0, 1, 0):
        at.sidebar.selectbox[0].set_value(pick).run()
        assert at.session_state[state.ACTIVE] == pick
        assert len(layer_table(at).value) == (40, 12)[pick]


@pytest.mark.parametrize("page", [p for p in PAGES if p != "layers"] + ["compare"])
def test_every_page_keeps_the_policy_in_the_address(app, syn_dir, other_dir, page):
    run = load_run(syn_dir)
    at = app([syn_dir, other_dir], "layers")
    at = set_format(at, 2, "int8")
    token, run_id = qp(at, "p"), qp(at, "run")
    assert np.count_nonzero(decode_url_token(token, run).codes) == 1
    navigate(at, page)
    assert not at.exception
    assert (qp(at, "run"), qp(at, "p")) == (run_id, token)


def test_export_share_link_is_the_address_of_the_current_policy(app, syn_dir):
    at = app([syn_dir], "layers")
    at = set_format(at, 1, "int8")
    navigate(at, "export")
    share = next(c.value for c in at.code if "p=q1." in c.value)
    assert share.endswith(f"/layers?run={qp(at, 'run')}&p={qp(at, 'p')}")
    assert any("address bar" in c.value for c in at.caption)


def test_the_link_names_the_run_by_its_model_and_creation_not_its_position(app, syn_dir, other_dir):
    at = app([syn_dir, other_dir], "overview")
    ids = []
    for i in range(2):
        at.sidebar.selectbox[0].set_value(i).run()
        ids.append(qp(at, "run"))
    assert ids[0] != ids[1] and not any(x.isdigit() for x in ids)
    for rid, d in zip(ids, (syn_dir, other_dir)):
        assert rid.startswith(load_run(d).model_sha256[:12])


@pytest.fixture
def twin_dir(tmp_path, syn_dir) -> str:
    """The same model analysed again: same model hash, another Run."""
    twin = tmp_path / "twin"
    shutil.copytree(syn_dir, twin)
    update_meta(load_run(twin), created="2020-01-02T03:04:05+00:00")
    return str(twin)


@pytest.mark.parametrize("which", ["syn", "twin"])
def test_a_link_opens_the_same_run_on_a_server_that_opened_the_runs_in_another_order(
        app, syn_dir, other_dir, twin_dir, which):
    target, second = (syn_dir, twin_dir) if which == "syn" else (twin_dir, syn_dir)
    run = load_run(target)
    at = app([target, other_dir, second], "layers")
    at = set_format(at, 4, "int8")
    link = {"run": qp(at, "run"), "p": qp(at, "p")}

    there = app([second, other_dir, target], "layers", link)  # the same Runs, opened in the other order
    assert not there.exception and not there.warning
    shown = there.session_state[state.RUN_DIRS][there.session_state[state.ACTIVE]]
    assert shown == str(run.path.resolve())
    assert there.session_state[state.codes_key(shown)].tolist() == decode_url_token(link["p"], run).codes.tolist()
    assert qp(there, "run") == link["run"]


def test_old_links_by_position_still_open_the_run_their_policy_fits(app, syn_dir, other_dir):
    run = load_run(syn_dir)
    codes = np.zeros(len(run.layer_names), dtype=np.int8)
    codes[[0, 7]] = 1
    at = app([other_dir, syn_dir], "overview", {"run": "0", "p": encode_codes(codes, run.model_sha256)})
    assert not at.exception and not at.warning
    path = at.session_state[state.RUN_DIRS][1]
    assert at.session_state[state.ACTIVE] == 1
    assert at.session_state[state.codes_key(path)].tolist() == codes.tolist()


def test_a_link_to_a_run_that_is_not_open_says_so(app, syn_dir, other_dir):
    at = app([syn_dir], "overview", {"run": load_run(other_dir).model_sha256[:12] + "-20200101000000"})
    assert not at.exception
    assert any("not open here" in w.value for w in at.warning)


@pytest.fixture
def finished_elsewhere(tmp_path, syn_dir):
    """A Run whose verify ran to the end in another browser session (jobs are shared by the server process)."""
    path = tmp_path / "verified"
    shutil.copytree(syn_dir, path)
    run = load_run(path)
    codes = np.ones(len(run.layer_names), dtype=np.int8)
    job = VerifyJob(str(run.path.resolve()), codes)
    job.result = {"name": "user-1 (onnxruntime)", "metric": 0.9, "measured_on": "onnxruntime, 100 samples",
                  "file_bytes": 1000, "latency_ms": 1.0, "fp32_latency_ms": 1.0}
    job.finished = job.started + 2.0
    jobs = verify_jobs()
    jobs._jobs[job.path] = job
    yield str(path)
    jobs._jobs.pop(job.path, None)


def test_a_fresh_session_shows_no_verify_banner_of_another_session(app, finished_elsewhere):
    at = app([finished_elsewhere], "export")
    assert not at.exception
    text = " ".join(e.value for e in [*at.success, *at.warning, *at.info])
    assert "another policy" not in text and "Verified in" not in text
