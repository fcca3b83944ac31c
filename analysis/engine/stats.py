"""Weight and activation statistics: histograms, calibrated ranges, clipping, SQNR.

Activations are streamed over the calibration batches in two passes (ranges, then
fixed-range histograms), so no activation tensor is kept beyond its batch.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from analysis.quant.formats import QuantFormat
from analysis.quant.act import ActivationStats, ActQuant
from analysis.quant.primitives import (HIST_BINS, StreamingHistogram, activation_range,
                                 fake_quantize_weight, qrange, sqnr_db)

STORED_BINS = 128  # bins kept in the Run (the 2048 fine bins are summed in groups)


def calibrate(model, stats: ActivationStats, formats: list[QuantFormat]) -> None:
    """Fill ``model.act_quant`` (input) and ``model.out_quant`` (output) for every layer and every format
    that quantizes activations from a calibrated range (dynamic formats take theirs from each tensor at
    run time)."""
    for info in model.layers():
        key = (info.name, "input")
        for fmt in formats:
            if fmt.activation is None or fmt.activation.dynamic:
                continue
            a = fmt.activation
            lo, hi = activation_range(a.observer, stats.ranges[key], stats.hists[key], a.bits, a.symmetric)
            model.act_quant[(info.name, fmt.name)] = ActQuant.from_range(lo, hi, a.bits, a.symmetric)
            # static integer kernels requantize their output too; a tensor's statistics give one quantizer
            # whichever layer records them, so a layer's output that is the next layer's input (one tensor,
            # one quantizer in onnxruntime) gets the same on both sides
            out = (info.name, "output")
            lo, hi = activation_range(a.observer, stats.ranges[out], stats.hists[out], a.bits, a.symmetric)
            model.out_quant[(info.name, fmt.name)] = ActQuant.from_range(lo, hi, a.bits, a.symmetric)


def _hist_row(layer: str, tensor: str, h: StreamingHistogram) -> dict:
    n = max(h.count, 1)
    mean = h.sum / n
    return {"layer": layer, "tensor": tensor, "lo": float(h.lo), "hi": float(h.hi),
            "counts": h.coarse(STORED_BINS).tolist(), "count": int(h.count), "mean": mean,
            "std": math.sqrt(max(h.sum_sq / n - mean**2, 0.0)), "absmax": float(max(abs(h.lo), abs(h.hi)))}


def _activation_sqnr(h: StreamingHistogram, aq: ActQuant) -> float:
    """SQNR of fake-quantizing the calibration values, read from the fine histogram."""
    c = torch.from_numpy(h.centers).float()
    n = torch.from_numpy(h.counts).double()
    err = (c - aq(c)).double()
    return sqnr_db(float((n * c.double() ** 2).sum()), float((n * err**2).sum()))


def statistics_tables(model, stats: ActivationStats, formats: list[QuantFormat]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ``histograms`` and ``clipping`` tables of a Run (no input row for dynamic formats: nothing is clipped
    to a calibrated range). Input and output rows carry their quantizer's ``scale`` and ``zero_point``:
    apply and verify hand those to onnxruntime instead of letting it calibrate again."""
    hist_rows, clip_rows = [], []
    for info in model.layers():
        W = model.weight(info.name)
        wh = StreamingHistogram(float(W.min()), float(W.max()), HIST_BINS)
        wh.update(W)
        hist_rows.append(_hist_row(info.name, "weight", wh))
        for tensor in ("input", "output"):
            hist_rows.append(_hist_row(info.name, tensor, stats.hists[(info.name, tensor)]))
        for fmt in formats:
            if fmt.weight is not None and model.skip_reason(info.name, fmt) is None:
                Wq = fake_quantize_weight(W, fmt.weight)
                clip_rows.append({"layer": info.name, "tensor": "weight", "format": fmt.name,
                                  "clip_lo": float(Wq.min()), "clip_hi": float(Wq.max()),
                                  "clipped_fraction": 0.0,  # min-max weight ranges never clip
                                  "sqnr_db": weight_sqnr(W, Wq)})
            if fmt.activation is not None and not fmt.activation.dynamic:
                qmin, qmax = qrange(fmt.activation.bits, fmt.activation.symmetric)
                for tensor, quantizers in (("input", model.act_quant), ("output", model.out_quant)):
                    aq = quantizers[(info.name, fmt.name)]
                    h = stats.hists[(info.name, tensor)]
                    lo = float((qmin - aq.zero) * aq.scale)
                    hi = float((qmax - aq.zero) * aq.scale)
                    clip_rows.append({"layer": info.name, "tensor": tensor, "format": fmt.name,
                                      "clip_lo": lo, "clip_hi": hi, "clipped_fraction": h.fraction_outside(lo, hi),
                                      "sqnr_db": _activation_sqnr(h, aq), "scale": float(aq.scale),
                                      "zero_point": int(aq.zero)})
    cols = ["layer", "tensor", "format", "clip_lo", "clip_hi", "clipped_fraction", "sqnr_db", "scale", "zero_point"]
    return pd.DataFrame(hist_rows), pd.DataFrame(clip_rows, columns=cols)


def weight_sqnr(W: torch.Tensor, W_q: torch.Tensor) -> float:
    W, W_q = W.double(), W_q.double()
    return sqnr_db(float((W**2).sum()), float(((W - W_q) ** 2).sum()))


def finite_or_nan(x: float) -> float:
    return x if np.isfinite(x) else float("nan")


def collect_activation_stats(model, calib_batches) -> ActivationStats:
    """Streamed ranges and histograms of every layer's input and output (the adapter observes)."""
    return model.activation_stats(calib_batches)
