"""Exact bytes per layer and format, and the model's total bytes under a policy.

Bytes count what a runtime stores for the layer:

* weight codes, packed (``ceil(n * bits / 8)``; 4-bit codes two to a byte);
* one fp32 scale per tensor / channel / group;
* zero points for asymmetric weights, packed at the code width (symmetric ones are 0),
  and for dynamic formats, whose ``quantize_dynamic`` file stores one per channel even when 0;
* the bias in fp32 (an int32 bias in integer kernels has the same size);
* for formats that quantize the input activation from a calibrated range: its fp32 scale and
  its zero point (dynamic formats compute them at run time and store none).

Latency is measured by onnxruntime and filled in separately (NaN until then).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from analysis.quant.formats import PerChannel, PerGroup, PerTensor, QuantFormat

if TYPE_CHECKING:  # layers are described by the models layer above; only their shapes are read here
    from analysis.models.base import LayerInfo

FP32_BYTES = 4


def n_scales(weight_shape: tuple[int, ...], fmt: QuantFormat) -> int:
    g = fmt.weight.granularity
    if isinstance(g, PerTensor):
        return 1
    if isinstance(g, PerChannel):
        return weight_shape[g.axis]
    if isinstance(g, PerGroup):
        return weight_shape[0] * (int(np.prod(weight_shape[1:])) // g.group_size)
    raise TypeError(f"unknown granularity {g!r}")


def layer_bytes(info: LayerInfo, fmt: QuantFormat) -> int:
    """Bytes of one layer's parameters under ``fmt`` (see the module docstring)."""
    n_weight = int(np.prod(info.weight_shape))
    bias = info.out_features * FP32_BYTES if info.has_bias else 0
    if fmt.weight is None:
        total = n_weight * FP32_BYTES + bias
    else:
        w = fmt.weight
        s = n_scales(info.weight_shape, fmt)
        zeros = math.ceil(s * w.bits / 8) if not w.symmetric or fmt.is_dynamic else 0
        total = math.ceil(n_weight * w.bits / 8) + s * FP32_BYTES + zeros + bias
    if fmt.activation is not None and not fmt.activation.dynamic:
        total += FP32_BYTES + math.ceil(fmt.activation.bits / 8)
    return total


def cost_table(layers: list[LayerInfo], formats: list[QuantFormat], skip: dict[tuple[str, str], str]) -> pd.DataFrame:
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
