"""Counted sizes against the ONNX file ``apply`` builds, for every layer kind x format.

Each initializer of the built model is attributed to the layers whose nodes read it
(``layer_nodes``, plus a torch layer's own scope, where the export puts a 3-D Linear's bias in
an ``Add``): one layer's several nodes count it once; a tensor read by several layers (one int8
layer's output scale that is the next one's input scale) is split evenly between them. Bytes are
as stored: itemsize x size, 4-bit tensors packed two to a byte. Protobuf framing and node names
are not weights and are not counted.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from analysis import analyze
from analysis.api import apply_policy
from analysis.quant.sizes import policy_bytes
from analysis.runtime.onnx_quantize import layer_nodes
from analysis.runtime.session import resolve_model

TOLERANCE = 0.02
FORMATS = ["int8", "int4", "int8-dyn"]


def stored_bytes(t: onnx.TensorProto) -> int:
    n = int(np.prod(t.dims))
    if t.data_type in (TensorProto.UINT4, TensorProto.INT4):
        return (n + 1) // 2  # onnxruntime keeps 4-bit tensors packed, two values to a byte
    return n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def attributed_bytes(model: onnx.ModelProto, nodes_of: dict[str, list[onnx.NodeProto]]) -> dict[str, float]:
    """Layer -> bytes of the initializers its nodes read, a tensor shared by k layers counting 1/k to each."""
    inits = {t.name: stored_bytes(t) for t in model.graph.initializer}
    users: dict[str, set[str]] = {}
    for layer, nodes in nodes_of.items():
        for name in {i for n in nodes for i in n.input if i in inits}:
            users.setdefault(name, set()).add(layer)
    out = dict.fromkeys(nodes_of, 0.0)
    for name, layers in users.items():
        for layer in layers:
            out[layer] += inits[name] / len(layers)
    return out


def single_layer_graph(kind: str) -> tuple[onnx.ModelProto, tuple[int, ...]]:
    """One layer and, for ``matmul3d``, the bias ``Add`` a 3-D Linear exports to (an unquantized tensor)."""
    rng = np.random.default_rng(0)
    f32 = lambda *shape: rng.normal(0, 0.2, shape).astype(np.float32)  # noqa: E731
    if kind == "conv":  # K = 8 x 2 x 2 = 32: one int4 block per row
        nodes = [helper.make_node("Conv", ["x", "W", "B"], ["y"], name="conv")]
        inits, x, y = {"W": f32(32, 8, 2, 2), "B": f32(32)}, ("N", 8, 5, 5), ("N", 32, 4, 4)
    elif kind == "gemm":  # K = 32
        nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["y"], name="gemm", transB=1)]
        inits, x, y = {"W": f32(32, 32), "B": f32(32)}, ("N", 32), ("N", 32)
    else:  # K = 96: three int4 blocks per row, an odd number
        nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
                 helper.make_node("Add", ["h", "B"], ["y"], name="bias")]
        inits, x, y = {"W": f32(96, 24), "B": f32(24)}, ("N", 5, 96), ("N", 5, 24)
    graph = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y))],
                              [numpy_helper.from_array(a, k) for k, a in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), x[1:]


class ConvLinear(nn.Module):
    """Conv2d (K = 32), two Linear layers on 3-D tokens (MatMul + Add; K = 32 and 96) and a 2-D head (Gemm)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(8, 32, 2)
        self.up = nn.Linear(32, 96)
        self.down = nn.Linear(96, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(2).transpose(1, 2)  # (N, 25 tokens, 32)
        return self.head(self.down(torch.relu(self.up(h))).mean(1))


def conv_linear() -> nn.Module:
    return ConvLinear()


def _analyze(model: str, sample_shape: tuple[int, ...], folder, formats: list[str]):
    x = np.random.default_rng(1).normal(0, 1, (32, *sample_shape)).astype(np.float32)
    np.savez(folder / "data.npz", inputs=x)
    return analyze(model, str(folder / "data.npz"), folder / "run", formats=formats, progress=False, latency=False,
                   verify_policies=0, random_policies=0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run per model, analysed on first use: ``conv``, ``gemm``, ``matmul3d`` (ONNX) and ``torch``."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            d = tmp_path_factory.mktemp(kind)
            if kind == "torch":
                cache[kind] = _analyze(f"{__name__}:conv_linear", (8, 6, 6), d, FORMATS)
            else:
                model, sample = single_layer_graph(kind)
                onnx.save(model, d / f"{kind}.onnx")
                cache[kind] = _analyze(str(d / f"{kind}.onnx"), sample, d, FORMATS if kind != "conv" else FORMATS[:2])
        return cache[kind]

    return get


def built_and_counted(run, policy: dict[str, str]):
    """``(per layer: (format, counted, attributed), counted total, initializers in the file)``."""
    applied = apply_policy(run, {"schema": "quantlens.policy/1", "model": {"sha256": run.model_sha256},
                                 "default": "fp32", "layers": policy})
    rm = resolve_model(run)
    model = applied.model
    nodes_of = {}
    for name in run.layer_names:
        scope = f"/{name.replace('.', '/')}/"  # a torch module's nodes in the export
        nodes_of[name] = layer_nodes(model, rm.by_onnx[rm.to_onnx[name]]) + (
            [n for n in model.graph.node if n.name.startswith(scope)] if rm.exported else [])
    attributed = attributed_bytes(model, nodes_of)
    cost = run.cost.set_index(["layer", "format"])["bytes"]
    layers = {n: (applied.formats[n], int(cost[(n, applied.formats[n])]), attributed[n]) for n in run.layer_names}
    counted = policy_bytes(run.cost, applied.formats, int(run.meta["model"]["other_bytes"]))
    return layers, counted, sum(stored_bytes(t) for t in model.graph.initializer)


def assert_within(counted: float, stored: float, what: str) -> None:
    assert abs(counted - stored) <= TOLERANCE * stored, \
        f"{what}: counted {counted:.0f} B, the file holds {stored:.0f} B ({(counted - stored) / stored:+.1%})"


@pytest.mark.parametrize("kind, fmt", [("conv", "int8"), ("conv", "int4"),
                                       ("gemm", "int8"), ("gemm", "int4"), ("gemm", "int8-dyn"),
                                       ("matmul3d", "int8"), ("matmul3d", "int4"), ("matmul3d", "int8-dyn")])
def test_onnx_layer_bytes_are_what_the_file_holds(runs, kind, fmt):
    run = runs(kind)
    layers, counted, stored = built_and_counted(run, {run.layer_names[0]: fmt})
    (got, layer_counted, layer_stored), = layers.values()
    assert got == fmt
    # one layer, nothing shared with another: the count is exact, well inside the 2 % promised for real models
    assert layer_counted == layer_stored, f"{kind} {fmt}: counted {layer_counted} B, the file holds {layer_stored:.0f}"
    assert_within(counted, stored, f"{kind} {fmt} model")


@pytest.mark.parametrize("policy", [
    {"conv": "int8", "up": "int8", "down": "int8", "head": "int8"},
    {"conv": "int4", "up": "int4", "down": "int4", "head": "int4"},
    {"up": "int8-dyn", "down": "int8-dyn", "head": "int8-dyn"},  # convolutions take static int8 only
    {"conv": "int4", "up": "int8", "down": "int8-dyn"},  # mixed; the head stays fp32
], ids=["int8", "int4", "int8-dyn", "mixed"])
def test_torch_layer_bytes_are_what_the_exported_file_holds(runs, policy):
    layers, counted, stored = built_and_counted(runs("torch"), policy)
    for name, (fmt, layer_counted, layer_stored) in layers.items():
        assert fmt == policy.get(name, "fp32")
        assert_within(layer_counted, layer_stored, f"torch layer {name} at {fmt}")
    assert_within(counted, stored, f"torch model under {policy}")
