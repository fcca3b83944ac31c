"""The MILP finds the exact optimum of the projection (checked by brute force), honours groups and budgets."""
import copy
import itertools
import json

import numpy as np
import pytest

from analysis.cli.main import main
from analysis.store.policy import from_json, match_policy
from analysis.project.projection import Projector
from analysis.project.search import SearchError, best_policy, pareto_frontier
from analysis.store.synthetic import explicit_run


@pytest.fixture(scope="module")
def pj(digits_run):
    return Projector(digits_run)


def _all_policies(p):
    options = [np.nonzero(p.allowed[i])[0] for i in range(len(p.names))]
    return [np.array(c) for c in itertools.product(*options)]


@pytest.mark.parametrize("budget_kb", [75, 90, 120, 200, 300, 430])
@pytest.mark.parametrize("allow_slower", [True, False])
def test_size_budget_optimum_matches_brute_force(pj, budget_kb, allow_slower):
    fits = [c for c in _all_policies(pj) if pj.size(c) <= budget_kb * 1000]
    if not allow_slower:  # the measured latencies decide; policies within the solver's tolerance of FP32 may go either way
        fast = [c for c in fits if pj.latency_ms(c) <= pj.fp32_latency_ms - 1e-6]
        fits = [c for c in fits if pj.latency_ms(c) <= pj.fp32_latency_ms + 1e-6]
        if not fits:
            with pytest.raises(SearchError, match="no policy fits that runs no slower than FP32; the smallest reachable"):
                best_policy(pj, max_bytes=budget_kb * 1000)
            return
    res = best_policy(pj, max_bytes=budget_kb * 1000, allow_slower=allow_slower)
    assert res.projection.bytes <= budget_kb * 1000
    got = float(pj.penalty[pj.rows, res.codes].sum())
    assert got == pytest.approx(min(float(pj.penalty[pj.rows, c].sum()) for c in fits), rel=1e-9, abs=1e-15) or (
        not allow_slower and fast and got <= min(float(pj.penalty[pj.rows, c].sum()) for c in fast) * (1 + 1e-9))
    assert allow_slower or res.projection.latency_ms <= pj.fp32_latency_ms + 1e-6


# Three layers whose every number is given, so each budget's answer is worked out by hand. The projection
# (v1: no random mixes) maps loss to accuracy through the points below, all on one falling line segment
# chain: (0.30, 0.90) fp32, (0.31, 0.895) A8, (0.32, 0.89) B8, (0.35, 0.87) B4, (0.50, 0.78) C8, (0.60, 0.70) A4,
# (0.90, 0.50) C4. Layer -> format -> (bytes, loss change, accuracy with only that layer quantized).
KNOWN = {"A": {"fp32": (1000, 0, 0), "int8": (250, 0.01, 0.895), "int4": (130, 0.30, 0.70)},
         "B": {"fp32": (2000, 0, 0), "int8": (500, 0.02, 0.89), "int4": (260, 0.05, 0.87)},
         "C": {"fp32": (400, 0, 0), "int8": (100, 0.20, 0.78), "int4": (50, 0.60, 0.50)}}


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    run = explicit_run(tmp_path_factory.mktemp("known") / "run", KNOWN, baseline=(0.30, 0.90))
    p = Projector(run)
    assert p.calibration is None
    return run, p


@pytest.mark.parametrize("max_bytes, codes", [
    (440, [2, 2, 2]),   # the smallest model there is (130 + 260 + 50): the only one that fits
    (700, [1, 2, 1]),   # 610 B, loss +0.26 (the other fits: 2,2,2 +0.95; 1,2,2 +0.66; 2,1,2 +0.92; 2,2,1 +0.55)
    (900, [1, 1, 1]),   # 850 B, +0.23
    (1000, [1, 2, 0]),  # 910 B, +0.06
    (1200, [1, 1, 0]),  # 1150 B, +0.03
    (3400, [0, 0, 0]),  # FP32 fits: nothing lost
])
def test_size_budget_has_the_answer_worked_out_by_hand(known, max_bytes, codes):
    assert best_policy(known[1], max_bytes=max_bytes).codes.tolist() == codes


@pytest.mark.parametrize("max_drop, codes, size", [
    (0.002, [0, 0, 0], 3400),  # accuracy >= 0.898: loss <= 0.304, no layer's change is that small
    (0.008, [1, 0, 0], 2650),  # >= 0.892: loss change <= 0.016, A8 (+0.01) alone
    (0.012, [0, 1, 0], 1900),  # >= 0.888: <= 0.023, B8 (+0.02) is smaller than A8
    (0.025, [1, 1, 0], 1150),  # >= 0.875: <= 0.0425, A8 + B8 (+0.03)
    (0.06, [1, 2, 0], 910),    # >= 0.84: <= 0.10, A8 + B4 (+0.06)
    (0.15, [1, 1, 1], 850),    # >= 0.75: <= 0.2375, A8 + B8 + C8 (+0.23)
])
def test_max_drop_has_the_answer_worked_out_by_hand(known, max_drop, codes, size):
    res = best_policy(known[1], max_drop=max_drop)
    assert res.codes.tolist() == codes and res.projection.bytes == size
    assert 0.90 - res.projection.metric <= max_drop


def test_search_cli_follows_the_budget(known, tmp_path, capsys):
    run = known[0]

    def search(*budget):
        out = tmp_path / "p.json"
        code = main(["search", str(run.path), *budget, "--out", str(out)])
        return code, (json.loads(out.read_text())["layers"] if code == 0 else None)

    assert search("--max-drop", "0.025") == (0, {"A": "int8", "B": "int8", "C": "fp32"})
    assert search("--max-drop", "0.06") == (0, {"A": "int8", "B": "int4", "C": "fp32"})  # looser: smaller
    assert search("--max-drop", "0.002") == (0, {"A": "fp32", "B": "fp32", "C": "fp32"})  # tighter: FP32
    assert search("--max-size-mb", "0.000445") == (0, {"A": "int4", "B": "int4", "C": "int4"})
    assert search("--max-size-mb", "0.0009") == (0, {"A": "int8", "B": "int8", "C": "int8"})  # looser: better
    capsys.readouterr()
    assert search("--max-size-mb", "0.000439")[0] == 2  # below the smallest model
    assert "max size 439 B: no policy fits; the smallest reachable is 440 B" in capsys.readouterr().err


def test_groups_tie_only_formats_whose_input_quantizer_is_shared(known):
    _, p = known
    assert p.shared_input_codes == [1]  # int8 quantizes the tensor A and B read; int4 is weight-only
    assert [int(c) for c in best_policy(p, max_drop=0.06).codes] == [1, 2, 0]
    # grouped, A at int8 means B at int8 too: the smallest within the drop is then A8 B8
    assert [int(c) for c in best_policy(p, max_drop=0.06, groups=[[0, 1]]).codes] == [1, 1, 0]
    p.shared_input_codes = []  # e.g. dynamic int8, quantized per call: nothing to share, nothing tied
    try:
        assert [int(c) for c in best_policy(p, max_drop=0.06, groups=[[0, 1]]).codes] == [1, 2, 0]
    finally:
        p.shared_input_codes = [1]


def test_infeasible_budgets_say_what_is_reachable(pj):
    smallest = pj.other_bytes + int(np.where(pj.allowed, pj.bytes, np.iinfo(np.int64).max).min(axis=1).sum())
    assert smallest < 100_000  # reported in bytes
    with pytest.raises(SearchError, match=f"max size 1,000 B: no policy fits; the smallest reachable is "
                                          f"{smallest:,} B$"):
        best_policy(pj, max_bytes=1000, allow_slower=True)
    with pytest.raises(SearchError, match="give a budget"):
        best_policy(pj)
    fastest = pj.fp32_latency_ms + float(np.where(pj.allowed, pj.latency - pj.latency[:, :1], np.inf).min(axis=1).sum())
    with pytest.raises(SearchError, match=f"max latency 1e-06 ms: no policy is that fast; the fastest reachable is "
                                          f"{fastest:.3f} ms"):
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
    # fitted to what onnxruntime measured: the uniform policies and four random ones analyze verified
    assert len(pj.validations) == 6 and pj.band is not None
    assert all(v.name.endswith(" (onnxruntime)") for v in pj.validations)
    assert "leave-one-out" in pj.band_method and pj.band_method.startswith("projected for onnxruntime")
    # a measured policy projects from a fit that never saw it
    v = pj.validations[0]
    assert v.held_out and np.isfinite(v.projected_metric)


def test_search_cli_writes_a_policy_the_run_accepts(digits_run, tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["search", str(digits_run.path), "--max-size-mb", "0.12", "--allow-slower", "--out", str(out)]) == 0
    assert "projected accuracy" in capsys.readouterr().out
    m = match_policy(from_json(out.read_bytes()), digits_run)
    assert m.clean and Projector(digits_run).size(m.codes) <= 120_000
    assert main(["search", str(digits_run.path), "--max-size-mb", "0.001", "--out", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()


def test_a_drop_budget_holds_at_the_pessimistic_end_of_the_band(tmp_path):
    # all-int8 measured 0.746 where the map without its point projects 0.756: the band is 0.01
    run = explicit_run(tmp_path / "run", KNOWN, baseline=(0.30, 0.90),
                       measured=[("all-int8", "uniform", {"A": "int8", "B": "int8", "C": "int8"}, 0.53, 0.746)])
    p = Projector(run)
    assert p.band == pytest.approx(0.01)
    res = best_policy(p, max_drop=0.025)
    # A8 B8 projects 0.8833 (drop 0.0167), but 0.8833 - 0.01 is beyond the budget: B8 alone (0.89) is the smallest
    assert [int(c) for c in res.codes] == [0, 1, 0]
    assert res.projection.metric - res.projection.band >= 0.90 - 0.025
    narrow = best_policy(p, max_drop=0.005)  # the band is wider than what is left: FP32, and it says why
    assert [int(c) for c in narrow.codes] == [0, 0, 0]
    assert any("only policies projected equal to FP32 qualify" in n for n in narrow.notes)


def test_size_and_drop_searches_leave_out_slower_than_fp32_policies(pj):
    q = copy.deepcopy(pj)  # latencies set by hand: the measured ones depend on this machine's CPU
    q.latency = np.where(q.allowed, 0.0, np.nan)
    q.latency[:, 0] = 0.1
    q.latency[:, 1] = 0.05  # int8 a little faster than fp32 on every layer,
    q.latency[:, 2] = np.where(q.allowed[:, 2], 0.5, np.nan)  # int4 much slower (like blocked int4 convolutions)
    q.fp32_latency_ms = 0.1 * len(q.names)
    for res in (best_policy(q, max_drop=0.05), best_policy(q, max_bytes=q.fp32_bytes * 0.5)):
        assert res.projection.latency_ms <= q.fp32_latency_ms + 1e-9
        assert any("slower than FP32 were left out" in n for n in res.notes)
    smallest = best_policy(q, max_bytes=q.fp32_bytes * 0.2, allow_slower=True)
    assert smallest.projection.latency_ms > q.fp32_latency_ms
    with pytest.raises(SearchError, match="no policy fits that runs no slower than FP32; the smallest reachable"):
        best_policy(q, max_bytes=q.fp32_bytes * 0.2)
