"""The monotone map from summed loss (or penalty) to the task metric, through measured points.

More loss never helps: the metric falls with loss when higher is better and rises otherwise,
so the map is an isotonic regression (scikit-learn's), anchored at the FP32 baseline.
"""
from __future__ import annotations

import numpy as np
from sklearn.isotonic import IsotonicRegression


def isotonic(x: np.ndarray, y: np.ndarray, increasing: bool,
             weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Weighted isotonic fit of y on x; returns the unique sorted x and the fitted y there."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    fit = IsotonicRegression(increasing=increasing).fit(x, y, sample_weight=weight)
    ux = np.unique(x)
    return ux, fit.predict(ux)


class LossToMetric:
    """Monotone map loss -> metric through measured points; the first point (the baseline) is an anchor."""

    ANCHOR = 1e12  # the baseline's weight: the map passes through it, so FP32 projects to the measured FP32

    def __init__(self, loss: np.ndarray, metric: np.ndarray, higher_is_better: bool,
                 bounds: tuple[float, float] | None = None) -> None:
        ok = np.isfinite(loss) & np.isfinite(metric)
        if not ok[0]:
            raise ValueError("the baseline (loss, metric) must be finite to fit the loss -> metric map")
        weight = np.ones(len(loss))
        weight[0] = self.ANCHOR
        self.x, self.y = isotonic(loss[ok], metric[ok], increasing=not higher_is_better, weight=weight[ok])
        self.max_loss = float(self.x[-1])

        # beyond the largest measured loss: continue along the chord of the whole fit
        span = self.x[-1] - self.x[0]
        self.tail_slope = float((self.y[-1] - self.y[0]) / span) if span > 0 else 0.0
        self.bounds = bounds  # the metric's own range (cosine -1..1, accuracy 0..1): the tail stops there

    def __call__(self, loss: float) -> float:
        if loss > self.max_loss:
            y = float(self.y[-1] + self.tail_slope * (loss - self.max_loss))
            return y if self.bounds is None else min(max(y, self.bounds[0]), self.bounds[1])
        return float(np.interp(loss, self.x, self.y))
