"""Projection v1: exact sizes, additive loss, a monotone map through the baseline, an honest band.

The fixtures write Runs without random mixed policies (``n_random=0``): with them the
Projector switches to the calibrated projection, tested at the end of this file."""
from __future__ import annotations


import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.store.policy import match_policy, uniform
from analysis.project.projection import LossToMetric, Projector, isotonic
from analysis.store.run import replace_table, update_meta
from analysis.store.synthetic import synthetic_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return synthetic_run(tmp_path_factory.mktemp("proj") / "run", 60, seed=5, n_random=0)


@pytest.fixture(scope="module")
def pj(run):
    return Projector(run)


def test_fp32_projects_to_the_measured_baseline(run, pj):
    p = pj.project(np.zeros(60, dtype=np.int8))
    assert p.metric == pytest.approx(run.meta["baseline"]["metric"], abs=1e-9)
    assert p.bytes == run.meta["model"]["fp32_bytes"] and p.size_ratio == 1.0
    assert p.latency_ms is None  # no latency in the Run


def test_uniform_size_matches_measured_bytes(run, pj):
    for fmt in ("int8", "int4"):
        codes = match_policy(uniform(run, fmt), run).codes
        assert pj.project(codes).bytes == run.meta["uniform"][fmt]["bytes"]


def test_toggle_changes_size_by_that_layers_bytes(run, pj):
    bt = run.bytes_table()
    codes = np.zeros(60, dtype=np.int8)
    before = pj.project(codes).bytes
    codes[7] = 1
    assert pj.project(codes).bytes - before == int(bt.iloc[7]["int8"] - bt.iloc[7]["fp32"])


def test_loss_is_additive(run, pj):
    sens = run.sensitivity.set_index(["layer", "format"])
    codes = np.zeros(60, dtype=np.int8)
    codes[[1, 4, 9]] = 1
    want = run.meta["baseline"]["loss"] + sum(sens.loc[(run.layer_names[i], "int8"), "loss_delta"] for i in (1, 4, 9))
    assert pj.project(codes).loss == pytest.approx(want)


def test_band_is_the_largest_held_out_error(pj):
    assert pj.band is not None and len(pj.validations) == 2
    assert pj.band == max(abs(v.error) for v in pj.validations)
    assert all(v.held_out for v in pj.validations)
    assert "uniform int8" in pj.band_method and "without its own point" in pj.band_method


def test_no_measured_policy_means_unknown_band(run, tmp_path):
    r2 = synthetic_run(tmp_path / "r2", 10, seed=1, n_random=0)
    replace_table(r2, "policies", r2.policies[r2.policies.kind == "baseline"])
    p = Projector(r2)
    assert p.band is None and "unknown" in p.band_method


def test_latency_only_when_measured(tmp_path):
    r = synthetic_run(tmp_path / "lat", 8, seed=2, n_random=0)
    cost = r.cost.copy()
    cost["latency_ms"] = np.where(cost["format"] == "fp32", 1.0, 0.75)
    replace_table(r, "cost", cost)
    assert Projector(r).project(np.ones(8, dtype=np.int8)).latency_ms is None  # no end-to-end FP32 latency
    update_meta(r, latency={"fp32_ms": 10.0})
    assert Projector(r).project(np.ones(8, dtype=np.int8)).latency_ms == pytest.approx(10.0 - 8 * 0.25)


def test_sanitize_keeps_unavailable_layers_fp32(run, pj):
    codes = np.full(60, 2, dtype=np.int8)
    clean, notes = pj.sanitize(codes)
    skipped = set(run.meta["uniform"]["int4"]["skipped_layers"])
    assert {pj.names[i] for i in np.nonzero(clean == 0)[0]} == skipped
    assert len(notes) == len(skipped) and all("kept at fp32" in n for n in notes)


def test_more_loss_never_projects_better(pj):
    losses = np.linspace(pj.base_loss, pj.base_loss + 3, 50)
    metrics = [pj.map(x) for x in losses]
    assert all(a >= b for a, b in zip(metrics, metrics[1:]))


@settings(derandomize=True, max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 10), st.floats(-5, 5)), min_size=1, max_size=60), st.booleans())
def test_isotonic_is_monotone(points, increasing):
    x, y = np.array([p[0] for p in points]), np.array([p[1] for p in points])
    ux, fy = isotonic(x, y, increasing)
    assert len(ux) == len(fy) == len(np.unique(x))
    d = np.diff(fy)
    assert (d >= -1e-9).all() if increasing else (d <= 1e-9).all()
    # PAV preserves the (weighted) mean of the data
    counts = np.array([(x == u).sum() for u in ux])
    assert (fy * counts).sum() == pytest.approx(y.sum(), abs=1e-6)


def test_map_extrapolates_along_the_chord():
    m = LossToMetric(np.array([0.0, 1.0, 2.0]), np.array([1.0, 0.8, 0.6]), higher_is_better=True)
    assert m(3.0) == pytest.approx(0.4) and m(0.5) == pytest.approx(0.9)


def test_size_on_1000_layers(tmp_path):
    r = synthetic_run(tmp_path / "big", 1000, seed=0)
    p = Projector(r)
    codes = np.random.default_rng(0).integers(0, 2, 1000).astype(np.int8)
    assert p.project(codes).bytes == p.other_bytes + int(p.bytes[np.arange(1000), codes].sum())


def test_measured_mixed_policies_switch_to_the_calibrated_projection(tmp_path):
    r = synthetic_run(tmp_path / "mixed", 60, seed=5, n_random=8)
    p = Projector(r)
    assert p.calibration is not None and len(p.validations) == 10  # 2 uniform + 8 random
    assert p.band == max(abs(v.error) for v in p.validations)
    codes = np.zeros(60, dtype=np.int8)
    assert p.project(codes).metric == pytest.approx(r.meta["baseline"]["metric"], abs=1e-9)
    assert p.project(codes).bytes == r.meta["model"]["fp32_bytes"]
