"""Exact bytes, checked against numbers worked out by hand and against the tensors onnxruntime stores.

Nothing here recomputes ``layer_bytes``' formula: the expected values are literals (the sum that
gives each is in its comment) or the sizes of the initializers in a quantized ONNX model."""
from __future__ import annotations

import numpy as np
import onnx
import pandas as pd
import pytest
from onnx import numpy_helper

from analysis import analyze
from analysis.api import apply_policy
from analysis.models.base import LayerInfo
from analysis.project.projection import Projector
from analysis.quant.formats import FP32, INT4, INT8
from analysis.quant.sizes import layer_bytes, policy_bytes
from onnx_fixtures import mlp_data, mlp_graph

# name, type, order, weight shape, bias, params, macs, in_features (K), out_features
LINEAR_3x64 = LayerInfo("fc", "Linear", 0, (3, 64), True, 195, 192, 64, 3)
LINEAR_5x32 = LayerInfo("odd", "Linear", 1, (5, 32), True, 165, 160, 32, 5)
CONV_4x8x2x2 = LayerInfo("conv", "Conv2d", 2, (4, 8, 2, 2), False, 128, 128, 32, 4)


# int8 counts the weight's zero points (the QOperator kernels store one int8 per channel, all 0) and
# the output's scale and zero point (they requantize it), which the counts before missed; int4 rows
# of 2-D weights keep their zero points in whole bytes (MatMulNBits), and int4 convolutions store
# their kernel's shape (int64 per dimension) for the Reshape after the blocked DequantizeLinear.
@pytest.mark.parametrize("info, fp32, int8, int4", [
    # fp32: (192 weights + 3 bias) x 4 = 780
    # int8: 192 codes + 3 channel scales x 4 + 3 zero points + 3 bias x 4 + input scale 4 + input zero point 1
    #       + output scale 4 + output zero point 1 = 229
    # int4: 96 bytes of codes + 6 groups x 4 + 2 zero points a row in 1 byte x 3 rows + 3 bias x 4 = 135
    (LINEAR_3x64, 780, 229, 135),
    # fp32: (160 + 5) x 4 = 660; int8: 160 + 20 + 5 + 20 + 5 + 5 = 215
    # int4: 80 + 5 groups x 4 + 1 zero point a row, in a byte of its own, x 5 rows + 5 bias x 4 = 125
    (LINEAR_5x32, 660, 215, 125),
    # no bias; fp32: 128 x 4 = 512; int8: 128 + 4 x 4 + 4 + 5 + 5 = 158
    # int4: 64 + 4 x 4 + 4 zero points in 2 bytes + shape 4 x 8 = 114
    (CONV_4x8x2x2, 512, 158, 114),
])
def test_layer_bytes_worked_out_by_hand(info, fp32, int8, int4):
    assert (layer_bytes(info, FP32), layer_bytes(info, INT8), layer_bytes(info, INT4)) == (fp32, int8, int4)


def test_policy_bytes_worked_out_by_hand():
    cost = pd.DataFrame({"layer": ["a", "a", "a", "b", "b"], "format": ["fp32", "int8", "int4", "fp32", "int8"],
                         "bytes": [100, 30, 20, 200, 60]})  # b cannot take int4
    assert policy_bytes(cost, {}, 7) == 307  # 7 + 100 + 200
    assert policy_bytes(cost, {"a": "int4"}, 7) == 227  # 7 + 20 + 200
    assert policy_bytes(cost, {"a": "int8", "b": "int4"}, 7) == 237  # b stays fp32: 7 + 30 + 200
    assert policy_bytes(cost, {"a": "fp32"}, 7, default="int8") == 167  # 7 + 100 + 60


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    """x -> MatMul(W1 64x64) -> Relu -> MatMul(W2 64x64), no bias and no other weights."""
    d = tmp_path_factory.mktemp("sizes")
    onnx.save(mlp_graph(), d / "mlp.onnx")
    return analyze(str(d / "mlp.onnx"), str(mlp_data(d)), d / "run", progress=False, latency=False, verify_policies=0,
                   random_policies=0)


def test_cost_bytes_are_what_onnxruntime_stores(mlp_run):
    a = apply_policy(mlp_run, {"schema": "quantlens.policy/1", "model": {"sha256": mlp_run.model_sha256},
                               "default": "fp32", "layers": {"mm1": "int8", "mm2": "int4"}})
    init = {t.name: numpy_helper.to_array(t) for t in a.model.graph.initializer}
    node = {n.op_type: n for n in a.model.graph.node}
    _, codes4, scales4, zeros4 = node["MatMulNBits"].input[:4]  # A, B, scales, zero_points
    # QLinearMatMul: a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point
    _, a_scale, a_zero, codes8, scales8, zeros8, y_scale, y_zero = node["QLinearMatMul"].input
    assert not init[zeros8].any()  # symmetric weights: all-zero zero points, stored all the same
    int4 = sum(init[n].nbytes for n in (codes4, scales4, zeros4))
    int8 = sum(init[n].nbytes for n in (codes8, scales8, zeros8, a_scale, a_zero, y_scale, y_zero))
    fp32 = numpy_helper.to_array(next(t for t in onnx.load(mlp_run.meta["model"]["source"]).graph.initializer
                                      if t.name == "W2")).nbytes
    assert (int8, int4, fp32) == (4426, 2624, 16384)  # 4096 + 256 + 64 + 4 + 1 + 4 + 1; 2048 + 512 + 64; 4096 x 4
    cost = mlp_run.cost.set_index(["layer", "format"])["bytes"]
    assert (cost[("mm1", "int8")], cost[("mm2", "int4")], cost[("mm2", "fp32")]) == (int8, int4, fp32)
    p = Projector(mlp_run)
    assert p.project(np.array([1, 2])).bytes == p.other_bytes + int8 + int4
