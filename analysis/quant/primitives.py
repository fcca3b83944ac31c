"""Pure tensor functions: quantization parameters, quantize / dequantize, observers.

Names follow the usual affine scheme: ``W_q = clamp(round(W_f / scale) + zero, qmin, qmax)``
and ``W_f ~ (W_q - zero) * scale``. Nothing here holds state about a model; the
streaming observers hold only running ranges and fixed-size histograms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from analysis.quant.formats import PerChannel, PerGroup, PerTensor, WeightSpec

HIST_BINS = 2048  # fine bins kept while calibrating; percentile and MSE clipping read these


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer code range: symmetric codes are centred on zero and drop the extra
    negative code (int8 -> [-127, 127]), as onnxruntime does for symmetric weights."""
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def choose_qparams(
    min_val: torch.Tensor, max_val: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map ``[min_val, max_val]`` (widened to include 0) onto the code range.

    Works elementwise, so per-tensor, per-channel and per-group ranges share it.
    Returns float32 scales and int32 zero points of the inputs' shape.
    """
    qmin, qmax = qrange(bits, symmetric)
    min_val = torch.clamp(min_val.float(), max=0.0)
    max_val = torch.clamp(max_val.float(), min=0.0)
    eps = torch.finfo(torch.float32).eps
    if symmetric:
        absmax = torch.maximum(-min_val, max_val)
        scale = torch.clamp(absmax / qmax, min=eps)
        zero = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = torch.clamp((max_val - min_val) / (qmax - qmin), min=eps)
        zero = torch.clamp(qmin - torch.round(min_val / scale), qmin, qmax).to(torch.int32)
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Integer codes (as int32) of ``x``; ``scale``/``zero`` broadcast against ``x``."""
    inv_scale = 1.0 / scale
    return torch.clamp(torch.round(x * inv_scale) + zero, qmin, qmax).to(torch.int32)


def dequantize(x_q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (x_q - zero).float() * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``dequantize(quantize(x))`` in float32, the value the quantized model computes with.

    For float32 it is computed in place on one buffer (it runs on every quantized activation of a
    sweep): the codes are integers held exactly in float32, so the result equals the integer path bit
    for bit, in the same memory layout (a later convolution picks its kernel by layout), except that
    NaN stays NaN where the integer path makes it an arbitrary code."""
    if x.dtype != torch.float32:
        return dequantize(quantize(x, scale, zero, qmin, qmax), scale, zero)
    q = torch.round(x * (1.0 / scale))  # out of place: round lays its output out as the integer path does
    return q.add_(zero).clamp_(qmin, qmax).sub_(zero).mul_(scale)


def weight_matrix(W: torch.Tensor) -> torch.Tensor:
    """A weight as ``(out, K)``: Linear as is, conv kernels flattened over (in, *kernel)."""
    return W.reshape(W.shape[0], -1)


def swap_transposed_conv_layout(W, groups: int):
    """A transposed convolution's weight, stored ``(in, out/groups, *kernel)``, as ``(out, in/groups, *kernel)``
    (a convolution's layout, the one the engine quantizes per output channel), and back: the same regrouping
    both ways. Takes a torch tensor or a numpy array and returns the same kind."""
    a, b, *k = W.shape
    return W.reshape(groups, a // groups, b, *k).swapaxes(1, 2).reshape(groups * b, a // groups, *k)


def transposed_conv_error(groups: int, spec: WeightSpec) -> str | None:
    """Why ``spec`` cannot quantize a ConvTranspose weight as onnxruntime does, or None: onnxruntime takes
    per-channel scales along the stored axis 1 (out/groups long), which is per output channel only when
    ``groups == 1``."""
    if groups > 1 and isinstance(spec.granularity, PerChannel):
        return (f"onnxruntime quantizes a grouped ConvTranspose weight (groups={groups}) per column of its stored "
                f"(in, out/groups) layout, one scale shared by {groups} output channels, not per output channel")
    return None


def group_size_error(W_shape: tuple[int, ...], spec: WeightSpec) -> str | None:
    """Why ``spec`` cannot quantize a weight of this shape, or None when it can."""
    g = spec.granularity
    if isinstance(g, PerGroup):
        k = int(np.prod(W_shape[1:]))
        if k % g.group_size:
            return f"group_size={g.group_size} does not divide the input dimension K={k}"
    if isinstance(g, PerChannel) and g.axis >= len(W_shape):
        return f"per-channel axis={g.axis} out of range for weight of rank {len(W_shape)}"
    return None


def quantize_weight(W: torch.Tensor, spec: WeightSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, scales and zero points of a weight under ``spec``.

    Shapes: per-tensor -> scale ``()``; per-channel (axis a) -> scale ``(W.shape[a],)``;
    per-group g -> codes ``(out, K//g, g)`` and scale ``(out, K//g, 1)``.
    """
    reason = group_size_error(tuple(W.shape), spec)
    if reason:
        raise ValueError(reason)
    qmin, qmax = qrange(spec.bits, spec.symmetric)
    g = spec.granularity
    W_f = W.detach().float()
    if isinstance(g, PerTensor):
        scale, zero = choose_qparams(W_f.min(), W_f.max(), spec.bits, spec.symmetric)
        return quantize(W_f, scale, zero, qmin, qmax), scale, zero
    if isinstance(g, PerChannel):
        dims = [d for d in range(W_f.dim()) if d != g.axis]
        lo = W_f.amin(dim=dims) if dims else W_f
        hi = W_f.amax(dim=dims) if dims else W_f
        scale, zero = choose_qparams(lo, hi, spec.bits, spec.symmetric)
        shape = [1] * W_f.dim()
        shape[g.axis] = -1
        return quantize(W_f, scale.view(shape), zero.view(shape), qmin, qmax), scale, zero
    if isinstance(g, PerGroup):
        W_g = weight_matrix(W_f).reshape(W_f.shape[0], -1, g.group_size)
        scale, zero = choose_qparams(W_g.amin(dim=2, keepdim=True), W_g.amax(dim=2, keepdim=True), spec.bits, spec.symmetric)
        return quantize(W_g, scale, zero, qmin, qmax), scale, zero
    raise TypeError(f"unknown granularity {g!r}")


def fake_quantize_weight(W: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """The float weight the quantized layer effectively uses, in ``W``'s shape."""
    W_q, scale, zero = quantize_weight(W, spec)
    g = spec.granularity
    if isinstance(g, PerChannel):
        shape = [1] * W.dim()
        shape[g.axis] = -1
        return dequantize(W_q, scale.view(shape), zero.view(shape))
    return dequantize(W_q, scale, zero).reshape(W.shape)


def sqnr_db(signal_power: float, noise_power: float) -> float:
    """Signal-to-quantization-noise ratio in dB from summed squares; inf when there is no noise."""
    if noise_power <= 0.0:
        return math.inf
    if signal_power <= 0.0:
        return -math.inf
    return 10.0 * math.log10(signal_power / noise_power)


@dataclass
class RangeObserver:
    """Running min and max of everything seen (the min-max observer)."""

    lo: float = math.inf
    hi: float = -math.inf
    count: int = 0
    nonfinite: int = 0  # NaN or Inf values seen: a range cannot hold them (``quant.act.check_finite``)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            self.nonfinite += int((~finite).sum())
            x = x[finite]
            if x.numel() == 0:
                return
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))
        self.count += x.numel()


@dataclass
class StreamingHistogram:
    """A fixed-range, fixed-bin histogram filled batch by batch (never holds the values)."""

    lo: float
    hi: float
    bins: int = HIST_BINS

    def __post_init__(self) -> None:
        if not self.hi > self.lo:  # constant tensors: give the single value a tiny bin
            self.hi = self.lo + max(abs(self.lo) * 1e-6, 1e-12)
        self.counts = np.zeros(self.bins, dtype=np.int64)
        self.sum_sq = 0.0
        self.sum = 0.0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1)
        self.counts += torch.histc(x, bins=self.bins, min=self.lo, max=self.hi).to(torch.int64).numpy()
        self.sum += float(x.sum(dtype=torch.float64))
        self.sum_sq += float(x.double().square_().sum())  # in place: one float64 copy of a layer's activations, not two

    @property
    def count(self) -> int:
        return int(self.counts.sum())

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, self.bins + 1)

    @property
    def centers(self) -> np.ndarray:
        e = self.edges
        return (e[:-1] + e[1:]) / 2

    def coarse(self, bins: int) -> np.ndarray:
        """Counts summed into ``bins`` equal bins over the same range (``bins`` divides ``self.bins``)."""
        if self.bins % bins:
            raise ValueError(f"bins={bins} must divide {self.bins}")
        return self.counts.reshape(bins, -1).sum(axis=1)

    def fraction_outside(self, clip_lo: float, clip_hi: float) -> float:
        """Share of values outside ``[clip_lo, clip_hi]``, read at bin resolution."""
        n = self.count
        if n == 0:
            return 0.0
        c = self.centers
        return float(self.counts[(c < clip_lo) | (c > clip_hi)].sum()) / n


def percentile_range(hist: StreamingHistogram, pct: float = 99.99) -> tuple[float, float]:
    """Clip range that keeps ``pct`` percent of the values, trimming both tails equally."""
    cdf = np.cumsum(hist.counts) / max(hist.count, 1)
    tail = (100.0 - pct) / 200.0
    e = hist.edges
    lo_i = int(np.searchsorted(cdf, tail, side="left"))
    hi_i = int(np.searchsorted(cdf, 1.0 - tail, side="left"))
    return float(e[lo_i]), float(e[min(hi_i + 1, hist.bins)])


def mse_range(hist: StreamingHistogram, bits: int, symmetric: bool, candidates: int = 100) -> tuple[float, float]:
    """Clip range minimising expected squared error (rounding noise inside, clipping error outside).

    Candidates shrink the observed range towards zero; rounding error inside the range is
    modelled as uniform (``scale**2 / 12`` per value), clipping error exactly per bin centre.
    """
    c, n = hist.centers, hist.counts.astype(np.float64)
    qmin, qmax = qrange(bits, symmetric)
    best, best_err = (hist.lo, hist.hi), math.inf
    for alpha in np.linspace(1.0, 0.05, candidates):
        lo, hi = min(hist.lo * alpha, 0.0), max(hist.hi * alpha, 0.0)
        if symmetric:
            hi = max(-lo, hi)
            lo = -hi
        scale = max((hi - lo) / (qmax - qmin), 1e-12)
        clipped = np.clip(c, lo, hi)
        inside = (c >= lo) & (c <= hi)
        err = float((n * (c - clipped) ** 2).sum() + n[inside].sum() * scale**2 / 12.0)
        if err < best_err:
            best, best_err = (lo, hi), err
    return best


def activation_range(observer: str, rng: RangeObserver, hist: StreamingHistogram, bits: int, symmetric: bool) -> tuple[float, float]:
    """The calibrated clip range of an activation under the named observer."""
    table = {
        "minmax": lambda: (rng.lo, rng.hi),
        "percentile": lambda: percentile_range(hist),
        "mse": lambda: mse_range(hist, bits, symmetric),
    }
    if observer not in table:
        raise KeyError(f"unknown observer '{observer}'; known: {', '.join(sorted(table))}")
    return table[observer]()
