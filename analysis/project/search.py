"""The best policy under a budget, exactly, as a mixed-integer program; Pareto frontiers.

Each layer takes exactly one format (one binary per allowed layer x format). The
projection is monotone in the summed per-layer penalty (see ``analysis.project.projection``),
so "best projected metric" is "least summed penalty":

* ``max_bytes`` / ``max_latency_ms``: minimise the penalty subject to size / latency;
* ``max_drop``: minimise size (or latency) subject to penalty <= the largest penalty
  whose projected metric stays within ``max_drop`` of FP32.

Layers in one coupled group (they read one tensor, which a runtime quantizes once) can
be required to share a format. ``scipy.optimize.milp`` (HiGHS) solves it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from analysis.store.policy import POLICY_FORMATS
from analysis.project.projection import Projection, Projector
from analysis.errors import InputError


class SearchError(InputError):
    """No policy meets the budget, or the budget is malformed; the message names the budget."""


@dataclass(frozen=True)
class SearchResult:
    codes: np.ndarray  # one format code per layer, execution order
    projection: Projection
    objective: str
    budget: dict

    def layers(self, names: list[str]) -> dict[str, str]:
        """``{layer: format}`` for the non-fp32 layers."""
        return {n: POLICY_FORMATS[c] for n, c in zip(names, self.codes) if c != 0}


def _variables(p: Projector):
    i, f = np.nonzero(p.allowed)
    return i, f


def _solve(p: Projector, cost: np.ndarray, rows: list[tuple[np.ndarray, float]], groups: list[list[int]] | None,
           what: str) -> np.ndarray:
    """Minimise ``cost . x`` subject to one format per layer, ``row . x <= ub`` for each row, and groups."""
    vi, vf = _variables(p)
    nv, n = len(vi), len(p.names)
    A_rows, A_cols, A_vals, lo, hi = [], [], [], [], []
    r = 0
    # exactly one format per layer
    A_rows += vi.tolist()
    A_cols += list(range(nv))
    A_vals += [1.0] * nv
    lo += [1.0] * n
    hi += [1.0] * n
    r = n
    for coef, ub in rows:
        A_rows += [r] * nv
        A_cols += list(range(nv))
        A_vals += coef.tolist()
        lo.append(-np.inf)
        hi.append(ub)
        r += 1
    index = {(int(a), int(b)): k for k, (a, b) in enumerate(zip(vi, vf))}
    for g in groups or []:
        lead = g[0]
        for other in g[1:]:
            for f in range(len(POLICY_FORMATS)):
                a, b = index.get((lead, f)), index.get((other, f))
                if a is None and b is None:
                    continue
                if a is not None:
                    A_rows.append(r); A_cols.append(a); A_vals.append(1.0)  # noqa: E702
                if b is not None:
                    A_rows.append(r); A_cols.append(b); A_vals.append(-1.0)  # noqa: E702
                lo.append(0.0)
                hi.append(0.0)
                r += 1
    A = coo_matrix((A_vals, (A_rows, A_cols)), shape=(r, nv)).tocsr()
    res = milp(c=cost, constraints=LinearConstraint(A, lo, hi), integrality=np.ones(nv), bounds=Bounds(0, 1),
               options={"time_limit": 30.0})
    if res.x is None:
        raise SearchError(f"{what}: no policy meets it ({res.message.strip()})")
    codes = np.zeros(n, dtype=np.int8)
    chosen = res.x > 0.5
    codes[vi[chosen]] = vf[chosen]
    return codes


def _penalty_limit(p: Projector, max_drop: float) -> float:
    """The largest summed penalty whose projected metric is within ``max_drop`` of FP32."""
    target = p.base_metric - max_drop if p.higher_is_better else p.base_metric + max_drop
    ok = (lambda m: m >= target - 1e-12) if p.higher_is_better else (lambda m: m <= target + 1e-12)
    worst = float(np.where(p.allowed, p.penalty, -np.inf).max(axis=1).clip(min=0).sum())
    lo, hi = 0.0, max(worst, 1e-300)
    if ok(p.metric_of_penalty(hi)):
        return hi
    for _ in range(100):  # bisection on a monotone map
        mid = (lo + hi) / 2
        if ok(p.metric_of_penalty(mid)):
            lo = mid
        else:
            hi = mid
    return lo


def best_policy(p: Projector, *, max_bytes: float | None = None, max_latency_ms: float | None = None,
                max_drop: float | None = None, minimize: str = "size", groups: list[list[int]] | None = None) -> SearchResult:
    """The exact optimum of the projection under the given budget(s).

    Args:
        max_bytes / max_latency_ms: maximise the projected metric within these.
        max_drop: with neither of the above, minimise ``minimize`` ("size" | "latency") subject to a
            projected metric within ``max_drop`` (metric units, e.g. 0.01 = one point of accuracy) of FP32.
        groups: lists of layer indices that must share a format.
    """
    if max_bytes is None and max_latency_ms is None and max_drop is None:
        raise SearchError("give a budget: max size, max latency or max drop")
    vi, vf = _variables(p)
    rows, budget = [], {}
    if max_bytes is not None:
        if max_bytes <= 0:
            raise SearchError(f"max size {max_bytes}: must be positive")
        rows.append((p.bytes[vi, vf].astype(float), float(max_bytes) - p.other_bytes))
        budget["max_bytes"] = max_bytes
    lat = p.latency[vi, vf]
    needs_latency = max_latency_ms is not None or (max_drop is not None and minimize == "latency")
    if needs_latency and not (np.isfinite(lat).all() and p.fp32_latency_ms is not None):
        raise SearchError("latency budget: this Run has no measured per-layer latency for every layer and format")
    if max_latency_ms is not None:
        fp32 = p.latency[vi, 0]
        rows.append((lat - fp32, float(max_latency_ms) - p.fp32_latency_ms))
        budget["max_latency_ms"] = max_latency_ms
    if max_drop is not None:
        if max_drop < 0:
            raise SearchError(f"max drop {max_drop}: must be >= 0")
        rows.append((p.penalty[vi, vf], _penalty_limit(p, max_drop)))
        budget["max_drop"] = max_drop
    if max_bytes is None and max_latency_ms is None:
        objective = minimize
        cost = p.bytes[vi, vf].astype(float) if minimize == "size" else lat.copy()
        # tie-break towards the lower penalty without changing the optimum's size
        cost = cost + p.penalty[vi, vf] * (1e-9 * max(float(np.abs(cost).max()), 1.0) / max(float(np.abs(p.penalty).max()), 1e-30))
    else:
        objective = "metric"
        cost = p.penalty[vi, vf].copy()
        cost = cost + p.bytes[vi, vf] * (1e-9 * max(float(np.abs(cost).max()), 1e-30) / max(float(p.bytes.max()), 1.0))
    what = ", ".join(f"{k}={v}" for k, v in budget.items())
    codes = _solve(p, cost, rows, groups, what)
    return SearchResult(codes, p.project(codes), objective, budget)


def pareto_frontier(p: Projector, axis: str = "size", points: int = 40, groups: list[list[int]] | None = None) -> list[SearchResult]:
    """Non-dominated policies (projected metric vs size or latency), from the smallest to FP32."""
    if axis not in ("size", "latency"):
        raise SearchError(f"axis '{axis}': use size or latency")
    if axis == "size":
        lo = p.other_bytes + int(np.where(p.allowed, p.bytes, np.iinfo(np.int64).max).min(axis=1).sum())
        hi = p.fp32_bytes
        key = "max_bytes"
    else:
        if p.fp32_latency_ms is None or not np.isfinite(p.latency[p.allowed]).all():
            raise SearchError("latency frontier: this Run has no measured per-layer latency")
        delta = np.where(p.allowed, p.latency - p.latency[:, :1], np.inf)
        lo, hi = p.fp32_latency_ms + float(delta.min(axis=1).sum()), p.fp32_latency_ms + float(
            np.where(p.allowed, delta, -np.inf).max(axis=1).sum())
        key = "max_latency_ms"
    out: list[SearchResult] = []
    for b in np.linspace(lo, hi, points):
        try:
            r = best_policy(p, groups=groups, **{key: float(b) * (1 + 1e-12)})
        except SearchError:
            continue
        if out and np.array_equal(out[-1].codes, r.codes):
            continue
        out.append(r)
    # keep only non-dominated points
    better = (lambda a, b: a >= b) if p.higher_is_better else (lambda a, b: a <= b)
    front = []
    for r in sorted(out, key=lambda r: r.projection.bytes if axis == "size" else r.projection.latency_ms):
        if not front or not better(front[-1].projection.metric, r.projection.metric) or r.projection.metric != front[-1].projection.metric:
            if not front or better(r.projection.metric, front[-1].projection.metric):
                front.append(r)
    return front
