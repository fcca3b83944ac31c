"""The best policy under a budget, exactly, as a mixed-integer program; Pareto frontiers.

Each layer takes exactly one format (one binary per allowed layer x format). The
projection is monotone in the summed per-layer penalty (see ``analysis.project.projection``),
so "best projected metric" is "least summed penalty":

* ``max_bytes`` / ``max_latency_ms``: minimise the penalty subject to size / latency;
* ``max_drop``: minimise size (or latency) subject to penalty <= the largest penalty
  whose projected metric, less its error band, stays within ``max_drop`` of FP32: the
  budget holds for the pessimistic end of the band, so what ``verify`` measures stays in it.

Latency is part of every search: where the Run measured it, a policy projected slower
than FP32 is never returned for a size or drop budget unless ``allow_slower`` says so.
Layers in one coupled group (they read one tensor, which the runtime quantizes once for
formats with a calibrated input quantizer) can be required to share such a format.
``scipy.optimize.milp`` (HiGHS) solves it to proven optimality; a budget nothing meets
is answered with the smallest / fastest value that can be reached.
"""
from __future__ import annotations

import math
from collections.abc import Callable
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
    notes: tuple[str, ...] = ()  # what the user should know about how the budget was applied

    def layers(self, names: list[str]) -> dict[str, str]:
        """``{layer: format}`` for the non-fp32 layers."""
        return {n: POLICY_FORMATS[c] for n, c in zip(names, self.codes) if c != 0}


def _variables(p: Projector):
    i, f = np.nonzero(p.allowed)
    return i, f


class _Infeasible(Exception):
    """The MILP has no solution under its rows (the caller says which budget and what is reachable)."""


def _solve(p: Projector, cost: np.ndarray, rows: list[tuple[np.ndarray, float]], groups: list[list[int]] | None,
           what: str) -> tuple[np.ndarray, bool]:
    """Minimise ``cost . x`` subject to one format per layer, ``row . x <= ub`` for each row, and groups;
    the codes and whether they are proven optimal (False: the time limit ended the search)."""
    vi, vf = _variables(p)
    nv, n = len(vi), len(p.names)
    A_rows, A_cols, A_vals, lo, hi = [], [], [], [], []
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
            for f in p.shared_input_codes:  # weight-only and dynamic formats quantize no shared tensor
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
               options={"time_limit": 30.0, "mip_rel_gap": 0.0})
    if res.status == 2:
        raise _Infeasible(what)
    if res.x is None or res.status not in (0, 1):
        raise SearchError(f"{what}: the solver stopped without a policy ({res.message.strip()})")
    codes = np.zeros(n, dtype=np.int8)
    chosen = res.x > 0.5
    codes[vi[chosen]] = vf[chosen]
    return codes, res.status == 0


def _penalty_limit(p: Projector, max_drop: float, band: float) -> float:
    """The largest summed penalty whose projected metric, ``band`` worse, is within ``max_drop`` of FP32."""
    margin = max_drop - band
    target = p.base_metric - margin if p.higher_is_better else p.base_metric + margin
    ok = (lambda m: m >= target - 1e-12) if p.higher_is_better else (lambda m: m <= target + 1e-12)
    worst = float(np.where(p.allowed, p.penalty, -np.inf).max(axis=1).clip(min=0).sum())
    lo, hi = 0.0, max(worst, 1e-300)
    if ok(p.metric_of_penalty(hi)):
        return hi
    if not ok(p.metric_of_penalty(0.0)):
        return 0.0  # only policies with no projected penalty at all (FP32 and layers that change nothing)
    for _ in range(100):  # bisection on a monotone map
        mid = (lo + hi) / 2
        if ok(p.metric_of_penalty(mid)):
            lo = mid
        else:
            hi = mid
    return lo


def _size_text(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:.3f} MB" if n_bytes >= 100_000 else f"{n_bytes:,.0f} B"


def _latency_known(p: Projector) -> bool:
    return p.fp32_latency_ms is not None and bool(np.isfinite(p.latency[p.allowed]).all())


def _reachable(p: Projector, groups, key: str, budget_rows: list[tuple[np.ndarray, float]]) -> str:
    """The smallest size or latency any policy reaches under the other rows, as a phrase for an error."""
    vi, vf = _variables(p)
    cost = p.bytes[vi, vf].astype(float) if key == "size" else p.latency[vi, vf] - p.latency[vi, 0]
    try:
        codes, _ = _solve(p, cost, budget_rows, groups, key)
    except _Infeasible:
        return ""
    pr = p.project(codes)
    if key == "size":
        return f"the smallest reachable is {_size_text(pr.bytes)}"
    return f"the fastest reachable is {pr.latency_ms:.3f} ms"


def best_policy(p: Projector, *, max_bytes: float | None = None, max_latency_ms: float | None = None,
                max_drop: float | None = None, minimize: str = "size", groups: list[list[int]] | None = None,
                allow_slower: bool = False, drop_text: Callable[[float], str] | None = None) -> SearchResult:
    """The exact optimum of the projection under the given budget(s).

    Args:
        max_bytes / max_latency_ms: maximise the projected metric within these.
        max_drop: with neither of the above, minimise ``minimize`` ("size" | "latency") subject to a
            projected metric within ``max_drop`` (metric units, e.g. 0.01 = one point of accuracy) of FP32
            at the pessimistic end of the projection's band (projected - band for higher-is-better metrics).
        groups: lists of layer indices that must share a format whose input quantizer is calibrated.
        allow_slower: return policies projected slower than FP32 (without a latency budget they are
            excluded wherever the Run measured latency).
        drop_text: how messages write a drop (metric units in, words out) in the unit the user typed it,
            e.g. ``lambda d: f"{d * 100:g} points"`` where the budget was given in percentage points.

    Raises:
        SearchError: a malformed budget, or one no policy meets (the message says what is reachable).
    """
    if max_bytes is None and max_latency_ms is None and max_drop is None:
        raise SearchError("give a budget: max size, max latency or max drop")
    if minimize not in ("size", "latency"):
        raise SearchError(f"minimize '{minimize}': use size or latency")
    say_drop = drop_text or (lambda d: f"{d:.4g}")
    vi, vf = _variables(p)
    rows, budget, notes = [], {}, []
    lat = p.latency[vi, vf]
    latency_known = _latency_known(p)
    needs_latency = max_latency_ms is not None or (max_drop is not None and max_bytes is None and minimize == "latency")
    if needs_latency and not latency_known:
        raise SearchError("latency budget: this Run has no measured per-layer latency for every layer and format")
    speed_rows = []
    if max_latency_ms is not None:
        if max_latency_ms <= 0:
            raise SearchError(f"max latency {max_latency_ms}: must be positive")
        speed_rows.append((lat - p.latency[vi, 0], float(max_latency_ms) - p.fp32_latency_ms))
        budget["max_latency_ms"] = max_latency_ms
    elif latency_known and not allow_slower:
        speed_rows.append((lat - p.latency[vi, 0], 1e-9))  # no slower than FP32 (projected)
        notes.append("policies projected slower than FP32 were left out (allow them with allow_slower / "
                     "--allow-slower)")
    elif not latency_known:
        notes.append("latency was not measured for this Run: the policy may run slower than FP32; "
                     "verify it (quantlens verify)")
    size_rows = []
    if max_bytes is not None:
        if max_bytes <= 0:
            raise SearchError(f"max size {max_bytes}: must be positive")
        size_rows.append((p.bytes[vi, vf].astype(float), float(max_bytes) - p.other_bytes))
        budget["max_bytes"] = max_bytes
    drop_rows = []
    if max_drop is not None:
        if max_drop < 0:
            raise SearchError(f"max drop {say_drop(max_drop)}: must be >= 0")
        band = p.band or 0.0
        if p.band is None:
            notes.append("the projection's error is unknown (no measured policy validates it): the drop budget "
                         "holds for the projected value only")
        elif band >= max_drop:
            notes.append(f"the projection's band (±{say_drop(band)}) is as wide as the drop budget ({say_drop(max_drop)}): only "
                         f"policies projected equal to FP32 qualify; measure more policies to narrow it")
        drop_rows.append((p.penalty[vi, vf], _penalty_limit(p, max_drop, band)))
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
    try:
        codes, optimal = _solve(p, cost, speed_rows + size_rows + drop_rows, groups, what)
    except _Infeasible:
        raise SearchError(_infeasible_message(p, groups, budget, speed_rows, size_rows, drop_rows, allow_slower,
                                              say_drop)) from None
    if not optimal:
        notes.append("the solver's time limit (30 s) ended the search: the policy meets the budget but is not "
                     "proven the best")
    return SearchResult(codes, p.project(codes), objective, budget, tuple(notes))


def _infeasible_message(p: Projector, groups, budget: dict, speed_rows, size_rows, drop_rows, allow_slower,
                        say_drop: Callable[[float], str]) -> str:
    """Which budget cannot be met, and the best value reachable under the others."""
    parts = []
    if "max_bytes" in budget:
        reach = _reachable(p, groups, "size", speed_rows + drop_rows)
        parts.append(f"max size {_size_text(budget['max_bytes'])}: no policy fits"
                     + (" that runs no slower than FP32" if speed_rows and "max_latency_ms" not in budget else "")
                     + (f"; {reach}" if reach else ""))
    if "max_latency_ms" in budget:
        reach = _reachable(p, groups, "latency", size_rows + drop_rows)
        parts.append(f"max latency {budget['max_latency_ms']:g} ms: no policy is that fast"
                     + (f"; {reach}" if reach else ""))
    if not parts:
        parts.append(f"max drop {say_drop(budget['max_drop'])}: no policy meets it")
    if speed_rows and "max_latency_ms" not in budget and not allow_slower:
        parts.append("slower-than-FP32 policies were left out (--allow-slower admits them)")
    return "; ".join(parts)


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
            r = best_policy(p, groups=groups, allow_slower=True, **{key: float(b) * (1 + 1e-12)})
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
