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
from analysis.store.synthetic import explicit_run, synthetic_run


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


def test_band_is_over_the_measured_policies(pj):
    assert pj.band is not None and len(pj.validations) == 2
    assert all(v.held_out for v in pj.validations)
    assert "uniform int8" in pj.band_method and "without its own point" in pj.band_method


# Two layers and two measured policies; every number below is worked out by hand.
# Layer -> format -> (bytes, loss change, metric with only that layer quantized); FP32 loss 0.30, accuracy 0.90.
TWO_LAYERS = {"L1": {"fp32": (400, 0, 0), "int8": (100, 0.10, 0.85)},
              "L2": {"fp32": (800, 0, 0), "int8": (200, 0.20, 0.80)}}


def test_band_worked_out_by_hand(tmp_path):
    run = explicit_run(tmp_path / "v1", TWO_LAYERS, baseline=(0.30, 0.90),
                       measured=[("all-int8", "uniform", {"L1": "int8", "L2": "int8"}, 0.65, 0.70),
                                 ("mine", "user", {"L1": "int8"}, 0.42, 0.86)])
    p = Projector(run)
    assert p.calibration is None
    errors = {v.name: v.error for v in p.validations}
    # all-int8: additive loss 0.60; the map without (0.65, 0.70) pools (0.40, 0.85) and (0.42, 0.86) to 0.855
    # and ends at (0.50, 0.80); beyond it the chord from (0.30, 0.90) falls 0.5 per unit: 0.75, measured 0.70
    assert errors["all-int8"] == pytest.approx(0.05)
    # mine: loss 0.40; the map without (0.42, 0.86) passes through (0.40, 0.85), measured 0.86
    assert errors["mine"] == pytest.approx(-0.01)
    assert p.band == pytest.approx(0.05)
    assert p.project(np.array([1, 0])).metric == pytest.approx(0.855)  # the full map keeps the pooled point


def test_calibrated_band_worked_out_by_hand(tmp_path):
    # penalties add up to 0.1, 0.2, 0.3 and were measured 0.12, 0.22, 0.36 (ratios 1.2, 1.1, 1.2)
    run = explicit_run(tmp_path / "v2", TWO_LAYERS, baseline=(0.30, 0.90),
                       measured=[("r1", "random", {"L1": "int8"}, 0.42, 0.84),
                                 ("r2", "random", {"L2": "int8"}, 0.52, 0.78),
                                 ("r3", "random", {"L1": "int8", "L2": "int8"}, 0.66, 0.66)])
    p = Projector(run)
    assert p.calibration is not None and p.calibration.map.a == pytest.approx(1.2)  # the median ratio
    errors = {v.name: v.error for v in p.validations}
    # r1 held out: a = 1.15, g(0.115) between (0.10, 0.85) and (0.20, 0.80) = 0.8425
    assert errors["r1"] == pytest.approx(0.8425 - 0.84)
    # r2 held out: a = 1.2, g(0.24) between (0.20, 0.80) and (0.36, 0.66) = 0.765
    assert errors["r2"] == pytest.approx(0.765 - 0.78)
    # r3 held out: a = 1.15, g(0.345) beyond (0.22, 0.78) on the chord from (0, 0.90): 0.78 - 0.125 * 0.12 / 0.22
    assert errors["r3"] == pytest.approx(0.78 - 0.125 * 0.12 / 0.22 - 0.66)
    assert p.band == pytest.approx(0.78 - 0.125 * 0.12 / 0.22 - 0.66)


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


def test_size_on_1000_layers_matches_the_generators_measured_bytes(tmp_path):
    r = synthetic_run(tmp_path / "big", 1000, seed=0)
    p = Projector(r)
    index = {n: i for i, n in enumerate(p.names)}
    rows = r.policies[r.policies["kind"] != "baseline"]
    assert len(rows) == 10
    for row in rows.itertuples():  # the generator sums its own per-layer sizes for each mixed policy
        assert p.project(Projector.codes_of(row.layers_json, index)).bytes == row.bytes


def test_measured_mixed_policies_switch_to_the_calibrated_projection(tmp_path):
    r = synthetic_run(tmp_path / "mixed", 60, seed=5, n_random=8)
    p = Projector(r)
    assert p.calibration is not None and len(p.validations) == 10  # 2 uniform + 8 random
    assert p.band is not None and "leave-one-out" in p.band_method
    codes = np.zeros(60, dtype=np.int8)
    assert p.project(codes).metric == pytest.approx(r.meta["baseline"]["metric"], abs=1e-9)
    assert p.project(codes).bytes == r.meta["model"]["fp32_bytes"]
