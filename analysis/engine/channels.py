"""Per-output-channel weight statistics: the Run's optional ``channels`` table.

The output channel is axis 0 of the engine's weight layout, ``(out, in, *kernel)`` as every adapter's
``weight()`` returns it (a torch ConvTranspose's stored axis 1, an ONNX MatMul's or a ``transB=0`` Gemm's
stored axis 1, a Conv's axis 0): the same axis the engine's per-channel INT8 fake-quant scales along
(``PerChannel(0)``) and onnxruntime's per-channel quantization is handed (``analysis.runtime``), so the
chart and the measurements cannot disagree on what a channel is.

Per channel: min, max, absmax, mean, std, and per format with a weight spec the quantization step the
engine's format gives that channel (``step[FORMAT]``: per-channel -> its own step, per-group -> the largest
step among its groups, per-tensor -> the tensor's step) and the weight SQNR of that channel under the
engine's fake-quantized weight (``sqnr_db[FORMAT]``).

Size: a layer keeps one row per channel up to ``rows_per_layer`` (4,096, fewer when the model has more
than 244 layers, so a Run holds at most about a million rows, ~60 MB; never under 256); a wider layer is
stored as that many rows each summarising consecutive channels (``n_channels`` > 1: min of the minima, max of
the maxima, pooled mean and std, the largest step and the lowest SQNR among them), so outliers stay visible.
Values are float32, as the weights are. The table is not read with the Run; readers fetch one layer at a time
(``analysis.store.channels.read_channels``).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from analysis.models.base import LayerInfo
from analysis.quant.formats import PerChannel, PerGroup, PerTensor, QuantFormat, WeightSpec
from analysis.quant.primitives import choose_qparams, sqnr_db, weight_matrix
from analysis.store.channels import CHANNEL_COLUMNS, sqnr_column, step_column

MAX_CHANNEL_ROWS = 4096  # rows per layer at most; wider layers are summarised in consecutive buckets
TOTAL_CHANNEL_ROWS = 1_000_000  # rows per Run at most (~60 MB at MiniLM's 59 bytes a row), bar MIN_CHANNEL_ROWS
MIN_CHANNEL_ROWS = 256  # rows per layer at least, however many layers share the total


def rows_per_layer(n_layers: int) -> int:
    """How many rows each layer keeps: ``MAX_CHANNEL_ROWS``, fewer when the model's layers would pass
    ``TOTAL_CHANNEL_ROWS`` together, never under ``MIN_CHANNEL_ROWS``."""
    return max(MIN_CHANNEL_ROWS, min(MAX_CHANNEL_ROWS, TOTAL_CHANNEL_ROWS // max(n_layers, 1)))


def channel_steps(W: torch.Tensor, spec: WeightSpec) -> np.ndarray:
    """The quantization step each output channel of ``W`` (engine layout) gets under ``spec``, as the
    engine's ``quantize_weight`` computes it: per channel (axis 0) its own, per group the largest of its
    groups, per tensor the tensor's. NaN when the scales run along another axis than the output channel."""
    g = spec.granularity
    W2 = weight_matrix(W.detach().float())
    if isinstance(g, PerTensor):
        scale, _ = choose_qparams(W2.min(), W2.max(), spec.bits, spec.symmetric)
        return np.full(W2.shape[0], float(scale), dtype=np.float64)
    if isinstance(g, PerChannel):
        if g.axis != 0:
            return np.full(W2.shape[0], np.nan)
        scale, _ = choose_qparams(W2.amin(dim=1), W2.amax(dim=1), spec.bits, spec.symmetric)
        return scale.double().numpy()
    if isinstance(g, PerGroup):
        W_g = W2.reshape(W2.shape[0], -1, g.group_size)
        scale, _ = choose_qparams(W_g.amin(dim=2), W_g.amax(dim=2), spec.bits, spec.symmetric)
        return scale.amax(dim=1).double().numpy()
    raise TypeError(f"unknown granularity {g!r}")


def channel_powers(W2: torch.Tensor, Wq2: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per row of an ``(out, K)`` weight: the summed squares of the weight and of its quantization error
    (float64 sums of float32 terms; the whole weight's SQNR is ``sqnr_db`` of their totals)."""
    E = W2 - Wq2
    return (torch.sum(W2 * W2, dim=1, dtype=torch.float64).numpy(),
            torch.sum(E.mul_(E), dim=1, dtype=torch.float64).numpy())


def _db(signal: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """``sqnr_db`` elementwise: +inf without noise, -inf for an all-zero row that has noise."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = 10.0 * np.log10(signal / noise)
    out[noise <= 0] = np.inf
    out[(noise > 0) & (signal <= 0)] = -np.inf
    return out


def layer_channels(name: str, W: torch.Tensor, fakes: dict[str, torch.Tensor], specs: dict[str, WeightSpec],
                   powers: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
                   max_rows: int = MAX_CHANNEL_ROWS) -> pd.DataFrame:
    """The ``channels`` rows of one layer: ``W`` and each format's fake-quantized weight in engine layout
    (``powers``: each format's ``channel_powers`` when the caller has them already); a layer with more than
    ``max_rows`` output channels gets ``max_rows`` rows or fewer, each summarising consecutive channels."""
    W2 = weight_matrix(W.detach().float())
    n_out, k = W2.shape
    lo, hi = torch.aminmax(W2, dim=1)
    cols = {"min": lo.double().numpy(), "max": hi.double().numpy(),
            "sum": torch.sum(W2, dim=1, dtype=torch.float64).numpy(),
            "sum_sq": torch.sum(W2 * W2, dim=1, dtype=torch.float64).numpy()}
    for fmt, Wq in fakes.items():
        cols[step_column(fmt)] = channel_steps(W, specs[fmt])
        signal, noise = (powers or {}).get(fmt) or channel_powers(W2, weight_matrix(Wq.detach().float()))
        cols[sqnr_column(fmt)] = _db(signal, noise)
    span = math.ceil(n_out / max_rows)
    starts = np.arange(0, n_out, span)
    count = np.diff(np.append(starts, n_out))
    reduce = {"min": np.minimum, "max": np.maximum, "sum": np.add, "sum_sq": np.add}
    reduce.update({c: np.maximum for c in cols if c.startswith("step[")})
    reduce.update({c: np.minimum for c in cols if c.startswith("sqnr_db[")})
    agg = {c: (v if span == 1 else reduce[c].reduceat(v, starts)) for c, v in cols.items()}
    n = count * k
    mean = agg.pop("sum") / n
    std = np.sqrt(np.maximum(agg.pop("sum_sq") / n - mean**2, 0.0))
    df = pd.DataFrame({"layer": name, "channel": starts.astype(np.int32), "n_channels": count.astype(np.int32),
                       "min": agg["min"], "max": agg["max"],
                       "absmax": np.maximum(np.abs(agg["min"]), np.abs(agg["max"])), "mean": mean, "std": std})
    for c in cols:
        if c.startswith(("step[", "sqnr_db[")):
            df[c] = agg[c]
    df[df.columns[3:]] = df[df.columns[3:]].astype(np.float32)  # the weights are float32: so is what they give
    return df[[*CHANNEL_COLUMNS, *[c for c in df.columns if c not in CHANNEL_COLUMNS]]]


def weight_tables(model, layers: list[LayerInfo], fmts: list[QuantFormat],
                  skip: dict[tuple[str, str], str]) -> tuple[dict[tuple[str, str], float], pd.DataFrame]:
    """Each (layer, format)'s whole-weight SQNR (inf for formats that keep weights in float) and the
    ``channels`` table, from one fake-quantized weight per layer and format."""
    wsqnr: dict[tuple[str, str], float] = {}
    frames, max_rows = [], rows_per_layer(len(layers))
    for l in layers:
        W = model.weight(l.name)
        W2 = weight_matrix(W.detach().float())
        fakes, specs, powers = {}, {}, {}
        for f in fmts:
            if (l.name, f.name) in skip:
                continue
            if f.weight is None:
                wsqnr[(l.name, f.name)] = math.inf
                continue
            fakes[f.name], specs[f.name] = model.fake_weight(l.name, f), f.weight
            powers[f.name] = channel_powers(W2, weight_matrix(fakes[f.name].detach().float()))
            wsqnr[(l.name, f.name)] = sqnr_db(float(powers[f.name][0].sum()), float(powers[f.name][1].sum()))
        frames.append(layer_channels(l.name, W, fakes, specs, powers, max_rows))
        del fakes
    if not frames:
        return wsqnr, pd.DataFrame(columns=CHANNEL_COLUMNS)
    # sorted by layer name: the file's row groups then hold few layers each, and a reader of one layer skips the rest
    return wsqnr, pd.concat(frames, ignore_index=True).sort_values(["layer", "channel"], kind="stable",
                                                                     ignore_index=True)
