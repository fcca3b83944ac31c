"""Small ONNX models written for tests: the demo CNN exported, and hand-built graphs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper


def export_digits(folder: Path) -> tuple[Path, Path]:
    """``(model.onnx, data.npz)``: the demo CNN exported, and the digits eval/calib splits."""
    from analysis.data.demos import digits_arrays, digits_model
    from analysis.runtime.session import export_torch

    d = digits_arrays()
    model = export_torch(digits_model(), torch.from_numpy(d["eval_inputs"][:2]))
    onnx.save(model, folder / "digits.onnx")
    np.savez(folder / "digits.npz", inputs=d["eval_inputs"], labels=d["eval_labels"], calib_inputs=d["calib_inputs"])
    return folder / "digits.onnx", folder / "digits.npz"


def mlp_graph(*, opset: int = 17, batch: int | str = "N", constant_weight: bool = False, shared: bool = False,
              d_in: int = 64) -> onnx.ModelProto:
    """x -> MatMul(W1) -> Relu -> MatMul(W2) [-> MatMul(W2 again)] -> y, with seeded weights.

    ``constant_weight`` keeps W1 in a Constant node; ``shared`` reuses W2 (64x64) twice.
    """
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.2, (d_in, 64)).astype(np.float32)
    w2 = rng.normal(0, 0.2, (64, 64)).astype(np.float32)
    nodes, inits = [], [numpy_helper.from_array(w2, "W2")]
    if constant_weight:
        nodes.append(helper.make_node("Constant", [], ["W1"], value=numpy_helper.from_array(w1, "W1")))
    else:
        inits.append(numpy_helper.from_array(w1, "W1"))
    nodes += [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
              helper.make_node("Relu", ["h"], ["r"], name="relu"),
              helper.make_node("MatMul", ["r", "W2"], ["y" if not shared else "h2"], name="mm2")]
    if shared:
        nodes.append(helper.make_node("MatMul", ["h2", "W2"], ["y"], name="mm3"))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, d_in])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 64])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


def residual_mlp_graph(width: int = 256, blocks: int = 12, classes: int = 10) -> onnx.ModelProto:
    """x -> ``blocks`` x (h + Relu(MatMul(h, W_i))) -> Gemm(head) -> y, seeded: a sweep of 2 x (blocks + 1) layer
    jobs on a thousand samples lasts a few seconds (long enough to be interrupted)."""
    rng = np.random.default_rng(2)
    nodes, inits, h = [], [], "x"
    for i in range(blocks):
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5 / np.sqrt(width), (width, width)).astype(np.float32), f"W{i}"))
        nodes += [helper.make_node("MatMul", [h, f"W{i}"], [f"m{i}"], name=f"block{i}/mm"),
                  helper.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"block{i}/relu"),
                  helper.make_node("Add", [h, f"r{i}"], [f"h{i}"], name=f"block{i}/add")]
        h = f"h{i}"
    inits += [numpy_helper.from_array(rng.normal(0, 0.1, (classes, width)).astype(np.float32), "Wh"),
              numpy_helper.from_array(np.zeros(classes, np.float32), "bh")]
    nodes.append(helper.make_node("Gemm", [h, "Wh", "bh"], ["y"], name="head", transB=1))
    graph = helper.make_graph(nodes, "residual_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def mlp_data(folder: Path, n: int = 96, d_in: int = 64) -> Path:
    x = np.random.default_rng(1).normal(0, 1, (n, d_in)).astype(np.float32)
    np.savez(folder / "mlp.npz", inputs=x)
    return folder / "mlp.npz"


@pytest.fixture(scope="session")
def digits_onnx(tmp_path_factory):
    return export_digits(tmp_path_factory.mktemp("onnx"))


@pytest.fixture(scope="session")
def onnx_run(digits_onnx, tmp_path_factory):
    from analysis import analyze

    model, data = digits_onnx
    return analyze(str(model), str(data), tmp_path_factory.mktemp("runs") / "digits-onnx", progress=False)
