"""Search applies the optimum to the current policy; Verify measures it in onnxruntime in the background."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from analysis.store.policy import decode_url_token
from analysis.project.projection import Projector
from analysis.store.run import load_run
from analysis.project.search import best_policy
from dashboard.data import verify_jobs
from apptest_support import layer_table, switch_page


def size_bytes(at) -> int:
    m = next(m for m in at.metric if m.label == "Projected size")
    return int(re.search(r"([\d,]+) B", m.proto.delta).group(1).replace(",", ""))


def codes_of(at) -> np.ndarray:
    return at.session_state[f"ql.codes::{at.session_state['ql.run_dirs'][0]}"]


def search(at, **budget):
    for k, v in budget.items():
        at.number_input(key=f"ql.s_{k}").set_value(v)
    at.button(key="FormSubmitter:ql.search_form-Find the best policy and apply it").click()
    return at.run()


def test_search_applies_the_policy_and_the_headline_follows(app, syn_dir):
    run = load_run(syn_dir)
    pj = Projector(run)
    budget_mb = (pj.fp32_bytes * 0.45) / 1e6
    want = best_policy(pj, max_bytes=budget_mb * 1e6)
    at = search(app([syn_dir], "search"), size=budget_mb)
    assert not at.exception and not at.error
    assert any("Applied the policy" in s.value for s in at.success)
    assert np.array_equal(codes_of(at), want.codes)
    assert size_bytes(at) == want.projection.bytes < pj.fp32_bytes
    token = at.query_params["p"]
    token = token if isinstance(token, str) else token[0]
    assert np.array_equal(decode_url_token(token, run).codes, want.codes)  # the link follows
    switch_page(at, "layers").run()  # and so does the table
    assert not at.exception and size_bytes(at) == want.projection.bytes
    assert (layer_table(at).value["format"] != "fp32").sum() == int((want.codes != 0).sum())


def test_max_drop_is_in_percentage_points(app, syn_dir):
    want = best_policy(Projector(load_run(syn_dir)), max_drop=0.01, minimize="size")
    at = search(app([syn_dir], "search"), drop=1.0)
    assert not at.exception and not at.error
    assert np.array_equal(codes_of(at), want.codes)


@pytest.mark.parametrize("budget", [{"size": 0.0001}, {}])
def test_infeasible_or_missing_budget_is_a_message(app, syn_dir, budget):
    at = search(app([syn_dir], "search"), **budget)
    assert not at.exception
    text = at.error[0].value if at.error else ""
    assert ("the smallest reachable is 1." in text and "MB" in text) if budget else "Give a budget" in text, text
    assert not codes_of(at).any()  # the policy is left as it was


@pytest.fixture
def digits_copy(digits_run, tmp_path) -> str:
    """A private copy of the demo Run: a verify rewrites the Run's policies table."""
    dst = tmp_path / "digits"
    shutil.copytree(digits_run.path, dst, ignore=shutil.ignore_patterns("jobs"))
    return str(dst)


def test_verify_measures_and_stores_the_current_policy(app, digits_copy):
    at = app([digits_copy], "search")
    at.button(key="ql.frontier_go").click().run()  # the frontier, both axes (the demo Run has latency)
    assert not at.exception and not at.error
    assert at.session_state[f"ql.frontier_on::{at.session_state['ql.run_dirs'][0]}"]
    assert not [b for b in at.button if b.key == "ql.frontier_go"]  # computed once asked, then the button goes
    at = search(at, drop=2.0)
    target = codes_of(at).copy()
    assert target.any()
    switch_page(at, "export").run()
    button = at.button(key="ql.verify")
    assert not button.disabled
    button.click().run()
    assert not at.exception
    path = at.session_state["ql.run_dirs"][0]
    assert verify_jobs().get(path).wait(120)
    at.run()
    assert not at.exception and not at.error
    assert any("Verified in" in s.value for s in at.success)
    pol = load_run(digits_copy).policies
    row = pol[pol["kind"] == "user"].iloc[-1]
    assert np.isfinite(row["metric"]) and np.isfinite(row["latency_ms"]) and row["measured_on"].startswith("onnxruntime")
    table = next(d.value for d in at.dataframe if "|measured − projected|" in d.value.columns)
    assert f"measured: {row['name']}" in table.iloc[:, 0].tolist()  # measured beside projected, from the Run on disk
    switch_page(at, "search").run()
    assert not at.exception and not at.error


@pytest.mark.parametrize("how, words", [("sha", "no longer matches"), ("data", "not at hand")])
def test_verify_is_off_with_the_reason_when_the_model_is_not_at_hand(app, digits_copy, how, words):
    meta_path = Path(digits_copy) / "run.json"
    meta = json.loads(meta_path.read_text())
    if how == "sha":
        meta["model"]["sha256"] = "0" * 64
    else:
        meta["data"].update(task="from-a-laptop", source="/nowhere/data.npz")
    meta_path.write_text(json.dumps(meta))
    at = app([digits_copy], "export")
    assert not at.exception
    assert at.button(key="ql.verify").disabled
    assert any("Verify is off" in i.value and words in i.value for i in at.info)


def test_verify_is_off_on_a_synthetic_run(app, syn_dir):
    at = app([syn_dir], "export")
    assert at.button(key="ql.verify").disabled
    assert any("synthetic Run has no model" in i.value for i in at.info)


def test_a_policy_verified_slower_than_fp32_says_so(app, syn_dir):
    """A finished verify whose model measured 3x FP32's latency warns with the ratio; one at FP32's speed does not."""
    from dashboard import state
    from dashboard.jobs import VerifyJob

    path = str(Path(syn_dir).resolve())
    jobs = verify_jobs()
    at = app([syn_dir], "export")
    for latency, warned in ((0.0123, True), (0.0042, False)):
        job = VerifyJob(path, np.zeros(40, dtype=np.int8), finished=1.0,
                        result={"name": "verified-1", "metric": 0.9, "measured_on": "onnxruntime CPU",
                                "file_bytes": 1e6, "latency_ms": latency, "fp32_latency_ms": 0.0041})
        jobs._jobs[path] = job
        at.session_state[state.VERIFY_OWN] = (job.id,)
        at.run()
        assert not at.exception and any("Verified in" in s.value for s in at.success)
        slower = [w.value for w in at.warning if "slower than FP32" in w.value]
        assert bool(slower) == warned, slower
        if warned:
            assert "3.0× slower than FP32" in slower[0] and "0.0123 vs 0.00410 ms" in slower[0]
    del jobs._jobs[path]


def test_slower_policies_are_left_out_unless_the_box_admits_them(app, tmp_path):
    """With measured latency where INT4 is slower than FP32, a drop budget leaves INT4 out and says so; the
    box admits it, as `quantlens search --allow-slower` does."""
    from analysis.store.run import replace_table, update_meta
    from analysis.store.synthetic import synthetic_run

    run = synthetic_run(tmp_path / "slow", 12, seed=8, n_random=2)
    cost = run.cost.copy()
    cost["latency_ms"] = np.select([cost["format"] == "fp32", cost["format"] == "int8"], [0.0043, 0.0031], 0.0052)
    replace_table(run, "cost", cost)
    update_meta(run, latency={"fp32_ms": 0.0412, "fp32_spread_ms": 0.0021, "unit": "ms", "threads": 1})
    pj = Projector(load_run(run.path))
    fast, any_speed = (best_policy(pj, max_drop=0.5, allow_slower=a) for a in (False, True))
    assert not np.array_equal(fast.codes, any_speed.codes)
    at = search(app([str(run.path)], "search"), drop=50.0)
    assert not at.exception and np.array_equal(codes_of(at), fast.codes)
    assert any("slower than FP32 were left out" in w.value for w in at.warning)
    at.checkbox(key="ql.s_slower").check()
    at = search(at, drop=50.0)
    assert not at.exception and np.array_equal(codes_of(at), any_speed.codes)


def test_drop_messages_speak_in_the_points_the_user_typed(app, tmp_path):
    """The drop box takes percentage points; notes about it must not quote the metric's fraction back."""
    from analysis.store.synthetic import explicit_run

    layers = {"A": {"fp32": (1000, 0, 0), "int8": (250, 0.01, 0.895)},
              "B": {"fp32": (2000, 0, 0), "int8": (500, 0.02, 0.89)}}
    # all-int8 measured 0.01 under the map without its point: the projection's band is 0.01, one point
    run = explicit_run(tmp_path / "run", layers, baseline=(0.30, 0.90),
                       measured=[("all-int8", "uniform", {"A": "int8", "B": "int8"}, 0.33, 0.875)])
    assert Projector(run).band > 0.005
    at = search(app([str(run.path)], "search"), drop=0.5)
    notes = " ".join(w.value for w in at.warning)
    assert "is as wide as the drop budget (0.5 points)" in notes, notes
    assert "0.005" not in notes
