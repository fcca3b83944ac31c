"""NaN produced inside the model once quantized, and a metric that is 0 for the FP32 model."""
from __future__ import annotations

import math

import numpy as np
import pytest

import hostile_models
from analysis import analyze
from analysis.store.policy import Policy, match_policy, uniform
from analysis.project.projection import Projector
from analysis.report.render import render_html, render_markdown
from analysis.project.search import best_policy


@pytest.fixture(scope="module")
def overflow_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("overflow")
    rng = np.random.default_rng(0)
    np.savez(d / "x.npz", inputs=hostile_models.overflow_inputs(48), labels=rng.integers(0, 10, 48))
    return analyze("hostile_models:overflow_at_int4", str(d / "x.npz"), d / "run", progress=False, latency=False, verify_policies=0,
                   random_policies=4)


def test_a_layer_that_overflows_at_int4_is_flagged_and_the_sweep_finishes(overflow_run):
    run = overflow_run
    assert run.status == "complete" and math.isfinite(run.meta["baseline"]["loss"])
    row = run.sensitivity.set_index(["layer", "format"]).loc[("fc1", "int4")]
    assert row["status"] == "nonfinite" and "NaN or Inf on 36 sample(s)" in row["reason"]
    assert math.isnan(row["metric"]) and math.isnan(row["metric_delta"])  # argmax of NaN is no accuracy
    ok = run.sensitivity.set_index(["layer", "format"]).loc[("fc1", "int8")]
    assert ok["status"] == "ok" and math.isfinite(ok["metric"])
    pol = run.policies.set_index("name")
    assert math.isnan(pol.loc["all-int4", "metric"]) and math.isnan(run.meta["uniform"]["int4"]["metric"])


def test_the_flagged_layer_is_kept_out_of_policies_and_projections(overflow_run):
    run = overflow_run
    assert uniform(run, "int4").layers["fc1"] == "fp32"
    m = match_policy(Policy(run.model_sha256, {"fc1": "int4"}), run)
    assert "fc1" in m.unavailable and "NaN or Inf" in m.unavailable["fc1"]
    p = Projector(run)
    assert not p.allowed[run.layer_names.index("fc1"), 2]
    assert "NaN or Inf" in render_html(run) and render_markdown(run)


@pytest.fixture(scope="module")
def zero_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("zero")
    rng = np.random.default_rng(0)
    np.savez(d / "x.npz", inputs=rng.normal(size=(48, 64)).astype(np.float32), labels=rng.integers(0, 9, 48))
    return analyze("hostile_models:all_wrong", str(d / "x.npz"), d / "run", progress=False, latency=False, verify_policies=0,
                   random_policies=4)


def test_a_metric_of_zero_for_fp32_divides_nothing_by_zero(zero_run):
    run = zero_run
    assert run.meta["baseline"]["metric"] == 0.0 and run.status == "complete"
    sens = run.sensitivity[run.sensitivity["status"] == "ok"]
    assert len(sens) and np.isfinite(sens["metric_delta"]).all() and (sens["metric_delta"] == 0).all()
    p = Projector(run)
    codes = np.array([1] * len(run.layer_names))
    proj = p.project(codes)
    assert math.isfinite(proj.metric) and proj.metric == pytest.approx(0.0, abs=1e-9)
    with np.errstate(divide="raise", invalid="raise"):  # a division by the zero baseline would raise here
        best = best_policy(p, max_drop=0.01)
    assert best.projection.size_ratio > 1 and math.isfinite(best.projection.metric)
    md = render_markdown(run)
    assert "projected accuracy **0.00 %**" in md and "nan" not in md.lower() and "inf" not in md.lower()


def test_nan_from_the_fp32_model_is_one_line_and_nothing_written(tmp_path, capsys):
    from analysis.cli.main import main

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "x.npz", inputs=rng.normal(size=(48, 64)).astype(np.float32), labels=rng.integers(0, 10, 48))
    out = tmp_path / "run"
    code = main(["analyze", "hostile_models:nan_in_fp32", "--task", str(tmp_path / "x.npz"), "--out", str(out),
                 "--quiet", "--no-latency", "--verify-policies", "0"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "NaN or Inf" in err, err
    assert not out.exists()
