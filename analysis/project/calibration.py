"""Projection v2: calibrated on measured mixed policies, with a cross-validated error.

The additive quantity is each layer's *penalty*: its KL divergence to the FP32 outputs
when the task has one (classifiers), else its loss increase clipped at zero (e.g. the
normalised squared error of embeddings). Unlike a loss against labels, a penalty cannot
be negative by chance, so summing it over layers does not reward noise.

    projected penalty(policy) = a * sum of per-layer penalties
    projected metric(policy)  = g(projected penalty)

``a`` (the interaction factor: 1 means layers' errors simply add up) is the median of
measured-over-summed penalty across the measured whole-model policies (uniform formats
and the K random mixed policies of the sweep); ``g`` is a monotone (isotonic) fit of the
metric against the penalty through every measured point (the baseline, each single-layer
job, each whole-model policy). The error band comes from leave-one-out cross-validation
over the measured whole-model policies: each is projected with ``a`` and ``g`` refitted
without it; the band is the largest absolute error, the mean absolute error is reported too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from analysis.project.curve import LossToMetric

MIN_POLICIES = 3  # fewer measured mixed policies than this: no cross-validated calibration


@dataclass(frozen=True)
class CVResult:
    name: str
    measured_metric: float
    projected_metric: float
    error: float
    held_out: bool = True


class PenaltyMap:
    """``metric = g(a * summed penalty)`` fitted on points and measured policies."""

    def __init__(self, pen_points: np.ndarray, metric_points: np.ndarray, policy_sums: np.ndarray,
                 policy_pens: np.ndarray, higher_is_better: bool, bounds: tuple[float, float] | None = None) -> None:
        ok = (policy_sums > 0) & np.isfinite(policy_pens)
        ratios = policy_pens[ok] / policy_sums[ok]
        self.a = float(np.median(ratios)) if ok.any() else 1.0
        self.g = LossToMetric(pen_points, metric_points, higher_is_better, bounds)  # baseline first: anchored
        self.max_penalty = self.g.max_loss

    def __call__(self, penalty_sum: float) -> float:
        return self.g(self.a * penalty_sum)


class Calibration:
    """Everything projection v2 needs from a Run: per-layer penalties, the map, its validation."""

    def __init__(self, penalty: np.ndarray, base_metric: float, single_pen: np.ndarray, single_metric: np.ndarray,
                 policies: list[tuple[str, np.ndarray, float, float]], higher_is_better: bool, kind: str,
                 source: str = "engine", bounds: tuple[float, float] | None = None) -> None:
        """
        Args:
            penalty: (layers, formats) per-layer penalties (0 for fp32 and for unavailable cells).
            single_pen / single_metric: the single-layer jobs' measured penalty and metric.
            policies: (name, codes, measured metric, measured penalty) per measured whole-model policy.
            source: where those policies were measured: "onnxruntime" (the model as shipped) or "engine"
                (the sweep's fake-quant).
        """
        self.penalty, self.kind, self.higher_is_better, self.source = penalty, kind, higher_is_better, source
        self.bounds = bounds
        self.rows = np.arange(penalty.shape[0])
        self.names = [p[0] for p in policies]
        self.codes = [p[1] for p in policies]
        sums = np.array([self.sum(c) for c in self.codes])
        metrics = np.array([p[2] for p in policies])
        pens = np.array([p[3] for p in policies])
        self._data = (base_metric, single_pen, single_metric, sums, metrics, pens)
        self.map = self._fit(np.ones(len(policies), dtype=bool))
        self.validations = []
        for k in range(len(policies)):
            keep = np.ones(len(policies), dtype=bool)
            keep[k] = False
            fit = self._fit(keep)
            proj = fit(sums[k])
            self.validations.append(CVResult(self.names[k], float(metrics[k]), proj, proj - float(metrics[k])))
        errs = np.array([abs(v.error) for v in self.validations])
        self.band = float(errs.max()) if len(errs) else None
        self.mae = float(errs.mean()) if len(errs) else None
        self.max_measured_sum = float(sums.max()) if len(sums) else 0.0

    def _fit(self, keep: np.ndarray) -> PenaltyMap:
        base_metric, sp, sm, sums, metrics, pens = self._data
        pen_pts = np.concatenate([[0.0], sp, pens[keep]])
        met_pts = np.concatenate([[base_metric], sm, metrics[keep]])
        return PenaltyMap(pen_pts, met_pts, sums[keep], pens[keep], self.higher_is_better, self.bounds)

    def sum(self, codes: np.ndarray) -> float:
        return float(self.penalty[self.rows, np.asarray(codes, dtype=np.intp)].sum())

    def nearest(self, codes: np.ndarray) -> tuple[str, float]:
        """The measured policy closest to ``codes`` and the share of layers that differ from it."""
        codes = np.asarray(codes)
        best = ("fp32", float(np.mean(codes != 0)))  # the baseline is measured too
        for name, c in zip(self.names, self.codes):
            d = float(np.mean(codes != c))
            if d < best[1]:
                best = (name, d)
        return best

    def method(self) -> str:
        what = "KL divergence to the FP32 outputs" if self.kind == "kl" else "loss increase"
        where = ("projected for onnxruntime: fitted to policies verified in onnxruntime" if self.source == "onnxruntime"
                 else "projected for the engine's fake-quant (no policies verified in onnxruntime yet)")
        return (f"{where}; {what} summed over layers, scaled by a = {self.map.a:.3g} and mapped to the metric by an "
                f"isotonic fit; band = largest leave-one-out error over {len(self.validations)} measured policies "
                f"({', '.join(self.names)}); mean absolute error {self.mae:.3g}")


def penalty_array(sens_rows, index: dict[str, int], n_formats: int, format_code: dict[str, int], use_kl: bool) -> np.ndarray:
    """(layers, formats) penalties from the sensitivity table's ok rows."""
    pen = np.zeros((len(index), n_formats))
    for r in sens_rows.itertuples(index=False):
        i, f = index.get(r.layer), format_code.get(r.format)
        if i is None or f is None or r.status != "ok":
            continue
        v = r.kl if use_kl else max(r.loss_delta, 0.0)
        pen[i, f] = v if math.isfinite(v) else 0.0
    return pen
