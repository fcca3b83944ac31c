"""The projection is fitted to what onnxruntime measured, once enough policies were verified there."""
import json

import numpy as np
import pandas as pd
import pytest

from analysis.project.projection import Projector, is_runtime_row
from analysis.store.run import load_run, merge_policy_rows
from analysis.store.synthetic import explicit_run

LAYERS = {"A": {"fp32": (1000, 0, 0), "int8": (250, 0.01, 0.895), "int4": (130, 0.30, 0.70)},
          "B": {"fp32": (2000, 0, 0), "int8": (500, 0.02, 0.89), "int4": (260, 0.05, 0.87)},
          "C": {"fp32": (400, 0, 0), "int8": (100, 0.20, 0.78), "int4": (50, 0.60, 0.50)}}
ENGINE = [("random-1", "random", {"A": "int8", "B": "int8"}, 0.33, 0.878),
          ("random-2", "random", {"B": "int4", "C": "int8"}, 0.55, 0.75),
          ("random-3", "random", {"A": "int4", "C": "int4"}, 1.2, 0.40),
          ("random-4", "random", {"A": "int8", "C": "int8"}, 0.51, 0.77)]


def _runtime_rows(rows):
    return pd.DataFrame([{"name": f"{n} (onnxruntime)", "kind": "verified", "layers_json": json.dumps(l),
                          "metric": m, "loss": loss, "bytes": 0, "latency_ms": np.nan,
                          "measured_on": "onnxruntime 1.32.0, CPU, 1 threads, 600 eval samples",
                          "projected_metric": np.nan, "projected_band": np.nan, "kl": loss - 0.30}
                         for n, _, l, loss, m in rows])


@pytest.fixture
def run(tmp_path):
    return explicit_run(tmp_path / "run", LAYERS, baseline=(0.30, 0.90), measured=ENGINE)


def test_without_runtime_measurements_the_projection_says_it_is_the_engines(run):
    p = Projector(run)
    assert p.calibration is not None and p.calibration.source == "engine"
    assert p.band_method.startswith("projected for the engine's fake-quant")


def test_enough_verified_policies_refit_the_projection_to_the_runtime(run):
    engine = Projector(run)
    # onnxruntime measured every policy 0.02 lower than the engine did
    worse = [(n, k, l, loss + 0.01, m - 0.02) for n, k, l, loss, m in ENGINE]
    merge_policy_rows(run, _runtime_rows(worse[:2]))
    assert Projector(load_run(run.path)).calibration.source == "engine"  # two are not enough to fit and validate
    merge_policy_rows(run, _runtime_rows(worse[2:]))
    again = load_run(run.path)
    assert sum(is_runtime_row(r) for r in again.policies.itertuples(index=False)) == 4
    p = Projector(again)
    assert p.calibration.source == "onnxruntime"
    assert p.band_method.startswith("projected for onnxruntime")
    assert {v.name for v in p.validations} == {f"{n} (onnxruntime)" for n, *_ in ENGINE}
    codes = np.array([1, 1, 0])  # A8 B8: the engine measured 0.878, onnxruntime 0.858
    assert p.project(codes).metric < engine.project(codes).metric
    assert abs(p.project(codes).metric - 0.858) < abs(engine.project(codes).metric - 0.858)


def test_analyze_verifies_policies_in_onnxruntime_and_fits_to_them(digits_run):
    verified = digits_run.policies[digits_run.policies["kind"] == "verified"]
    assert len(verified) == 2 + 4  # the uniform policies and four random ones (the default)
    assert verified["measured_on"].str.startswith("onnxruntime").all()
    assert digits_run.meta["runtime_check"]["verified"] == 6
    assert Projector(digits_run).band_method.startswith("projected for onnxruntime")
    engine = digits_run.policies.set_index("name")
    for r in verified.itertuples(index=False):  # the engine simulates what the runtime runs
        assert r.loss == pytest.approx(engine.loss[r.name.removesuffix(" (onnxruntime)")], abs=5e-3)
