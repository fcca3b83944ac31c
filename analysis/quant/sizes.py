"""Exact bytes per layer and format, and the model's total bytes under a policy.

Bytes count the initializers the ONNX file that ``apply`` builds (``analysis.runtime.onnx_quantize``)
holds for the layer; ``tests/test_sizes_file.py`` checks them against that file:

* weight codes, packed (``ceil(n * bits / 8)``; 4-bit codes two to a byte);
* one fp32 scale per tensor / channel / group;
* weight zero points, packed at the code width, for asymmetric weights and for every format that
  quantizes the input: onnxruntime's integer kernels (``QLinearConv`` / ``QGemm`` / ``QLinearMatMul``,
  ``MatMulInteger``) take one per channel, stored even when all are 0. Group-wise 2-D weights run as
  ``MatMulNBits``, which pads each row's zero points to whole bytes (half a byte per row wasted when
  a row has an odd number of 4-bit groups);
* for group-wise convolution kernels (uint4 codes behind a blocked ``DequantizeLinear``): the kernel's
  shape, an int64 per dimension, that the dequantized (out, K) weight is reshaped to;
* the bias in fp32 (an int32 bias in integer kernels has the same size);
* for formats that quantize the input activation from a calibrated range: its fp32 scale and zero
  point, and the output's, which static integer kernels requantize (dynamic formats compute the
  input's at run time and store none).

Not exact, by a few bytes: two quantized layers in a row share one quantizer (the first's output is
the second's input), stored once and counted for each; a 2-D ``Gemm`` that cannot run as ``MatMul``
(``transA``, ``alpha``) takes the blocked int4 path but is counted as ``MatMulNBits``. A weight shared
by several layers is counted for each of them.

Latency is measured by onnxruntime and filled in separately (NaN until then).
"""
from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import pandas as pd

from analysis.quant.formats import PerChannel, PerGroup, PerTensor, QuantFormat


class LayerShape(Protocol):
    """What sizes read of a layer (``analysis.models.base.LayerInfo`` is one): its name and shapes."""

    name: str
    weight_shape: tuple[int, ...]
    has_bias: bool
    out_features: int

FP32_BYTES = 4
SHAPE_BYTES = 8  # one int64 per dimension of a Reshape target


def n_scales(weight_shape: tuple[int, ...], fmt: QuantFormat) -> int:
    g = fmt.weight.granularity
    if isinstance(g, PerTensor):
        return 1
    if isinstance(g, PerChannel):
        return weight_shape[g.axis]
    if isinstance(g, PerGroup):
        return weight_shape[0] * (int(np.prod(weight_shape[1:])) // g.group_size)
    raise TypeError(f"unknown granularity {g!r}")


def zero_point_bytes(weight_shape: tuple[int, ...], fmt: QuantFormat) -> int:
    """Bytes of the weight's stored zero points (see the module docstring); 0 where none is stored."""
    w = fmt.weight
    if w.symmetric and fmt.activation is None:
        return 0
    s = n_scales(weight_shape, fmt)
    if isinstance(w.granularity, PerGroup) and len(weight_shape) == 2:
        rows = weight_shape[0]
        return rows * math.ceil(s // rows * w.bits / 8)  # MatMulNBits: whole bytes per row
    return math.ceil(s * w.bits / 8)


def layer_bytes(info: LayerShape, fmt: QuantFormat) -> int:
    """Bytes of one layer's parameters under ``fmt`` (see the module docstring)."""
    n_weight = int(np.prod(info.weight_shape))
    bias = info.out_features * FP32_BYTES if info.has_bias else 0
    if fmt.weight is None:
        total = n_weight * FP32_BYTES + bias
    else:
        w = fmt.weight
        s = n_scales(info.weight_shape, fmt)
        total = math.ceil(n_weight * w.bits / 8) + s * FP32_BYTES + zero_point_bytes(info.weight_shape, fmt) + bias
        if isinstance(w.granularity, PerGroup) and len(info.weight_shape) > 2:
            total += SHAPE_BYTES * len(info.weight_shape)  # the blocked DequantizeLinear's Reshape target
    if fmt.activation is not None and not fmt.activation.dynamic:
        total += 2 * (FP32_BYTES + math.ceil(fmt.activation.bits / 8))  # the input's quantizer and the output's
    return total


def cost_table(layers: list[LayerShape], formats: list[QuantFormat], skip: dict[tuple[str, str], str]) -> pd.DataFrame:
    """One row per layer x format (fp32 included); formats a layer cannot take are left out."""
    rows = []
    for info in layers:
        for fmt in formats:
            if (info.name, fmt.name) in skip:
                continue
            rows.append({"layer": info.name, "format": fmt.name, "bytes": layer_bytes(info, fmt),
                         "latency_ms": float("nan"), "latency_spread_ms": float("nan"), "latency_source": ""})
    return pd.DataFrame(rows)


def policy_bytes(cost: pd.DataFrame, policy: dict[str, str], other_bytes: int, default: str = "fp32") -> int:
    """Total model bytes under ``policy``; layers it does not name take ``default``."""
    b = cost.set_index(["layer", "format"])["bytes"]
    total = other_bytes
    for layer in cost["layer"].unique():
        fmt = policy.get(layer, default)
        total += int(b.get((layer, fmt), b[(layer, "fp32")]))
    return total
