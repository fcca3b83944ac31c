"""Activations: streamed statistics of a layer's input and output, and the calibrated quantizer.

Backend-neutral: the torch and ONNX adapters fill ``ActivationStats`` while observing, and
the engine turns its ranges into one ``ActQuant`` per layer and format. Dynamic formats
quantize each tensor with its own range (``fake_quantize_dynamic``) and need no calibration.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from analysis.errors import InputError
from analysis.quant.primitives import RangeObserver, StreamingHistogram, choose_qparams, fake_quantize, qrange


@dataclass
class ActivationStats:
    ranges: dict[tuple[str, str], RangeObserver]  # (layer, "input"|"output")
    hists: dict[tuple[str, str], StreamingHistogram]


class NonFiniteActivation(InputError):
    """The FP32 model produced NaN or Inf inside on the calibration data: no range can be calibrated."""


def check_finite(ranges: dict[tuple[str, str], RangeObserver]) -> None:
    """Raise ``NonFiniteActivation`` naming the first layer tensor that held NaN or Inf."""
    for (layer, tensor), r in ranges.items():
        if r.nonfinite or not (math.isfinite(r.lo) and math.isfinite(r.hi)):
            raise NonFiniteActivation(f"the FP32 model produced NaN or Inf in the {tensor} of layer '{layer}' on the "
                                      f"calibration data ({r.nonfinite} value(s)); check the model and its inputs")


@dataclass
class ActQuant:
    """Calibrated per-tensor quantization of one layer's input."""

    scale: torch.Tensor
    zero: torch.Tensor
    qmin: int
    qmax: int

    @classmethod
    def from_range(cls, lo: float, hi: float, bits: int, symmetric: bool) -> "ActQuant":
        scale, zero = choose_qparams(torch.tensor(lo), torch.tensor(hi), bits, symmetric)
        qmin, qmax = qrange(bits, symmetric)
        return cls(scale, zero, qmin, qmax)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize(x, self.scale, self.zero, self.qmin, self.qmax)


def fake_quantize_dynamic(x: torch.Tensor, bits: int = 8, symmetric: bool = False) -> torch.Tensor:
    """``x`` quantized with one scale and zero point from its own min and max (widened to include 0),
    as onnxruntime's ``DynamicQuantizeLinear`` does at run time over the whole tensor it is fed."""
    scale, zero = choose_qparams(x.detach().min(), x.detach().max(), bits, symmetric)
    qmin, qmax = qrange(bits, symmetric)
    return fake_quantize(x, scale, zero, qmin, qmax).to(x.dtype)
