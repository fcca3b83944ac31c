"""The MILP finds the exact optimum of the projection (checked by brute force), honours groups and budgets."""
import itertools
import json

import numpy as np
import pytest

from analysis.cli.main import main
from analysis.store.policy import from_json, match_policy
from analysis.project.projection import Projector
from analysis.project.search import SearchError, best_policy, pareto_frontier


@pytest.fixture(scope="module")
def pj(digits_run):
    return Projector(digits_run)


def _all_policies(p):
    options = [np.nonzero(p.allowed[i])[0] for i in range(len(p.names))]
    return [np.array(c) for c in itertools.product(*options)]


@pytest.mark.parametrize("budget_kb", [75, 90, 120, 200, 300, 430])
def test_size_budget_optimum_matches_brute_force(pj, budget_kb):
    feasible = [c for c in _all_policies(pj) if pj.size(c) <= budget_kb * 1000]
    best = min(float(pj.penalty[pj.rows, c].sum()) for c in feasible)
    res = best_policy(pj, max_bytes=budget_kb * 1000)
    assert res.projection.bytes <= budget_kb * 1000
    assert float(pj.penalty[pj.rows, res.codes].sum()) == pytest.approx(best, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("drop", [0.0, 0.001, 0.01])
def test_max_drop_gives_the_smallest_model_within_the_drop(pj, drop):
    res = best_policy(pj, max_drop=drop)
    assert pj.base_metric - res.projection.metric <= drop + 1e-12
    ok = [c for c in _all_policies(pj) if pj.base_metric - pj.metric_of_penalty(float(pj.penalty[pj.rows, c].sum())) <= drop + 1e-12]
    assert res.projection.bytes == min(pj.size(c) for c in ok)


def test_groups_force_one_format(pj):
    res = best_policy(pj, max_bytes=150_000, groups=[[1, 2, 3]])
    assert len(set(res.codes[[1, 2, 3]].tolist())) == 1


def test_infeasible_and_missing_budgets_are_errors(pj):
    with pytest.raises(SearchError, match="no policy meets it"):
        best_policy(pj, max_bytes=1000)
    with pytest.raises(SearchError, match="give a budget"):
        best_policy(pj)
    with pytest.raises(SearchError, match="no policy meets it"):
        best_policy(pj, max_latency_ms=1e-6)


def test_latency_budget_uses_measured_per_layer_latency(pj):
    budget = pj.fp32_latency_ms * 0.97
    res = best_policy(pj, max_latency_ms=budget)
    assert res.projection.latency_ms <= budget + 1e-9
    fastest = best_policy(pj, max_drop=0.01, minimize="latency")
    assert fastest.projection.latency_ms <= res.projection.latency_ms + 1e-9


def test_frontier_is_non_dominated_and_spans_sizes(pj):
    front = pareto_frontier(pj, "size", points=25)
    sizes = [r.projection.bytes for r in front]
    metrics = [r.projection.metric for r in front]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    assert all(b > a for a, b in zip(metrics, metrics[1:]))  # strictly better metric for more bytes
    assert front[0].projection.bytes <= pj.size(np.array([1, 2, 2, 2, 2, 2, 2]))


def test_calibrated_projection_is_cross_validated(digits_run, pj):
    assert pj.calibration is not None
    kinds = digits_run.policies.set_index("name")["kind"]
    assert (kinds == "random").sum() == 8
    assert len(pj.validations) == 10 and pj.band == max(abs(v.error) for v in pj.validations)
    assert "leave-one-out" in pj.band_method
    # a measured policy projects from a fit that never saw it
    v = pj.validations[0]
    assert v.held_out and np.isfinite(v.projected_metric)


def test_search_cli_writes_a_policy_the_run_accepts(digits_run, tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["search", str(digits_run.path), "--max-size-mb", "0.12", "--out", str(out)]) == 0
    assert "projected accuracy" in capsys.readouterr().out
    m = match_policy(from_json(out.read_bytes()), digits_run)
    assert m.clean and Projector(digits_run).size(m.codes) <= 120_000
    assert main(["search", str(digits_run.path), "--max-size-mb", "0.001", "--out", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()
