"""A time budget for per-layer latency: layers left untimed are recorded as not measured (NaN, with the
reason), never as zero or as an earlier measurement, and projections say their latency is unknown."""
import json
import shutil
import time

import numpy as np
import pytest
import torch

import analysis.runtime.latency as latency
from analysis.api import Projector, SearchError, best_policy, load_run
from analysis.cli.main import main
from analysis.store.policy import FORMAT_CODE

torch.set_num_threads(1)


def test_out_of_budget_looks_at_the_time_left_and_the_jobs_so_far():
    now = time.perf_counter()
    assert latency._out_of_budget(None, [1e9]) is False
    assert latency._out_of_budget(now - 1.0, []) is True
    assert latency._out_of_budget(now + 100.0, []) is False
    assert latency._out_of_budget(now + 100.0, [5.0, 7.0]) is False
    assert latency._out_of_budget(now + 3.0, [5.0, 7.0]) is True  # the next one would end past the deadline


@pytest.fixture
def run_copy(digits_run, tmp_path):
    """The digits Run with latency measured in full already (conftest), copied so it can be re-measured."""
    shutil.copytree(digits_run.path, tmp_path / "run")
    return load_run(tmp_path / "run")


def test_untimed_layers_are_nan_with_their_reason(run_copy, monkeypatch, capsys):
    before = run_copy.cost
    assert np.isfinite(before.loc[before["format"] != "fp32", "latency_ms"]).all()  # the full measurement
    calls = []

    def three_then_out(deadline, job_s):  # the budget allows exactly three single-layer models
        calls.append(len(job_s))
        return len(job_s) >= 3

    monkeypatch.setattr(latency, "_out_of_budget", three_then_out)
    meta = latency.measure_latency(run_copy, repeats=3, warmup=1, latency_budget=60.0, progress_bar=True,
                                   method="pairs")
    err = capsys.readouterr().err
    assert "latency" in err and "/13" in err  # the bar, over every single-layer model

    nm = meta["not_measured"]
    assert (nm["count"], nm["of"]) == (10, 13) and len(nm["layers"]) == 10
    assert nm["reason"] == "the latency budget of 60 s ran out after 3 of 13 single-layer models"
    assert meta["budget_s"] == 60.0 and load_run(run_copy.path).meta["latency"]["not_measured"] == nm

    cost = load_run(run_copy.path).cost.set_index(["layer", "format"])
    untimed = [tuple(k.split("|")) for k in nm["layers"]]
    timed = [(l, f) for l, f in cost.index if f != "fp32" and (l, f) not in untimed]
    assert len(timed) == 3
    for key in untimed:  # NaN, not the earlier measurement and not zero
        assert np.isnan(cost.loc[key, "latency_ms"]) and np.isnan(cost.loc[key, "latency_spread_ms"])
        assert cost.loc[key, "latency_source"] == f"not measured: {nm['reason']}"
    for key in timed:
        assert np.isfinite(cost.loc[key, "latency_ms"]) and "delta vs fp32" in cost.loc[key, "latency_source"]
    assert np.isfinite(cost.xs("fp32", level="format")["latency_ms"]).all()

    run = load_run(run_copy.path)
    p = Projector(run)
    names = run.layer_names
    fp32 = np.zeros(len(names), dtype=np.int8)
    assert p.project(fp32).latency_ms == pytest.approx(meta["fp32_ms"])
    one_timed = fp32.copy()
    l, f = timed[0]
    one_timed[names.index(l)] = FORMAT_CODE[f]
    assert np.isfinite(p.project(one_timed).latency_ms)
    one_untimed = fp32.copy()
    l, f = untimed[0]
    one_untimed[names.index(l)] = FORMAT_CODE[f]
    assert p.project(one_untimed).latency_ms is None  # unknown, not fp32 plus zero
    with pytest.raises(SearchError, match="no measured per-layer latency for every layer and format"):
        best_policy(p, max_latency_ms=meta["fp32_ms"])


def test_budget_must_be_positive(run_copy):
    with pytest.raises(ValueError, match="latency_budget=0: must be a positive number of seconds"):
        latency.measure_latency(run_copy, latency_budget=0)


def test_cli_budget_that_runs_out_leaves_a_run_that_still_projects_and_searches(tmp_path, capsys):
    out = tmp_path / "r"
    code = main(["analyze", "demo:digits", "--out", str(out), "--latency-budget", "0.001", "--verify-policies", "0",
                 "--latency-method", "pairs"])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert "the latency budget of 0.001 s ran out after 0 of 13 single-layer models" in cap.err
    assert "quantizes any of the other 13 (layer, format) pairs has no projected latency" in cap.out
    meta = json.loads((out / "run.json").read_text())["latency"]
    assert meta["not_measured"]["count"] == meta["not_measured"]["of"] == 13 and np.isfinite(meta["fp32_ms"])
    assert np.isfinite([u["ms"] for u in meta["uniform"].values()]).all()  # whole models are always timed
    run = load_run(out)
    q = run.cost[run.cost["format"] != "fp32"]
    assert q["latency_ms"].isna().all() and q["latency_source"].str.startswith("not measured: ").all()

    code = main(["search", str(out), "--max-latency-ms", "1.0", "--out", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no measured per-layer latency" in err
    code = main(["search", str(out), "--max-drop", "0.01", "--out", str(tmp_path / "p.json")])
    cap = capsys.readouterr()
    assert code == 0 and "latency" not in cap.out.split("wrote")[0]  # projected latency unknown: not printed
    code = main(["report", str(out), "--policy", str(tmp_path / "p.json"), "--format", "md",
                 "--out", str(tmp_path / "r.md")])
    assert code == 0, capsys.readouterr().err
